"""Benchmark: what fit()'s NaN guard costs (README, "Reliability": non-finite weights are never returned).

The guard checks each step's loss before its update on host backends, reads "are the weights and the optimizer
state finite?" with every periodic read of the running loss, and keeps a snapshot of the last good state. Three
variants of the same epochs, interleaved, each the minimum over the repeats:

- ``guard``: as shipped;
- ``no state check``: the weights/optimizer finiteness reduction removed (snapshots and the loss check kept);
- ``no guard``: no loss check, no finiteness reduction, no snapshot at all.

Each runs with one read per epoch (``verbose=0``) and with 20 per epoch (what ``verbose=1`` does). ``device mode``
runs the guard's GPU path on the CPU (nothing read per step; flags accumulate on the device and ride along with the
periodic read, a snapshot at each read that found everything finite), to measure that path's work without a GPU.
``per read`` times the two things a read adds, alone: the finiteness reduction over the weights and the optimizer
state, and the snapshot of weights, state and optimizer (median of 50).

    python benchmarks/guard.py [--samples 20000] [--repeats 5] [--backends numpy,torch] [--threads 1] [--clock cpu]
                               [--json]

On a shared machine ``--threads 1 --clock cpu`` (one BLAS / torch thread, this process's CPU time) is far less
noisy than the wall clock.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time

import numpy as np

import portanet as pn
from portanet import training

WIDTHS, BATCH = (784, 256, 128, 10), 128
clock = time.perf_counter  # --clock cpu: time.process_time


class _EpochTimer(pn.Callback):
    """The epoch from on_epoch_begin to on_epoch_end, after the guard's end-of-epoch read and snapshot."""

    def on_epoch_begin(self, epoch, logs=None):
        self.start = clock()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds = clock() - self.start


@contextlib.contextmanager
def variant(name):
    """Patch the guard into one of the variants for the duration."""
    guard, saved = training._Guard, {}

    def patch(obj, attr, value):
        saved[(obj, attr)] = getattr(obj, attr)
        setattr(obj, attr, value)

    if name in ("no state check", "no guard"):
        patch(training, "_state_finite", lambda model: model.xp.asarray(True))
    if name == "no guard":
        patch(guard, "check_loss", lambda self, loss, epoch, step: None)
        patch(guard, "flags", lambda self: ())
        patch(guard, "passed", lambda self, epoch, step: setattr(self, "saved", None))
    if name.startswith("device mode"):
        init = guard.__init__

        def device_init(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self.host = False
            self.passed(0, 0)

        patch(guard, "__init__", device_init)
    try:
        yield
    finally:
        for (obj, attr), value in saved.items():
            setattr(obj, attr, value)


def _model(device):
    layers = [pn.Dense(w, "relu") for w in WIDTHS[1:-1]] + [pn.Dense(WIDTHS[-1], "softmax")]
    return pn.Model(layers, device=device, seed=0).compile("sparse_categorical_crossentropy", pn.Adam(lr=1e-3))


def per_read_seconds(device, x, y):
    """Median seconds of the state check (with its read back) and of a training snapshot, on a trained model."""
    model = _model(device)
    model.fit(x[:4 * BATCH], y[:4 * BATCH], epochs=1, batch_size=BATCH, verbose=0)
    out = {}
    for name, work in (("state check", lambda: bool(training._state_finite(model))),
                       ("snapshot", lambda: model.snapshot(training=True))):
        times = []
        for _ in range(50):
            start = clock()
            work()
            times.append(clock() - start)
        out[name] = statistics.median(times)
    return out


def epoch_seconds(device, x, y, reads):
    model = _model(device)
    model.fit(x[:4 * BATCH], y[:4 * BATCH], epochs=1, batch_size=BATCH, verbose=0)  # warm-up
    timer = _EpochTimer()
    log_every = None if reads == 1 else max(1, x.shape[0] // BATCH // reads)
    model.fit(x, y, epochs=1, batch_size=BATCH, verbose=0, log_every=log_every, callbacks=[timer])
    return timer.seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", default="numpy,torch")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for NumPy's BLAS and torch (default: leave them as they are)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    with contextlib.ExitStack() as stack:
        if args.threads:
            from threadpoolctl import threadpool_limits

            stack.enter_context(threadpool_limits(args.threads, user_api="blas"))
        run(args)


def run(args):
    rng = np.random.default_rng(0)
    x = rng.random((args.samples, WIDTHS[0]), dtype=np.float32)
    y = rng.integers(0, WIDTHS[-1], args.samples)
    variants = ["guard", "no state check", "no guard", "device mode", "device mode, no state check"]
    report = {"machine": {"python": platform.python_version(), "platform": platform.platform(), "numpy": np.__version__},
              "samples": args.samples, "widths": WIDTHS, "batch": BATCH, "repeats": args.repeats, "clock": args.clock,
              "threads": args.threads, "results": {}, "per_read": {}}
    for backend in args.backends.split(","):
        if backend == "torch":
            import torch

            if args.threads:
                torch.set_num_threads(args.threads)
            report["machine"]["torch"] = torch.__version__
        device = pn.resolve_device("cpu", None if backend == "numpy" else backend)
        report["per_read"][backend] = per_read_seconds(device, x, y)
        if not args.json:
            print(f"{backend:6s} per read: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in
                                                         report["per_read"][backend].items()), flush=True)
        for reads in (1, 20):
            times = {v: [] for v in variants}
            for _ in range(args.repeats):
                for v in variants:  # interleaved: load changes on a shared machine hit every variant alike
                    with variant(v):
                        times[v].append(epoch_seconds(device, x, y, reads))
            best = {v: min(t) for v, t in times.items()}
            row = {"seconds": best, "all": times,
                   "guard / no guard": best["guard"] / best["no guard"],
                   "guard / no state check": best["guard"] / best["no state check"],
                   "device mode / no guard": best["device mode"] / best["no guard"],
                   "device mode / device mode, no state check": best["device mode"] / best["device mode, no state check"]}
            report["results"][f"{backend}, {reads} read(s) per epoch"] = row
            if not args.json:
                print(f"{backend:6s} {reads:2d} read(s)/epoch: " + ", ".join(f"{v} {s:.3f} s" for v, s in best.items())
                      + f" | guard/no guard {row['guard / no guard']:.3f}, guard/no state check "
                      f"{row['guard / no state check']:.3f}, device mode/no guard {row['device mode / no guard']:.3f}",
                      flush=True)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()


if __name__ == "__main__":
    main()
