"""Benchmark: data-parallel training throughput against the number of ranks, and the all-reduce's share of a step.

    python benchmarks/distributed.py [--ranks 1 2] [--threads 1] [--batch-size 128 1024] [--json] [--markdown FILE]

For each number of ranks it starts ``mpiexec -n N`` on this script (1 rank is the baseline, in the same run) with
``--threads`` BLAS/OpenMP threads per rank (OMP_NUM_THREADS, OPENBLAS_NUM_THREADS, MKL_NUM_THREADS; default 1, so 2
ranks on 2 cores are not oversubscribed), trains the same model with ``model.fit(..., distributed=...)`` and reports,
per global batch size: samples per second (global), seconds per step, the time spent in the per-step gradient
all-reduce inside fit (it includes waiting for the slowest rank) and its share of the epoch, the same all-reduce
timed alone back to back, the speedup over 1 rank and the parallel efficiency (speedup / ranks). On a shared
machine the wall clock also counts other processes' load (a rank that loses its core makes the others wait in the
all-reduce), so it reports as well each rank's CPU time outside the all-reduce (its own work; with one thread per
rank, what the step costs on an idle core) and from it an idle-core estimate: samples / (busiest rank's work + the
all-reduce alone), an estimate, not a measurement.

Model and data as in benchmarks/mlp.py: 784-512-256-10 ReLU network, softmax cross-entropy, Adam (lr 1e-3),
MNIST-shaped float32 data from a fixed random linear teacher (``--samples`` rows, default 16384), shuffled every
epoch. Each configuration trains ``--epochs`` epochs (default 3); the first is a warm-up, the time reported is the
fastest of the others (an epoch as its callbacks see it, ``on_epoch_begin`` to ``on_epoch_end``).

On a GPU machine with CuPy and NCCL (not run yet: no GPU was available):
    python benchmarks/distributed.py --device cuda --comm nccl --ranks 1 2 4 --batch-size 1024 4096
puts rank r on GPU ``r % gpus`` of its node and all-reduces CuPy buffers with NCCL (``--comm mpi`` stages them
through the host instead, unless the MPI is CUDA-aware).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling helper, however this file is loaded
from _markdown import write_section  # noqa: E402

WIDTHS = (784, 512, 256, 10)
MARKERS = ("<!-- distributed:begin -->", "<!-- distributed:end -->")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# -- one rank of one job (--worker) -----------------------------------------------------------------------------
def make_data(samples: int, seed: int = 0):
    """MNIST-shaped float32 data: (samples, 784) pixels in [0, 1), 10 classes from a fixed random linear teacher."""
    rng = np.random.default_rng(seed)
    x = rng.random((samples, WIDTHS[0]), dtype=np.float32)
    teacher = rng.standard_normal((WIDTHS[0], WIDTHS[-1]), dtype=np.float32)
    y = np.argmax(x @ teacher - 0.5 * teacher.sum(axis=0), axis=1).astype(np.int64)
    return x, y


def worker(args):
    import portanet as pn
    from portanet import distributed

    class Timed(distributed.Communicator):
        """Another communicator's collectives, with the seconds spent in ``allreduce_`` (the gradient) counted."""

        def __init__(self, inner):
            self.inner, self.rank, self.size, self.timeout = inner, inner.rank, inner.size, inner.timeout
            self.seconds = self.cpu_seconds = 0.0

        def allreduce_(self, array):
            start, cpu = time.perf_counter(), time.process_time()
            self.inner.allreduce_(array)
            self.seconds += time.perf_counter() - start
            self.cpu_seconds += time.process_time() - cpu
            return array

        def broadcast_(self, array, root=0):
            return self.inner.broadcast_(array, root)

        def allreduce_host(self, values, op="sum"):
            return self.inner.allreduce_host(values, op)

        def allgather_object(self, obj):
            return self.inner.allgather_object(obj)

        def broadcast_object(self, obj, root=0):
            return self.inner.broadcast_object(obj, root)

        def barrier(self):
            self.inner.barrier()

        def abort(self, code=1):
            self.inner.abort(code)

    class EpochTimes(pn.Callback):
        """Per epoch: wall seconds, seconds in the gradient all-reduce, and this process's CPU seconds outside it
        (its own work: insensitive to other processes on a shared machine, with one thread per rank)."""

        def __init__(self, comm):
            self.comm, self.seconds, self.allreduce, self.work_cpu = comm, [], [], []

        def on_epoch_begin(self, epoch, logs=None):
            self.comm.seconds = self.comm.cpu_seconds = 0.0
            self.start, self.cpu = time.perf_counter(), time.process_time()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.start)
            self.allreduce.append(self.comm.seconds)
            self.work_cpu.append(time.process_time() - self.cpu - self.comm.cpu_seconds)

    if args.spin is not None:
        distributed.MPICommunicator.spin_seconds = args.spin
    comm = Timed(distributed.get_communicator(args.comm))
    device = args.device
    if args.comm == "nccl":
        device = f"cuda:{comm.inner.device}"
    x, y = make_data(args.samples)
    results = []
    for batch_size in args.batch_size:
        layers = [pn.Dense(w, activation="relu") for w in WIDTHS[1:-1]] + [pn.Dense(WIDTHS[-1], activation="softmax")]
        model = pn.Model(layers, device=device, seed=0)
        model.compile(loss="sparse_categorical_crossentropy", optimizer=pn.Adam(lr=1e-3))
        timer = EpochTimes(comm)
        comm.inner.barrier()
        model.fit(x, y, epochs=args.epochs, batch_size=batch_size, verbose=0, callbacks=[timer], distributed=comm)
        buffer = model.parameter_buffer.grads
        comm.inner.barrier()
        alone = []
        for _ in range(args.allreduce_repeats):  # the all-reduce without waiting for a slower rank's compute
            comm.inner.barrier()
            start = time.perf_counter()
            comm.inner.allreduce_(buffer)
            alone.append(time.perf_counter() - start)
        steps = -(-args.samples // batch_size)
        timed = timer.seconds[1:] or timer.seconds
        best = min(range(len(timed)), key=timed.__getitem__)
        epoch_s = timed[best]
        reduce_s = (timer.allreduce[1:] or timer.allreduce)[best]
        work_s = max(comm.inner.allgather_object(min(timer.work_cpu[1:] or timer.work_cpu)))  # the busiest rank
        alone_s = statistics.median(alone) if comm.size > 1 else 0.0
        results.append({
            "batch_size": batch_size, "steps_per_epoch": steps, "epoch_seconds": [round(s, 4) for s in timer.seconds],
            "epoch_s": round(epoch_s, 4), "samples_per_s": round(args.samples / epoch_s, 1),
            "step_ms": round(1e3 * epoch_s / steps, 3), "allreduce_ms_per_step": round(1e3 * reduce_s / steps, 3),
            "allreduce_share": round(reduce_s / epoch_s, 4),
            "allreduce_alone_ms": round(1e3 * alone_s, 3),
            "work_cpu_ms_per_step": round(1e3 * work_s / steps, 3),
            "idle_estimate_samples_per_s": round(args.samples / (work_s + steps * alone_s), 1),
            "parameters": int(buffer.shape[0]),
        })
    if comm.rank == 0:
        with open(args.worker, "w") as f:
            json.dump({"ranks": comm.size, "results": results}, f)


# -- the driver: one mpiexec job per number of ranks ----------------------------------------------------------------
def mpiexec() -> str:
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if found is None:
        raise SystemExit('no mpiexec next to the interpreter or on PATH: pip install "portanet[mpi]"')
    return found


def run_job(args, ranks: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "rank0.json")
        cmd = [mpiexec(), "-n", str(ranks), sys.executable, os.path.abspath(__file__), "--worker", out,
               "--comm", args.comm, "--device", args.device, "--samples", str(args.samples), "--epochs",
               str(args.epochs), "--allreduce-repeats", str(args.allreduce_repeats),
               *(["--spin", str(args.spin)] if args.spin is not None else []), "--batch-size",
               *map(str, args.batch_size)]
        env = {**os.environ, **{name: str(args.threads) for name in THREAD_VARIABLES}}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        with open(out) as f:
            return json.load(f)


def machine_info(args) -> dict:
    import portanet as pn

    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    version = subprocess.run([mpiexec(), "--version"], capture_output=True, text=True, timeout=60).stdout
    return {"date": datetime.date.today().isoformat(), "platform": platform.platform(), "cpu": cpu,
            "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "portanet": pn.__version__,
            "mpi": _mpi_version(version),
            "threads_per_rank": args.threads, "device": args.device, "comm": args.comm, "samples": args.samples,
            "epochs": args.epochs, "repeats": args.repeats, "load_average_at_start": os.getloadavg()[0]}


def _mpi_version(text: str) -> str:
    """"MPICH (Hydra) 5.0.2" from ``mpiexec --version`` (MPICH prints its Hydra build details, Open MPI one line)."""
    if "HYDRA" in text:
        version = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.strip().startswith(
            "Version:")), "?")
        return f"MPICH (Hydra) {version}"
    return text.strip().splitlines()[0] if text.strip() else "unknown MPI"


