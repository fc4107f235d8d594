"""Held-out accuracy and wall time on scikit-learn's digits: portanet.sklearn.MLPClassifier against scikit-learn's
MLPClassifier with the same hyperparameters, side by side in one process.

    python benchmarks/sklearn_digits.py                                   # the table on stdout
    python benchmarks/sklearn_digits.py --json digits.json               # every number, machine-readable
    python benchmarks/sklearn_digits.py --markdown benchmarks/README.md  # the published table
    python benchmarks/sklearn_digits.py --device cuda --dtype float32    # add a GPU contestant (CuPy)

For each seed (0..4 by default): a stratified 75/25 split of the 1797 digits, StandardScaler fitted on the training
part, then every contestant fits ``MLPClassifier(hidden_layer_sizes, solver, alpha, max_iter, random_state=seed)``
on the same arrays, in an order that rotates with the seed, and is scored on the held-out quarter. Times are wall
clock (and process CPU time) around ``fit`` alone (data already scaled), the fastest of ``--repeats`` identical
fits, with the same BLAS thread limit for everyone (``--threads 1``: insensitive to other work on a shared machine). Needs the sklearn
extra: ``pip install -e ".[sklearn]"``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import sklearn
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier as ScikitLearnMLP
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_info, threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import portanet as pn  # noqa: E402
from portanet.sklearn import MLPClassifier as PortanetMLP  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling helper, however this file is loaded
from _markdown import write_section  # noqa: E402

MARKERS = ("<!-- sklearn-digits:begin -->", "<!-- sklearn-digits:end -->")


def contestants(args) -> dict:
    """``{name: factory(params) -> estimator}``; scikit-learn first (the reference of the ratios)."""
    out = {"scikit-learn": lambda p: ScikitLearnMLP(**p),
           "portanet (numpy, float64)": lambda p: PortanetMLP(**p),
           "portanet (numpy, float32)": lambda p: PortanetMLP(**p, dtype="float32")}
    if args.device or args.backend:
        device = pn.resolve_device(args.device, args.backend)  # fails now, with the reason, if it is not there
        where = device.name if device.name.startswith(device.backend) else f"{device.backend} {device.name}"
        name = f"portanet ({where}, {args.dtype or 'float64'})"
        out[name] = lambda p: PortanetMLP(**p, device=args.device, backend=args.backend, dtype=args.dtype)
    return out


def run(args) -> dict:
    X, y = load_digits(return_X_y=True)
    params = {"hidden_layer_sizes": tuple(args.hidden), "solver": args.solver, "alpha": args.alpha,
              "max_iter": args.max_iter}
    makers = contestants(args)
    names = list(makers)
    results = {name: {"accuracy": [], "seconds": [], "cpu_seconds": [], "all_seconds": [], "epochs": [],
                      "same_as_scikit_learn": []} for name in names}
    for seed in range(args.seeds):
        X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, stratify=y, random_state=seed)
        scaler = StandardScaler().fit(X_train)
        X_train, X_test = scaler.transform(X_train), scaler.transform(X_test)
        predictions = {}
        for name in names[seed % len(names):] + names[:seed % len(names)]:
            walls, cpus = [], []
            for _ in range(args.repeats):  # the same fit each time (random_state=seed): the fastest is reported
                estimator = makers[name]({**params, "random_state": seed})
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    start, start_cpu = time.perf_counter(), time.process_time()
                    estimator.fit(X_train, y_train)
                    walls.append(time.perf_counter() - start)
                    cpus.append(time.process_time() - start_cpu)
            predictions[name] = estimator.predict(X_test)
            results[name]["accuracy"].append(float(np.mean(predictions[name] == y_test)))
            results[name]["seconds"].append(round(min(walls), 4))
            results[name]["cpu_seconds"].append(round(min(cpus), 4))
            results[name]["all_seconds"].append([round(t, 4) for t in walls])
            results[name]["epochs"].append(int(estimator.n_iter_))
        for name in names:
            same = float(np.mean(predictions[name] == predictions["scikit-learn"]))
            results[name]["same_as_scikit_learn"].append(same)
        print(f"seed {seed}: " + ", ".join(f"{n} {results[n]['accuracy'][-1]:.2%} in {results[n]['seconds'][-1]:.2f} s"
                                           for n in names), file=sys.stderr)
    reference = statistics.mean(results["scikit-learn"]["seconds"])
    for name, r in results.items():
        r["mean_accuracy"] = statistics.mean(r["accuracy"])
        r["mean_seconds"] = statistics.mean(r["seconds"])
        r["mean_cpu_seconds"] = statistics.mean(r["cpu_seconds"])
        r["time_vs_scikit_learn"] = round(r["mean_seconds"] / reference, 3)
    params["hidden_layer_sizes"] = list(params["hidden_layer_sizes"])
    return {"machine": machine_info(args), "params": params,
            "seeds": args.seeds, "repeats": args.repeats, "test_size": 0.25, "results": results}


def machine_info(args) -> dict:
    blas = next((f"{lib['internal_api']} {lib.get('version')} {lib.get('architecture')}" for lib in threadpool_info()
                 if lib["user_api"] == "blas" and "numpy" in lib["filepath"]), "unknown")
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"date": datetime.date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(), "numpy": np.__version__,
            "scikit_learn": sklearn.__version__, "portanet": pn.__version__, "blas": blas, "threads": args.threads,
            "load_average_at_start": os.getloadavg()[0]}


def markdown(report) -> str:
    m, p, results = report["machine"], report["params"], report["results"]
    ref = results["scikit-learn"]
    lines = [
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores), Python {m['python']}, NumPy {m['numpy']} with "
        f"{m['blas']} ({m['threads']} BLAS thread{'' if m['threads'] == 1 else 's'}), scikit-learn {m['scikit_learn']}; load average "
        f"{m['load_average_at_start']:.1f} at the start, {m['load_average_at_end']:.1f} at the end. "
        f"`MLPClassifier(hidden_layer_sizes={tuple(p['hidden_layer_sizes'])}, solver={p['solver']!r}, "
        f"alpha={p['alpha']}, max_iter={p['max_iter']}, random_state=seed)`, seeds 0-{report['seeds'] - 1}; each "
        f"time is the fastest of {report['repeats']} identical fits.",
        "",
        "| contestant | held-out accuracy: mean (min-max) | per seed | fit s, wall: mean (min-max) | wall / "
        "scikit-learn | fit s, CPU: mean | epochs (mean) | test predictions equal to scikit-learn's |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        acc, sec = r["accuracy"], r["seconds"]
        lines.append(
            f"| {name} | {r['mean_accuracy']:.2%} ({min(acc):.2%}-{max(acc):.2%}) | "
            f"{' '.join(f'{a:.2%}' for a in acc)} | {r['mean_seconds']:.2f} ({min(sec):.2f}-{max(sec):.2f}) | "
            f"{r['time_vs_scikit_learn']:.2f} | {r['mean_cpu_seconds']:.2f} | {statistics.mean(r['epochs']):.0f} | "
            f"{statistics.mean(r['same_as_scikit_learn']):.2%} |")
    verdicts = [f"{name}: {'yes' if r['mean_accuracy'] >= ref['mean_accuracy'] else 'NO'}"
                for name, r in results.items() if name != "scikit-learn"]
    lines += ["", "Mean held-out accuracy equal to or better than scikit-learn's: " + "; ".join(verdicts) + "."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5, help="seeds (splits and initializations), default 5")
    p.add_argument("--hidden", type=int, nargs="+", default=[100], help="hidden layer sizes (default 100)")
    p.add_argument("--solver", default="adam", choices=["adam", "sgd", "lbfgs"], help="default adam")
    p.add_argument("--alpha", type=float, default=1e-4, help="L2 penalty (default 1e-4)")
    p.add_argument("--max-iter", type=int, default=200, help="epochs at most (default 200, scikit-learn's)")
    p.add_argument("--repeats", type=int, default=3, help="timed fits per contestant and seed; the fastest counts")
    p.add_argument("--threads", type=int, default=None, help="BLAS threads for everyone (default: NumPy's)")
    p.add_argument("--device", default=None, help="also run portanet there (cuda, cuda:1, cpu with --backend)")
    p.add_argument("--backend", default=None, help="numpy, cupy, torch or array_api_strict for that contestant")
    p.add_argument("--dtype", default=None, choices=["float32", "float64"], help="for that contestant")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON to FILE ('-' for stdout)")
    p.add_argument("--markdown", metavar="FILE", help="write the table between the sklearn-digits markers in FILE")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads is None:
        args.threads = next((lib["num_threads"] for lib in threadpool_info()
                             if lib["user_api"] == "blas" and "numpy" in lib["filepath"]), os.cpu_count())
    with threadpool_limits(args.threads, user_api="blas"):
        report = run(args)
    report["machine"]["load_average_at_end"] = os.getloadavg()[0]
    table = markdown(report)
    if args.json == "-":
        print(json.dumps(report, indent=1))
    else:
        print(table)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown:
        write_section(args.markdown, MARKERS, table)


if __name__ == "__main__":
    main()
