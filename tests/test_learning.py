"""End-to-end learning: XOR, sin(x) regression, and real MNIST above 95% in 2 epochs."""

import math

import numpy as np
import pytest

import portanet as pn
from portanet import datasets, to_numpy


def test_xor_reaches_full_accuracy(device):
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
    y = np.array([0, 1, 1, 0], dtype=np.float32)
    model = pn.Model([pn.Dense(8, "tanh"), pn.Dense(1, "sigmoid")], device=device, seed=0)
    model.compile("binary_crossentropy", pn.Adam(lr=0.05), metrics=["binary_accuracy"])
    history = model.fit(x, y, epochs=300, batch_size=4, verbose=0)
    assert history.history["binary_accuracy"][-1] == 1.0
    np.testing.assert_array_equal(to_numpy(model.predict(x))[:, 0] > 0.5, y > 0.5)


def test_sine_regression_reaches_low_error(device):
    x = np.linspace(-math.pi, math.pi, 256, dtype=np.float32).reshape(-1, 1)
    y = np.sin(x)
    model = pn.Model([pn.Dense(32, "tanh"), pn.Dense(32, "tanh"), pn.Dense(1)], device=device, seed=0)
    model.compile("mse", pn.Adam(lr=0.01))
    model.fit(x, y, epochs=400, batch_size=64, verbose=0)
    assert model.evaluate(x, y)["loss"] < 1e-3


@pytest.mark.slow
def test_mnist_two_hidden_layers_beat_95_percent_in_two_epochs(device, mnist_dir):
    (x_train, y_train), (x_test, y_test) = datasets.load_mnist(mnist_dir, download=False, normalize=True, flatten=True)
    model = pn.Model([pn.Dense(128, "relu"), pn.Dense(64, "relu"), pn.Dense(10, "softmax")], device=device, seed=0)
    model.compile("sparse_categorical_crossentropy", pn.Adam(lr=1e-3), metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=2, batch_size=64, verbose=0)
    assert model.evaluate(x_test, y_test)["accuracy"] > 0.95
