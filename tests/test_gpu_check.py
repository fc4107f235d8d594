"""ci/gpu-check's pieces on the CPU, fed what the real commands print, so that a GPU run's few minutes are not lost
to a parsing error: the report (ci/gpu_report.py), its table (benchmarks/gpu_table.py), and the benchmarks' GPU
plumbing (benchmarks/mlp.py's compute shape and CuPy targets, benchmarks/gpu.py on the CuPy stand-in)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from cupy_stand_in import NumpyAsCupy

from portanet import resolve_device

ROOT = Path(__file__).resolve().parents[1]


def _module(relative):
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(f"portanet_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mlp():
    pytest.importorskip("threadpoolctl")
    return _module("benchmarks/mlp.py")


@pytest.fixture(scope="module")
def gpu_bench():
    return _module("benchmarks/gpu.py")


def test_gemm_flops_count_the_products_the_gemm_bound_times(mlp):
    # 3-4-5: forward 3*4 + 4*5, weight gradients the same, input gradients 4*5 only; 2 flops per multiply-add
    assert mlp.gemm_flops((3, 4, 5), 2) == 2 * 2 * (2 * (12 + 20) + 20)


def test_the_compute_shape_reports_tflops_and_the_fraction_of_the_gemm_bound(mlp, monkeypatch):
    monkeypatch.setitem(mlp.SHAPES, "compute", ((48, 32, 32, 10), 64))  # the shape's plumbing, at a CPU's size
    report = mlp.main(["--json", "--shapes", "compute", "--samples", "64", "--compute-samples", "256", "--repeats", "1",
                       "--no-sklearn", "--no-memory", "--no-predict", "--threads", "1"])
    shape = report["shapes"]["compute"]
    assert shape["samples"] == 256 and shape["widths"] == [48, 32, 32, 10]
    seconds = {k: v["min"] for k, v in shape["seconds"].items()}
    assert shape["fraction_of_gemm_bound"]["portanet"] == pytest.approx(seconds["gemm_bound"] / seconds["portanet"],
                                                                        rel=0.01, abs=1e-3)
    flops = mlp.gemm_flops((48, 32, 32, 10), 256)
    assert shape["tflop_per_s"]["gemm_bound"] == pytest.approx(flops / seconds["gemm_bound"] / 1e12, rel=0.01,
                                                               abs=1e-3)


def test_cupy_targets_are_checked_for_the_shipped_path_and_with_kernels(mlp):
    def entry(portanet, portable, fraction=None):
        return {"ratio_to_pytorch": {"portanet": portanet, "portanet_portable": portable},
                "fraction_of_gemm_bound": {"portanet": fraction, "portanet_portable": fraction}}

    report = {"machine": {"backend": "cupy"}, "shapes": {"typical": entry(1.2, 1.4), "throughput": entry(1.0, 1.1),
                                                          "compute": entry(None, None, fraction=0.84)}}
    met = {k: v["met"] for k, v in mlp.check_targets(report).items()}
    assert met == {"typical vs pytorch": True, "typical portable path vs pytorch": False,
                   "throughput vs pytorch": True, "throughput portable path vs pytorch": True,
                   "compute portanet fraction of gemm_bound": False,
                   "compute portanet_portable fraction of gemm_bound": False}


def test_gpu_benchmark_times_each_kernel_against_the_portable_path(gpu_bench, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", NumpyAsCupy())
    monkeypatch.setattr(gpu_bench, "CALLS", 2)
    monkeypatch.setattr(gpu_bench, "ROUNDS", 1)
    rows = gpu_bench.kernels(resolve_device("cpu"))
    assert [r["kernel"] for r in rows] == ["relu_", "relu_grad", "softmax_", "sparse_softmax_crossentropy",
                                           "dense_grads", "adam"]
    assert all(r["us_fast"] > 0 and r["us_portable"] > 0 for r in rows)


def test_gpu_benchmark_prefetch_compares_the_same_training_both_ways(gpu_bench):
    rng = np.random.default_rng(0)
    x, y = rng.random((256, 784), dtype=np.float32), rng.integers(0, 10, 256)
    (run,) = gpu_bench.prefetch(resolve_device("cpu"), x, y, [64], repeats=1)
    assert run["batch_size"] == 64 and run["max_weight_difference"] == 0.0  # on the CPU the flag changes nothing


def test_gpu_benchmark_without_cuda_says_so_and_exits_2():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--backends", "cupy"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    if out.returncode == 0:
        pytest.skip("this machine has CuPy and a CUDA device")
    assert out.returncode == 2 and "error" in json.loads(out.stdout)


# -- the report, from real outputs ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpu_report():
    return _module("ci/gpu_report.py")


@pytest.fixture(scope="module")
def pytest_outputs(tmp_path_factory):
    """What ci/gpu-check's pytest prints and its exit status, from real pytest runs of two tests, with one of them
    (named like a kernel's test) failing (True) or not (False)."""
    outputs = {}
    for failing in (False, True):
        test = tmp_path_factory.mktemp("pytest") / "test_two.py"
        test.write_text(textwrap.dedent(f"""
            def test_relu_forward_in_place():
                assert {not failing}

            def test_other():
                pass
        """))
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                              "-rfE", str(test)], capture_output=True, text=True, timeout=120, cwd=test.parent)
        outputs[failing] = out.stdout, out.returncode
    return outputs


