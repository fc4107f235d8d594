"""portanet.sklearn: scikit-learn's estimator checks, scikit-learn's own MLP tests, and training that follows
scikit-learn's MLP to rounding (same initialization, batches, updates, schedules and stopping rules) on every backend.
"""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest

EXTRA = 'portanet.sklearn needs the sklearn extra: pip install "portanet[sklearn]"'
pytest.importorskip("scipy", reason=EXTRA)
sklearn = pytest.importorskip("sklearn", reason=EXTRA)

import scipy.sparse  # noqa: E402
from sklearn import neural_network as reference  # noqa: E402
from sklearn.base import clone  # noqa: E402
from sklearn.datasets import load_digits, make_multilabel_classification, make_regression  # noqa: E402
from sklearn.exceptions import ConvergenceWarning, NotFittedError  # noqa: E402
from sklearn.model_selection import GridSearchCV  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402
from sklearn.utils.fixes import parse_version  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402  (a scikit-learn dependency)

from portanet.sklearn import MLPClassifier, MLPRegressor  # noqa: E402
from portanet.testing import assert_on_device  # noqa: E402

SKLEARN_1_7 = parse_version(sklearn.__version__) >= parse_version("1.7")  # MLP sample_weight and loss="poisson"
needs_1_7 = pytest.mark.skipif(not SKLEARN_1_7, reason="scikit-learn's MLP has sample_weight and poisson from 1.7")

_digits_x, _digits_y = load_digits(return_X_y=True)
X_DIGITS, Y_DIGITS = _digits_x[:300] / 16, _digits_y[:300]
X_REG, Y_REG = make_regression(150, 8, noise=1.0, random_state=0)
Y_REG = Y_REG / Y_REG.std()
X_MULTI, Y_MULTI = make_regression(150, 8, n_targets=3, random_state=1)
Y_MULTI = Y_MULTI / Y_MULTI.std()
X_LABELS, Y_LABELS = make_multilabel_classification(150, 10, n_classes=4, random_state=0)
Y_COUNTS = np.random.RandomState(0).poisson(np.exp(X_REG[:, 0] / 3))
WEIGHTS = np.random.RandomState(1).rand(300)


@pytest.fixture(autouse=True)
def _keep_array_api_strict_flags():
    """scikit-learn's array-API code sets array-api-strict's flags for the whole process (1.6: api_version
    2023.12, 1.7 and 1.8: 2024.12); put back the suite's after each test."""
    try:
        import array_api_strict
    except ImportError:
        yield
        return
    flags = array_api_strict.get_array_api_strict_flags()
    yield
    array_api_strict.set_array_api_strict_flags(**flags)


@pytest.fixture(scope="module", autouse=True)
def _one_blas_thread():
    """The networks here are tiny: on a shared machine, BLAS threads only wait for each other (2x slower here)."""
    with threadpool_limits(1, user_api="blas"):
        yield


def _where(device) -> dict:
    """The estimator's ``device`` / ``backend`` strings for a test ``device`` (strings, so clone can copy them)."""
    if device.backend == "numpy":
        return {"device": "cpu"}
    if device.backend == "cupy":
        return {"device": device.name}
    name = device.name.split(":", 1)[1] if device.backend == "array_api_strict" else device.name
    return {"backend": device.backend, "device": name}


# -- scikit-learn's estimator checks ------------------------------------------------------------------------------
CHECKED = [
    MLPClassifier(max_iter=20, learning_rate_init=0.01),
    MLPRegressor(max_iter=20, learning_rate_init=0.01),
    MLPClassifier(solver="lbfgs", max_iter=20),
    MLPRegressor(solver="sgd", max_iter=20, learning_rate_init=0.05, hidden_layer_sizes=(20, 10),
                 activation=["relu", "tanh"]),
    MLPClassifier(max_iter=20, learning_rate_init=0.01, dropout=0.1),
]


def _expected_failures(estimator) -> dict:
    if not estimator.dropout:
        return {}
    why = ("dropout draws one mask per row: k repeated rows get k independent masks, one row of weight k gets one, so "
           "the two fits differ (as they would in any dropout network); without dropout the check passes")
    return {"check_sample_weight_equivalence_on_dense_data": why, "check_sample_weight_equivalence_on_sparse_data": why}


