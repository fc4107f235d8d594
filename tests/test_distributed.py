"""portanet.distributed: sharding math and the one-process communicator here; MPI behaviour in 2-process jobs.

The MPI tests launch ``mpiexec -n 2 <python> tests/mpi_scripts/<script>.py`` (the ``mpiexec`` fixture of conftest.py:
the mpiexec next to the interpreter, else the one on PATH) and are skipped with the reason when mpi4py or mpiexec is
missing. Every launch has a subprocess timeout, so a job that hangs fails its test instead of blocking the suite.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import portanet as pn
from portanet import distributed
from portanet.distributed import (Communicator, LocalCommunicator, RankMismatchError, get_communicator, shard_batches,
                                  shard_iterable, split_rows)
from portanet.testing import assert_close

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "mpi_scripts"
LAUNCH_TIMEOUT = 180  # seconds for one 2-process job, imports on a loaded 2-core machine included


# -- split_rows / shard_batches -------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 2, 5, 7, 8, 31])
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_split_rows_is_contiguous_covers_every_row_and_sizes_differ_by_at_most_one(n, size):
    parts = [split_rows(n, rank, size) for rank in range(size)]
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(parts[r][1] == parts[r + 1][0] for r in range(size - 1))
    lengths = [stop - start for start, stop in parts]
    assert max(lengths) - min(lengths) <= 1
    assert lengths == sorted(lengths, reverse=True)  # the longer parts go to the lower ranks
    assert lengths == [len(a) for a in np.array_split(np.arange(n), size)]


@pytest.mark.parametrize("n, batch_size, size", [(45, 8, 2), (40, 7, 2), (41, 8, 2), (50, 12, 3), (9, 4, 4), (3, 8, 2)])
def test_shard_batches_split_each_single_process_batch_in_rank_order(n, batch_size, size):
    order = np.random.default_rng([7, 3]).permutation(n)
    single = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    per_rank = [shard_batches(n, batch_size, rank, size, seed=[7, 3]) for rank in range(size)]
    assert all(len(shards) == len(single) for shards in per_rank)  # every rank runs every step
    for step, batch in enumerate(single):
        parts = [per_rank[rank][step] for rank in range(size)]
        np.testing.assert_array_equal(np.concatenate([p.rows for p in parts]), batch)
        assert all(p.global_rows == len(batch) for p in parts)
        assert all(p.weight == len(p.rows) / len(batch) for p in parts)
        assert sum(p.weight for p in parts) == pytest.approx(1.0, abs=1e-15)
        assert all(p.rows.dtype == np.int64 for p in parts)


def test_shard_batches_gives_a_rank_zero_rows_and_zero_weight_in_a_last_batch_shorter_than_the_ranks():
    last = [shard_batches(41, 8, rank, 2, seed=0)[-1] for rank in range(2)]
    assert [len(s.rows) for s in last] == [1, 0]
    assert [s.weight for s in last] == [1.0, 0.0]
    assert last[1].global_rows == 1


def test_shard_batches_drop_last_drops_the_short_batch_on_every_rank():
    shards = [shard_batches(41, 8, rank, 2, seed=0, drop_last=True) for rank in range(2)]
    assert [len(s) for s in shards] == [5, 5]
    assert all(s.global_rows == 8 and len(s.rows) == 4 for rank in shards for s in rank)


def test_shard_batches_without_shuffle_or_with_an_order_follows_it():
    plain = shard_batches(10, 4, 1, 2, shuffle=False)
    assert [s.rows.tolist() for s in plain] == [[2, 3], [6, 7], [9]]
    order = np.arange(10)[::-1]
    given = shard_batches(10, 4, 0, 2, order=order)
    assert [s.rows.tolist() for s in given] == [[9, 8], [5, 4], [1]]


def test_shard_batches_reshuffles_per_seed_and_agrees_across_ranks_for_one_seed():
    first = np.concatenate([s.rows for r in range(2) for s in shard_batches(100, 10, r, 2, seed=[1, 0])])
    again = np.concatenate([s.rows for r in range(2) for s in shard_batches(100, 10, r, 2, seed=[1, 0])])
    other = np.concatenate([s.rows for r in range(2) for s in shard_batches(100, 10, r, 2, seed=[1, 1])])
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert sorted(first.tolist()) == list(range(100))


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=1), "at least the number of ranks 2, got 1"),
    (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
    (dict(batch_size=4, seed=None), "needs a seed shared by all ranks"),
    (dict(batch_size=4, order=np.arange(9)), r"order must be a permutation of range\(10\)"),
    (dict(batch_size=4, order=np.linspace(0, 1, 10)), "order must be a permutation"),
])
def test_shard_batches_rejects_bad_arguments_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        shard_batches(10, rank=0, size=2, **kwargs)


@pytest.mark.parametrize("rank, size", [(2, 2), (-1, 2), (0, 0), (True, 2)])
def test_split_rows_rejects_a_rank_outside_the_group(rank, size):
    with pytest.raises(ValueError, match="rank must be in|size must be a positive integer"):
        split_rows(10, rank, size)


def test_weighted_sum_of_rank_mean_gradients_is_the_global_mean_gradient_of_least_squares():
    rng = np.random.default_rng(1)
    x, y, w = rng.normal(size=(37, 3)), rng.normal(size=37), rng.normal(size=3)

    def mean_grad(rows):  # d/dw of mean((x w - y)^2) / 2
        return x[rows].T @ (x[rows] @ w - y[rows]) / len(rows)

    for size in (1, 2, 3, 5):
        shards = [shard_batches(37, 10, rank, size, seed=4) for rank in range(size)]
        for step in range(len(shards[0])):
            parts = [shards[rank][step] for rank in range(size)]
            total = sum(p.weight * mean_grad(p.rows) for p in parts if len(p.rows))
            rows = np.concatenate([p.rows for p in parts])
            np.testing.assert_allclose(total, mean_grad(rows), rtol=1e-13, atol=1e-14)


def test_weighted_sum_of_rank_model_gradients_is_the_global_batch_gradient(device):
    """The model's own mean gradients (MSE, float64) on each rank's rows, weighted, sum to the global batch's."""
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(23, 4)), rng.normal(size=(23, 2))
    model = pn.Model([pn.Dense(5, activation="tanh"), pn.Dense(2)], device=device, dtype="float64", seed=0)
    model.compile(loss="mse", optimizer="sgd")
    for step, parts in enumerate(zip(*[shard_batches(23, 8, rank, 3, seed=5) for rank in range(3)])):
        rows = np.concatenate([p.rows for p in parts])
        _, want = model.loss_and_grads(x[rows], y[rows])
        got = {name: 0.0 for name in want}
        for part in parts:
            if len(part.rows):
                _, grads = model.loss_and_grads(x[part.rows], y[part.rows])
                got = {name: got[name] + grads[name] * part.weight for name in want}
        for name in want:
            assert_close(got[name], want[name], device=device, rtol=1e-12, atol=1e-14, err_msg=f"step {step} {name}")


