"""Benchmark: one epoch of MLP training in portanet, PyTorch, scikit-learn and the GEMM bound, side by side.

Run from the repository root (on CPU, unset the OpenBLAS overrides for this command only, see benchmarks/README.md):
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/mlp.py [--json] [--backend numpy|cupy]
    python benchmarks/mlp.py --backend cupy --shapes typical,throughput,compute   # a GPU: also the compute-bound shape
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

import portanet as pn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling helper, however this file is loaded
from _markdown import write_section  # noqa: E402

SHAPES = {  # name -> (widths, batch size)
    "typical": ((784, 512, 256, 10), 128),
    "throughput": ((784, 512, 256, 10), 1024),
    "overhead": ((784, 64, 10), 32),
    "compute": ((4096, 4096, 4096, 10), 8192),  # matrix products dominate: for GPUs (not in the default --shapes)
}
DEFAULT_SHAPES = ("typical", "throughput", "overhead")
TARGETS = {  # backend -> {(shape, reference): the largest acceptable ratio of portanet to the reference}
    "numpy": {("typical", "pytorch"): 0.85, ("typical", "gemm_bound"): 2.0, ("throughput", "pytorch"): 1.0,
              ("throughput", "gemm_bound"): 1.4, ("overhead", "pytorch"): 0.6, ("predict", "gemm_bound"): 1.15},
    # ("compute", "gemm_fraction"): the smallest acceptable fraction of the GEMM bound's FLOP/s that portanet reaches
    "cupy": {("typical", "pytorch"): 1.3, ("throughput", "pytorch"): 1.1, ("compute", "gemm_fraction"): 0.85},
}
PREDICT_BATCH = 4096
SWEEP_BATCHES = (16, 32, 64, 128, 256, 512, 1024, 2048)
SWEEP_WIDTHS = (32, 64, 128, 256, 512, 1024, 2048)
LR = 1e-3
clock = time.perf_counter  # --clock cpu: time.process_time, this process's CPU time (see the README)


# -- data ---------------------------------------------------------------------------------------
def make_data(samples: int, seed: int = 0, features: int = 784):
    """MNIST-shaped float32 data: (samples, features) pixels in [0, 1), 10 classes from a fixed random linear
    teacher."""
    rng = np.random.default_rng(seed)
    x = rng.random((samples, features), dtype=np.float32)
    teacher = rng.standard_normal((features, 10), dtype=np.float32)
    y = np.argmax(x @ teacher - 0.5 * teacher.sum(axis=0), axis=1).astype(np.int64)  # (x - 0.5) @ teacher, no copy
    return x, y


def gemm_flops(widths, samples: int) -> int:
    """Floating-point operations of the matrix products of one epoch over ``samples`` rows (what the GEMM bound
    times): forward h @ W and weight gradients h.T @ g for every layer, input gradients g @ W.T for all but the
    first; 2 * m * n * k each."""
    pairs = [a * b for a, b in zip(widths[:-1], widths[1:])]
    return 2 * samples * (2 * sum(pairs) + sum(pairs[1:]))


# -- the contestants ----------------------------------------------------------------------------
def _portanet_model(widths, device, seed=0):
    layers = [pn.Dense(w, activation="relu") for w in widths[1:-1]] + [pn.Dense(widths[-1], activation="softmax")]
    model = pn.Model(layers, device=device, seed=seed)
    model.compile(loss="sparse_categorical_crossentropy", optimizer=pn.Adam(lr=LR))
    return model.build(widths[0])


class _EpochTimer(pn.Callback):
    """The epoch as callbacks see it: from on_epoch_begin to on_epoch_end, after the loss was read back; the device
    is synchronised at both ends (GPUs queue work), and fit()'s one-time input checks are not part of it."""

    def on_epoch_begin(self, epoch, logs=None):
        self.model.device.synchronize()
        self.start = clock()

    def on_epoch_end(self, epoch, logs=None):
        self.model.device.synchronize()
        self.seconds = clock() - self.start


