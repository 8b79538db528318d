"""Limits (issue 12): every executable states its cost, load and run enforce Limits before any
native code runs, a thread's arena is trimmed after an outsized call, n_threads is validated, and
load tells a bad file from the file system's and memory's errors."""
import errno
import json
import os
import time

import numpy as np
import pytest
from spec_helpers import F32, make_spec, randn  # tests/spec_helpers.py

import sparseprune.runtime.executable as executable_module
from sparseprune import formats
from sparseprune.runtime import Executable, LimitExceeded, Limits, SpecError, load
from sparseprune.runtime import limits as limits_module


def mlp_spec(rng, cols=16, hidden=32, rows=4):
    """csr linear (relu) -> dense linear -> softmax."""
    w = randn(rng, hidden, cols)
    w[rng.random(w.shape) < 0.75] = 0
    a = formats.csr_arrays(w)
    arrays = {"fc1.indptr": a.indptr, "fc1.indices": a.indices, "fc1.values": a.values,
              "fc2.weight": randn(rng, rows, hidden), "fc2.bias": randn(rng, rows)}
    ops = [{"op": "linear", "in": 0, "out": 1, "weight": "fc1", "format": "csr", "block": [1, 1], "rows": hidden,
            "cols": cols, "activation": "relu"},
           {"op": "linear", "in": 1, "out": 2, "weight": "fc2", "format": "dense", "block": [1, 1], "rows": rows,
            "cols": hidden},
           {"op": "softmax", "in": 2, "out": 3}]
    return make_spec([[cols], [hidden], [rows], [rows]], [0], [3], ops), arrays


def attention_spec(seq_max):
    """(seq, 8) -> self-attention over seq (2 heads): work grows with seq**2."""
    ops = [{"op": "attention", "q": 0, "k": 0, "v": 0, "out": 1, "layout": "sequence_first", "heads": 2,
            "scale": 0.5, "causal": False}]
    return make_spec([["seq", 8], ["seq", 8]], [0], [1], ops, dims={"seq": {"min": 1, "max": seq_max}})


def test_cost_is_counted_per_op_and_stated_in_the_metadata(rng):
    spec, arrays = mlp_spec(rng)
    exe = Executable.from_spec(spec, arrays)
    nnz = arrays["fc1.values"].size
    cost = exe.cost()
    # linear 2 * nnz * rows (one row per sample here), plus one per output element of every op
    assert cost.work == (2 * nnz + 32) + (2 * 4 * 32 + 4) + (4 + 4)
    assert cost.arena == 4 * exe._plan.arena_floats_per_sample([])
    assert cost.io == 4 * (16 + 4)
    assert cost.scratch == 4 * (16 + 1 + 32 + 1)  # the CSR kernel's channel-major copies of x and y
    stated = exe.metadata["cost"]
    assert stated == {"work_per_sample": cost.work, "memory_per_sample": cost.memory, "fixed_bytes": exe.nbytes,
                      "at": {}}


def test_cost_is_a_function_of_the_dims():
    exe = Executable.from_spec(attention_spec(64), {})
    small, large = exe.cost(seq=8), exe.cost()
    assert large == exe.cost(seq=64) and large.at == (("seq", 64),)
    # QK^T and PV: 2 * seq * seq * 8 each, scores 3 * heads * seq * seq, the output seq * 8
    for seq, cost in ((8, small), (64, large)):
        assert cost.work == 2 * 2 * seq * seq * 8 + 3 * 2 * seq * seq + seq * 8
    assert exe.metadata["cost"]["at"] == {"seq": 64}
    with pytest.raises(ValueError, match="dim 'seq' must be an int in"):
        exe.cost(seq=65)
    with pytest.raises(ValueError, match="'len' is not a dim"):
        exe.cost(len=3)