# -- shard_iterable -----------------------------------------------------------------------------------------------
def test_shard_iterable_takes_every_size_th_batch_and_drops_an_incomplete_round():
    batches = [np.full((2, 1), i) for i in range(7)]
    taken = [[int(b[0, 0]) for b in shard_iterable(iter(batches), rank, 3)] for rank in range(3)]
    assert taken == [[0, 3], [1, 4], [2, 5]]  # batch 6 would be a round of one: every rank skips it


def test_shard_iterable_weights_are_rows_over_the_rounds_rows():
    batches = [(np.zeros((4, 2)), np.zeros(4)), (np.zeros((4, 2)), np.zeros(4)),
               (np.zeros((3, 2)), np.zeros(3)), (np.zeros((1, 2)), np.zeros(1))]
    got = [[w for _, w in shard_iterable(batches, rank, 2, weights=True)] for rank in range(2)]
    assert got == [[0.5, 0.75], [0.5, 0.25]]


def test_shard_iterable_rejects_a_rank_outside_the_group_when_called():
    with pytest.raises(ValueError, match=r"rank must be in 0..1, got 2"):
        shard_iterable([], 2, 2)


# -- the one-process communicator and the shared checks -------------------------------------------------------
def test_local_communicator_is_a_group_of_one_whose_collectives_return_their_input(device):
    comm = get_communicator(None)
    assert isinstance(comm, LocalCommunicator) and (comm.rank, comm.size, comm.is_root) == (0, 1, True)
    x = device.from_host(np.arange(4.0))
    assert comm.allreduce_(x) is x and comm.broadcast_(x) is x
    assert_close(x, np.arange(4.0), device=device)
    values = np.array([1.0, 2.0])
    reduced = comm.allreduce_host(values)
    reduced += 1
    np.testing.assert_array_equal(values, [1.0, 2.0])  # a new array: the caller's stays as it was
    assert comm.allgather_object({"a": 1}) == [{"a": 1}]
    assert comm.broadcast_object("seed") == "seed"
    assert comm.agree((784, 10), "the input shape") == (784, 10)
    comm.check_identical(x, "the parameters")
    comm.check_identical(x, "the parameters", exact=True)
    comm.barrier()
    with pytest.raises(SystemExit):
        comm.abort(3)


