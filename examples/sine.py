"""Regression of sin(x) on [-pi, pi] the right way: tanh hidden layers, one linear output, mean squared error.

    python examples/sine.py                      # prints the test MSE (below 1e-3 with the defaults)
    python examples/sine.py --plot sine.png      # also saves a plot (needs matplotlib: pip install "portanet[plot]")
    python examples/sine.py --backend array_api_strict --device device1

Training points are drawn uniformly at random; the error is measured on an even grid of 1001 points.
"""

import time

from _cli import example_parser  # examples/_cli.py: --device, --backend, --seed, --threads; imported before
                                  # numpy and portanet, so --threads reaches BLAS and PyTorch as they load

import numpy as np

import portanet as pn


def main(argv=None):
    parser = example_parser(__doc__, "data and initial weights")
    parser.add_argument("--epochs", type=int, default=200, help="passes over the training points (default 200)")
    parser.add_argument("--batch-size", type=int, default=32, help="default 32")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    parser.add_argument("--samples", type=int, default=1024, help="training points (default 1024)")
    parser.add_argument("--plot", metavar="PATH", help="save a PNG of sin(x) and the network's fit to PATH")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    x = rng.uniform(-np.pi, np.pi, (args.samples, 1)).astype("float32")
    y = np.sin(x)
    x_grid = np.linspace(-np.pi, np.pi, 1001, dtype="float32")[:, None]
    y_grid = np.sin(x_grid)

    model = pn.Model([pn.Dense(32, activation="tanh"), pn.Dense(32, activation="tanh"), pn.Dense(1)],
                     device=args.device, backend=args.backend, seed=args.seed)
    model.compile(loss="mse", optimizer=pn.Adam(lr=args.lr))
    start = time.perf_counter()
    history = model.fit(x, y, epochs=args.epochs, batch_size=args.batch_size, verbose=0)
    seconds = time.perf_counter() - start
    mse = model.evaluate(x_grid, y_grid)["loss"]
    print(f"1-32-32-1 network on {model.device.name} ({model.backend}), {args.epochs} epochs in {seconds:.2f} s")
    print(f"final training loss {history['loss'][-1]:.2e}")
    print(f"test MSE on 1001 grid points: {mse:.2e} ({'below' if mse < 1e-3 else 'not below'} the 1e-3 target)")

    if args.plot:
        _plot(args.plot, x, y, x_grid, y_grid, model.predict(x_grid, to_numpy=True), mse)
        print(f"plot saved to {args.plot}")
    return mse


def _plot(path, x, y, x_grid, y_grid, fit, mse):
    try:
        import matplotlib
    except ImportError:
        raise SystemExit('--plot needs matplotlib: pip install "portanet[plot]"') from None
    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x[:, 0], y[:, 0], ".", ms=2, color="0.7", label="training points")
    ax.plot(x_grid[:, 0], y_grid[:, 0], lw=2, label="sin(x)")
    ax.plot(x_grid[:, 0], fit[:, 0], "--", lw=2, label=f"network (MSE {mse:.1e})")
    ax.set_xlabel("x")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
