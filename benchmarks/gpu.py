"""GPU benchmark: one epoch from host (NumPy) data on CuPy, with the pinned double-buffered prefetch on vs off.

Same model, seed and batches both ways; reports seconds per epoch, samples/s, the speed-up and the largest weight
difference (expected 0 or round-off) as JSON. Needs CuPy and a CUDA device; exits 2 with a message otherwise.

    python benchmarks/gpu.py [--samples 262144] [--batch-sizes 128,1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

import portanet as pn


def _cuda_device():
    try:
        return pn.resolve_device("cuda")
    except (ImportError, RuntimeError, ValueError) as exc:
        print(json.dumps({"benchmark": "gpu-prefetch", "error": str(exc)}))
        print(f"benchmarks/gpu.py: needs CuPy and a CUDA device: {exc}", file=sys.stderr)
        sys.exit(2)


def _model(device, widths=(784, 512, 256, 10)):
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=262144)
    p.add_argument("--batch-sizes", default="128,1024")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per setting; the fastest is reported")
    args = p.parse_args(argv)
    device = _cuda_device()
    rng = np.random.default_rng(0)
    x = rng.random((args.samples, 784), dtype=np.float32)
    y = rng.integers(0, 10, args.samples)
    report = {"benchmark": "gpu-prefetch", "device": device.name, "samples": args.samples,
              "model": "784-512-256-10, Adam, float32", "data": "host NumPy, uploaded batch by batch", "runs": []}
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        timings, weights = {}, {}
        for prefetch in (False, True):
            runs = [_epoch(device, x, y, batch_size, prefetch) for _ in range(args.repeats)]
            timings[prefetch] = min(s for s, _ in runs)
            weights[prefetch] = runs[-1][1]
        diff = max(float(np.max(np.abs(weights[True][k] - weights[False][k]))) for k in weights[True])
        report["runs"].append({
            "batch_size": batch_size,
            "seconds_prefetch_off": round(timings[False], 4), "seconds_prefetch_on": round(timings[True], 4),
            "samples_per_s_off": round(args.samples / timings[False]),
            "samples_per_s_on": round(args.samples / timings[True]),
            "speedup": round(timings[False] / timings[True], 3), "max_weight_difference": diff,
        })
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