def test_checksum_is_computed_on_the_arrays_device_and_matches_numpy(device):
    host = np.random.default_rng(3).normal(size=(5, 7)).astype("float32")
    got = LocalCommunicator().checksum(device.from_host(host))
    flat = host.astype(np.float64).ravel()
    want = [flat.sum(), np.abs(flat).sum(), (flat * flat).sum(), (flat * np.arange(35) / 35).sum()]
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12)


class _Group(Communicator):
    """A stand-in group: allgather_object returns what each 'rank' would have passed."""

    def __init__(self, values):
        self.values = values

    def allgather_object(self, obj):
        return list(self.values)


def test_agree_names_every_rank_grouped_by_value():
    with pytest.raises(RankMismatchError, match=r"ranks disagree about the input width: ranks 0, 2: 784; rank 1: 783"):
        _Group([784, 783, 784]).agree(784, "the input width")
    assert _Group([(3, "float32")] * 3).agree((3, "float32"), "the shape") == (3, "float32")


def test_check_identical_tolerates_reduction_noise_but_not_divergence():
    x = np.linspace(-1, 1, 1000)
    comm = LocalCommunicator()
    stats = comm.checksum(x)
    noisy = stats * (1 + 1e-14)
    _Group([stats, noisy]).check_identical(x, "the parameters")  # the statistics a rank would report
    with pytest.raises(RankMismatchError, match=r"the parameters differ between ranks .*rank 0: .*; rank 1: "):
        _Group([stats, comm.checksum(x + 1e-6)]).check_identical(x, "the parameters")
    with pytest.raises(RankMismatchError, match="BLAKE2"):
        _Group(["aaa", "bbb"]).check_identical(x, "the parameters", exact=True)


def test_get_communicator_accepts_names_and_objects_and_rejects_the_rest():
    comm = LocalCommunicator()
    assert get_communicator(comm) is comm
    assert isinstance(get_communicator("LOCAL"), LocalCommunicator)
    with pytest.raises(ValueError, match=r"must be None, 'local', 'mpi', 'nccl' or a Communicator, got 'mpl'"):
        get_communicator("mpl")
    with pytest.raises(TypeError, match="options"):
        get_communicator(comm, timeout=3)


def test_timeout_comes_from_the_argument_or_the_environment(monkeypatch):
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert LocalCommunicator().timeout == distributed.DEFAULT_TIMEOUT
    assert LocalCommunicator(timeout=7).timeout == 7.0
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "12.5")
    assert LocalCommunicator().timeout == 12.5
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="PORTANET_DIST_TIMEOUT must be a number of seconds, got 'soon'"):
        LocalCommunicator()
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds, got 0"):
        LocalCommunicator(timeout=0)


