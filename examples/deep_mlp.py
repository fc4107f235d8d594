"""A 20-hidden-layer MLP on MNIST: normalization, warm-up + cosine and gradient clipping make it train; without them
the same network does not.

    python examples/deep_mlp.py                          # both networks, NumPy on the CPU, 8 epochs each
    python examples/deep_mlp.py --epochs 1 --limit 5000  # a quick look
    python examples/deep_mlp.py --backend torch --device cpu

Both networks have 20 hidden layers of 128 units (ReLU, He-normal initial weights), a softmax output, and train with
SGD (momentum 0.9, batch 128) at a peak learning rate of 0.1:

- deep: each hidden layer is Dense (no bias) -> BatchNormalization (momentum 0.9, PyTorch's default: Keras's 0.99
  needs thousands of steps before the moving statistics are fit for inference) -> ReLU; the learning rate rises
  linearly from lr/10 to lr over the first 10% of the steps, then follows a cosine to 0 (pn.CosineDecay with
  warm-up, stepped every batch); gradients are scaled to a global norm of at most 1 (global_clipnorm=1.0: at the
  start their norm is about 90, the exploding gradients of deep batch-normalized networks); weight decay 5e-4 on
  the kernels (the model's default mask skips BatchNormalization's gamma and beta).
- plain: Dense(relu) layers, the learning rate constant at lr, no clipping, no weight decay. It collapses to a
  constant prediction (or its loss becomes NaN); at a tenth of the rate it would train, to a lower accuracy.

The rate each epoch ended with is logged in the History ("lr") and printed with the deep network's table. The IDX
files are read from --data-dir, else $PORTANET_DATA/mnist, else ~/.cache/portanet/mnist (downloaded when absent).
"""

import math
import time

import portanet as pn
from portanet.datasets import load_mnist

from _cli import example_parser  # examples/_cli.py: --device, --backend, --seed


def deep_network(width, depth, args):
    """Dense (no bias: BatchNormalization's beta is the offset) -> BatchNormalization -> ReLU, ``depth`` times."""
    layers = []
    for _ in range(depth):
        layers += [pn.Dense(width, use_bias=False), pn.BatchNormalization(momentum=0.9), pn.Activation("relu")]
    return pn.Model(layers + [pn.Dense(10, "softmax")], device=args.device, backend=args.backend, seed=args.seed)


def plain_network(width, depth, args):
    layers = [pn.Dense(width, "relu") for _ in range(depth)]
    return pn.Model(layers + [pn.Dense(10, "softmax")], device=args.device, backend=args.backend, seed=args.seed)


def train(model, optimizer, data, args):
    """Fit with the test set evaluated after each epoch; returns (History, test accuracy at the end, seconds). A NaN
    loss ends training quietly (TerminateOnNaN): the model keeps its last finite weights, which are then tested."""
    (x_train, y_train), (x_test, y_test) = data
    model.compile("sparse_categorical_crossentropy", optimizer, metrics=["accuracy"])
    start = time.perf_counter()
    history = model.fit(x_train, y_train, epochs=args.epochs, batch_size=args.batch_size,
                        validation_data=(x_test, y_test), callbacks=[pn.TerminateOnNaN()],
                        verbose=0 if args.quiet else 2)
    seconds = time.perf_counter() - start
    if len(history.epoch) == args.epochs:
        return history, history.history["val_accuracy"][-1], seconds
    return history, model.evaluate(x_test, y_test)["accuracy"], seconds


def main(argv=None):
    parser = example_parser(__doc__, "initial weights and shuffling")
    parser.add_argument("--epochs", type=int, default=8, help="epochs for each network (default 8)")
    parser.add_argument("--batch-size", type=int, default=128, help="default 128")
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate of SGD (default 0.1)")
    parser.add_argument("--width", type=int, default=128, help="units per hidden layer (default 128)")
    parser.add_argument("--depth", type=int, default=20, help="hidden layers (default 20)")
    parser.add_argument("--data-dir", default=None, help="folder holding the four MNIST IDX files (plain or .gz)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="train on the first N training images")
    parser.add_argument("--quiet", action="store_true", help="no line per epoch while training")
    args = parser.parse_args(argv)

    try:
        (x_train, y_train), (x_test, y_test) = load_mnist(args.data_dir, normalize=True, flatten=True)
    except FileNotFoundError as error:  # offline with no local copy: the message says where to put the files
        raise SystemExit(f"deep_mlp.py: {error}") from None
    if args.limit is not None:
        x_train, y_train = x_train[:args.limit], y_train[:args.limit]
    data = (x_train, y_train), (x_test, y_test)

    deep = deep_network(args.width, args.depth, args)
    print(f"training on {len(x_train)} images, testing on {len(x_test)}, on {deep.device.name} ({deep.backend}): "
          f"{args.depth} hidden layers of {args.width} units, {args.epochs} epochs each")
    steps = math.ceil(len(x_train) / args.batch_size) * args.epochs
    warmup = max(1, steps // 10)
    schedule = pn.CosineDecay(args.lr / 10, decay_steps=max(1, steps - warmup), warmup_target=args.lr,
                              warmup_steps=warmup)
    optimizer = pn.SGD(schedule, momentum=0.9, global_clipnorm=1.0, weight_decay=5e-4)
    history, deep_accuracy, seconds = train(deep, optimizer, data, args)
    h = history.history
    print("deep network: epoch | lr at its end | train loss | train acc | test acc")
    for epoch in history.epoch:
        print(f"{epoch + 1:18d} | {h['lr'][epoch]:13.3g} | {h['loss'][epoch]:10.4f} | {h['accuracy'][epoch]:8.2%} | "
              f"{h['val_accuracy'][epoch]:7.2%}")

    plain = plain_network(args.width, args.depth, args)
    plain_history, plain_accuracy, plain_seconds = train(plain, pn.SGD(args.lr, momentum=0.9), data, args)
    done = len(plain_history.epoch)
    plain_end = f"after {done} epochs" if done == args.epochs else f"(the loss became NaN in epoch {done + 1})"

    print(f"deep  (BatchNormalization, warm-up + cosine, global_clipnorm=1.0): test accuracy {deep_accuracy:.2%} "
          f"after {len(history.epoch)} epochs, {seconds:.0f} s")
    print(f"plain (no normalization, constant lr {args.lr:g}, no clipping):      test accuracy {plain_accuracy:.2%} "
          f"{plain_end}, {plain_seconds:.0f} s")
    return deep_accuracy, plain_accuracy


if __name__ == "__main__":
    main()