def test_a_file_claiming_less_than_its_spec_needs_is_refused(rng, tmp_path):
    spec, arrays = mlp_spec(rng)
    exe = Executable.from_spec(spec, arrays)
    honest = exe.spec
    assert Executable.from_spec(honest, arrays).metadata["cost"] == honest["metadata"]["cost"]
    for key in ("work_per_sample", "memory_per_sample"):
        lying = json.loads(json.dumps(honest))
        lying["metadata"]["cost"][key] -= 1
        with pytest.raises(SpecError, match=rf"spec\.metadata\.cost\.{key} = .* is less than the spec needs"):
            Executable.from_spec(lying, arrays)
        lying["metadata"]["cost"][key] = "0"
        with pytest.raises(SpecError, match=rf"spec\.metadata\.cost\.{key} must be an int"):
            Executable.from_spec(lying, arrays)
    # through a file: the same SpecError from load
    from safetensors.numpy import save_file

    lying = json.loads(json.dumps(honest))
    lying["metadata"]["cost"]["work_per_sample"] = 1
    save_file(dict(exe.arrays), str(tmp_path / "lie.safetensors"), metadata={"sparseprune_spec": json.dumps(lying)})
    with pytest.raises(SpecError, match="is less than the spec needs"):
        load(tmp_path / "lie.safetensors")
    bigger = json.loads(json.dumps(honest))  # claiming more is harmless: the true figures replace it
    bigger["metadata"]["cost"]["work_per_sample"] *= 10
    assert Executable.from_spec(bigger, arrays).metadata["cost"] == honest["metadata"]["cost"]


def test_limits_are_validated():
    assert Limits() == Limits(max_batch=4096, max_work=1e12, max_arena_bytes=4 << 30)
    for field, bad in [("max_batch", 0), ("max_batch", 1.5), ("max_batch", True), ("max_work", float("nan")),
                       ("max_work", -1), ("max_work", float("inf")), ("max_arena_bytes", "1")]:
        with pytest.raises(ValueError, match=rf"Limits\.{field} must be"):
            Limits(**{field: bad})
    with pytest.raises(TypeError, match="limits must be a sparseprune.runtime.Limits"):
        Executable.from_spec(attention_spec(8), {}, limits={"max_batch": 3})


def test_every_call_is_checked_before_it_runs(rng):
    spec, arrays = mlp_spec(rng)
    exe = Executable.from_spec(spec, arrays, limits=Limits(max_batch=8))
    cost = exe.cost()
    x = randn(rng, 9, 16)
    assert exe.run(x[:8]).shape == (8, 4)
    with pytest.raises(LimitExceeded, match=r"the batch of this call is 9, above Limits\.max_batch = 8") as info:
        exe.run(x)
    assert isinstance(info.value, ValueError)
    assert (info.value.limit, info.value.value, info.value.maximum) == ("max_batch", 9, 8)
    import pickle

    again = pickle.loads(pickle.dumps(info.value))
    assert str(again) == str(info.value) and again.limit == "max_batch"
    exe.limits = Limits(max_work=cost.work * 3)
    exe.run(x[:3])
    with pytest.raises(LimitExceeded, match=rf"the work of this call \(4 x {cost.work:,} FLOP\) is "
                                            rf"{4 * cost.work:,}, above Limits\.max_work = {3 * cost.work:,}"):
        exe.run(x[:4])
    exe.limits = Limits(max_arena_bytes=cost.memory * 2)
    exe.run(x[:2])
    with pytest.raises(LimitExceeded, match=r"the memory of this call \(3 x [\d,]+ bytes\) .* Limits\.max_arena_bytes"):
        exe.run(x[:3])
    with pytest.raises(TypeError, match="limits must be"):
        exe.limits = 5
    exe.limits = None  # none: an executable built from a spec its caller trusts (from_spec's default)
    assert exe.run(randn(rng, 5000, 16)).shape == (5000, 4)
    assert Executable.from_spec(spec, arrays).limits is None


def test_load_applies_the_default_limits(rng, tmp_path):
    spec, arrays = mlp_spec(rng)
    path = tmp_path / "mlp.safetensors"
    Executable.from_spec(spec, arrays).save(path)
    exe = load(path)
    assert exe.limits == Limits()
    with pytest.raises(LimitExceeded, match="max_batch = 4,096"):
        exe.run(np.zeros((4097, 16), F32))


