"""Initializers against Keras 3's formulas: large host draws checked for their distribution (Kolmogorov-Smirnov
against scipy.stats), spread and bounds; orthogonality; one seed, the same values everywhere; names and errors."""

import math

import numpy as np
import pytest

from portanet import initializers

stats = pytest.importorskip("scipy.stats")

SHAPE = (400, 500)  # fan_in 400, fan_out 500: 200,000 draws
FAN_IN, FAN_OUT = SHAPE


def _draw(init, shape=SHAPE, seed=0):
    values = init(shape, np.random.default_rng(seed))
    assert isinstance(values, np.ndarray) and values.dtype == np.float64 and values.shape == tuple(shape)
    return values


def _ks(values, dist):
    return stats.kstest(values.ravel(), dist.cdf).pvalue


def test_keras_truncation_constant_is_the_std_of_a_standard_normal_cut_at_two():
    assert initializers.TRUNCATED_STDDEV == pytest.approx(stats.truncnorm(-2, 2).std(), rel=1e-15)


# (name, Keras's variance scale / n, distribution)
VARIANCE_SCALING = [
    ("glorot_uniform", 2.0 / (FAN_IN + FAN_OUT), "uniform"),
    ("glorot_normal", 2.0 / (FAN_IN + FAN_OUT), "truncated"),
    ("he_uniform", 2.0 / FAN_IN, "uniform"),
    ("he_normal", 2.0 / FAN_IN, "truncated"),
    ("lecun_uniform", 1.0 / FAN_IN, "uniform"),
    ("lecun_normal", 1.0 / FAN_IN, "truncated"),
]


@pytest.mark.parametrize("name,variance,kind", VARIANCE_SCALING, ids=[c[0] for c in VARIANCE_SCALING])
def test_variance_scaling_presets_follow_keras(name, variance, kind):
    values = _draw(initializers.get(name))
    std = math.sqrt(variance)
    if kind == "uniform":  # Keras: uniform on [-sqrt(3 * variance), sqrt(3 * variance)]
        limit = math.sqrt(3.0 * variance)
        dist = stats.uniform(-limit, 2 * limit)
        assert np.abs(values).max() <= limit
    else:  # Keras: normal of stddev sqrt(variance) / .87962566103423978 truncated at 2 of those stddevs
        scale = std / 0.87962566103423978
        dist = stats.truncnorm(-2, 2, scale=scale)
        assert np.abs(values).max() <= 2 * scale
    assert _ks(values, dist) > 1e-3
    assert values.std() == pytest.approx(std, rel=0.01)
    assert abs(values.mean()) < 0.01 * std


def test_glorot_uniform_limit_is_torch_xavier_uniform_limit():
    torch = pytest.importorskip("torch")
    w = torch.empty(FAN_OUT, FAN_IN, dtype=torch.float64)  # torch stores (out, in); portanet kernels are (in, out)
    torch.nn.init.xavier_uniform_(w, generator=torch.Generator().manual_seed(0))
    ours = _draw(initializers.GlorotUniform())
    limit = math.sqrt(6.0 / (FAN_IN + FAN_OUT))
    assert w.abs().max().item() <= limit and np.abs(ours).max() <= limit
    assert stats.ks_2samp(ours.ravel(), w.numpy().ravel()).pvalue > 1e-3


@pytest.mark.parametrize("mode,n", [("fan_in", FAN_IN), ("fan_out", FAN_OUT), ("fan_avg", (FAN_IN + FAN_OUT) / 2)])
def test_variance_scaling_untruncated_normal(mode, n):
    values = _draw(initializers.VarianceScaling(scale=3.0, mode=mode, distribution="untruncated_normal"))
    assert _ks(values, stats.norm(scale=math.sqrt(3.0 / n))) > 1e-3


@pytest.mark.parametrize("init,dist", [
    (initializers.RandomNormal(), stats.norm(0.0, 0.05)),
    (initializers.RandomNormal(mean=1.0, stddev=2.0), stats.norm(1.0, 2.0)),
    (initializers.RandomUniform(), stats.uniform(-0.05, 0.1)),
    (initializers.RandomUniform(minval=2.0, maxval=5.0), stats.uniform(2.0, 3.0)),
    (initializers.TruncatedNormal(), stats.truncnorm(-2, 2, scale=0.05)),
    (initializers.TruncatedNormal(mean=-1.0, stddev=0.5), stats.truncnorm(-2, 2, loc=-1.0, scale=0.5)),
], ids=lambda v: repr(v) if isinstance(v, initializers.Initializer) else "")
def test_random_initializers_draw_their_distribution(init, dist):
    assert _ks(_draw(init), dist) > 1e-3