def test_allreduce_host_rejects_non_numbers_and_unknown_ops():
    comm = LocalCommunicator()
    with pytest.raises(TypeError, match="values must be host numbers"):
        comm.allreduce_host(["a"])
    with pytest.raises(ValueError, match="op must be 'sum', 'max' or 'min', got 'mean'"):
        comm.allreduce_host([1.0], op="mean")


def test_mpi_without_mpi4py_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(ImportError, match=r'pip install "portanet\[mpi\]"'):
        get_communicator("mpi")


def test_nccl_without_cupy_fails_before_starting_mpi(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # reaching MPI would raise the MPI hint instead
    with pytest.raises(ImportError, match="distributed='nccl' needs CuPy with NCCL"):
        get_communicator("nccl")


def test_importing_portanet_does_not_start_mpi():
    code = "import sys, portanet, portanet.distributed; assert 'mpi4py' not in sys.modules, 'mpi4py was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=_env())


# -- 2-process jobs -------------------------------------------------------------------------------------------
def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


def _launch(mpiexec, script, *args, ranks=2):
    cmd = mpiexec + ["-n", str(ranks), sys.executable, str(SCRIPTS / script), *map(str, args)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=_env(), cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"{script} {args} hung: no exit within {LAUNCH_TIMEOUT} s\n{out}")
    return done.returncode, done.stdout + done.stderr


def test_mpi_allreduce_and_broadcast_in_place_on_every_cpu_backend(mpiexec):
    rc, out = _launch(mpiexec, "collectives.py")
    assert rc == 0, out
    names = ["numpy", "host"] + [name for name, lib in (("torch", "torch"), ("array_api_strict", "array_api_strict"),
                                                       ("array_api_strict-device1", "array_api_strict"))
                                 if importlib.util.find_spec(lib) is not None]
    for name in names:
        assert sorted(re.findall(rf"ok {re.escape(name)} rank (\d)", out)) == ["0", "1"], out


def test_mpi_disagreements_raise_on_every_rank_naming_ranks_and_values(mpiexec):
    rc, out = _launch(mpiexec, "mismatch.py")
    assert rc == 0, out
    for label in ("input", "drift", "ulp-exact", "broadcast-shape"):
        assert sorted(re.findall(rf"{label} rank (\d) caught RankMismatchError", out)) == ["0", "1"], out
    for label in ("config", "same", "ulp"):  # "ulp": one last-place bit is below the default check, by design
        assert sorted(re.findall(rf"{label} rank (\d) passed", out)) == ["0", "1"], out
    assert "ranks disagree about the input shape: rank 0: (784, 10); rank 1: (785, 10)" in out


@pytest.mark.parametrize("mode, expected", [
    ("raise", [r"RuntimeError: rank 1 failed on purpose",
               r"uncaught RuntimeError on rank 1 of 2; calling MPI_Abort"]),
    ("raise-nohook", [r"RuntimeError: rank 1 failed on purpose",
                      r"DistributedError: rank 0 of 2: allreduce_ of 1000 float64 values \(collective call \d+\) "
                      r"did not complete within 2 s",
                      r"rank 0 exits with a broken communicator .*calling MPI_Abort instead of MPI_Finalize"]),
    ("caught", [r"rank 0 caught DistributedError: .*did not complete within 2 s",
                r"rank 0 again: .*this communicator is broken"]),
    ("hang", [r"DistributedError: rank 0 of 2: allreduce_ .*did not complete within 2 s",
              r"uncaught DistributedError on rank 0 of 2; calling MPI_Abort"]),
    ("exit", [r"rank 1 leaves with os._exit\(3\)"]),
    ("sigkill", [r"BAD TERMINATION|signal 9|Killed"]),
])
def test_mpi_job_with_a_failing_rank_ends_with_a_clear_error_instead_of_hanging(mpiexec, mode, expected):
    """The job must end (a hang fails the launch timeout) with a non-zero status and the error in its output.

    In "raise", "exit" and "sigkill" the waiting rank's timeout is 600 s: only the abort can end the job in time.
    """
    rc, out = _launch(mpiexec, "failure.py", mode)
    assert rc != 0, out
    assert "finished the all-reduce" not in out
    for pattern in expected:
        assert re.search(pattern, out), f"no {pattern!r} in:\n{out}"


def test_two_ranks_with_global_batch_b_train_the_same_weights_as_one_process(mpiexec, tmp_path):
    """Proof of concept on today's public API (loss_and_grads, set_parameters, Adam on flat arrays)."""
    rc, out = _launch(mpiexec, "equivalence.py", tmp_path / "two.npz")
    assert rc == 0, out
    cases = 3 * (1 + sum(importlib.util.find_spec(lib) is not None for lib in ("torch", "array_api_strict")))
    assert len(re.findall(r"ranks=2: max \|distributed - single\| = ", out)) == cases, out
    single = subprocess.run([sys.executable, str(SCRIPTS / "equivalence.py"), str(tmp_path / "one.npz")],
                            capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=_env(), cwd=ROOT)
    assert single.returncode == 0, single.stdout + single.stderr
    two, one = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
    assert sorted(two.files) == sorted(one.files) and len(two.files) == cases
    for key in two.files:
        np.testing.assert_allclose(two[key], one[key], rtol=0, atol=1e-12, err_msg=key)
        assert np.max(np.abs(two[key])) > 0.1


# -- data-parallel fit and evaluate: the pieces, in one process ----------------------------------------------------
def _shares(source, batch_size, size, shuffle=True, seed=3):
    """For each rank: ([(x, y) of each share], [rows of each global batch]) from data.Batches with ``part``."""
    out = []
    for rank in range(size):
        batches = pn.data.Batches(source, batch_size=batch_size, shuffle=shuffle, rng=seed, dtype="float64",
                                  part=lambda rows, rank=rank: split_rows(rows, rank, size))
        shares = [(pn.to_numpy(xb), pn.to_numpy(yb)) for xb, yb, _ in batches]
        out.append((shares, list(batches.batch_rows)))
    return out


@pytest.mark.parametrize("kind", ["array", "memmap"])
@pytest.mark.parametrize("n, batch_size, size, shuffle", [(45, 8, 2, True), (41, 8, 2, True), (40, 7, 3, False)])
def test_batch_shares_of_the_ranks_tile_the_one_process_batches(tmp_path, kind, n, batch_size, size, shuffle):
    x = np.arange(n * 2, dtype=np.float64).reshape(n, 2)
    y = np.arange(n, dtype=np.float64)
    if kind == "memmap":  # block-shuffled in blocks of 16 rows: a short batch may come mid-epoch
        np.save(tmp_path / "x.npy", x)
        source = lambda: pn.data.SliceableAdapter(np.load(tmp_path / "x.npy", mmap_mode="r"), y, block_size=16)  # noqa: E731
    else:
        source = lambda: pn.data.adapt(x, y)  # noqa: E731
    whole = [(pn.to_numpy(xb), pn.to_numpy(yb)) for xb, yb, _ in
             pn.data.Batches(source(), batch_size=batch_size, shuffle=shuffle, rng=3, dtype="float64")]
    ranks = _shares(source(), batch_size, size, shuffle)
    for rank, (shares, rows) in enumerate(ranks):
        assert len(shares) == len(whole) and rows == [len(b[1]) for b in whole], rank
    for step, (xb, yb) in enumerate(whole):
        np.testing.assert_array_equal(np.concatenate([ranks[r][0][step][1] for r in range(size)]), yb)
        np.testing.assert_array_equal(np.concatenate([ranks[r][0][step][0] for r in range(size)]), xb)
        lengths = [stop - start for start, stop in (split_rows(len(yb), r, size) for r in range(size))]
        assert [len(ranks[r][0][step][1]) for r in range(size)] == lengths


def test_a_stream_is_taken_as_this_ranks_share_as_it_is():
    stream = [(np.ones((3, 2)), np.zeros(3)), (np.ones((2, 2)), np.zeros(2))]
    batches = pn.data.Batches(iter(stream), batch_size=8, steps_per_epoch=2, part=lambda rows: split_rows(rows, 1, 2))
    assert [xb.shape[0] for xb, _, _ in batches] == [3, 2] and not batches.batch_rows


def test_derive_seed_is_reproducible_and_differs_per_key():
    seeds = {distributed.derive_seed(7, epoch, rank) for epoch in range(50) for rank in range(8)}
    assert len(seeds) == 400 and all(0 <= s < 2**62 for s in seeds)
    state = np.random.default_rng(1).bit_generator.state
    assert distributed.derive_seed(state) == distributed.derive_seed(np.random.default_rng(1).bit_generator.state)
    assert distributed.derive_seed(state) != distributed.derive_seed(np.random.default_rng(2).bit_generator.state)


def test_get_communicator_makes_one_mpi_communicator_per_process_and_options(monkeypatch):
    made = []

    class Fake(LocalCommunicator):
        def __init__(self, **options):
            super().__init__(**options)
            made.append(self)

    monkeypatch.setattr(distributed, "MPICommunicator", Fake)
    monkeypatch.setattr(distributed, "_SHARED", {})
    assert get_communicator("mpi") is get_communicator("MPI") is made[0]
    assert get_communicator("mpi", timeout=5) is not made[0] and len(made) == 2


def test_the_name_alone_returns_the_communicator_made_first_with_options(monkeypatch):
    # get_communicator("mpi", timeout=60) before fit(distributed="mpi") must set fit's timeout: fit asks for the name
    made = []

    class Fake(LocalCommunicator):
        def __init__(self, **options):
            super().__init__(**options)
            made.append(self)

    monkeypatch.setattr(distributed, "MPICommunicator", Fake)
    monkeypatch.setattr(distributed, "_SHARED", {})
    configured = get_communicator("mpi", timeout=7)
    assert get_communicator("mpi") is configured and configured.timeout == 7
    assert get_communicator("mpi", timeout=9) is not configured and get_communicator("mpi") is configured
    assert len(made) == 2


def _classifier(device=None, seed=0):
    model = pn.Model([pn.Dense(5, activation="tanh"), pn.Dropout(0.2), pn.Dense(3, activation="softmax")],
                     dtype="float64", seed=seed, **({} if device is None else {"device": device}))
    model.compile(loss="sparse_categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    return model


def test_fit_with_a_group_of_one_is_plain_training_bit_for_bit(device):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 4)), rng.integers(0, 3, size=30)
    runs = []
    for spec in (None, "local", LocalCommunicator()):
        model = _classifier(device)
        history = model.fit(x, y, epochs=2, batch_size=8, validation_split=0.2, verbose=0, distributed=spec)
        runs.append((pn.to_numpy(model.parameter_buffer.values), history.history,
                     model.evaluate(x, y, distributed=spec)))
    for weights, history, logs in runs[1:]:
        np.testing.assert_array_equal(weights, runs[0][0])
        assert history == runs[0][1] and logs == runs[0][2]