def test_a_hostile_length_is_refused_at_load_and_at_run_fast(tmp_path):
    # The file: a sequence length edited far up (a whole call would take minutes).
    exe = Executable.from_spec(attention_spec(64), {})
    spec = exe.spec
    spec["dims"]["seq"]["max"] = 1 << 20
    del spec["metadata"]
    from safetensors.numpy import save_file

    path = tmp_path / "long.safetensors"
    save_file({}, str(path), metadata={"sparseprune_spec": json.dumps(spec)})
    start = time.perf_counter()
    with pytest.raises(LimitExceeded, match=r"one sample at the dims' max values .* above Limits\.max_work") as info:
        load(path)
    assert time.perf_counter() - start < 0.1 and str(path) in str(info.value)
    # With a larger budget it loads; each call is then checked at its own length, before running.
    big = load(path, limits=Limits(max_work=1e15, max_arena_bytes=1 << 45))
    big.limits = Limits()
    assert big.run(np.ones((2, 16, 8), F32)).shape == (2, 16, 8)
    x = np.ones((1, 300_000, 8), F32)
    start = time.perf_counter()
    with pytest.raises(LimitExceeded, match=r"the work of this call \(1 x [\d,]+ FLOP at seq=300000\) is .* Limits\.max_work"):
        big.run(x)
    assert time.perf_counter() - start < 0.1


def test_cost_of_a_convolution_counts_output_pixels():
    arrays = {"c.weight": np.ones((4, 2, 3, 3), F32)}
    ops = [{"op": "conv2d", "in": 0, "out": 1, "weight": "c", "in_channels": 2, "out_channels": 4, "kernel": [3, 3],
            "stride": [2, 2], "padding": [1, 1], "dilation": [1, 1], "groups": 1, "format": "dense"},
           {"op": "maxpool2d", "in": 1, "out": 2, "kernel": [2, 2], "stride": [2, 2], "padding": [0, 0]}]
    exe = Executable.from_spec(make_spec([[2, 9, 9], [4, 5, 5], [4, 2, 2]], [0], [2], ops), arrays)
    assert exe.cost().work == (2 * 72 * 25 + 100) + (16 * 4 + 16)


# --- arena trim ----------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _wide_exe(width=8192):
    ops = [{"op": "affine", "in": 0, "out": 1, "scale": 2.0, "shift": 1.0}]
    return Executable.from_spec(make_spec([[width], [width]], [0], [1], ops), {}, n_threads=1)


def _usual_then_huge(exe, usual, rng):
    x = randn(rng, usual, 8192)
    for _ in range(5):
        exe.run(x)
    before = _rss()
    big = np.ones((usual * 100, 8192), F32)
    y = exe.run(big)
    del big, y
    return x, before


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS from /proc")
def test_rss_returns_after_a_call_100x_the_usual_batch(rng, monkeypatch):
    exe = _wide_exe()
    exe.trim()
    # the huge call's arena: 1600 samples x 64 KiB = 105 MB, above TRIM_FLOOR and 4x the median
    x, before = _usual_then_huge(exe, 16, rng)
    assert limits_module.thread_scratch_bytes() < 8 << 20  # freed right after the huge call
    exe.run(x)
    assert _rss() <= before * 1.1
    # Without the policy the arena stays (so the check above can fail) until trim()
    monkeypatch.setattr(limits_module, "TRIM_FLOOR", 1 << 62)
    x, before = _usual_then_huge(exe, 16, rng)
    exe.run(x)
    assert limits_module.thread_scratch_bytes() > 90 << 20
    assert _rss() > before + (50 << 20)
    exe.trim()
    assert limits_module.thread_scratch_bytes() == 0
    assert _rss() <= before * 1.1
    assert np.array_equal(exe.run(x), x * 2 + 1)  # and it runs on


def test_trim_policy_keeps_a_steady_large_need():
    limits_module.release_thread_scratch()
    limits_module._needs.needs.clear()
    big = 200 << 20
    assert not any(limits_module.after_call(big) for _ in range(40))  # the usual need: kept
    assert not limits_module.after_call(10 << 20)
    limits_module._needs.needs.clear()
    for _ in range(20):
        limits_module.after_call(1 << 20)
    assert limits_module.after_call(big)  # far above the median of 1 MiB: freed
    assert not limits_module.after_call(50 << 20)  # below TRIM_FLOOR: kept
    limits_module._needs.needs.clear()


# --- n_threads -------------------------------------------------------------------------------------


BAD_THREADS = [0, -1, 1.5, True, False, 257, 1000, 2**31, 2**64, "2", np.float32(2)]