def report(args) -> dict:
    """Every rank count ``--repeats`` times, in rotating order (a shared machine's load then slows each alike); for
    each (ranks, batch) the repeat with the highest throughput, with every repeat's throughput alongside."""
    info = machine_info(args)
    runs: dict = {}
    for repeat in range(args.repeats):
        order = args.ranks[repeat % len(args.ranks):] + args.ranks[:repeat % len(args.ranks)]
        for ranks in order:
            for r in run_job(args, ranks)["results"]:
                runs.setdefault((ranks, r["batch_size"]), []).append(r)
    info["load_average_at_end"] = os.getloadavg()[0]
    best = {key: max(found, key=lambda r: r["samples_per_s"]) for key, found in runs.items()}
    estimate = {key: max(found, key=lambda r: r["idle_estimate_samples_per_s"]) for key, found in runs.items()}
    rows = []
    for (ranks, batch), r in sorted(best.items()):
        base = (min(args.ranks), batch)
        speedup = r["samples_per_s"] / best[base]["samples_per_s"]
        idle = estimate[(ranks, batch)]["idle_estimate_samples_per_s"]
        rows.append({"ranks": ranks, **r, "speedup": round(speedup, 3),
                     "efficiency": round(speedup * min(args.ranks) / ranks, 3),
                     "samples_per_s_each_repeat": [x["samples_per_s"] for x in runs[(ranks, batch)]],
                     "idle_estimate_samples_per_s": idle,
                     "work_cpu_ms_per_step": estimate[(ranks, batch)]["work_cpu_ms_per_step"],
                     "idle_estimate_speedup": round(idle / estimate[base]["idle_estimate_samples_per_s"], 3)})
    return {"machine": info, "results": rows}


