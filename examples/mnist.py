"""MNIST digits: a 784-256-128-10 ReLU network, softmax cross-entropy, Adam; over 98% test accuracy in 10 epochs.

    python examples/mnist.py                           # NumPy on the CPU, 10 epochs
    python examples/mnist.py --device cuda             # CuPy on the first GPU (pip install "portanet[cuda12]")
    python examples/mnist.py --backend torch --device cpu
    python examples/mnist.py --epochs 1 --limit 2000   # a quick look
    OMP_NUM_THREADS=1 mpiexec -n 2 python examples/mnist.py --distributed   # 2 processes (pip install "portanet[mpi]")

The IDX files are read from --data-dir, else $PORTANET_DATA/mnist, else ~/.cache/portanet/mnist, and downloaded
there (about 11 MB, checked by SHA-256) when absent. Dropout (0.2) after each hidden layer and a cosine decay of
the learning rate over the epochs keep the final accuracy steady. The test set is evaluated after every epoch.
With --distributed, each process of an mpiexec job trains on its share of every batch of --batch-size images (data
parallel: the same training as one process, the batch split over the processes) and rank 0 alone prints; set the
threads per process so that processes x threads fits the cores (OMP_NUM_THREADS).
"""

import math
import statistics
import time

from _cli import example_parser, machine_summary  # examples/_cli.py: --device, --backend, --seed, --threads;
                                                   # imported before numpy and portanet, so --threads reaches BLAS
                                                   # and PyTorch as they load

import portanet as pn
from portanet.callbacks import LearningRateScheduler
from portanet.datasets import load_mnist


class EpochTimer(pn.Callback):
    """Wall-clock seconds of each epoch (training pass plus the test-set evaluation)."""

    def __init__(self):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def main(argv=None):
    parser = example_parser(__doc__, "initial weights, shuffling and dropout")
    parser.add_argument("--epochs", type=int, default=10, help="default 10")
    parser.add_argument("--batch-size", type=int, default=128, help="default 128")
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="Adam's first learning rate, decayed to 0 along a cosine (default 1e-3)")
    parser.add_argument("--dropout", type=float, default=0.2, help="dropout rate after each hidden layer (default 0.2)")
    parser.add_argument("--data-dir", default=None, help="folder holding the four MNIST IDX files (plain or .gz)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="train on the first N training images")
    parser.add_argument("--quiet", action="store_true", help="one line per epoch instead of a progress bar")
    parser.add_argument("--distributed", action="store_true",
                        help="data-parallel training over the processes of an mpiexec job (MPI)")
    args = parser.parse_args(argv)
    comm = pn.distributed.get_communicator("mpi" if args.distributed else None)
    say = print if comm.is_root else (lambda *a, **k: None)  # rank 0 alone prints

    try:
        (x_train, y_train), (x_test, y_test) = load_mnist(args.data_dir, normalize=True, flatten=True)
    except FileNotFoundError as error:  # offline with no local copy: the message says where to put the files
        raise SystemExit(f"mnist.py: {error}") from None
    if args.limit is not None:
        x_train, y_train = x_train[:args.limit], y_train[:args.limit]

    model = pn.Model([
        pn.Dense(256, activation="relu"),
        pn.Dropout(args.dropout),
        pn.Dense(128, activation="relu"),
        pn.Dropout(args.dropout),
        pn.Dense(10, activation="softmax"),
    ], device=args.device, backend=args.backend, seed=args.seed)
    model.compile(loss="sparse_categorical_crossentropy", optimizer=pn.Adam(lr=args.lr), metrics=["accuracy"])
    ranks = f", {comm.size} processes" if comm.size > 1 else ""
    say(f"training on {len(x_train)} images, testing on {len(x_test)}, on {model.device.name} ({model.backend}){ranks}")

    def cosine(epoch, lr):  # big steps first, small ones at the end
        return args.lr * (1 + math.cos(math.pi * epoch / args.epochs)) / 2

    timer = EpochTimer()
    history = model.fit(x_train, y_train, epochs=args.epochs, batch_size=args.batch_size,
                        validation_data=(x_test, y_test), callbacks=[LearningRateScheduler(cosine), timer],
                        verbose=2 if args.quiet else 1, distributed="mpi" if args.distributed else None)

    say("epoch | train loss | train acc | test loss | test acc | seconds")
    for epoch, seconds in enumerate(timer.seconds):
        h = history.history
        say(f"{epoch + 1:5d} | {h['loss'][epoch]:10.4f} | {h['accuracy'][epoch]:8.2%} | "
            f"{h['val_loss'][epoch]:9.4f} | {h['val_accuracy'][epoch]:7.2%} | {seconds:7.2f}")
    accuracy = history.history["val_accuracy"][-1]
    say(f"test accuracy {accuracy:.2%} after {len(timer.seconds)} epochs; "
        f"median {statistics.median(timer.seconds):.2f} s per epoch on {model.device.name} ({model.backend})")
    say(f"machine: {machine_summary()}")  # epoch times depend on the processor and the BLAS kernel
    return accuracy


if __name__ == "__main__":
    main()
