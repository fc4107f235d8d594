"""The examples and the notebook, run as a user runs them (a subprocess, a headless kernel), on a small budget.

Each example runs on every backend of the ``device`` fixture; the seed problems are also run in full on NumPy.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = ["xor.py", "sine.py", "mnist.py", "gradient_check.py", "export_onnx.py"]


def _cli(device) -> list:
    """The ``--backend/--device`` arguments that select the fixture's device on an example's command line."""
    if device.backend == "numpy":
        return ["--device", "cpu"]
    if device.backend == "cupy":
        return ["--device", device.name]
    # array_api_strict devices are named "array_api_strict:device1"; the command line takes "device1".
    name = device.name.split(":", 1)[1] if device.backend == "array_api_strict" else device.name
    return ["--backend", device.backend, "--device", name]


def run_example(script, *args, env=None, timeout=300) -> str:
    """Run ``examples/script`` with ``args``; it must exit 0. Returns its stdout."""
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, **(env or {})}, cwd=EXAMPLES.parent)
    assert result.returncode == 0, f"{script} {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _number(pattern, text) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not found in:\n{text}"
    return float(match.group(1))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_example_documents_device_and_backend_in_its_help(script):
    out = run_example(script, "--help")
    assert "--device" in out and "--backend" in out


def test_xor_example_learns_the_whole_truth_table_with_its_defaults():
    out = run_example("xor.py")
    rows = re.findall(r"^\s+(\d)\s+(\d) \|\s+(\d)\s+\| [\d.]+ \| (\d)$", out, re.M)
    assert sorted(rows) == [("0", "0", "0", "0"), ("0", "1", "1", "1"), ("1", "0", "1", "1"), ("1", "1", "0", "0")]
    assert "accuracy 100%" in out


def test_xor_example_runs_on_each_backend(device):
    out = run_example("xor.py", "--epochs", 5, *_cli(device))
    assert f"on {device.name} ({device.backend})" in out
    assert len(re.findall(r"^\s+\d\s+\d \|", out, re.M)) == 4


def test_sine_example_reaches_mse_below_1e3_with_its_defaults():
    out = run_example("sine.py")
    assert _number(r"test MSE on 1001 grid points: (\S+)", out) < 1e-3


def test_sine_example_saves_a_png_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the plot extra)")
    path = tmp_path / "sine.png"
    run_example("sine.py", "--epochs", 1, "--plot", path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sine_example_runs_on_each_backend(device):
    out = run_example("sine.py", "--epochs", 1, "--samples", 256, *_cli(device))
    assert f"on {device.name} ({device.backend})" in out
    assert _number(r"test MSE on 1001 grid points: (\S+)", out) < 1.0


def test_gradient_check_example_passes_swish_and_catches_the_broken_derivative(device):
    out = run_example("gradient_check.py", *_cli(device))
    worst = dict(re.findall(r"^(\w+): worst error (\S+)", out, re.M))
    assert float(worst["swish"]) < 1e-6
    assert float(worst["broken_swish"]) > 1e-2
    assert "broken_swish: worst error" in out and "the derivative is WRONG" in out


def test_mnist_example_trains_on_a_subset_with_a_progress_bar(mnist_dir):
    result = subprocess.run([sys.executable, str(EXAMPLES / "mnist.py"), "--epochs", "2", "--limit", "2000",
                             "--data-dir", str(mnist_dir)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "training on 2000 images, testing on 10000" in result.stdout
    assert "epoch 2/2" in result.stderr and "batch" in result.stderr  # the tqdm bar
    assert _number(r"test accuracy ([\d.]+)% after 2 epochs", result.stdout) > 80
    assert re.search(r"median [\d.]+ s per epoch on cpu \(numpy\)", result.stdout)


def test_mnist_example_runs_on_each_backend(device, mnist_dir):
    out = run_example("mnist.py", "--epochs", 1, "--limit", 256, "--quiet", *_cli(device),
                      env={"PORTANET_DATA": str(mnist_dir.parent)})
    assert f"on {device.name} ({device.backend})" in out
    assert _number(r"test accuracy ([\d.]+)% after 1 epochs", out) > 20


def test_mnist_example_on_two_processes_reaches_the_one_process_accuracy_and_prints_once(mpiexec, mnist_dir):
    args = ["--epochs", 2, "--limit", 2000, "--quiet", "--data-dir", mnist_dir]
    one = run_example("mnist.py", *args, env={"OMP_NUM_THREADS": "1"})
    result = subprocess.run([*mpiexec, "-n", "2", sys.executable, str(EXAMPLES / "mnist.py"), "--distributed",
                             *map(str, args)], capture_output=True, text=True, timeout=300, cwd=EXAMPLES.parent,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    two = result.stdout
    assert "training on 2000 images, testing on 10000, on cpu (numpy), 2 processes" in two
    assert len(re.findall(r"^test accuracy ", two, re.M)) == 1 and len(re.findall(r"^epoch 2/2 - ", two, re.M)) == 1
    accuracy_one = _number(r"test accuracy ([\d.]+)% after 2 epochs", one)
    accuracy_two = _number(r"test accuracy ([\d.]+)% after 2 epochs", two)
    assert accuracy_one > 80 and abs(accuracy_two - accuracy_one) < 2.0, (accuracy_one, accuracy_two)


def test_mnist_example_says_where_to_put_the_files_when_offline(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on: the proxy "connection refused" stands for offline
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    offline = {name: dead for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "all_proxy")}
    result = subprocess.run([sys.executable, str(EXAMPLES / "mnist.py"), "--data-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, env={**env, **offline})
    assert result.returncode != 0
    assert "MNIST files missing" in result.stderr and str(tmp_path) in result.stderr
    assert "Traceback" not in result.stderr


def _served_counts(out) -> tuple:
    """(correct by portanet, correct by ONNX Runtime, test size) from export_onnx.py's report."""
    ours = re.search(r"^portanet +test accuracy [\d.]+% \((\d+)/(\d+)\)$", out, re.M)
    theirs = re.search(r"^ONNX Runtime test accuracy [\d.]+% \((\d+)/(\d+)\), served without portanet$", out, re.M)
    assert ours and theirs, out
    return int(ours.group(1)), int(theirs.group(1)), int(ours.group(2))