def markdown(rep) -> str:
    m = rep["machine"]
    lines = [f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores), {m['platform']}; Python {m['python']}, NumPy "
             f"{m['numpy']}, {m['mpi']}; device {m['device']}, communicator {m['comm']}, {m['threads_per_rank']} "
             f"BLAS/OpenMP thread(s) per rank for every run; {m['samples']} samples, the fastest of epochs 2-"
             f"{m['epochs']}, the best of {m['repeats']} jobs per rank count; load average "
             f"{m['load_average_at_start']:.1f} at the start, "
             f"{m['load_average_at_end']:.1f} at the end.", "",
             "| ranks | global batch | samples/s | ms per step | all-reduce ms per step (in fit) | all-reduce share "
             "| all-reduce alone, ms | speedup | efficiency | CPU ms per step (busiest rank, outside the all-reduce) "
             "| idle-core estimate, samples/s | estimated speedup |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rep["results"]:
        lines.append(f"| {r['ranks']} | {r['batch_size']} | {r['samples_per_s']:,.0f} | {r['step_ms']:.2f} | "
                     f"{r['allreduce_ms_per_step']:.2f} | {r['allreduce_share']:.1%} | {r['allreduce_alone_ms']:.2f} "
                     f"| {r['speedup']:.2f} | {r['efficiency']:.2f} | {r['work_cpu_ms_per_step']:.2f} | "
                     f"{r['idle_estimate_samples_per_s']:,.0f} | {r['idle_estimate_speedup']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="numbers of ranks (default 1 2)")
    p.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads per rank, every run (default 1)")
    p.add_argument("--batch-size", type=int, nargs="+", default=[128, 1024], help="global batch sizes")
    p.add_argument("--samples", type=int, default=16384)
    p.add_argument("--epochs", type=int, default=3, help="the first is a warm-up (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="jobs per rank count, in rotating order (default 3)")
    p.add_argument("--device", default="cpu", help='"cpu" (NumPy) or "cuda" (CuPy)')
    p.add_argument("--comm", default="mpi", choices=["mpi", "nccl"])
    p.add_argument("--allreduce-repeats", type=int, default=30)
    p.add_argument("--spin", type=float, default=None,
                   help="seconds a waiting rank polls without sleeping (MPICommunicator.spin_seconds, default 0.05)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one mpiexec job may take")
    p.add_argument("--json", action="store_true", help="print the report as JSON (default: a Markdown table)")
    p.add_argument("--markdown", metavar="FILE", help="also write the table between the markers in FILE")
    p.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.markdown:
        write_section(args.markdown, MARKERS)  # fail before measuring, not after
    rep = report(args)
    if args.markdown:
        write_section(args.markdown, MARKERS, markdown(rep))
    print(json.dumps(rep, indent=1) if args.json else markdown(rep))


if __name__ == "__main__":
    main()
