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
SCRIPTS = ["xor.py", "sine.py", "mnist.py", "gradient_check.py", "export_onnx.py", "deep_mlp.py"]


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


def test_the_readme_quickstart_runs_as_pasted_on_a_machine_without_a_gpu(tmp_path):
    readme = (EXAMPLES.parent / "README.md").read_text()
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", readme, re.S).group(1)
    script = tmp_path / "quickstart.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                            cwd=EXAMPLES.parent)
    assert result.returncode == 0, result.stderr
    assert "epoch 5/5 - " in result.stdout and "'accuracy': " in result.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_example_documents_device_backend_and_threads_in_its_help(script):
    out = run_example(script, "--help")
    assert "--device" in out and "--backend" in out and "--threads N" in out
    summary = " ".join((EXAMPLES / script).read_text().split('"""')[1].split("\n\n")[0].split())
    assert summary in " ".join(out.split("options:")[0].split())  # the whole first paragraph, before the options


@pytest.mark.parametrize("form", [["--threads", "1"], ["--threads=1"]])
def test_threads_option_sets_blas_and_pytorch_threads_before_they_load(form):
    """What an example does: import _cli first, then numpy and torch; both must run one thread."""
    pytest.importorskip("threadpoolctl", reason="reading BLAS's thread count needs threadpoolctl (the bench extra)")
    pytest.importorskip("torch", reason="the torch extra is not installed")
    code = ("import sys; sys.path.insert(0, 'examples'); import _cli; import numpy, torch; "
            "from threadpoolctl import threadpool_info; "
            "print(sorted({p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas'}), "
            "torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    result = subprocess.run([sys.executable, "-c", code, *form], capture_output=True, text=True, timeout=120, env=env,
                            cwd=EXAMPLES.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[1]", "1"]


def test_threads_must_be_a_positive_integer():
    result = subprocess.run([sys.executable, str(EXAMPLES / "xor.py"), "--threads", "0"], capture_output=True,
                            text=True, timeout=120, cwd=EXAMPLES.parent)
    assert result.returncode == 2 and "--threads: must be a positive integer, got '0'" in result.stderr


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
    assert "epoch 2/2: " in result.stderr  # the tqdm bar, then the epoch's line with every log
    assert re.search(r"^epoch 2/2 - [\d.e+-]+s - loss: .* - val_accuracy: ", result.stdout, re.M)
    assert _number(r"test accuracy ([\d.]+)% after 2 epochs", result.stdout) > 80
    assert re.search(r"median [\d.]+ s per epoch on cpu \(numpy\)", result.stdout)
    assert re.search(r"^machine: .+ \(\d+ cores\); ", result.stdout, re.M)  # what the epoch time depends on


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


def test_sklearn_pipeline_example_documents_device_and_backend_in_its_help():
    pytest.importorskip("sklearn", reason='the example needs the sklearn extra: pip install "portanet[sklearn]"')
    out = run_example("sklearn_pipeline.py", "--help")
    assert "--device" in out and "--backend" in out


def test_sklearn_pipeline_example_grid_searches_with_two_processes_on_each_backend(device):
    pytest.importorskip("sklearn", reason='the example needs the sklearn extra: pip install "portanet[sklearn]"')
    out = run_example("sklearn_pipeline.py", "--max-iter", 2, *_cli(device))
    assert f"8 candidates x 3 folds, 2 processes, on {device.name} ({device.backend}, float64)" in out
    assert len(re.findall(r"^ +[\d.]+% \| alpha=", out, re.M)) == 8
    assert _number(r"held-out accuracy ([\d.]+)% on 450 digits", out) > 30


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


def _deep_mlp_results(out) -> tuple:
    """(deep accuracy, plain accuracy, rows of the deep network's table) from deep_mlp.py's report."""
    deep = _number(r"(?m)^deep  \(BatchNormalization, warm-up \+ cosine, global_clipnorm=1.0\): test accuracy ([\d.]+)% "
                   r"after \d+ epochs", out)
    plain = _number(r"(?m)^plain \(no normalization, constant lr 0.1, no clipping\): +test accuracy ([\d.]+)% "
                    r"(?:after \d+ epochs|\(the loss became NaN in epoch \d+\))", out)
    rows = re.findall(r"^ +(\d+) \| +([\d.e+-]+) \| +[\d.]+ \| +[\d.]+% \| +[\d.]+%$", out, re.M)
    return deep, plain, rows


def test_deep_mlp_example_runs_on_each_backend(device, mnist_dir):
    out = run_example("deep_mlp.py", "--epochs", 1, "--limit", 256, "--quiet", *_cli(device),
                      env={"PORTANET_DATA": str(mnist_dir.parent)})
    assert f"on {device.name} ({device.backend}): 20 hidden layers of 128 units" in out
    deep, plain, rows = _deep_mlp_results(out)
    assert [r[0] for r in rows] == ["1"] and float(rows[0][1]) == pytest.approx(0.1)  # 2 steps: the peak at the end
    assert 0 <= deep <= 100 and 0 <= plain <= 100


def test_deep_mlp_example_trains_the_normalized_network_and_not_the_plain_one(mnist_dir):
    # 188 steps: the normalized network reaches about 81% (98.2% takes the default 8 epochs on 60,000 images); the
    # plain one collapses to a constant prediction (10-11%).
    out = run_example("deep_mlp.py", "--epochs", 2, "--limit", 12000, "--quiet", "--data-dir", mnist_dir)
    deep, plain, rows = _deep_mlp_results(out)
    assert [r[0] for r in rows] == ["1", "2"]
    assert float(rows[1][1]) < 1e-4  # the cosine has come down to (nearly) 0 at the last step
    assert deep > 60 and plain < 20
