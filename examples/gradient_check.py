"""check_gradients catching a wrong derivative in a custom activation (Swish, x * sigmoid(x)).

    python examples/gradient_check.py
    python examples/gradient_check.py --backend array_api_strict --device device1

Both versions compute the same forward pass; the broken one forgets the product rule in its derivative.
The checker compares backprop with central finite differences in float64: ~1e-9 means right, ~1e-1 wrong.
"""


from _cli import example_parser  # examples/_cli.py: --device, --backend, --seed, --threads; imported before
                                  # numpy and portanet, so --threads reaches BLAS and PyTorch as they load

import numpy as np

import portanet as pn
from portanet.activations import ActivationFunction


class Swish(ActivationFunction):
    """swish(z) = z * sigmoid(z); swish'(z) = s + z * s * (1 - s) with s = sigmoid(z)."""

    name = "swish"

    def forward(self, z, xp):
        return z / (1.0 + xp.exp(-z))

    def backward(self, grad, z, a, xp):
        s = 1.0 / (1.0 + xp.exp(-z))
        return grad * (s + z * s * (1.0 - s))


class BrokenSwish(Swish):
    """The classic mistake: differentiating z * sigmoid(z) as if z were a constant."""

    name = "broken_swish"

    def backward(self, grad, z, a, xp):
        s = 1.0 / (1.0 + xp.exp(-z))
        return grad * z * s * (1.0 - s)


def check(activation, x, y, device, backend, seed):
    """Relative error per parameter of a 4-8-3 network using ``activation`` in its hidden layer."""
    model = pn.Model([pn.Dense(8, activation=activation), pn.Dense(3, activation="softmax")],
                     device=device, backend=backend, seed=seed)
    model.compile(loss="sparse_categorical_crossentropy", optimizer="adam")
    model.build(x.shape[1])
    return pn.check_gradients(model, x, y)


def main(argv=None):
    parser = example_parser(__doc__, "data and initial weights")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((16, 4)).astype("float32")
    y = rng.integers(0, 3, 16)
    worst = {}
    for activation in (Swish(), BrokenSwish()):
        errors = check(activation, x, y, args.device, args.backend, args.seed)
        worst[activation.name] = max(errors.values())
        print(f"{activation.name}: relative error of backprop vs finite differences")
        for name, error in errors.items():
            print(f"  {name:14s} {error:.1e}")
    for name, error in worst.items():
        verdict = "backprop is right" if error < 1e-6 else "the derivative is WRONG"
        print(f"{name}: worst error {error:.1e} -> {verdict}")
    return worst


if __name__ == "__main__":
    main()
