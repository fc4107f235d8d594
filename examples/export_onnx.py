"""MNIST to ONNX: train a 784-128-10 ReLU network, export it, and serve the file with ONNX Runtime alone.

    python examples/export_onnx.py                            # 3 epochs on NumPy, writes a temporary mnist.onnx
    python examples/export_onnx.py --output mnist.onnx        # keep the file
    python examples/export_onnx.py --epochs 1 --limit 2000    # a quick look
    python examples/export_onnx.py --backend torch --device cpu --opset 21

Needs the onnx extra: pip install "portanet[onnx]". The serving half, serve() below, imports only numpy and
onnxruntime, as a server, a phone or a browser would; it runs in a separate Python process in which importing
portanet is made impossible, and it reads the test images from a .npy file. Both sides then report the test
accuracy, which agrees to the last image. The IDX files are found as in examples/mnist.py (--data-dir,
$PORTANET_DATA/mnist, ~/.cache/portanet/mnist, else downloaded).
"""

import os
import subprocess
import sys
import tempfile

from _cli import example_parser  # examples/_cli.py: --device, --backend, --seed, --threads; imported before
                                  # numpy and portanet, so --threads reaches BLAS and PyTorch as they load

import numpy as np


def serve(model_path, images, batch_size=4096):
    """Class probabilities (n, 10) of float images (n, 784) from the ONNX file alone: numpy and onnxruntime only."""
    import onnxruntime

    session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    (spec,) = session.get_inputs()  # "input", shape ["batch", 784]: any batch size
    dtype = np.float64 if spec.type == "tensor(double)" else np.float32
    return np.concatenate([session.run(["output"], {spec.name: images[i:i + batch_size].astype(dtype)})[0]
                           for i in range(0, len(images), batch_size)])


def _serve_files(model_path, images_path, out_path):
    """The serving process: ``python export_onnx.py --serve model.onnx images.npy probabilities.npy``."""
    sys.modules["portanet"] = None  # any "import portanet" in this process now raises ImportError
    np.save(out_path, serve(model_path, np.load(images_path)))


def main(argv=None):
    import portanet as pn  # the training half
    from portanet.datasets import load_mnist

    parser = example_parser(__doc__, "initial weights, shuffling and dropout")
    parser.add_argument("--epochs", type=int, default=3, help="default 3")
    parser.add_argument("--batch-size", type=int, default=128, help="default 128")
    parser.add_argument("--data-dir", default=None, help="folder holding the four MNIST IDX files (plain or .gz)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="train on the first N training images")
    parser.add_argument("--output", default=None, metavar="PATH",
                        help="where to write the ONNX file (default: a temporary folder, removed at the end)")
    parser.add_argument("--opset", type=int, default=None,
                        help=f"ONNX opset, {pn.export.MIN_OPSET} to {pn.export.MAX_OPSET} "
                             f"(default {pn.export.DEFAULT_OPSET}; ONNX Runtime 1.18 reads up to 21)")
    args = parser.parse_args(argv)
    try:
        import onnx  # noqa: F401  (export_onnx needs it; checked before training)
        import onnxruntime  # noqa: F401
    except ImportError as error:
        raise SystemExit(f'export_onnx.py needs onnx and onnxruntime: pip install "portanet[onnx]" ({error})') from None

    try:
        (x_train, y_train), (x_test, y_test) = load_mnist(args.data_dir, normalize=True, flatten=True)
    except FileNotFoundError as error:
        raise SystemExit(f"export_onnx.py: {error}") from None
    if args.limit is not None:
        x_train, y_train = x_train[:args.limit], y_train[:args.limit]

    model = pn.Model([pn.Dense(128, activation="relu"), pn.Dropout(0.2), pn.Dense(10, activation="softmax")],
                     device=args.device, backend=args.backend, seed=args.seed)
    model.compile(loss="sparse_categorical_crossentropy", optimizer=pn.Adam(lr=1e-3), metrics=["accuracy"])
    print(f"training on {len(x_train)} images, testing on {len(x_test)}, on {model.device.name} ({model.backend})")
    model.fit(x_train, y_train, epochs=args.epochs, batch_size=args.batch_size, verbose=2)
    expected = model.predict(x_test, to_numpy=True)

    with tempfile.TemporaryDirectory() as work:
        path = pn.export_onnx(model, args.output or os.path.join(work, "mnist.onnx"), opset=args.opset)
        print(f"exported to {path} ({os.path.getsize(path):,} bytes, opset "
              f"{args.opset or pn.export.DEFAULT_OPSET}){'' if args.output else ' (temporary; --output keeps it)'}")
        images, served_path = os.path.join(work, "x_test.npy"), os.path.join(work, "probabilities.npy")
        np.save(images, x_test)
        subprocess.run([sys.executable, os.path.abspath(__file__), "--serve", path, images, served_path], check=True)
        served = np.load(served_path)

    n = len(y_test)
    ours, theirs = np.argmax(expected, axis=1), np.argmax(served, axis=1)
    print(f"portanet     test accuracy {np.mean(ours == y_test):.2%} ({np.sum(ours == y_test)}/{n})")
    print(f"ONNX Runtime test accuracy {np.mean(theirs == y_test):.2%} ({np.sum(theirs == y_test)}/{n}), "
          "served without portanet")
    print(f"predicted classes that differ: {np.sum(ours != theirs)}; "
          f"max |probability difference|: {np.max(np.abs(expected - served)):.1e}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        _serve_files(*sys.argv[2:5])
    else:
        main()
