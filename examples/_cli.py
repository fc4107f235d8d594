"""The command-line options every example shares: where to run (--device, --backend), the seed, and --threads.

Argument parsing only; each example adds its own options and does its own work. Import this module before numpy,
portanet or torch: ``--threads N`` is applied on import, through the environment variables that BLAS libraries
(OpenBLAS, MKL, BLIS, Accelerate) and PyTorch's OpenMP pool read once, when they are loaded.
"""

import argparse
import os
import platform
import sys
import textwrap

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def _threads_in(argv):
    """The value of ``--threads N`` / ``--threads=N`` in ``argv`` (a string), or None."""
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--threads="):
            return arg.split("=", 1)[1]
    return None


def limit_threads(n: int) -> None:
    """Use ``n`` threads for BLAS (NumPy's matrix products) and PyTorch. Effective for libraries loaded after the
    call; for one already loaded, PyTorch is set directly and BLAS through threadpoolctl when it is installed."""
    for name in THREAD_VARIABLES:
        os.environ[name] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    if "numpy" in sys.modules:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            print(f"--threads {n}: NumPy was loaded before the examples' _cli module, so its BLAS keeps its own "
                  "thread count (pip install threadpoolctl, or set OMP_NUM_THREADS before starting Python)",
                  file=sys.stderr)
        else:
            threadpool_limits(n)


_early = _threads_in(sys.argv[1:])
if _early is not None and _early.isdigit() and int(_early) > 0:
    limit_threads(int(_early))  # before the example imports numpy, portanet or torch


def _positive_int(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


class _Threads(argparse.Action):
    """``--threads N``: applied when parsed too (``main(argv)`` called from Python, not the command line)."""

    def __call__(self, parser, namespace, values, option_string=None):
        limit_threads(values)
        setattr(namespace, self.dest, values)


def example_parser(doc: str, seed_help: str = "initial weights") -> argparse.ArgumentParser:
    """A parser described by the first paragraph of ``doc`` (the example's docstring, whose rest is shown after the
    options); a summary may span lines."""
    summary, _, details = doc.strip().partition("\n\n")
    parser = argparse.ArgumentParser(description=textwrap.fill(" ".join(summary.split()), 100), epilog=details,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu",
                        help='"cpu" (default), "cuda", "cuda:N", or the backend\'s own device name (e.g. device1)')
    parser.add_argument("--backend", default=None,
                        help="numpy, cupy, torch or array_api_strict (default: chosen from --device)")
    parser.add_argument("--seed", type=int, default=0, help=f"{seed_help} (default 0)")
    parser.add_argument("--threads", type=_positive_int, default=None, metavar="N", action=_Threads,
                        help="threads for NumPy's BLAS and PyTorch on the CPU (default: the libraries' own, usually "
                             "one per core); on a busy or small machine --threads 1 avoids oversubscription")
    return parser


def machine_summary() -> str:
    """The processor, and the BLAS library with the kernel it runs and its threads (what an epoch time depends on):
    "AMD EPYC (2 cores); openblas 0.3.31 Haswell kernels, 2 threads". The kernel needs threadpoolctl."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        blas = "BLAS kernel not known (pip install threadpoolctl to see it)"
    else:
        libs = [p for p in threadpool_info() if p.get("user_api") == "blas"]
        blas = "; ".join(f"{p['internal_api']} {p.get('version')} {p.get('architecture') or 'unknown'} kernels, "
                         f"{p['num_threads']} thread{'s' if p['num_threads'] != 1 else ''}" for p in libs)
        blas = blas or "no BLAS loaded"
    return f"{cpu} ({os.cpu_count()} cores); {blas}"