def time_portanet(widths, batch, x, y, device, steps=None):
    """Seconds for one ``fit`` epoch over x (or its first ``steps`` batches), after a short warm-up."""
    model = _portanet_model(widths, device)
    n = x.shape[0] if steps is None else min(x.shape[0], steps * batch)
    model.fit(x[:4 * batch], y[:4 * batch], epochs=1, batch_size=batch, verbose=0)
    timer = _EpochTimer()
    model.fit(x[:n], y[:n], epochs=1, batch_size=batch, verbose=0, callbacks=[timer])
    return timer.seconds


class Torch:
    """The same network in PyTorch: Linear/ReLU stack, cross-entropy on logits, Adam; loss summed on the device."""

    def __init__(self, device, fused_adam=True):
        import torch

        self.torch, self.device, self.fused_adam = torch, torch.device(device), fused_adam

    def _synchronize(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def epoch_seconds(self, widths, batch, x, y, steps=None):
        torch, nn = self.torch, self.torch.nn
        mods = []
        for i in range(len(widths) - 1):
            mods += [nn.Linear(widths[i], widths[i + 1])] + ([nn.ReLU()] if i < len(widths) - 2 else [])
        net = nn.Sequential(*mods).to(self.device)
        opt = torch.optim.Adam(net.parameters(), lr=LR, **({"fused": True} if self.fused_adam else {}))
        n = x.shape[0] if steps is None else min(x.shape[0], steps * batch)

        def epoch(n):
            perm, total = torch.randperm(n, device=self.device), torch.zeros((), device=self.device)
            for start in range(0, n, batch):
                rows = perm[start:start + batch]
                xb, yb = x[rows], y[rows]
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(net(xb), yb)
                loss.backward()
                opt.step()
                total += loss.detach() * rows.shape[0]
            return float(total) / n

        epoch(min(4 * batch, x.shape[0]))
        self._synchronize()
        start = clock()
        epoch(n)
        self._synchronize()
        return clock() - start


def time_sklearn(widths, batch, x, y):
    """Seconds for ``MLPClassifier(...).fit`` with ``max_iter=1``: one epoch of Adam at the same batch size."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=widths[1:-1], activation="relu", solver="adam", alpha=0.0, batch_size=batch,
                        learning_rate_init=LR, max_iter=1, shuffle=True, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        start = clock()
        clf.fit(x, y)
        return clock() - start


def _weights(widths, device, seed=1):
    rng = np.random.default_rng(seed)
    return [device.from_host(rng.standard_normal((a, b), dtype=np.float32) * math.sqrt(2.0 / a))
            for a, b in zip(widths[:-1], widths[1:])]


def time_gemm_bound(widths, batch, x_dev, device, steps=None, backward=True):
    """Seconds for the matrix products of one epoch alone: forward h @ W, backward h.T @ g and g @ W.T
    (no input gradient for the first layer, as in every framework here), on contiguous batches of ``x_dev``."""
    weights = _weights(widths, device)
    n = x_dev.shape[0] if steps is None else min(x_dev.shape[0], steps * batch)

    def epoch(n):
        for start in range(0, n, batch):
            hs = [x_dev[start:min(start + batch, n), :]]  # array-API indexing: explicit axes, stop in range
            for w in weights:
                hs.append(hs[-1] @ w)
            if backward:
                g = hs[-1]  # stands in for dL/dz: only the shapes matter
                for i in range(len(weights) - 1, -1, -1):
                    hs[i].T @ g
                    if i:
                        g = g @ weights[i].T
        device.synchronize()

    epoch(min(4 * batch, x_dev.shape[0]))
    start = clock()
    epoch(n)
    return clock() - start


def time_predict(widths, x, device):
    model = _portanet_model(widths, device)
    model.predict(x[:PREDICT_BATCH], batch_size=PREDICT_BATCH)
    device.synchronize()
    start = clock()
    model.predict(x, batch_size=PREDICT_BATCH)
    device.synchronize()
    return clock() - start


# -- peak memory (one child process per contestant, so high-water marks do not mix) ----------------
def _status_mb(field):
    """VmRSS (now) or VmHWM (peak) of this process in MiB, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _rss_mb():
    """Resident memory now, after resetting the peak to it where the kernel allows (so the peak is this run's)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_mb("VmRSS")


def peak_memory_child(args):
    """Train ``args.steps`` batches of one contestant; print the peak memory above the data in MiB."""
    widths, batch = SHAPES[args.shape]
    x, y = make_data(args.samples)
    if args.backend == "cupy" and args.peak_memory == "portanet":
        import cupy

        x, y = cupy.asarray(x), cupy.asarray(y)
        pool = cupy.get_default_memory_pool()
        base = pool.used_bytes()
        time_portanet(widths, batch, x, y, pn.resolve_device("cuda"), steps=args.steps)
        print(json.dumps({"peak_mb": (pool.total_bytes() - base) / 2**20, "kind": "cupy pool"}))
        return
    if args.backend == "cupy":
        import torch

        xt, yt = torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        Torch("cuda").epoch_seconds(widths, batch, xt, yt, steps=args.steps)
        print(json.dumps({"peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20, "kind": "torch cuda"}))
        return
    if args.peak_memory == "pytorch":
        import torch

        torch.set_num_threads(args.threads)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        base = _rss_mb()
        Torch("cpu").epoch_seconds(widths, batch, xt, yt, steps=args.steps)
    else:
        device = pn.resolve_device("cpu", backend=args.backend)
        base = _rss_mb()
        time_portanet(widths, batch, x, y, device, steps=args.steps)
    # not getrusage's ru_maxrss: it keeps the parent's high-water mark across fork and exec
    print(json.dumps({"peak_mb": _status_mb("VmHWM") - base, "kind": "rss"}))


def peak_memory(args, contestant, shape):
    cmd = [sys.executable, __file__, "--peak-memory", contestant, "--shape", shape, "--samples", str(args.samples),
           "--backend", args.backend, "--threads", str(args.threads), "--steps", "200"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        return None
    return round(json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"], 1)


# -- orchestration ------------------------------------------------------------------------------
def machine_info(args) -> dict:
    info = {"date": datetime.date.today().isoformat(), "platform": platform.platform(), "cpu": _cpu_name(),
            "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "portanet": pn.__version__, "backend": args.backend, "threads": args.threads,
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"), "blas": _blas_kernel(), "clock": args.clock,
            "load_average_at_start": os.getloadavg()[0]}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        torch = None
    if args.backend == "cupy":
        info.update(gpu_info(torch))
    return info


def gpu_info(torch=None) -> dict:
    """The first CUDA device, CuPy's and CUDA's versions, and the float32 matrix-product precision of each side."""
    import cupy

    runtime = cupy.cuda.runtime
    name = runtime.getDeviceProperties(0)["name"]
    info = {"gpu": name.decode() if isinstance(name, bytes) else str(name), "cupy": cupy.__version__,
            "cuda_runtime": runtime.runtimeGetVersion(), "cuda_driver": runtime.driverGetVersion(),
            "CUPY_TF32": os.environ.get("CUPY_TF32", "unset (off)"),
            "cupy_kernels": os.environ.get("PORTANET_CUPY_KERNELS") == "1"}
    if torch is not None:
        info["torch_cuda"] = torch.version.cuda
        info["torch_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return info


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _blas_kernel():
    from threadpoolctl import threadpool_info

    for lib in threadpool_info():
        if lib["user_api"] == "blas" and "numpy" in lib["filepath"]:
            return f"{lib['internal_api']} {lib.get('version')} {lib.get('architecture')} ({lib['num_threads']} threads)"
    return "unknown"


def _numpy_blas_threads():
    from threadpoolctl import threadpool_info

    return next((lib["num_threads"] for lib in threadpool_info()
                 if lib["user_api"] == "blas" and "numpy" in lib["filepath"]), os.cpu_count())


def _summary(times):
    return {"min": round(min(times), 4), "median": round(statistics.median(times), 4), "all": [round(t, 4) for t in times]}


class Run:
    """Holds the data on each side once and times every contestant for one shape per call, in rotating order."""

    def __init__(self, args):
        self.args = args
        self.device = pn.resolve_device("cuda" if args.backend == "cupy" else "cpu",
                                        backend=None if args.backend == "cupy" else args.backend)
        try:
            import torch
        except ImportError:
            torch = None
        else:
            torch.set_num_threads(args.threads)
        self.torch = torch
        self._data = {}
        self.x, self.y, self.x_dev = self.data(784)[:3]

    def data(self, features) -> tuple:
        """``(x, y, x_dev, fit_x, fit_y, x_torch, y_torch)`` for inputs of ``features`` columns, made once: host
        arrays, x on the device, what ``fit`` gets (device arrays on a GPU) and PyTorch's copies."""
        if features not in self._data:
            samples = self.args.samples if features == 784 else self.args.compute_samples
            x, y = make_data(samples, features=features)
            x_dev = self.device.from_host(x)
            fit_x, fit_y = (x_dev, self.device.from_host(y)) if self.args.backend == "cupy" else (x, y)
            xt = yt = None
            if self.torch is not None:
                tdev = "cuda" if self.args.backend == "cupy" else "cpu"
                xt, yt = self.torch.from_numpy(x).to(tdev), self.torch.from_numpy(y).to(tdev)
            self._data[features] = (x, y, x_dev, fit_x, fit_y, xt, yt)
        return self._data[features]

    def contestants(self, features) -> dict:
        _, _, x_dev, fit_x, fit_y, xt, yt = self.data(features)
        found = {
            "portanet": lambda w, b: time_portanet(w, b, fit_x, fit_y, self.device),
            "portanet_portable": lambda w, b: time_portanet(w, b, fit_x, fit_y, self.device.portable()),
            "gemm_bound": lambda w, b: time_gemm_bound(w, b, x_dev, self.device),
        }
        if self.torch is not None:
            tdev = "cuda" if self.args.backend == "cupy" else "cpu"
            fused, plain = Torch(tdev, fused_adam=True), Torch(tdev, fused_adam=False)
            found["pytorch"] = lambda w, b: fused.epoch_seconds(w, b, xt, yt)
            found["pytorch_default_adam"] = lambda w, b: plain.epoch_seconds(w, b, xt, yt)
        return found

    def shape(self, name) -> dict:
        widths, batch = SHAPES[name]
        x, y = self.data(widths[0])[:2]
        contestants = self.contestants(widths[0])
        times = {k: [] for k in contestants}
        order = list(contestants)
        for r in range(self.args.repeats):
            for k in order[r % len(order):] + order[:r % len(order)]:
                times[k].append(contestants[k](widths, batch))
        result = {"widths": list(widths), "batch": batch, "samples": x.shape[0],
                  "seconds": {k: _summary(v) for k, v in times.items()}}
        if self.args.sklearn and self.args.backend != "cupy":
            try:
                result["seconds"]["sklearn"] = _summary([time_sklearn(widths, batch, x, y)])
            except ImportError:
                pass
        best = {k: v["min"] for k, v in result["seconds"].items()}
        for ref in ("pytorch", "gemm_bound"):
            if ref in best:
                result[f"ratio_to_{ref}"] = {k: round(v / best[ref], 3) for k, v in best.items() if k != ref}
        flops = gemm_flops(widths, x.shape[0])  # every contestant does these products, and the GEMM bound only these
        result["gemm_tflop_per_epoch"] = round(flops / 1e12, 4)
        result["tflop_per_s"] = {k: round(flops / v / 1e12, 3) for k, v in best.items()}
        result["fraction_of_gemm_bound"] = {k: round(best["gemm_bound"] / v, 3) for k, v in best.items()
                                            if k != "gemm_bound"}
        if "pytorch" in times:  # the same ratio per repeat (each pair measured back to back), then the median
            result["ratio_to_pytorch_median_of_repeats"] = round(statistics.median(
                p / t for p, t in zip(times["portanet"], times["pytorch"])), 3)
        result["ratio_to_gemm_bound_median_of_repeats"] = round(statistics.median(
            p / g for p, g in zip(times["portanet"], times["gemm_bound"])), 3)
        if self.args.memory:
            result["peak_memory_mb"] = {k: peak_memory(self.args, k, name) for k in ("portanet", "pytorch")}
        return result

    def predict(self) -> dict:
        widths = SHAPES["typical"][0]
        pred, bound = [], []
        for _ in range(self.args.repeats):
            pred.append(time_predict(widths, self.x_dev if self.args.backend == "cupy" else self.x, self.device))
            bound.append(time_gemm_bound(widths, PREDICT_BATCH, self.x_dev, self.device, backward=False))
        return {"widths": list(widths), "batch": PREDICT_BATCH, "seconds": {"predict": _summary(pred),
                "forward_gemm_bound": _summary(bound)}, "ratio_to_gemm_bound": round(min(pred) / min(bound), 3),
                "samples_per_second": round(self.x.shape[0] / min(pred))}

    def sweep(self) -> dict:
        """Microseconds per training sample over ``SWEEP_STEPS`` steps: vs batch size (784-512-256-10) and vs width
        (784-w-w-10 at batch 128)."""
        rows = []
        points = [("batch", b, (784, 512, 256, 10), b) for b in SWEEP_BATCHES]
        points += [("width", w, (784, w, w, 10), 128) for w in SWEEP_WIDTHS]
        steps = self.args.sweep_steps
        for axis, value, widths, batch in points:
            n = min(steps * batch, self.x.shape[0])
            row = {"axis": axis, "value": value, "widths": list(widths), "batch": batch}
            for k in ("portanet", "pytorch", "gemm_bound"):
                if k != "pytorch" or self.torch is not None:
                    row[k] = round(1e6 * min(self._partial(k, widths, batch, steps) for _ in range(2)) / n, 3)
            rows.append(row)
        return {"steps": steps, "unit": "microseconds per sample", "rows": rows}

    def _partial(self, k, widths, batch, steps):
        x = self.x_dev if self.args.backend == "cupy" else self.x
        if k == "portanet":
            return time_portanet(widths, batch, x, self.y if self.args.backend != "cupy" else
                                 self.device.from_host(self.y), self.device, steps=steps)
        if k == "gemm_bound":
            return time_gemm_bound(widths, batch, self.x_dev, self.device, steps=steps)
        import torch

        tdev = "cuda" if self.args.backend == "cupy" else "cpu"
        return Torch(tdev).epoch_seconds(widths, batch, torch.from_numpy(self.x).to(tdev),
                                         torch.from_numpy(self.y).to(tdev), steps=steps)


def check_targets(report) -> dict:
    """Which of the targets for this backend hold in this run (those measured). On CuPy each target is checked for
    portanet as run (``PORTANET_CUPY_KERNELS`` decides its kernels) and for the portable path (kernels off)."""
    met = {}
    backend = report["machine"]["backend"]
    for (shape, ref), limit in TARGETS.get(backend, {}).items():
        entry = report.get("predict") if shape == "predict" else report["shapes"].get(shape)
        if entry is None:
            continue
        if ref == "gemm_fraction":  # at least this fraction of the GEMM bound's FLOP/s
            for who in ("portanet", "portanet_portable") if backend == "cupy" else ("portanet",):
                fraction = entry["fraction_of_gemm_bound"].get(who)
                met[f"{shape} {who} fraction of gemm_bound"] = {"ratio": fraction, "target": limit,
                                                                "met": fraction >= limit, "at_least": True}
            continue
        ratio = entry["ratio_to_gemm_bound"] if shape == "predict" else entry.get(f"ratio_to_{ref}", {}).get("portanet")
        if ratio is not None:
            met[f"{shape} vs {ref}"] = {"ratio": ratio, "target": limit, "met": ratio <= limit}
        portable = entry.get(f"ratio_to_{ref}", {}).get("portanet_portable") if backend == "cupy" else None
        if portable is not None:
            met[f"{shape} portable path vs {ref}"] = {"ratio": portable, "target": limit, "met": portable <= limit}
        if ref == "pytorch" and "pytorch_default_adam" in entry.get("seconds", {}):  # the same limit, weaker rival
            seconds = {k: v["min"] for k, v in entry["seconds"].items()}
            ratio = round(seconds["portanet"] / seconds["pytorch_default_adam"], 3)
            met[f"{shape} vs pytorch_default_adam"] = {"ratio": ratio, "target": limit, "met": ratio <= limit}
    return met


# -- output -------------------------------------------------------------------------------------
def markdown(report) -> str:
    m = report["machine"]
    gpu = f"{m['gpu']} (CuPy {m['cupy']}, CUDA runtime {m['cuda_runtime']}) with " if "gpu" in m else ""
    lines = [f"Measured {m['date']} on {gpu}{m['cpu']} ({m['cores']} cores), {m['platform']}; Python {m['python']}, "
             f"NumPy {m['numpy']} with {m['blas']}, PyTorch {m.get('torch', 'absent')}; backend `{m['backend']}`, "
             f"{m['threads']} thread(s) for NumPy's BLAS and PyTorch; "
             f"{report['samples']} samples; {m['clock']} clock; each time is the minimum of {report['repeats']} "
             f"repeats (sklearn: one run), all in one process; load average {m['load_average_at_start']:.1f} at the "
             f"start, {m['load_average_at_end']:.1f} at the end.", "",
             "| shape | batch | portanet s/epoch | portable path | PyTorch (fused Adam) | PyTorch (default Adam) "
             "| sklearn | GEMM bound | portanet / PyTorch | portanet / GEMM bound | PyTorch / GEMM bound "
             "| peak MiB portanet / PyTorch |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, s in report["shapes"].items():
        sec = {k: v["min"] for k, v in s["seconds"].items()}
        cell = lambda k: f"{sec[k]:.3f}" if k in sec else "n/a"  # noqa: E731
        r_pt, r_gb = s.get("ratio_to_pytorch", {}), s["ratio_to_gemm_bound"]
        mem = s.get("peak_memory_mb") or {}
        lines.append(
            f"| {name} {'-'.join(map(str, s['widths']))} | {s['batch']} | {cell('portanet')} | "
            f"{cell('portanet_portable')} | {cell('pytorch')} | {cell('pytorch_default_adam')} | {cell('sklearn')} | "
            f"{cell('gemm_bound')} | **{r_pt.get('portanet', 'n/a')}** | **{r_gb['portanet']}** | "
            f"{r_gb.get('pytorch', 'n/a')} | {mem.get('portanet', 'n/a')} / {mem.get('pytorch', 'n/a')} |")
    if "predict" in report:
        p = report["predict"]
        lines += ["", f"predict, 784-512-256-10 at batch {p['batch']}: {p['seconds']['predict']['min']:.3f} s for "
                      f"{report['samples']} samples ({p['samples_per_second']:,} samples/s); forward GEMM bound "
                      f"{p['seconds']['forward_gemm_bound']['min']:.3f} s; ratio **{p['ratio_to_gemm_bound']}**."]
    if report.get("targets"):
        lines += ["", "| target | measured | limit | met |", "| --- | ---: | ---: | --- |"]
        lines += [f"| {k} | {v['ratio']} | {'>=' if v.get('at_least') else '<='} {v['target']} | "
                  f"{'yes' if v['met'] else 'no'} |" for k, v in report["targets"].items()]
    if "sweep" in report:
        sw = report["sweep"]
        lines += ["", f"Cost curve: microseconds per training sample ({sw['steps']} steps per point, best of 2).", "",
                  "| varied | value | widths @ batch | portanet | PyTorch (fused Adam) | GEMM bound | portanet / GEMM |",
                  "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
        for r in sw["rows"]:
            lines.append(f"| {r['axis']} | {r['value']} | {'-'.join(map(str, r['widths']))} @ {r['batch']} | "
                         f"{r['portanet']} | {r.get('pytorch', 'n/a')} | {r['gemm_bound']} | "
                         f"{r['portanet'] / r['gemm_bound']:.2f} |")
    return "\n".join(lines) + "\n"


MARKERS = ("<!-- results:begin -->", "<!-- results:end -->")


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, axis, label in ((axes[0], "batch", "batch size (784-512-256-10)"), (axes[1], "width", "width w (784-w-w-10, batch 128)")):
        rows = [r for r in report["sweep"]["rows"] if r["axis"] == axis]
        for k, style, name in (("portanet", "o-", "portanet"), ("pytorch", "s--", "PyTorch (fused Adam)"),
                               ("gemm_bound", "k:", "GEMM bound")):
            if k in rows[0]:
                ax.plot([r["value"] for r in rows], [r[k] for r in rows], style, label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("µs per training sample")
        ax.legend()
    fig.suptitle(f"portanet ({report['machine']['backend']}) on {report['machine']['cpu']}, {report['machine']['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="numpy", help="portanet backend: numpy (CPU, default), cupy (CUDA), torch, array_api_strict")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                   help=f"comma-separated subset of {list(SHAPES)} (default: {','.join(DEFAULT_SHAPES)})")
    p.add_argument("--samples", type=int, default=60000, help="rows of MNIST-shaped data (default 60000)")
    p.add_argument("--compute-samples", type=int, default=65536,
                   help="rows of 4096-feature data for the compute shape (default 65536: 8 batches of 8192)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per contestant; the minimum is reported")
    p.add_argument("--threads", type=int, default=None, help="BLAS and PyTorch threads (default: NumPy's BLAS threads)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time (default), or this process's CPU time: robust on a busy machine with --threads 1")
    p.add_argument("--no-sklearn", dest="sklearn", action="store_false", help="skip scikit-learn")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory child processes")
    p.add_argument("--no-predict", dest="predict", action="store_false", help="skip the predict throughput check")
    p.add_argument("--sweep", action="store_true", help="also time vs batch size and width (the cost curve)")
    p.add_argument("--sweep-steps", type=int, default=30, help="training steps per sweep point")
    p.add_argument("--plot", metavar="PNG", help="draw the sweep to this PNG (needs --sweep and matplotlib)")
    p.add_argument("--markdown", metavar="FILE", help="write the results as Markdown between the markers in FILE")
    p.add_argument("--peak-memory", choices=("portanet", "pytorch"), help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=200, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    global clock
    args = parse_args(argv)
    if args.markdown:
        write_section(args.markdown, MARKERS)  # fail before measuring, not after
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads is None:
        args.threads = _numpy_blas_threads()
    from threadpoolctl import threadpool_limits

    with threadpool_limits(args.threads, user_api="blas"):
        if args.peak_memory:
            return peak_memory_child(args)
        if os.environ.get("OPENBLAS_CORETYPE") and args.backend == "numpy":
            print("note: OPENBLAS_CORETYPE is set, which selects a slower OpenBLAS kernel; for the published figures "
                  "run with `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE`", file=sys.stderr)
        t0 = time.perf_counter()
        run = Run(args)
        report = {"machine": machine_info(args), "samples": args.samples, "repeats": args.repeats, "shapes": {}}
        for name in args.shapes.split(","):
            if name not in SHAPES:
                raise SystemExit(f"--shapes: unknown shape {name!r}; choose from {list(SHAPES)}")
            report["shapes"][name] = run.shape(name)
            print(f"measured {name} at {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if args.predict:
            report["predict"] = run.predict()
        if args.sweep:
            report["sweep"] = run.sweep()
        report["targets"] = check_targets(report)
        report["machine"]["load_average_at_end"] = os.getloadavg()[0]
    if args.plot and "sweep" in report:
        plot(report, args.plot)
    if args.markdown:
        write_section(args.markdown, MARKERS, markdown(report))
    print(json.dumps(report, indent=1) if args.json else markdown(report))
    return report


if __name__ == "__main__":
    main()