@parametrize_with_checks(CHECKED, expected_failed_checks=_expected_failures)
def test_scikit_learn_estimator_check(estimator, check, monkeypatch):
    # scikit-learn runs its array-API checks (torch, array-api-strict's CPU and device1, mixed namespaces) only
    # with SCIPY_ARRAY_API set; set for the check alone, so other test modules keep SciPy's default mode.
    monkeypatch.setenv("SCIPY_ARRAY_API", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter is kept small for speed
        check(estimator)


# -- scikit-learn's own MLP tests, run against portanet's estimators -----------------------------------------------
upstream = pytest.importorskip("sklearn.neural_network.tests.test_mlp",
                               reason="this scikit-learn installation ships without its tests")
NOT_RUN = {
    # Builds a fitted state by hand (coefs_ assigned to an unfitted estimator, private gradient and velocity
    # buffers); portanet's weights live in its model, which fit/partial_fit create. The same worked example runs in
    # test_one_sgd_step_matches_scikit_learns_worked_example below.
    "test_fit",
    # Calls the private _loss_grad_lbfgs; test_gradient_of_every_loss_matches_finite_differences checks the same.
    "test_gradient",
}
for _name in sorted(n for n in dir(upstream) if n.startswith("test_") and n not in NOT_RUN):
    globals()[f"test_upstream_{_name[5:]}"] = getattr(upstream, _name)


@pytest.fixture(autouse=True)
def _upstream_uses_portanet(monkeypatch):
    monkeypatch.setattr(upstream, "MLPClassifier", MLPClassifier)
    monkeypatch.setattr(upstream, "MLPRegressor", MLPRegressor)


@pytest.fixture
def global_random_seed():
    """scikit-learn's conftest fixture, which upstream tests take (its default seed)."""
    return 42


def test_one_sgd_step_matches_scikit_learns_worked_example():
    # scikit-learn's test_fit: one SGD step by hand on a 3-2-1 logistic network (alpha 0.1, lr 0.1, no momentum).
    X, y = np.array([[0.6, 0.8, 0.7]]), np.array([0])
    mlp = MLPClassifier(solver="sgd", learning_rate_init=0.1, alpha=0.1, activation="logistic", random_state=1,
                        max_iter=1, hidden_layer_sizes=2, momentum=0)
    mlp.partial_fit(X, y, classes=[0, 1])
    mlp.coefs_ = [np.array([[0.1, 0.2], [0.3, 0.1], [0.5, 0]]), np.array([[0.1], [0.2]])]
    mlp.intercepts_ = [np.array([0.1, 0.1]), np.array([1.0])]
    mlp.partial_fit(X, y)
    np.testing.assert_allclose(mlp.coefs_[0], [[0.098, 0.195756], [0.2956664, 0.096008], [0.4939998, -0.002244]],
                               atol=5e-4)
    np.testing.assert_allclose(mlp.coefs_[1], [[0.04706], [0.154089]], atol=5e-4)
    np.testing.assert_allclose(mlp.intercepts_[0], [0.098333, 0.09626], atol=5e-4)
    np.testing.assert_allclose(mlp.intercepts_[1], [0.9235], atol=5e-4)
    assert mlp.predict_proba(X)[0, 1] == pytest.approx(0.739, abs=5e-4)


# -- the same training as scikit-learn's MLP ------------------------------------------------------------------------
SAME = {
    "adam, multiclass": ("MLPClassifier", dict(hidden_layer_sizes=(20,), max_iter=12), X_DIGITS, Y_DIGITS, None),
    "adam, 2 layers, alpha, short last batch": (
        "MLPClassifier", dict(hidden_layer_sizes=(20, 10), batch_size=64, max_iter=8, alpha=0.1), X_DIGITS, Y_DIGITS,
        None),
    "sgd, nesterov, invscaling": (
        "MLPClassifier", dict(solver="sgd", learning_rate="invscaling", learning_rate_init=0.5,
                              hidden_layer_sizes=(20,), max_iter=8, batch_size=50), X_DIGITS, Y_DIGITS, None),
    "sgd, momentum, adaptive, tanh": (
        "MLPClassifier", dict(solver="sgd", learning_rate="adaptive", nesterovs_momentum=False, activation="tanh",
                              hidden_layer_sizes=(20,), max_iter=40, batch_size=100, tol=0.1, n_iter_no_change=2),
        X_DIGITS, Y_DIGITS, None),
    "binary, logistic, early stopping": (
        "MLPClassifier", dict(activation="logistic", early_stopping=True, hidden_layer_sizes=(10,), max_iter=30,
                              n_iter_no_change=3), X_DIGITS, Y_DIGITS % 2, None),
    "string labels, identity, no shuffle": (
        "MLPClassifier", dict(activation="identity", shuffle=False, hidden_layer_sizes=(10,), max_iter=6), X_DIGITS,
        np.array(["even", "odd"])[Y_DIGITS % 2], None),
    "multilabel": ("MLPClassifier", dict(hidden_layer_sizes=(15,), max_iter=15), X_LABELS, Y_LABELS, None),
    "lbfgs classifier": ("MLPClassifier", dict(solver="lbfgs", hidden_layer_sizes=(10,), max_iter=25), X_DIGITS,
                         Y_DIGITS, None),
    "sgd regressor": ("MLPRegressor", dict(solver="sgd", hidden_layer_sizes=(10,), max_iter=15,
                                           learning_rate_init=0.01), X_REG, Y_REG, None),
    "lbfgs regressor": ("MLPRegressor", dict(solver="lbfgs", hidden_layer_sizes=(10,), max_iter=40), X_REG, Y_REG,
                        None),
    "weighted adam classifier": pytest.param(
        "MLPClassifier", dict(hidden_layer_sizes=(20,), batch_size=64, max_iter=6, alpha=0.05), X_DIGITS, Y_DIGITS,
        WEIGHTS, marks=needs_1_7),
    "weighted early stopping regressor": pytest.param(
        "MLPRegressor", dict(hidden_layer_sizes=(10,), early_stopping=True, max_iter=30, n_iter_no_change=2,
                             learning_rate_init=0.01), X_REG, Y_REG, WEIGHTS[:150], marks=needs_1_7),
    "weighted lbfgs classifier": pytest.param(
        "MLPClassifier", dict(solver="lbfgs", hidden_layer_sizes=(8,), max_iter=15, alpha=1.0), X_DIGITS, Y_DIGITS,
        WEIGHTS, marks=needs_1_7),
    "poisson adam": pytest.param("MLPRegressor", dict(loss="poisson", hidden_layer_sizes=(10,), max_iter=15), X_REG,
                                 Y_COUNTS, None, marks=needs_1_7),
    "poisson lbfgs": pytest.param("MLPRegressor", dict(loss="poisson", solver="lbfgs", hidden_layer_sizes=(5,),
                                                       max_iter=20), X_REG, Y_COUNTS, None, marks=needs_1_7),
}


def _fit_both(kind, params, X, y, sample_weight, **ours):
    fit = {} if sample_weight is None else {"sample_weight": sample_weight}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        theirs = getattr(reference, kind)(random_state=0, **params).fit(X, y, **fit)
        mine = {"MLPClassifier": MLPClassifier, "MLPRegressor": MLPRegressor}[kind](random_state=0, **params, **ours)
        mine.fit(X, y, **fit)
    return theirs, mine


def _assert_same_weights(theirs, mine, rtol=1e-9, atol=1e-10):
    assert len(mine.coefs_) == len(theirs.coefs_) == mine.n_layers_ - 1
    for a, b in zip(theirs.coefs_ + theirs.intercepts_, mine.coefs_ + mine.intercepts_):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(b, a, rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind, params, X, y, sample_weight", list(SAME.values()), ids=list(SAME))
def test_training_follows_scikit_learns_mlp_to_rounding(kind, params, X, y, sample_weight):
    theirs, mine = _fit_both(kind, params, X, y, sample_weight)
    lbfgs = params.get("solver") == "lbfgs"
    _assert_same_weights(theirs, mine, rtol=1e-7 if lbfgs else 1e-9, atol=1e-9 if lbfgs else 1e-10)
    assert (mine.n_iter_, mine.t_, mine.n_outputs_, mine.out_activation_) == (
        theirs.n_iter_, theirs.t_, theirs.n_outputs_, theirs.out_activation_)
    assert mine.loss_ == pytest.approx(theirs.loss_, rel=1e-9, abs=1e-12)
    if lbfgs:
        assert not hasattr(mine, "loss_curve_") and not hasattr(theirs, "loss_curve_")
    else:
        np.testing.assert_allclose(mine.loss_curve_, theirs.loss_curve_, rtol=1e-9)
        for name in ("best_loss_", "best_validation_score_"):
            assert (getattr(mine, name) is None) == (getattr(theirs, name) is None)
        if theirs.validation_scores_ is not None:
            np.testing.assert_allclose(mine.validation_scores_, theirs.validation_scores_, rtol=1e-12)
    if kind == "MLPClassifier":
        np.testing.assert_array_equal(mine.classes_, theirs.classes_)
        np.testing.assert_array_equal(mine.predict(X), theirs.predict(X))
        np.testing.assert_allclose(mine.predict_proba(X), theirs.predict_proba(X), rtol=1e-7, atol=1e-9)
    else:
        np.testing.assert_allclose(mine.predict(X), theirs.predict(X), rtol=1e-7, atol=1e-9)


def test_multi_output_squared_error_has_scikit_learns_gradient_and_the_loss_that_belongs_to_it():
    # scikit-learn's loss_ averages the outputs while its gradient is that of the sum (scikit-learn#8349): the
    # weights follow scikit-learn's exactly, and loss_ is the summed loss (3 outputs: 3x scikit-learn's, alpha=0).
    theirs, mine = _fit_both("MLPRegressor", dict(hidden_layer_sizes=(10,), max_iter=10, alpha=0.0,
                                                  n_iter_no_change=100), X_MULTI, Y_MULTI, None)
    _assert_same_weights(theirs, mine)
    np.testing.assert_allclose(mine.loss_curve_, 3 * np.asarray(theirs.loss_curve_), rtol=1e-9)


def test_warm_start_and_partial_fit_continue_as_scikit_learns_do():
    params = dict(solver="sgd", learning_rate="invscaling", learning_rate_init=0.3, hidden_layer_sizes=(10,),
                  max_iter=3, random_state=0)
    theirs, mine = reference.MLPClassifier(**params), MLPClassifier(**params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for est in (theirs, mine):
            est.partial_fit(X_DIGITS[:200], Y_DIGITS[:200], classes=np.arange(10))
            est.partial_fit(X_DIGITS[200:], Y_DIGITS[200:])
            est.set_params(warm_start=True, max_iter=4)
            est.fit(X_DIGITS, Y_DIGITS)
            est.partial_fit(X_DIGITS, Y_DIGITS)
    _assert_same_weights(theirs, mine)
    assert (mine.n_iter_, mine.t_) == (theirs.n_iter_, theirs.t_) == (1, 200 + 100 + 4 * 300 + 300)
    np.testing.assert_allclose(mine.loss_curve_, theirs.loss_curve_, rtol=1e-9)


def test_float32_data_trains_in_float32_like_scikit_learn():
    X = X_DIGITS.astype(np.float32)
    theirs, mine = _fit_both("MLPClassifier", dict(hidden_layer_sizes=(20,), max_iter=5), X, Y_DIGITS, None)
    assert mine._model.dtype == "float32"
    _assert_same_weights(theirs, mine, rtol=2e-4, atol=1e-5)
    assert mine.predict_proba(X).dtype == np.float32


# -- the objective: every loss and the batch-scaled penalty, against finite differences ----------------------------
@pytest.mark.parametrize("kind, params, X, y", [
    ("MLPClassifier", {}, X_DIGITS[:40], Y_DIGITS[:40]),
    ("MLPClassifier", {"activation": "logistic"}, X_LABELS[:40], Y_LABELS[:40]),
    ("MLPRegressor", {"activation": "tanh"}, X_MULTI[:40], Y_MULTI[:40]),
    ("MLPRegressor", {"loss": "poisson"}, X_REG[:40], Y_COUNTS[:40]),
], ids=["softmax", "multilabel logistic", "multi-output squared error", "poisson"])
def test_gradient_of_every_loss_matches_finite_differences(kind, params, X, y):
    est = {"MLPClassifier": MLPClassifier, "MLPRegressor": MLPRegressor}[kind](
        hidden_layer_sizes=(4, 3), alpha=0.7, solver="lbfgs", max_iter=2, random_state=0, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X, y)
    model, n = est._model, X.shape[0]
    _, Y = est._validate_input(X, y, incremental=True, reset=False)
    targets = est._targets_on(model, Y)
    est._penalty.scale = 1.0 / n
    model.compute_gradients(X, targets)
    analytic = model.parameter_buffer.grads.copy()
    flat = model.parameter_buffer.values
    numeric = np.empty_like(analytic)
    for i in range(flat.shape[0]):
        keep = flat[i]
        flat[i] = keep + 1e-6
        up = float(model.test_step(X, targets)[0])
        flat[i] = keep - 1e-6
        down = float(model.test_step(X, targets)[0])
        flat[i] = keep
        numeric[i] = (up - down) / 2e-6
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-7)


# -- devices --------------------------------------------------------------------------------------------------------
def test_training_on_every_backend_matches_numpy(device):
    params = dict(hidden_layer_sizes=(16,), max_iter=5, batch_size=64, random_state=0, dtype="float64")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        on_numpy = MLPClassifier(**params).fit(X_DIGITS, Y_DIGITS)
        there = MLPClassifier(**params, **_where(device)).fit(X_DIGITS, Y_DIGITS)
    assert there._model.device == device
    assert_on_device(there._model.parameter_buffer.values, device)
    proba = there.predict_proba(X_DIGITS)
    assert isinstance(proba, np.ndarray)  # results come back as NumPy without array_api_dispatch
    np.testing.assert_allclose(proba, on_numpy.predict_proba(X_DIGITS), rtol=1e-8, atol=1e-10)
    np.testing.assert_array_equal(there.predict(X_DIGITS), on_numpy.predict(X_DIGITS))
    for a, b in zip(there.coefs_, on_numpy.coefs_):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)


def test_lbfgs_sparse_and_dropout_run_on_every_backend(device):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        lbfgs = MLPRegressor(solver="lbfgs", hidden_layer_sizes=(8,), max_iter=30, random_state=0, **_where(device))
        assert lbfgs.fit(scipy.sparse.csr_matrix(X_REG), Y_REG).score(X_REG, Y_REG) > 0.9
        first, second = (MLPClassifier(hidden_layer_sizes=(32, 16), dropout=[0.3, 0.1], max_iter=5, random_state=3,
                                       **_where(device)).fit(X_DIGITS, Y_DIGITS) for _ in range(2))
    assert [layer.kind for layer in first._model.layers] == ["dense", "dropout", "dense", "dropout", "dense"]
    np.testing.assert_array_equal(first.predict_proba(X_DIGITS), second.predict_proba(X_DIGITS))  # seeded dropout


def test_array_api_dispatch_keeps_inputs_and_outputs_on_their_device(monkeypatch):
    aas = pytest.importorskip("array_api_strict")
    monkeypatch.setenv("SCIPY_ARRAY_API", "1")
    device1 = aas.Device("device1")
    X, y = aas.asarray(X_DIGITS, device=device1), aas.asarray(Y_DIGITS, device=device1)
    with sklearn.config_context(array_api_dispatch=True), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = MLPClassifier(hidden_layer_sizes=(16,), max_iter=3, random_state=0).fit(X, y)
        assert est._model.device.backend == "array_api_strict" and est._model.device.device == device1
        proba, labels = est.predict_proba(X), est.predict(X)
        assert proba.device == device1 and labels.device == device1 and est.classes_.device == device1
        assert est.score(X, y) == pytest.approx(MLPClassifier(hidden_layer_sizes=(16,), max_iter=3, random_state=0)
                                                .fit(X_DIGITS, Y_DIGITS).score(X_DIGITS, Y_DIGITS))
        with pytest.raises(ValueError, match=r"MLPClassifier\.predict\(\) must use the same namespace"):
            est.predict(X_DIGITS)
    assert isinstance(est.coefs_[0], np.ndarray)


# -- scikit-learn machinery: clone, pipelines, grid search, pickling ------------------------------------------------
def test_partial_fit_takes_classes_in_the_namespace_of_x_under_array_api_dispatch(device, monkeypatch):
    if device.backend == "numpy":
        pytest.skip("NumPy arrays are not another namespace: nothing to dispatch")
    monkeypatch.setenv("SCIPY_ARRAY_API", "1")
    X, y = device.from_host(X_DIGITS), device.from_host(Y_DIGITS)
    with sklearn.config_context(array_api_dispatch=True):
        est = MLPClassifier(hidden_layer_sizes=(8,), random_state=0)
        est.partial_fit(X, y, classes=device.from_host(np.arange(10))).partial_fit(X, y)
        labels = est.predict(X)
    assert_on_device(labels, device)
    on_numpy = MLPClassifier(hidden_layer_sizes=(8,), random_state=0).partial_fit(X_DIGITS, Y_DIGITS,
                                                                                  classes=np.arange(10))
    np.testing.assert_array_equal(device.to_host(labels),
                                  on_numpy.partial_fit(X_DIGITS, Y_DIGITS).predict(X_DIGITS))


@needs_1_7
@pytest.mark.parametrize("kind", ["classifier", "regressor"])
def test_a_number_as_sample_weight_weighs_every_row_as_scikit_learn_does(device, kind):
    ours, theirs = {"classifier": (MLPClassifier, reference.MLPClassifier),
                    "regressor": (MLPRegressor, reference.MLPRegressor)}[kind]
    X, y = (X_DIGITS, Y_DIGITS) if kind == "classifier" else (X_REG, Y_REG)
    params = dict(hidden_layer_sizes=(8,), max_iter=3, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = ours(**params, **_where(device)).fit(X, y, sample_weight=2.5)
        expected = theirs(**params).fit(X, y, sample_weight=2.5)
    for a, b in zip(est.coefs_ + est.intercepts_, expected.coefs_ + expected.intercepts_):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12)


def test_clone_get_params_and_set_params_round_trip():
    est = MLPClassifier(hidden_layer_sizes=(7, 5), activation=["tanh", "relu"], dropout=[0.2, 0.0], backend="torch",
                        device="cpu", dtype="float32", max_iter=3, random_state=0)
    twin = clone(est)
    assert twin.get_params() == est.get_params() and twin is not est
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X_DIGITS, Y_DIGITS)
        assert not hasattr(clone(est), "n_iter_")
        est.set_params(hidden_layer_sizes=(4,), activation="logistic", dropout=0.0).fit(X_DIGITS, Y_DIGITS)
    assert [c.shape for c in est.coefs_] == [(64, 4), (4, 10)]
    assert est.coefs_[0].dtype == np.float32