def _work(tmp_path, gpu_report, outputs, mnist_out, mlp_report, kernels_failing=False):
    """A ci/gpu-check work folder holding what each step printed."""
    work = tmp_path / "work"
    work.mkdir()
    env = gpu_report.environment()  # this machine's, with the GPU that CuPy and torch see on the GPU machine
    env.update(gpu={"name": "NVIDIA H200", "devices": 1}, torch_cuda={"available": True, "cuda": "13.0"})
    (work / "environment.json").write_text(json.dumps(env))
    (tests_out, tests_rc), (kernels_out, kernels_rc) = outputs[False], outputs[kernels_failing]
    files = {"tests.out": tests_out, "kernels.out": kernels_out, "mnist.out": mnist_out,
             "mlp.out": json.dumps(mlp_report, indent=1),
             "gpu.out": json.dumps({"prefetch": {"cupy": {"device": "cuda:0", "runs": [
                 {"batch_size": 128, "seconds_prefetch_off": 2.0, "seconds_prefetch_on": 1.5, "speedup": 1.333,
                  "max_weight_difference": 0.0}]}},
                 "kernels": [{"kernel": "relu_", "shape": "1024x512", "us_fast": 10.0, "us_portable": 20.0,
                              "speedup": 2.0},
                             {"kernel": "adam", "shape": "535818 parameters", "us_fast": 30.0, "us_portable": 30.0,
                              "speedup": 1.0}]})}
    for name, text in files.items():
        (work / name).write_text(text)
    codes = {"tests": tests_rc, "kernels": kernels_rc, "mnist": 0, "mlp": 0, "gpu": 0}
    (work / "steps.tsv").write_text("".join(f"{k}\t{rc}\t3\t60\n" for k, rc in codes.items()))
    return work


@pytest.fixture(scope="module")
def real_outputs(mnist_dir, mlp):
    """examples/mnist.py's output (1 epoch, a few images, on the CPU) and mlp.py's report with every GPU shape."""
    mnist = subprocess.run([sys.executable, str(ROOT / "examples" / "mnist.py"), "--epochs", "1", "--limit", "512",
                            "--quiet", "--data-dir", str(mnist_dir)], capture_output=True, text=True, timeout=300,
                           cwd=ROOT)
    assert mnist.returncode == 0, mnist.stderr
    shapes = {"typical": ((784, 16, 10), 64), "throughput": ((784, 16, 10), 256), "compute": ((32, 16, 10), 64)}
    saved = dict(mlp.SHAPES)
    mlp.SHAPES.update(shapes)
    try:
        report = mlp.main(["--json", "--shapes", "typical,throughput,compute", "--samples", "512", "--compute-samples",
                           "256", "--repeats", "1", "--no-sklearn", "--no-memory", "--no-predict", "--threads", "1"])
    finally:
        mlp.SHAPES.clear()
        mlp.SHAPES.update(saved)
    report["machine"]["backend"] = "cupy"
    report["targets"] = mlp.check_targets(report)
    return mnist.stdout, report