def test_n_threads_is_validated_everywhere(rng, tmp_path):
    spec, arrays = mlp_spec(rng)
    exe = Executable.from_spec(spec, arrays)
    path = tmp_path / "mlp.safetensors"
    exe.save(path)
    x = randn(rng, 2, 16)
    assert exe.run(x, n_threads=256).shape == (2, 4)
    for bad in BAD_THREADS:
        pattern = r"n_threads must be None or an int in \[1, 256\]"
        with pytest.raises(ValueError, match=pattern):
            exe.run(x, n_threads=bad)
        with pytest.raises(ValueError, match=pattern):
            exe.n_threads = bad
        with pytest.raises(ValueError, match=pattern):
            load(path, n_threads=bad)
        with pytest.raises(ValueError, match=pattern):
            Executable.from_spec(spec, arrays, n_threads=bad)


@pytest.mark.parametrize("bad", [0, 257, 2**31, True, 1.5])
def test_compile_num_threads_is_validated(bad):
    import torch

    from sparseprune.compile import compile

    with pytest.raises(ValueError, match=r"num_threads must be None or an int in \[1, 256\]"):
        compile(torch.nn.Linear(3, 2), (torch.zeros(1, 3),), num_threads=bad)


# --- load's errors -------------------------------------------------------------------------------


@pytest.fixture
def saved_mlp(rng, tmp_path):
    spec, arrays = mlp_spec(rng)
    path = tmp_path / "mlp.safetensors"
    Executable.from_spec(spec, arrays).save(path)
    return path


def test_load_missing_file_and_directory_are_os_errors_naming_the_path(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors") as info:
        load(missing)
    assert info.value.filename == str(missing)
    with pytest.raises(IsADirectoryError, match="is a directory") as info:
        load(tmp_path)
    assert info.value.filename == str(tmp_path)


def test_load_unreadable_file_is_a_permission_error(saved_mlp, monkeypatch):
    if os.geteuid() != 0:
        os.chmod(saved_mlp, 0)
    else:  # root reads anything: the OS error as open() raises it for a normal user
        def refuse(path, *args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        monkeypatch.setattr(executable_module, "open", refuse, raising=False)
    with pytest.raises(PermissionError, match="mlp.safetensors") as info:
        load(saved_mlp)
    assert not isinstance(info.value, ValueError)


def test_load_out_of_memory_is_a_memory_error_naming_the_path(saved_mlp, monkeypatch):
    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(executable_module._C, "Plan", no_memory)
    with pytest.raises(MemoryError, match="out of memory building the executable in .*mlp.safetensors"):
        load(saved_mlp)
    monkeypatch.undo()

    import safetensors

    class NoMemoryFile:
        def __init__(self, *args, **kwargs):
            raise MemoryError()

    monkeypatch.setattr(safetensors, "safe_open", NoMemoryFile)
    with pytest.raises(MemoryError, match="out of memory reading .*mlp.safetensors"):
        load(saved_mlp)


def test_load_invalid_file_is_still_a_spec_error(saved_mlp):
    data = bytearray(saved_mlp.read_bytes())
    saved_mlp.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(SpecError, match="is not a valid executable"):
        load(saved_mlp)


# --- command line --------------------------------------------------------------------------------


def test_cli_run_and_bench_take_the_limits(saved_mlp, capsys):
    from sparseprune import cli

    assert cli.main(["run", str(saved_mlp), "--batch", "5", "--max-batch", "4"]) == 2
    err = capsys.readouterr().err
    assert "the batch of this call is 5, above Limits.max_batch = 4" in err
    assert cli.main(["run", str(saved_mlp), "--batch", "4", "--max-batch", "4"]) == 0
    capsys.readouterr()
    assert cli.main(["run", str(saved_mlp), "--max-work", "10"]) == 2
    assert "above Limits.max_work = 10" in capsys.readouterr().err
    assert cli.main(["run", str(saved_mlp), "--threads", "1000"]) == 2
    assert "n_threads must be None or an int in [1, 256], got 1000" in capsys.readouterr().err
    assert cli.main(["bench", str(saved_mlp), "--batch-sizes", "2", "--threads", "1", "--repeats", "1",
                     "--warmup", "0", "--max-arena", "100"]) == 2
    assert "Limits.max_arena_bytes = 100" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "token ids and masks (inputs the executable marks int64 or bool) keep their integer / bool dtype" in help_text
    for option in ("--max-batch", "--max-work", "--max-arena"):
        assert option in help_text