def test_initial_weights_use_each_layers_glorot_factor():
    est = MLPClassifier(hidden_layer_sizes=(40, 30), activation=["logistic", "relu"], max_iter=1, random_state=0)
    est.partial_fit(X_DIGITS[:1], Y_DIGITS[:1], classes=np.arange(10))  # one step of lr 1e-3 moves little
    for coef, factor in zip(est.coefs_, [2.0, 6.0, 6.0]):  # logistic: 2, else 6; the output takes the last layer's
        bound = np.sqrt(factor / sum(coef.shape))
        assert 0.95 * bound < np.abs(coef).max() < bound + 2e-3


def test_grid_search_with_two_processes_finds_what_one_process_finds():
    pipe = Pipeline([("scale", StandardScaler()),
                     ("mlp", MLPClassifier(max_iter=20, learning_rate_init=0.01, random_state=0))])
    grid = {"mlp__hidden_layer_sizes": [(8,), (24,)], "mlp__alpha": [1e-4, 1.0]}
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for jobs in (1, 2):
            search = GridSearchCV(pipe, grid, cv=3, n_jobs=jobs).fit(X_DIGITS, Y_DIGITS)
            results.append((search.best_params_, search.cv_results_["mean_test_score"]))
    assert results[0][0] == results[1][0]
    np.testing.assert_array_equal(results[0][1], results[1][1])
    assert search.best_estimator_.score(X_DIGITS, Y_DIGITS) > 0.9