def test_the_report_reads_every_step_and_checks_every_target(tmp_path, gpu_report, pytest_outputs, real_outputs):
    mnist_out, mlp_report = real_outputs
    work = _work(tmp_path, gpu_report, pytest_outputs, mnist_out, mlp_report)
    report, status = gpu_report.report(work, "", False, 0)
    results, targets = report["results"], report["targets"]
    assert results["tests"]["ok"] and results["tests"]["counts"] == {"passed": 2}
    assert 0 < results["mnist"]["test_accuracy_percent"] <= 100 and results["mnist"]["epochs"] == 1
    assert targets["no test failures on cupy and torch-cuda"]["met"]
    shapes = mlp_report["shapes"]
    assert targets["CuPy <= 1.3x PyTorch CUDA at batch 128"]["value"] == shapes["typical"]["ratio_to_pytorch"][
        "portanet_portable"]
    assert targets["compute-bound >= 0.85 of the GEMM bound"]["with_kernels"] == shapes["compute"][
        "fraction_of_gemm_bound"]["portanet"]
    assert report["all_targets_met"] == all(t["met"] for t in targets.values())
    assert status == (0 if report["all_targets_met"] else 1)
    assert report["kernels"] == {"relu_": {"correct": True, "speedup": 2.0, "switch_on": True},
                                 "adam": {"correct": True, "speedup": 1.0, "switch_on": False}}


def test_a_failing_kernel_test_keeps_that_kernel_off(tmp_path, gpu_report, pytest_outputs, real_outputs):
    work = _work(tmp_path, gpu_report, pytest_outputs, *real_outputs, kernels_failing=True)
    report, status = gpu_report.report(work, "", False, 0)
    assert status == 1 and not report["targets"]["no test failures with the CuPy kernels on"]["met"]
    assert report["results"]["kernel_tests"]["failed"][0].endswith("test_relu_forward_in_place - assert False")
    assert report["kernels"]["relu_"] == {"correct": False, "speedup": 2.0, "switch_on": False}
    assert report["kernels"]["adam"]["correct"]


def test_the_table_shows_every_target_shape_and_kernel(tmp_path, gpu_report, pytest_outputs, real_outputs):
    work = _work(tmp_path, gpu_report, pytest_outputs, *real_outputs)
    report, _ = gpu_report.report(work, "", False, 0)
    (tmp_path / "r.json").write_text(json.dumps(report))
    doc = tmp_path / "README.md"
    doc.write_text("# x\n<!-- gpu-results:begin -->\nnot run yet\n<!-- gpu-results:end -->\ntail\n")
    table = _module("benchmarks/gpu_table.py")
    text = table.main([str(tmp_path / "r.json"), "--markdown", str(doc)])
    for name in report["targets"]:
        assert f"| {name} |" in text
    for shape in ("typical", "throughput", "compute"):
        assert f"| {shape} " in text
    assert "| `relu_` |" in text and "| cupy | 128 |" in text and "test accuracy after 1 epochs" in text
    written = doc.read_text()
    assert "not run yet" not in written and written.endswith("<!-- gpu-results:end -->\ntail\n") and text in written


def test_no_cuda_device_is_an_error_of_the_report(tmp_path, gpu_report):
    work = tmp_path / "work"
    work.mkdir()
    report, status = gpu_report.report(work, "no CUDA device: CuPy: ImportError", True, 0)
    assert status == 2 and report["gpu_check"] == "failed" and report["error"].startswith("no CUDA device")
    assert not report["all_targets_met"] and report["results"]["tests"] == {"exit_code": None, "ran": False}


def test_tests_that_only_skipped_for_lack_of_cuda_do_not_count_as_passing(tmp_path, gpu_report, pytest_outputs,
                                                                          real_outputs):
    work = _work(tmp_path, gpu_report, pytest_outputs, *real_outputs)
    env = json.loads((work / "environment.json").read_text())
    env["torch_cuda"] = {"available": False}
    (work / "environment.json").write_text(json.dumps(env))
    targets = gpu_report.report(work, "", False, 0)[0]["targets"]
    assert not targets["no test failures on cupy and torch-cuda"]["met"]
    assert targets["no test failures with the CuPy kernels on"]["met"]
