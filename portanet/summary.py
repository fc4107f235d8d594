"""Model summaries: one row per layer (name and type, output shape, activation, parameters) and the total, as
text for a terminal or as an HTML table for a notebook.

Reads a model's public structure only; computes nothing on the device.
"""

from __future__ import annotations

import html
import math

__all__ = ["rows", "text", "html_table"]


def rows(model):
    """``(title, rows, total)``: one row of strings per layer; shapes and counts are "?" until the input width is
    known."""
    dim = model.input_dim if model.input_dim is not None else (model.layers[0].input_dim if model.layers else None)
    title = (f"Model on {model.device.name} ({model.backend}, {model.dtype}), input "
             f"{'(batch, ?)' if dim is None else f'(batch, {dim})'}")
    table, total = [], 0
    for layer in model.layers:
        activation = getattr(layer, "activation", None)
        count, shape = "?", "(batch, ?)"
        if dim is not None:
            count = sum(math.prod(s) for s in layer.param_shapes(dim).values())
            total += count
            dim = layer.output_dim(dim)
            shape = f"(batch, {dim})"
        table.append((f"{layer.name} ({type(layer).__name__})", shape, "" if activation is None else activation.name,
                      "?" if count == "?" else f"{count:,}"))
    return title, table, "?" if any(row[3] == "?" for row in table) else f"{total:,}"


_HEADER = ("Layer (type)", "Output shape", "Activation", "Params")


def text(model) -> str:
    """The summary as a fixed-width table."""
    title, table, total = rows(model)
    cells = [_HEADER, *table]
    widths = [max(len(row[i]) for row in cells) for i in range(4)]

    def line(row):
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    rule = "-" * len(line(_HEADER))
    total_line = "Total params: ? (not built yet)" if total == "?" else f"Total params: {total}"
    return "\n".join([title, line(_HEADER), rule, *map(line, table), rule, total_line])


def html_table(model) -> str:
    """The summary as an HTML table (what Jupyter shows for a model)."""
    title, table, total = rows(model)
    esc = html.escape
    head = "".join(f"<th>{h}</th>" for h in _HEADER)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row[:3]) +
                   f"<td style='text-align:right'>{row[3]}</td></tr>" for row in table)
    return (f"<table><caption>{esc(title)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody><tfoot><tr>"
            f"<td colspan='3'>Total params</td><td style='text-align:right'>{total}</td></tr></tfoot></table>")