def test_export_onnx_example_serves_the_same_accuracy_without_portanet(mnist_dir, tmp_path):
    pytest.importorskip("onnx", reason='export needs the onnx extra: pip install "portanet[onnx]"')
    pytest.importorskip("onnxruntime", reason='serving needs the onnx extra: pip install "portanet[onnx]"')
    path = tmp_path / "mnist.onnx"
    out = run_example("export_onnx.py", "--epochs", 1, "--limit", 2000, "--data-dir", mnist_dir, "--output", path,
                      "--opset", 21)
    ours, theirs, n = _served_counts(out)
    assert n == 10000 and ours == theirs and ours > 6000
    assert f"exported to {path}" in out and "opset 21" in out and path.exists()
    assert "predicted classes that differ: 0" in out


def test_export_onnx_example_runs_on_each_backend(device, mnist_dir):
    pytest.importorskip("onnx", reason='export needs the onnx extra: pip install "portanet[onnx]"')
    pytest.importorskip("onnxruntime", reason='serving needs the onnx extra: pip install "portanet[onnx]"')
    out = run_example("export_onnx.py", "--epochs", 1, "--limit", 256, *_cli(device),
                      env={"PORTANET_DATA": str(mnist_dir.parent)})
    assert f"on {device.name} ({device.backend})" in out
    ours, theirs, _ = _served_counts(out)
    assert ours == theirs and ours > 2000


def _kernel_manager(tmp_path):
    """A kernel running this very interpreter, whatever kernelspecs the machine has installed."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = tmp_path / "kernels" / "portanet-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "portanet test", "language": "python",
    }))
    specs = KernelSpecManager(kernel_dirs=[str(spec.parent)])
    return KernelManager(kernel_name="portanet-test", kernel_spec_manager=specs)


def test_switching_backends_notebook_runs_headlessly_and_its_checks_hold(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("array_api_strict")
    nb = nbformat.read(EXAMPLES / "switching_backends.ipynb", as_version=4)
    nbclient.NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=300,
                            resources={"metadata": {"path": str(EXAMPLES)}}).execute()
    text = "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)
    assert "max |prediction difference| after the move:" in text
    assert "array_api_strict on array_api_strict:device1: accuracy" in text
    assert "numpy on cpu: accuracy" in text
    assert "parameters agree with the twin: True" in text
