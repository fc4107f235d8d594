"""GPU benchmarks: an epoch from host data with the prefetch on vs off (CuPy, PyTorch CUDA), and each CuPy kernel
against the portable code it replaces.

prefetch: one epoch of the 784-512-256-10 MLP from host (NumPy) data uploaded batch by batch, ``prefetch=True``
(CuPy: pinned double buffer on a side stream; torch: pinned, non_blocking copies) against ``prefetch=False``; same
model, seed and batches both ways: seconds per epoch, samples/s, speed-up, largest weight difference (0 or round-off).
kernels: microseconds per call of each ``CupyKernels`` method and of the portable array-API code it stands in for,
on the shapes of that MLP (batch 1024), whatever ``PORTANET_CUPY_KERNELS`` says: the evidence for switching a
kernel on. Prints JSON; needs a CUDA device (exits 2 with a message otherwise).

    python benchmarks/gpu.py [--samples 262144] [--batch-sizes 128,1024] [--repeats 3] [--backends cupy,torch]
                             [--no-kernels]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

import portanet as pn

WIDTHS = (784, 512, 256, 10)
CALLS, ROUNDS = 200, 5  # kernel timings: calls per round, rounds (the median is reported)


def _cuda_device(backend):
    try:
        return pn.resolve_device("cuda", backend=backend)
    except (ImportError, RuntimeError, ValueError) as exc:
        print(json.dumps({"benchmark": "gpu", "error": f"{backend}: {exc}"}))
        print(f"benchmarks/gpu.py: needs a CUDA device and {backend}: {exc}", file=sys.stderr)
        sys.exit(2)


def _model(device, widths=WIDTHS):
    model = pn.Model([pn.Dense(w, "relu") for w in widths[1:-1]] + [pn.Dense(widths[-1], "softmax")],
                     device=device, seed=0)
    return model.compile("sparse_categorical_crossentropy", pn.Adam(lr=1e-3)).build(widths[0])


def _epoch(device, x, y, batch_size, prefetch):
    """Seconds for one synchronized epoch (after a short warm-up) and the final weights on the host."""
    def stream(rows):
        return pn.data.Batches(x[:rows], y[:rows], batch_size=batch_size, device=device, y_dtype="int",
                               prefetch=prefetch)

    _model(device).fit(stream(8 * batch_size), epochs=1, verbose=0)
    model = _model(device)
    device.synchronize()
    start = time.perf_counter()
    model.fit(stream(len(x)), epochs=1, verbose=0)
    device.synchronize()
    seconds = time.perf_counter() - start
    return seconds, {k: pn.to_numpy(v) for k, v in model.parameters().items()}


def prefetch(device, x, y, batch_sizes, repeats) -> list:
    runs = []
    for batch_size in batch_sizes:
        timings, weights = {}, {}
        for on in (False, True):
            done = [_epoch(device, x, y, batch_size, on) for _ in range(repeats)]
            timings[on] = min(s for s, _ in done)
            weights[on] = done[-1][1]
        diff = max(float(np.max(np.abs(weights[True][k] - weights[False][k]))) for k in weights[True])
        runs.append({
            "batch_size": batch_size,
            "seconds_prefetch_off": round(timings[False], 4), "seconds_prefetch_on": round(timings[True], 4),
            "samples_per_s_off": round(len(x) / timings[False]), "samples_per_s_on": round(len(x) / timings[True]),
            "speedup": round(timings[False] / timings[True], 3), "max_weight_difference": diff,
        })
    return runs


def _per_call(device, fn) -> float:
    """Median over ROUNDS of the microseconds per call of ``fn()`` (CALLS calls, the device synchronised around)."""
    fn()
    times = []
    for _ in range(ROUNDS):
        device.synchronize()
        start = time.perf_counter()
        for _ in range(CALLS):
            fn()
        device.synchronize()
        times.append((time.perf_counter() - start) / CALLS * 1e6)
    return statistics.median(times)


def kernels(device) -> list:
    """Each CupyKernels method against the portable code of the training step it replaces, on the same inputs."""
    import cupy

    from portanet import activations, optimizers
    from portanet.backends.cupy import CupyKernels

    fast, xp = CupyKernels(cupy), device.xp
    rng = np.random.default_rng(0)

    def arr(*shape):
        return device.from_host(rng.standard_normal(shape).astype(np.float32))

    relu, softmax, xent = activations.ReLU(), activations.Softmax(), pn.SparseCategoricalCrossentropy()
    z, grad = arr(1024, 512), arr(1024, 512)
    a = relu.forward(z, xp)
    logits = arr(1024, 10)
    probs = softmax.forward(logits, xp)
    labels = device.from_host(rng.integers(0, 10, 1024))
    x, gz = arr(1024, 784), arr(1024, 512)
    flat = device.zeros((784 * 512 + 512,), "float32")
    gk, gb = xp.reshape(flat[:784 * 512], (784, 512)), flat[784 * 512:]
    n = sum(i * o + o for i, o in zip(WIDTHS[:-1], WIDTHS[1:]))  # kernels and biases
    params, grads = arr(n), arr(n)
    opt_fast, opt_portable = optimizers.Adam(learning_rate=1e-3), optimizers.Adam(learning_rate=1e-3)

    def dense_portable():
        gk[...] = x.T @ gz
        gb[...] = xp.sum(gz, axis=0)

    cases = {  # name: (shape, fast, portable)
        "relu_": ("1024x512", lambda: fast.relu_(z), lambda: relu.forward(z, xp)),
        "relu_grad": ("1024x512", lambda: fast.relu_grad(grad, a), lambda: relu.backward(grad, None, a, xp)),
        "softmax_": ("1024x10", lambda: fast.softmax_(xp.asarray(logits, copy=True)),
                     lambda: softmax.forward(logits, xp)),
        "sparse_softmax_crossentropy": ("1024x10", lambda: fast.sparse_softmax_crossentropy(logits, probs, labels),
                                        lambda: xent.per_sample_logits(logits, labels, xp, probs=probs)),
        "dense_grads": ("784x512 from 1024 rows", lambda: fast.dense_grads(x, gz, gk, gb), dense_portable),
        "adam": (f"{n} parameters", lambda: opt_fast.step(params, grads, fast=fast),
                 lambda: opt_portable.step(params, grads)),
    }
    out = []
    with device.scope():
        for name, (shape, quick, portable) in cases.items():
            t_fast, t_portable = _per_call(device, quick), _per_call(device, portable)
            out.append({"kernel": name, "shape": shape, "us_fast": round(t_fast, 2),
                        "us_portable": round(t_portable, 2), "speedup": round(t_portable / t_fast, 3)})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=262144)
    p.add_argument("--batch-sizes", default="128,1024")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per setting; the fastest is reported")
    p.add_argument("--backends", default="cupy,torch", help="libraries to time the prefetch on (cupy, torch)")
    p.add_argument("--no-kernels", dest="kernels", action="store_false", help="skip the CuPy kernel timings")
    args = p.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    devices = {b: _cuda_device(b) for b in backends}
    rng = np.random.default_rng(0)
    x = rng.random((args.samples, WIDTHS[0]), dtype=np.float32)
    y = rng.integers(0, WIDTHS[-1], args.samples)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    report = {"benchmark": "gpu", "samples": args.samples, "model": "784-512-256-10, Adam, float32",
              "data": "host NumPy, uploaded batch by batch", "prefetch": {}}
    for backend, device in devices.items():
        report["prefetch"][backend] = {"device": device.name, "runs": prefetch(device, x, y, sizes, args.repeats)}
    if args.kernels:
        device = devices.get("cupy") or _cuda_device("cupy")
        report["kernels"] = kernels(device)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