def test_pickle_carries_a_safetensors_model_and_training_continues_identically():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = MLPClassifier(hidden_layer_sizes=(10,), max_iter=3, random_state=0).fit(X_DIGITS, Y_DIGITS)
        state = est.__getstate__()
        assert "_model" not in state and state["_model_file"][8:9] == b"{"  # a safetensors header follows its size
        copy = pickle.loads(pickle.dumps(est))
        np.testing.assert_array_equal(copy.predict_proba(X_DIGITS), est.predict_proba(X_DIGITS))
        for e in (est, copy):  # Adam's moments and step count travel too
            e.partial_fit(X_DIGITS, Y_DIGITS)
    for a, b in zip(copy.coefs_ + copy.intercepts_, est.coefs_ + est.intercepts_):
        np.testing.assert_array_equal(a, b)


def test_a_pickle_or_deepcopy_with_dropout_continues_training_as_the_original_would(device):
    """scikit-learn pickles its random state, so a copy's partial_fit and warm start go on as the original's: with
    dropout the copy must carry the dropout generator's state too (it restarted from the seed: other masks)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = MLPClassifier(hidden_layer_sizes=(16,), dropout=0.3, max_iter=2, random_state=0,
                            **_where(device)).fit(X_DIGITS, Y_DIGITS)
        copies = [pickle.loads(pickle.dumps(est)), copy.deepcopy(est)]
        for e in (est, *copies):
            e.partial_fit(X_DIGITS, Y_DIGITS)
            e.set_params(warm_start=True, max_iter=1)
            e.fit(X_DIGITS, Y_DIGITS)
    for twin in copies:
        for a, b in zip(twin.coefs_ + twin.intercepts_, est.coefs_ + est.intercepts_):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("make, X, y", [
    (lambda where: MLPClassifier(hidden_layer_sizes=(8,), solver="sgd", max_iter=3, random_state=0, **where),
     X_DIGITS, Y_DIGITS),
    (lambda where: MLPClassifier(hidden_layer_sizes=(8,), max_iter=3, random_state=0, **where), X_LABELS, Y_LABELS),
    (lambda where: MLPRegressor(loss="poisson", hidden_layer_sizes=(8,), max_iter=3, random_state=0, **where),
     X_REG, Y_COUNTS),
    (lambda where: MLPRegressor(solver="lbfgs", hidden_layer_sizes=(8,), max_iter=3, random_state=0, **where),
     X_MULTI, Y_MULTI),
], ids=["softmax-sgd", "multilabel-adam", "poisson-adam", "multi-output-lbfgs"])
def test_every_fitted_estimator_unpickles_on_every_backend(device, make, X, y):
    """The pickled model file holds scikit-learn's own pieces (its L2 penalty, losses, exp output, SGD), which
    portanet's registries do not know: unpickling must not check the file's config against them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = make(_where(device)).fit(X, y)
    copy = pickle.loads(pickle.dumps(est))
    assert copy._model.device == device
    np.testing.assert_array_equal(copy.predict(X), est.predict(X))


