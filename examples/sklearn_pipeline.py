"""StandardScaler + portanet's MLPClassifier in a scikit-learn GridSearchCV (2 processes) on the digits data.

    python examples/sklearn_pipeline.py                                     # NumPy on the CPU
    python examples/sklearn_pipeline.py --backend array_api_strict --device device1
    python examples/sklearn_pipeline.py --device cuda --dtype float32      # CuPy on a GPU machine

The scikit-learn code is unchanged but for one import (sklearn.neural_network -> portanet.sklearn) and the device:
--device cuda trains every candidate on CuPy, --backend torch --device cpu on PyTorch, --backend array_api_strict
--device device1 on array-api-strict's stand-in for a GPU. It prints each candidate's cross-validated accuracy, the
best parameters and the held-out accuracy of the best pipeline, refitted on the whole training split.
"""

import time
import warnings

from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from portanet.sklearn import MLPClassifier  # was: from sklearn.neural_network import MLPClassifier

from _cli import example_parser  # examples/_cli.py: --device, --backend, --seed


def main(argv=None):
    parser = example_parser(__doc__, seed_help="initial weights, shuffles and the train/test split")
    parser.add_argument("--max-iter", type=int, default=200, help="epochs per fit at most (default 200)")
    parser.add_argument("--jobs", type=int, default=2, help="GridSearchCV processes (default 2)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float64"],
                        help="training precision (default: that of the data, float64; float32 is faster on GPUs)")
    args = parser.parse_args(argv)

    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, stratify=y, random_state=args.seed)
    pipeline = Pipeline([
        ("scale", StandardScaler()),
        ("mlp", MLPClassifier(max_iter=args.max_iter, random_state=args.seed, device=args.device,
                              backend=args.backend, dtype=args.dtype)),
    ])
    grid = {"mlp__hidden_layer_sizes": [(64,), (128, 64)], "mlp__alpha": [1e-4, 1e-1], "mlp__dropout": [0.0, 0.2]}
    search = GridSearchCV(pipeline, grid, cv=3, n_jobs=args.jobs)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a small --max-iter stops before convergence
        search.fit(X_train, y_train)
    seconds = time.perf_counter() - start

    mlp = search.best_estimator_.named_steps["mlp"]
    model = mlp.model_  # the portanet Model underneath
    print(f"{len(search.cv_results_['params'])} candidates x 3 folds, {args.jobs} processes, on {model.device.name} "
          f"({model.backend}, {model.dtype}): {seconds:.1f} s")
    print(" mean CV accuracy | parameters")
    for score, params in sorted(zip(search.cv_results_["mean_test_score"], search.cv_results_["params"]),
                                key=lambda item: -item[0]):
        print(f"          {score:6.2%} | {', '.join(f'{k[5:]}={v}' for k, v in params.items())}")
    print(f"best: {', '.join(f'{k[5:]}={v}' for k, v in search.best_params_.items())}; "
          f"{mlp.n_iter_} epochs in the refit")
    print(f"held-out accuracy {search.score(X_test, y_test):.2%} on {len(y_test)} digits")


if __name__ == "__main__":
    main()