@pytest.mark.parametrize("shape", [(50, 20), (20, 50), (30, 30), (4, 5, 6)])
@pytest.mark.parametrize("gain", [1.0, 2.5])
def test_orthogonal_gives_orthonormal_rows_or_columns_times_gain(shape, gain):
    w = _draw(initializers.Orthogonal(gain=gain), shape).reshape(-1, shape[-1])
    product = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    np.testing.assert_allclose(product, gain**2 * np.eye(product.shape[0]), atol=1e-12)


def test_orthogonal_columns_are_signed_by_the_diagonal_of_r():
    a = np.random.default_rng(3).standard_normal((6, 4))  # what Orthogonal draws for (6, 4) from seed 3
    q, r = np.linalg.qr(a)
    np.testing.assert_allclose(_draw(initializers.Orthogonal(), (6, 4), seed=3), q * np.sign(np.diag(r)), rtol=1e-15)


def test_constants():
    assert (_draw(initializers.Zeros(), (3, 2)) == 0).all()
    assert (_draw(initializers.Ones(), (3,)) == 1).all()
    assert (_draw(initializers.Constant(0.25), (2, 2)) == 0.25).all()
    np.testing.assert_array_equal(_draw(initializers.Identity(gain=3.0), (2, 3)), 3.0 * np.eye(2, 3))


def test_fans_follow_keras():
    assert initializers.compute_fans((3, 5)) == (3, 5)
    assert initializers.compute_fans((7,)) == (7, 7)  # a bias
    assert initializers.compute_fans(()) == (1, 1)
    assert initializers.compute_fans((2, 3, 4, 5)) == (4 * 6, 5 * 6)


def test_one_seed_gives_the_same_values_on_every_backend(device):
    init = initializers.HeNormal()
    host = init((8, 4), np.random.default_rng(42))
    again = init((8, 4), np.random.default_rng(42))
    np.testing.assert_array_equal(host, again)
    on_device = device.asarray(host, "float64")
    assert device.owns(on_device)
    np.testing.assert_array_equal(__import__("portanet").to_numpy(on_device), host)


def test_keras_defaults_and_names():
    assert initializers.get("random_normal").get_config() == {"name": "random_normal", "mean": 0.0, "stddev": 0.05}
    assert initializers.get("random_uniform").get_config() == {"name": "random_uniform", "minval": -0.05,
                                                              "maxval": 0.05}
    assert initializers.get("constant").value == 0.0 and initializers.get("orthogonal").gain == 1.0
    assert isinstance(initializers.get("HeNormal"), initializers.HeNormal)
    assert initializers.get("variance_scaling").get_config() == {
        "name": "variance_scaling", "scale": 1.0, "mode": "fan_in", "distribution": "truncated_normal"}
    assert initializers.VarianceScaling(distribution="normal").distribution == "truncated_normal"  # Keras's alias
    assert initializers.get(None) is None


@pytest.mark.parametrize("name", sorted(initializers.INITIALIZERS))
def test_config_round_trip(name):
    init = initializers.get(name)
    assert initializers.get(init.get_config()) == init


@pytest.mark.parametrize("make,error,match", [
    (lambda: initializers.get("xavier"), ValueError, "unknown initializer 'xavier'; expected one of"),
    (lambda: initializers.get({"name": "he_normal", "scale": 3}), ValueError, "bad arguments for initializer"),
    (lambda: initializers.VarianceScaling(scale=0), ValueError, "VarianceScaling scale must be a finite number > 0"),
    (lambda: initializers.VarianceScaling(mode="fan"), ValueError, "mode must be 'fan_in', 'fan_out' or 'fan_avg'"),
    (lambda: initializers.VarianceScaling(distribution="cauchy"), ValueError, "distribution must be"),
    (lambda: initializers.RandomNormal(stddev=-1), ValueError, "RandomNormal stddev must be a finite number >= 0"),
    (lambda: initializers.RandomUniform(1.0, 0.0), ValueError, "maxval must be >= minval"),
    (lambda: initializers.Orthogonal()((5,), np.random.default_rng(0)), ValueError, "rank >= 2, got"),
    (lambda: initializers.Identity()((2, 2, 2), np.random.default_rng(0)), ValueError, "2-D shape"),
    (lambda: initializers.HeNormal()((3, -1), np.random.default_rng(0)), ValueError, "shape must be a tuple of"),
    (lambda: initializers.HeNormal()((3, 2), 0), TypeError, "rng must be a numpy.random.Generator"),
])
def test_bad_arguments_raise(make, error, match):
    with pytest.raises(error, match=match):
        make()


# -- in Dense: by name or object, defaults by activation, drawn from the model's seed ---------------------------------
def _initial(device="cpu", seed=5, **dense):
    import portanet as pn

    model = pn.Model([pn.Dense(300, "relu"), pn.Dense(200, "tanh", **dense)], device=device, dtype="float64",
                     seed=seed).build(400)
    return {k: pn.to_numpy(v).copy() for k, v in model.parameters().items()}


