"""Turn the JSON of ci/gpu-check into the Markdown tables of benchmarks/README.md's GPU section.

    python benchmarks/gpu_table.py benchmarks/gpu-results.json                              # print the tables
    python benchmarks/gpu_table.py benchmarks/gpu-results.json --markdown benchmarks/README.md  # write them in place

With --markdown, what lies between the lines <!-- gpu-results:begin --> and <!-- gpu-results:end --> is replaced.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling helper, however this file is loaded
from _markdown import write_section  # noqa: E402

MARKERS = ("<!-- gpu-results:begin -->", "<!-- gpu-results:end -->")
CONTESTANTS = (("portanet_portable", "portanet (shipped: kernels off)"), ("portanet", "portanet, CuPy kernels on"),
               ("pytorch", "PyTorch CUDA (fused Adam)"), ("pytorch_default_adam", "PyTorch CUDA (default Adam)"),
               ("gemm_bound", "GEMM bound"))


def _fmt(value, spec=".3f", missing="n/a"):
    return missing if value is None else format(value, spec)


def tables(report) -> str:
    env, results = report.get("environment", {}), report.get("results", {})
    gpu, versions = env.get("gpu") or {}, env.get("versions") or {}
    lines = [f"Measured {env.get('date', '?')} by `ci/gpu-check` on {gpu.get('name', 'no GPU')} "
             f"(driver {env.get('nvidia_smi') or gpu.get('cuda_driver', '?')}, "
             f"CUDA runtime {gpu.get('cuda_runtime', '?')}); "
             f"Python {env.get('python', '?')}, CuPy {versions.get('cupy')}, PyTorch {versions.get('torch')}, "
             f"NumPy {versions.get('numpy')}; float32 without TF32 on both sides; portanet source "
             f"`{(env.get('portanet_source_sha256') or '?')[:12]}`. Check: **{report.get('gpu_check')}**"
             + (f" ({report['error']})" if report.get("error") else "") + ".", "",
             "| target | measured | limit | met | with CuPy kernels on |", "| --- | ---: | ---: | --- | ---: |"]
    for name, t in report.get("targets", {}).items():
        value = t.get("value")
        shown = _fmt(value) if isinstance(value, float) else (value if value is not None else "not measured")
        limit = f"{'>=' if t.get('kind') == 'at least' else '<='} {t['limit']}" if "limit" in t else "-"
        kernels = (f"{_fmt(t['with_kernels'])} ({'met' if t.get('met_with_kernels') else 'missed'})"
                   if "with_kernels" in t else "-")
        lines.append(f"| {name} | {shown} | {limit} | {'yes' if t.get('met') else '**no**'} | {kernels} |")
    shapes = (results.get("mlp") or {}).get("shapes") or {}
    if shapes:
        lines += ["", "Seconds per epoch (best of the repeats), and ratios to PyTorch CUDA with fused Adam "
                      "(`benchmarks/mlp.py --backend cupy`).", "",
                  "| shape | batch | " + " | ".join(label for _, label in CONTESTANTS)
                  + " | shipped / PyTorch | kernels / PyTorch | TFLOP/s shipped | fraction of GEMM bound |",
                  "| --- | ---: |" + " ---: |" * (len(CONTESTANTS) + 4)]
        for name, s in shapes.items():
            best = {k: v["min"] for k, v in s["seconds"].items()}
            ratio, flops = s.get("ratio_to_pytorch", {}), s.get("tflop_per_s", {})
            frac = s.get("fraction_of_gemm_bound", {})
            lines.append(f"| {name} {'-'.join(map(str, s['widths']))} | {s['batch']} | "
                         + " | ".join(_fmt(best.get(k)) for k, _ in CONTESTANTS)
                         + f" | **{_fmt(ratio.get('portanet_portable'))}** | {_fmt(ratio.get('portanet'))} | "
                         f"{_fmt(flops.get('portanet_portable'), '.1f')} | {_fmt(frac.get('portanet_portable'))} |")
    mnist = results.get("mnist") or {}
    if "test_accuracy_percent" in mnist:
        lines += ["", f"`examples/mnist.py --device cuda`: {mnist['test_accuracy_percent']:.2f}% test accuracy after "
                      f"{mnist['epochs']} epochs, median {mnist['median_seconds_per_epoch']:.2f} s per epoch "
                      "(training pass and test-set evaluation)."]
    prefetch = (results.get("gpu") or {}).get("prefetch") or {}
    if prefetch:
        lines += ["", "Prefetch from host data, one epoch of 784-512-256-10 (`benchmarks/gpu.py`).", "",
                  "| library | batch | s off | s on | speed-up | largest weight difference |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for library, entry in prefetch.items():
            for r in entry["runs"]:
                lines.append(f"| {library} | {r['batch_size']} | {r['seconds_prefetch_off']:.3f} | "
                             f"{r['seconds_prefetch_on']:.3f} | {r['speedup']:.2f} | "
                             f"{r['max_weight_difference']:.1e} |")
    timings = (results.get("gpu") or {}).get("kernels") or []
    advice = report.get("kernels") or {}
    if timings:
        lines += ["", "CuPy kernels against the portable path (microseconds per call; correct = its tests passed with "
                      "the kernels on).", "",
                  "| kernel | shape | us kernel | us portable | speed-up | correct | switch on |",
                  "| --- | --- | ---: | ---: | ---: | --- | --- |"]
        for row in timings:
            a = advice.get(row["kernel"], {})
            lines.append(f"| `{row['kernel']}` | {row['shape']} | {row['us_fast']} | {row['us_portable']} | "
                         f"{row['speedup']:.2f} | {'yes' if a.get('correct') else 'no'} | "
                         f"{'yes' if a.get('switch_on') else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="the JSON ci/gpu-check printed (benchmarks/gpu-results.json)")
    p.add_argument("--markdown", metavar="FILE", help="write the tables between the gpu-results markers in FILE")
    args = p.parse_args(argv)
    with open(args.results) as f:
        text = tables(json.load(f))
    if args.markdown:
        write_section(args.markdown, MARKERS, text)
    else:
        print(text, end="")
    return text


if __name__ == "__main__":
    main()