def test_a_pickle_restores_the_network_as_fitted_whatever_set_params_changed_since(device):
    """set_params after fit changes what the next fit builds, not the fitted network: a pickle must restore that one
    (hidden layers, activations, dropout, the optimizer and its hyperparameters), not one built from the new values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = MLPClassifier(hidden_layer_sizes=(8,), max_iter=3, random_state=0, **_where(device)).fit(X_DIGITS,
                                                                                                       Y_DIGITS)
        proba = est.predict_proba(X_DIGITS)
        est.set_params(hidden_layer_sizes=(5, 5), activation="tanh", dropout=0.5, solver="lbfgs")
        copy = pickle.loads(pickle.dumps(est))
        np.testing.assert_array_equal(copy.predict_proba(X_DIGITS), proba)
        est.set_params(solver="adam", beta_1=0.5, learning_rate_init=0.1)
        copy = pickle.loads(pickle.dumps(est))
        for e in (est, copy):  # partial_fit goes on with the fitted Adam (beta_1=0.9, rate 1e-3), as it would unpickled
            e.partial_fit(X_DIGITS, Y_DIGITS)
    for a, b in zip(copy.coefs_ + copy.intercepts_, est.coefs_ + est.intercepts_):
        np.testing.assert_array_equal(a, b)


def test_unpickling_where_the_device_is_missing_restores_on_the_cpu():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = MLPRegressor(hidden_layer_sizes=(6,), max_iter=3, random_state=0).fit(X_REG, Y_REG)
    state = est.__getstate__()
    state["_model_place"] = ("cupy", "cuda:7", *state["_model_place"][2:])
    copy = MLPRegressor.__new__(MLPRegressor)
    with pytest.warns(RuntimeWarning, match=r"fitted on cuda:7 \(cupy\).*restored on the CPU"):
        copy.__setstate__(state)
    assert copy._model.device == "cpu"
    np.testing.assert_array_equal(copy.predict(X_REG), est.predict(X_REG))


# -- bad input and parameters ---------------------------------------------------------------------------------------
def test_bad_input_raises_as_scikit_learn_does():
    est = MLPClassifier(max_iter=2)
    with pytest.raises(NotFittedError):
        est.predict(X_DIGITS)
    with pytest.raises(NotFittedError):
        est.coefs_
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X_DIGITS, Y_DIGITS)
    with pytest.raises(ValueError, match="X has 3 features, but MLPClassifier is expecting 64 features"):
        est.predict(X_DIGITS[:, :3])
    bad = X_DIGITS.copy()
    bad[3, 5] = np.nan
    with pytest.raises(ValueError, match="Input X contains NaN"):
        est.predict(bad)
    with pytest.raises(ValueError, match="Input X contains NaN"):
        clone(est).fit(bad, Y_DIGITS)
    with pytest.raises(ValueError, match=r"`y` has classes not in `self.classes_`"):
        est.partial_fit(X_DIGITS[:5], np.array([0, 1, 2, 3, 42]))
    with pytest.raises(ValueError, match="classes must be passed on the first call to partial_fit"):
        MLPClassifier().partial_fit(X_DIGITS, Y_DIGITS)
    with pytest.raises(ValueError, match="is not the same as on last call to partial_fit"):
        est.partial_fit(X_DIGITS, Y_DIGITS, classes=np.arange(11))
    with pytest.raises(AttributeError, match="partial_fit") as info:
        MLPRegressor(solver="lbfgs").partial_fit
    assert "only available for stochastic optimizers. lbfgs is not stochastic" in str(info.value.__cause__)
    with pytest.raises(ValueError, match="Sample weights must contain at least one non-zero number"):
        clone(est).fit(X_DIGITS, Y_DIGITS, sample_weight=np.zeros(300))
    with pytest.raises(ValueError, match=r"sample_weight.shape == \(299,\), expected \(300,\)"):
        clone(est).fit(X_DIGITS, Y_DIGITS, sample_weight=np.ones(299))


@pytest.mark.parametrize("params, message", [
    ({"alpha": -1.0}, r"MLPClassifier alpha must be a number in \[0.0, inf\), got -1.0"),
    ({"hidden_layer_sizes": (10, 0)}, r"hidden_layer_sizes must be a positive integer or a sequence of them, got "
                                      r"\(10, 0\)"),
    ({"activation": "swish"}, r"activation must be one of \[.*'relu'.*\], got 'swish'"),
    ({"activation": ["tanh"], "hidden_layer_sizes": (4, 4)}, r"activation must be one name or a list of 2"),
    ({"dropout": 1.0}, r"dropout must be a number in \[0.0, 1.0\), got 1.0"),
    ({"dropout": 0.5, "solver": "lbfgs"}, r"dropout needs a stochastic solver"),
    ({"solver": "newton"}, r"solver must be one of \['adam', 'lbfgs', 'sgd'\], got 'newton'"),
    ({"batch_size": 0}, r"batch_size must be an integer >= 1, got 0"),
    ({"n_iter_no_change": 0}, r"n_iter_no_change must be an integer >= 1 or numpy.inf, got 0"),
    ({"momentum": 1.5}, r"momentum must be a number in \[0.0, 1.0\], got 1.5"),
    ({"dtype": "int32"}, r"dtype must be None \(follow X\), 'float32' or 'float64', got 'int32'"),
    ({"device": "tpu"}, r"unknown device 'tpu'"),
])
def test_bad_parameters_raise_at_fit_naming_the_parameter_and_change_nothing(params, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = MLPClassifier(hidden_layer_sizes=(5,), max_iter=2, random_state=0).fit(X_DIGITS, Y_DIGITS)
    before = est.predict_proba(X_DIGITS)
    with pytest.raises(ValueError, match=message):
        est.set_params(**params).fit(X_DIGITS, Y_DIGITS)
    np.testing.assert_array_equal(est.predict_proba(X_DIGITS), before)


@pytest.mark.parametrize("params, y, message", [
    ({"device": "tpu"}, Y_DIGITS % 2, "unknown .*device 'tpu'"),
    ({}, Y_DIGITS / 2, "Unknown label type"),
    ({"random_state": "seed"}, Y_DIGITS % 2, "cannot be used to seed"),
], ids=["device", "labels", "random_state"])
def test_a_fit_that_fails_before_training_leaves_the_fitted_estimator_whole(device, params, y, message):
    """The failing fit has another feature count and other classes: its validation must not leave them behind (the
    model would expect 64 features while n_features_in_ says 5, and label 10 outputs with 2 classes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = MLPClassifier(hidden_layer_sizes=(5,), max_iter=2, random_state=0, **_where(device)).fit(X_DIGITS,
                                                                                                       Y_DIGITS)
    before = est.predict_proba(X_DIGITS)
    with pytest.raises(ValueError, match=message):
        est.set_params(**params).fit(X_DIGITS[:, :5], y)
    assert est.n_features_in_ == 64
    np.testing.assert_array_equal(est.classes_, np.arange(10))
    np.testing.assert_array_equal(est.predict_proba(X_DIGITS), before)
    np.testing.assert_array_equal(est.predict(X_DIGITS), np.argmax(before, axis=1))


def test_poisson_refuses_negative_targets():
    with pytest.raises(ValueError, match=r"loss='poisson' needs targets y >= 0"):
        MLPRegressor(loss="poisson").fit(X_REG, Y_REG)
    with pytest.raises(ValueError, match=r"MLPRegressor loss must be one of \['poisson', 'squared_error'\]"):
        MLPRegressor(loss="huber").fit(X_REG, Y_REG)


# -- packaging ------------------------------------------------------------------------------------------------------
def test_import_portanet_does_not_import_scikit_learn():
    code = "import sys, portanet; assert 'sklearn' not in sys.modules and 'portanet.sklearn' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_scikit_learn_raises_an_import_error_naming_the_extra():
    code = ("import sys; sys.modules['sklearn'] = None\n"
            "try:\n    import portanet.sklearn\nexcept ImportError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert 'pip install "portanet[sklearn]"' in out
