"""The one helper the benchmark scripts share: their Markdown tables go between two marker lines of a README."""

from __future__ import annotations

from pathlib import Path


def write_section(path, markers, text=None):
    """Replace what lies between the ``markers`` (begin, end) lines of ``path`` with ``text``; None only checks that
    each marker is there once (a script checks before it measures). SystemExit naming the file otherwise."""
    doc = Path(path).read_text()
    begin, end = markers
    if doc.count(begin) != 1 or doc.count(end) != 1:
        raise SystemExit(f"--markdown {path}: expected the lines {begin} and {end} once each")
    head, rest = doc.split(begin, 1)
    if text is not None:
        Path(path).write_text(f"{head}{begin}\n{text}{end}{rest.split(end, 1)[1]}")