def test_dense_defaults_are_truncated_he_normal_for_relu_glorot_uniform_otherwise_and_zero_biases():
    params, rng = _initial(), np.random.default_rng(5)  # Model(seed=5) draws from default_rng(5), layer by layer
    np.testing.assert_array_equal(params["dense_0.kernel"], initializers.HeNormal()((400, 300), rng))
    np.testing.assert_array_equal(params["dense_1.kernel"], initializers.GlorotUniform()((300, 200), rng))
    assert not params["dense_0.bias"].any() and not params["dense_1.bias"].any()
    kernel, std = params["dense_0.kernel"], math.sqrt(2 / 400)
    assert np.abs(kernel).max() <= 2 * std / initializers.TRUNCATED_STDDEV  # truncated, as Keras's he_normal
    assert kernel.std() == pytest.approx(std, rel=0.02)


@pytest.mark.parametrize("spec", ["orthogonal", {"name": "orthogonal", "gain": 2.0}, initializers.RandomUniform(-1, 1),
                                  "HeUniform"], ids=["name", "config", "object", "keras-class-name"])
def test_dense_takes_initializers_by_name_config_or_object(spec):
    params, rng = _initial(kernel_initializer=spec, bias_initializer=initializers.Constant(0.5)), \
        np.random.default_rng(5)
    initializers.HeNormal()((400, 300), rng)
    np.testing.assert_array_equal(params["dense_1.kernel"], initializers.get(spec)((300, 200), rng))
    assert (params["dense_1.bias"] == 0.5).all()


def test_dense_initial_weights_are_the_same_on_every_backend(device):
    import portanet as pn

    on_device = _initial(device, kernel_initializer="lecun_normal", bias_initializer="random_normal")
    for name, value in _initial(kernel_initializer="lecun_normal", bias_initializer="random_normal").items():
        np.testing.assert_array_equal(on_device[name], value, err_msg=name)
    model = pn.Model([pn.Dense(3, kernel_initializer="ones")], device=device).build(2)
    assert all(device.owns(v) for v in model.parameters().values())


def test_dense_initializer_configs_round_trip():
    import portanet as pn

    layer = pn.Dense(3, kernel_initializer="orthogonal", bias_initializer={"name": "constant", "value": 0.1})
    config = layer.get_config()
    assert config["kernel_initializer"] == {"name": "orthogonal", "gain": 1.0}
    assert config["bias_initializer"] == {"name": "constant", "value": 0.1}
    assert pn.Dense(3).get_config()["kernel_initializer"] is None  # the default follows the activation
    assert pn.layers.get(config).get_config() == config
    assert pn.layers.get({**config, "kernel_initializer": "he_normal"}).kernel_initializer == initializers.HeNormal()


@pytest.mark.parametrize("kwargs,error,match", [
    ({"kernel_initializer": "he_norm"}, ValueError, r"Dense kernel_initializer: unknown initializer 'he_norm'"),
    ({"bias_initializer": {"name": "constant", "value": "x"}}, ValueError,
     r"Dense bias_initializer: .*Constant value must be a finite number"),
    ({"kernel_initializer": 0.1}, TypeError, r"Dense kernel_initializer: initializer must be a name"),
])
def test_a_bad_dense_initializer_names_the_argument(kwargs, error, match):
    import portanet as pn

    with pytest.raises(error, match=match):
        pn.Dense(3, **kwargs)


class _Transposed(initializers.Initializer):
    """A custom initializer with a bug: it draws (units, in) for a kernel of shape (in, units)."""

    name = "transposed"

    def _draw(self, shape, rng):
        return rng.standard_normal(tuple(reversed(shape)))


class _KerasStyle(initializers.Initializer):
    """Written as for Keras (``__call__(shape, dtype=None)``), returning NaN by mistake."""

    def __call__(self, shape, dtype=None):
        return np.full(shape, np.nan)


@pytest.mark.parametrize("layer,match", [
    (lambda pn: pn.Dense(3, kernel_initializer=_Transposed(), name="wide"),
     r"Dense 'wide' kernel_initializer _Transposed\(\) gave values of shape \(3, 4\) for a parameter of shape "
     r"\(4, 3\)"),
    (lambda pn: pn.Dense(3, bias_initializer=_KerasStyle()), r"Dense 'dense_0' bias_initializer .* gave NaN or inf"),
    (lambda pn: pn.LayerNormalization(gamma_initializer=_KerasStyle()),
     r"LayerNormalization 'layer_normalization_0' gamma_initializer .* gave NaN or inf"),
])
def test_a_custom_initializer_giving_the_wrong_shape_or_nan_is_refused_at_build(layer, match):
    import portanet as pn

    model = pn.Model([layer(pn)], seed=0)
    with pytest.raises(ValueError, match=match):
        model.build(4)
    assert not model.built