def test_fit_rejects_an_unknown_distributed_before_building_the_model():
    model = _classifier()
    with pytest.raises(ValueError, match=r"distributed must be None, 'local', 'mpi', 'nccl' or a Communicator, got 'm"):
        model.fit(np.zeros((4, 3)), np.zeros(4, dtype=np.int64), distributed="mpl")
    assert not model.built


def test_seed_dropout_restarts_the_masks_from_the_seed(device):
    model = _classifier(device).build(4)
    x = device.from_host(np.ones((6, 4)))
    draws = []
    for seed in (5, 5, 6):
        model.seed_dropout(seed)
        draws.append(pn.to_numpy(model.layers[1].forward_with_cache(x, training=True)[0]))
    np.testing.assert_array_equal(draws[0], draws[1])
    assert not np.array_equal(draws[0], draws[2])


# -- data-parallel fit and evaluate on 2 ranks ----------------------------------------------------------------------
def _run_plain(script, *args):
    done = subprocess.run([sys.executable, str(SCRIPTS / script), *map(str, args)], capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT, env=_env(), cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_fit_on_two_ranks_trains_and_logs_what_one_process_does(mpiexec, tmp_path):
    """Through model.fit(distributed="mpi"): Adam, shuffling, uneven and one-row last batches, validation data and
    split, metrics, sample and class weights, a memory map, a sharded stream, evaluate(); float64."""
    rc, out = _launch(mpiexec, "fit_equivalence.py", tmp_path / "two.npz")
    assert rc == 0, out
    _run_plain("fit_equivalence.py", tmp_path / "one.npz", "--plain")
    two, one = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
    assert sorted(two.files) == sorted(one.files) and len(one.files) >= 30
    for key in one.files:
        np.testing.assert_allclose(two[key], one[key], rtol=0, atol=1e-12, err_msg=key)
    assert all(np.max(np.abs(one[k])) > 0.1 for k in one.files if k.endswith("/weights"))
    # rank 0 only prints (the others pass verbose=0): one line per epoch for verbose=2 (the numpy classifier, logging
    # accuracy) and for the progress bar of verbose=1 (the regression, logging mae), which tqdm may leave mid-line
    lines = [sorted(re.findall(rf"epoch {e}/3 - [0-9.e+-]+s - loss: \S+ - (\w+):", out)) for e in (1, 2, 3)]
    assert lines == [["accuracy", "mae"]] * 3, out


@pytest.fixture(scope="module")
def resumed(mpiexec, tmp_path_factory):
    """One process trains 2 epochs (checkpoint) and 4 uninterrupted; 2 ranks resume that checkpoint to 4 epochs and
    train 2 (checkpoint); one process resumes that one to 4 epochs."""
    folder = tmp_path_factory.mktemp("resume")
    _run_plain("fit_resume.py", folder, "first")
    rc, out = _launch(mpiexec, "fit_resume.py", folder, "ranks")
    assert rc == 0, out
    _run_plain("fit_resume.py", folder, "last")
    return folder, out


@pytest.mark.parametrize("run", ["ranks", "last"])
def test_a_checkpoint_resumes_on_another_number_of_ranks_to_the_uninterrupted_result(resumed, run):
    folder, _ = resumed
    whole, got = np.load(folder / "first.npz"), np.load(folder / f"{run}.npz")
    np.testing.assert_allclose(got["resumed"], whole["uninterrupted"], rtol=0, atol=1e-12)
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(got[f"resumed/{key}"], whole[f"uninterrupted/{key}"], rtol=0, atol=1e-12)
        assert len(got[f"resumed/{key}"]) == 4


def test_only_rank_0_writes_checkpoints(resumed):
    folder, out = resumed
    assert sorted(re.findall(r"rank (\d): checkpoints written by rank: \[True, False\]", out)) == ["0", "1"], out
    assert (folder / "two-rank0.ckpt").exists() and not (folder / "two-rank1.ckpt").exists()


def test_dropout_masks_differ_between_ranks_and_resume_exactly(resumed):
    _, out = resumed
    assert sorted(re.findall(r"rank (\d): dropout generators differ between ranks: True", out)) == ["0", "1"], out
    diffs = re.findall(r"dropout resumed vs uninterrupted max diff (\S+); vs one process (\S+)", out)
    assert len(diffs) == 2 and all(float(same) == 0 and float(other) > 1e-3 for same, other in diffs), out


@pytest.fixture(scope="module")
def failures(mpiexec):
    rc, out = _launch(mpiexec, "fit_failures.py", "clean")
    assert rc == 0, out
    return out


def _caught(out, case):
    found = dict(re.findall(rf"^{case} rank (\d) caught (.*)$", out, re.M))
    assert sorted(found) == ["0", "1"], out
    assert found["0"] == found["1"], out  # the same error, the same message, on every rank
    return found["0"]


@pytest.mark.parametrize("case, message", [
    ("width", r"RankMismatchError: ranks disagree about the training data .*rank 0: \('ArrayAdapter', 48, 4, .*; "
              r"rank 1: \('ArrayAdapter', 48, 5, "),
    ("batch_size", r"RankMismatchError: ranks disagree about the arguments of fit\(\) .*rank 0: \[2, 8, .*"
                   r"rank 1: \[2, 9,"),
    ("layers", r"RankMismatchError: ranks disagree about the model \(layers, loss, optimizer, metrics\)"),
])
def test_ranks_that_disagree_raise_on_every_rank_before_the_model_is_built(failures, case, message):
    assert re.search(message, _caught(failures, case))
    assert sorted(re.findall(rf"^{case} rank (\d) built: False$", failures, re.M)) == ["0", "1"], failures


def test_parameters_that_drift_apart_on_one_rank_raise_at_the_end_of_the_epoch(failures):
    message = _caught(failures, "perturbed")
    assert re.search(r"RankMismatchError: the parameters after epoch 1 differ between ranks", message)


def test_a_loss_overflow_on_one_rank_stops_every_rank_at_the_same_step_with_the_same_weights(failures):
    assert re.search(r"FloatingPointError: the loss became NaN or inf at epoch 1, step 4 of 6",
                     _caught(failures, "overflow"))
    assert sorted(re.findall(r"overflow rank (\d) weights finite: True, identical on every rank: True",
                             failures)) == ["0", "1"], failures


def test_a_nan_read_in_one_ranks_share_raises_stream_error_everywhere_and_puts_the_model_back(failures):
    assert re.search(r"StreamError: batch 3 of x \(memmap\) in epoch 1 holds NaN or inf", _caught(failures, "nan_read"))
    assert sorted(re.findall(r"nan_read rank (\d) weights put back: True, identical on every rank: True",
                             failures)) == ["0", "1"], failures


def test_batch_normalization_shares_of_one_row_raise_on_every_rank_before_the_model_is_built(failures):
    message = _caught(failures, "bn_share")
    assert re.search(r"ValueError: batch_size=3 on 2 ranks splits a global batch of 3 rows into shares as small as 1 "
                     r"row\(s\), but layer 'batch_normalization_\d+' \(BatchNormalization\) needs at least 2 rows",
                     message), message
    assert sorted(re.findall(r"^bn_share rank (\d) built: False$", failures, re.M)) == ["0", "1"], failures


def test_a_callback_on_one_rank_that_restores_other_weights_raises_at_the_end_of_fit(failures):
    message = _caught(failures, "restore_one_rank")
    assert re.search(r"RankMismatchError: the parameters at the end of fit\(\) .*EarlyStopping"
                     r"\(restore_best_weights=True\), must be given on every rank\) differ between ranks", message)


@pytest.mark.parametrize("mode, expected", [
    ("kill", r"BAD TERMINATION|signal 9|Killed"),
    ("raise", r"RuntimeError: rank 1 failed on purpose in its 3rd step(.|\n)*uncaught RuntimeError on rank 1 of 2"),
    ("hang", r"DistributedError: rank 0 of 2: allreduce_ of \d+ float64 values .*did not complete within 3 s"),
])
def test_a_rank_that_dies_raises_or_hangs_in_fit_ends_the_job_with_an_error(mpiexec, mode, expected):
    rc, out = _launch(mpiexec, "fit_failures.py", mode)
    assert rc != 0, out
    assert "finished training" not in out
    assert re.search(expected, out), out



def test_nccl_refuses_a_model_off_cupy_and_mpi_takes_any_device(device):
    """NCCL reduces CuPy arrays only (checked before training, naming the model's device); MPI takes any device."""
    nccl = object.__new__(distributed.NCCLCommunicator)  # no CuPy here: the check needs none of its state but device
    nccl.device = 1
    if device.backend == "cupy":
        nccl.check_device(device)
        return
    with pytest.raises(ValueError, match=rf"nccl' reduces CuPy arrays on the GPU, but the model is on "
                                         rf"{re.escape(device.name)}: .*device='cuda:1'"):
        nccl.check_device(device)
    distributed.LocalCommunicator().check_device(device)
    object.__new__(distributed.MPICommunicator).check_device(device)
