"""The machine record and the one JSON report of ci/gpu-check (called by it; standard library only).

    python ci/gpu_report.py --environment FILE     # the machine: GPU, driver, CUDA, versions, date, source hash
    python ci/gpu_report.py --work DIR --error MSG --dry-run 0|1 --started EPOCH
        # reads DIR/{environment.json, steps.tsv, <step>.out, <step>.log}, prints the report, writes DIR/report.json;
        # exit status 0 when every target is met, 1 when one is not or a step failed, 2 with an error (no CUDA)
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {  # what the report names -> distributions that provide it (first found wins)
    "numpy": ["numpy"], "cupy": ["cupy-cuda13x", "cupy-cuda12x", "cupy"], "torch": ["torch"],
    "array_api_compat": ["array-api-compat", "array_api_compat"], "array_api_strict": ["array-api-strict",
    "array_api_strict"], "safetensors": ["safetensors"], "tqdm": ["tqdm"], "pytest": ["pytest"],
    "pytest_xdist": ["pytest-xdist"], "hypothesis": ["hypothesis"], "scipy": ["scipy"], "onnx": ["onnx"],
    "onnxruntime": ["onnxruntime"], "scikit_learn": ["scikit-learn"], "threadpoolctl": ["threadpoolctl"],
}
TARGETS = {  # name -> (where in the results, limit, "at most" / "at least")
    "no test failures on cupy and torch-cuda": None,
    "no test failures with the CuPy kernels on": None,
    "MNIST test accuracy >= 98.0%": ("mnist.test_accuracy_percent", 98.0, "at least"),
    "CuPy <= 1.3x PyTorch CUDA at batch 128": ("typical", 1.3, "at most"),
    "CuPy <= 1.1x PyTorch CUDA at batch 1024": ("throughput", 1.1, "at most"),
    "compute-bound >= 0.85 of the GEMM bound": ("compute", 0.85, "at least"),
}
KERNEL_TESTS = {  # CupyKernels method -> the words in the names of the tests that check it alone (test_fast_paths)
    "relu_": "relu_forward", "relu_grad": "relu_backward", "softmax_": "softmax_in_place",
    "sparse_softmax_crossentropy": "fused_sparse_crossentropy", "dense_grads": "dense_grads",
    "adam": "fast_optimizer_steps",
}
FASTER = 1.05  # a kernel is worth switching on when the portable path takes at least this much longer


# -- the machine --------------------------------------------------------------------------------------------------
def _version(dists):
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _source_sha256():
    """SHA-256 over portanet/'s Python files (path and content, sorted): names the code that was measured."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "portanet").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _command(*args):
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=10, cwd=ROOT)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "platform": platform.platform(), "cores": os.cpu_count(),
           "versions": {name: _version(dists) for name, dists in PACKAGES.items()},
           "portanet_source_sha256": _source_sha256(), "git_commit": _command("git", "rev-parse", "HEAD"),
           "nvidia_smi": _command("nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"),
           "CUPY_TF32": os.environ.get("CUPY_TF32"), "PYTHONPATH": os.environ.get("PYTHONPATH")}
    try:
        import cupy

        runtime = cupy.cuda.runtime
        count = runtime.getDeviceCount()
        if count < 1:
            raise RuntimeError("CuPy sees 0 CUDA devices")
        props = runtime.getDeviceProperties(0)
        name = props["name"]
        env["gpu"] = {"name": name.decode() if isinstance(name, bytes) else str(name), "devices": count,
                      "compute_capability": f"{props['major']}.{props['minor']}",
                      "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
                      "cuda_runtime": runtime.runtimeGetVersion(), "cuda_driver": runtime.driverGetVersion()}
    except Exception as exc:  # noqa: BLE001 - ImportError, CUDARuntimeError, no device: all mean no CUDA here
        env["cuda_error"] = f"CuPy: {type(exc).__name__}: {exc}"
    try:
        import torch

        env["torch_cuda"] = {"available": torch.cuda.is_available(), "cuda": torch.version.cuda,
                             "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    except Exception as exc:  # noqa: BLE001
        env["torch_cuda"] = {"error": f"{type(exc).__name__}: {exc}"}
    return env


# -- the report ---------------------------------------------------------------------------------------------------
def _read(work, name):
    path = work / name
    return path.read_text(errors="replace") if path.exists() else ""


def _json_in(text):
    """The last JSON object printed in ``text`` (a script's stdout), or None."""
    start = text.find("{")
    while start >= 0:
        try:
            return json.loads(text[start:])
        except ValueError:
            start = text.find("\n{", start + 1)
            start = start + 1 if start >= 0 else -1
    return None


def _pytest(work, name, step):
    """Counts and failing test ids from a pytest run's stdout."""
    text = _read(work, f"{name}.out")
    result = {"summary": None, "failed": [], **step}
    lines = [line.strip("= ").strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        counts = dict((kind, int(n)) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|"
                                                                r"xfailed|xpassed)", line))
        if counts and re.search(r" in [\d.]+s", line):
            result["summary"], result["counts"] = line, counts
            break
    result["failed"] = [line.split(" ", 1)[1] for line in lines if line.startswith(("FAILED ", "ERROR "))]
    counts = result.get("counts", {})
    result["ok"] = (step.get("exit_code") == 0 and counts.get("passed", 0) > 0 and not counts.get("failed")
                    and not counts.get("error") and not counts.get("errors"))
    return result


def _mnist(work, step):
    text = _read(work, "mnist.out")
    found = re.search(r"test accuracy ([\d.]+)% after (\d+) epochs; median ([\d.]+) s per epoch on (\S+) \((\w+)\)",
                      text)
    if not found:
        return {**step, "error": (text + _read(work, "mnist.log")).strip().splitlines()[-3:]}
    accuracy, epochs, seconds, device, backend = found.groups()
    return {**step, "test_accuracy_percent": float(accuracy), "epochs": int(epochs),
            "median_seconds_per_epoch": float(seconds), "device": device, "backend": backend}


def _script(work, name, step):
    found = _json_in(_read(work, f"{name}.out"))
    if found is None:
        return {**step, "error": _read(work, f"{name}.log").strip().splitlines()[-3:]}
    return {**step, **found}


def _mlp_value(mlp, shape, who):
    entry = (mlp.get("shapes") or {}).get(shape)
    if not entry:
        return None
    if shape == "compute":
        return entry.get("fraction_of_gemm_bound", {}).get(who)
    return entry.get("ratio_to_pytorch", {}).get(who)


def _targets(results, env) -> dict:
    out = {}
    for name, spec in TARGETS.items():
        if spec is None:  # the tests passed, with CUDA there: without it the tests of that library are only skipped
            cupy = bool(env.get("gpu"))
            both = cupy and bool((env.get("torch_cuda") or {}).get("available"))
            run, present = (results["tests"], both) if "torch-cuda" in name else (results["kernel_tests"], cupy)
            out[name] = {"value": run.get("summary"), "met": bool(run.get("ok")) and present}
            if not present:
                out[name]["note"] = "no CUDA device for CuPy or torch: their tests were skipped, not run"
            continue
        where, limit, kind = spec
        if where.startswith("mnist."):
            value, with_kernels = results["mnist"].get(where.split(".", 1)[1]), None
        else:  # shipped default (kernels off: the portable path) and with PORTANET_CUPY_KERNELS=1
            value = _mlp_value(results["mlp"], where, "portanet_portable")
            with_kernels = _mlp_value(results["mlp"], where, "portanet")
        met = value is not None and (value >= limit if kind == "at least" else value <= limit)
        out[name] = {"value": value, "limit": limit, "kind": kind, "met": met}
        if with_kernels is not None:
            out[name]["with_kernels"] = with_kernels
            out[name]["met_with_kernels"] = with_kernels >= limit if kind == "at least" else with_kernels <= limit
    return out


def _kernel_advice(results) -> dict:
    """Each CupyKernels method: correct (no test of it failed with the kernels on, nor a test of them all), its
    speed-up over the portable path, and whether both make it worth switching on."""
    tests, timings = results["kernel_tests"], results["gpu"].get("kernels") or []
    failed = tests.get("failed", [])
    ran = tests.get("counts", {}).get("passed", 0) > 0
    shared = [f for f in failed if not any(word in f for word in KERNEL_TESTS.values())]  # e.g. training matches
    advice = {}
    for row in timings:
        word = KERNEL_TESTS.get(row["kernel"], row["kernel"])
        correct = ran and not shared and not any(word in f for f in failed)
        advice[row["kernel"]] = {"correct": correct, "speedup": row["speedup"],
                                 "switch_on": correct and row["speedup"] >= FASTER}
    return advice


def report(work, error, dry_run, started) -> tuple:
    env_path = work / "environment.json"
    env = json.loads(env_path.read_text()) if env_path.exists() else {"error": "the environment was not recorded"}
    steps = {}
    for line in _read(work, "steps.tsv").splitlines():
        name, rc, seconds, limit = line.split("\t")
        steps[name] = {"exit_code": int(rc), "seconds": int(seconds), "limit_s": int(limit),
                       "timed_out": int(rc) in (124, 137)}
    not_run = {"exit_code": None, "ran": False}
    results = {
        "tests": _pytest(work, "tests", steps["tests"]) if "tests" in steps else dict(not_run),
        "kernel_tests": _pytest(work, "kernels", steps["kernels"]) if "kernels" in steps else dict(not_run),
        "mnist": _mnist(work, steps["mnist"]) if "mnist" in steps else dict(not_run),
        "mlp": _script(work, "mlp", steps["mlp"]) if "mlp" in steps else dict(not_run),
        "gpu": _script(work, "gpu", steps["gpu"]) if "gpu" in steps else dict(not_run),
    }
    targets = _targets(results, env)
    all_met = all(t["met"] for t in targets.values())
    out = {
        "gpu_check": "passed" if all_met and not error else "failed",
        "error": error or None,
        "dry_run": bool(dry_run),
        "seconds": round(time.time() - started),
        "environment": env,
        "targets": targets,
        "all_targets_met": all_met,
        "kernels": _kernel_advice(results),
        "results": results,
    }
    return out, (2 if error else 0 if all_met else 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--environment", metavar="FILE")
    p.add_argument("--work", type=Path)
    p.add_argument("--error", default="")
    p.add_argument("--dry-run", default="0")
    p.add_argument("--started", type=float, default=time.time())
    args = p.parse_args(argv)
    if args.environment:
        Path(args.environment).write_text(json.dumps(environment(), indent=2))
        return 0
    out, status = report(args.work, args.error, args.dry_run == "1", args.started)
    text = json.dumps(out, indent=2)
    (args.work / "report.json").write_text(text + "\n")
    print(text)
    return status


if __name__ == "__main__":
    sys.exit(main())
