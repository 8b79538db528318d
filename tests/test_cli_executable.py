"""`sparseprune compile`, `sparseprune run` and `sparseprune bench EXECUTABLE` (issue 5).

Small models and --policy threshold only (no kernel timing at compile time), tiny bench runs.
"""
import contextlib
import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sparseprune
import sparseprune.cli as cli

MODEL_FILE = textwrap.dedent(
    """
    import torch
    from torch import nn


    def make():
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 4)
            self.b = nn.Linear(5, 4)

        def forward(self, x, y):
            return torch.relu(self.a(x) + self.b(y)), self.b(y)


    def unsupported():
        return nn.Sequential(nn.Linear(6, 4), nn.LeakyReLU())


    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, ids, scale):
            return self.head(self.emb(ids)) * scale


    def broken():
        raise RuntimeError("cannot build this one")
    """
)


def _main(argv):
    """(status, stdout, stderr) of cli.main(argv)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(argv)
    return status, out.getvalue(), err.getvalue()


def _assert_clean_error(status, err, *fragments):
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("sparseprune ") and "error:" in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """mlp-small pruned to 90% and compiled by the CLI: (path, stdout)."""
    path = tmp_path_factory.mktemp("exe") / "mlp.spx"
    status, out, err = _main(["compile", "--model", "mlp-small", "--policy", "threshold", "--threads", "1",
                              "-o", str(path)])
    assert status == 0, err
    return path, out


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "my_model.py"
    path.write_text(MODEL_FILE)
    return path


# ------------------------------------------------------------------------------------ compile
def test_compile_named_model_prints_a_summary(compiled):
    path, out = compiled
    exe = sparseprune.load(path)
    assert exe.input_shapes == ((64,),) and exe.output_shapes == ((10,),)
    assert f"{exe.n_ops} ops" in out
    layers = exe.layer_table()
    assert len(layers) == 3
    for row in layers:  # every layer listed with its kernel and sparsity
        assert any(line.split()[:4] == [row["name"], row["op"], row["format"], f"{row['sparsity']:.1%}"]
                   for line in out.splitlines()), out
        assert row["format"] == "csr" and row["sparsity"] == pytest.approx(0.9, abs=2e-3)
    size = path.stat().st_size
    assert f"{size:,} bytes, {size / exe.dense_nbytes:.1%} of the dense fp32 weights" in out
    diff = float(out.split("max |diff|")[1].split()[0])
    assert 0 <= diff < 1e-4


def test_compile_batch_sizes_reach_the_kernel_choice(tmp_path, monkeypatch):
    from sparseprune.compile import kernel_choice

    seen = []

    def fake(plans, shapes, threads, dense, dense_reference, repeats):  # sparse wins at 1, dense at 64
        seen.append(sorted(shapes))
        return {k: {1: 1.0 if k == dense else 0.1, 64: 10.0 if k == dense else 30.0} for k in plans}

    monkeypatch.setattr(kernel_choice, "_time_plans", fake)
    path = tmp_path / "mlp.spx"
    status, out, err = _main(["compile", "--model", "mlp-small", "--threads", "1", "--batch-sizes", "1,64",
                              "-o", str(path)])
    assert status == 0, err
    assert seen and all(sizes == [1, 64] for sizes in seen)
    for row in sparseprune.load(path).layer_table():
        assert row["format"] == "csr" and row["dense_from"] == 4
        assert any(line.split()[:5] == [row["name"], row["op"], "csr,", "dense", "from"] for line in out.splitlines())


def test_compile_named_model_is_the_pruned_model(compiled):
    # the same pruning as `sparseprune bench`: per-layer L1 magnitude on the seeded model
    from sparseprune.bench import build_model, prune_linear_layers

    model, shape = build_model("mlp-small", seed=0)
    prune_linear_layers(model, 0.9)
    x = torch.randn(4, *shape)
    with torch.no_grad():
        expected = model(x).numpy()
    got = sparseprune.load(compiled[0]).run(x.numpy())
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_compile_model_file_uses_the_weights(tmp_path, model_file):
    namespace = {}
    exec(compile(MODEL_FILE, "model", "exec"), namespace)  # the same factory, in the test
    trained = namespace["make"]()
    with torch.no_grad():
        for p in trained.parameters():
            p.copy_(torch.randn(p.shape) * 3.0)
    weights = tmp_path / "w.safetensors"
    save_file(trained.state_dict(), str(weights))
    out_path = tmp_path / "mine.spx"
    status, out, err = _main(["compile", "--model-file", f"{model_file}:make", "--weights", str(weights),
                              "--input-shape", "6", "--batch", "2", "--policy", "threshold", "-o", str(out_path)])
    assert status == 0, err
    assert "max |diff|" in out
    exe = sparseprune.load(out_path)
    x = torch.randn(5, 6)
    got = exe.run(x.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(got, trained(x).numpy(), rtol=1e-4, atol=1e-4)
        fresh = namespace["make"]()(x).numpy()
    assert not np.allclose(got, fresh, atol=1e-2)  # not the factory's own random initialisation


def test_compile_token_id_inputs(tmp_path, model_file):
    out_path = tmp_path / "tagger.spx"
    status, out, err = _main(["compile", "--model-file", f"{model_file}:Tagger", "--input-shape", "5",
                              "--input-dtype", "int64", "--input-shape", "5,3", "--input-dtype", "float32",
                              "--policy", "threshold", "-o", str(out_path)])
    assert status == 0, err
    exe = sparseprune.load(out_path)
    assert exe.input_dtypes == ("int64", "float32")
    ids = np.array([[0, 10, 3, 3, 7]])
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "scale.npy", np.full((1, 5, 3), 2.0, np.float32))
    status, out, err = _main(["run", str(out_path), "--input", str(tmp_path / "ids.npy"),
                              "--input", str(tmp_path / "scale.npy"), "--output", str(tmp_path / "y.npy")])
    assert status == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), exe.run(ids, np.full((1, 5, 3), 2.0, np.float32)))
    # One dtype for two inputs is an argument error; int64 without an embedding a clean failure.
    with pytest.raises(SystemExit) as exit_info:  # argparse's error(): usage and message on stderr
        _main(["compile", "--model-file", f"{model_file}:Tagger", "--input-shape", "5",
               "--input-shape", "5,3", "--input-dtype", "int64", "-o", str(out_path)])
    assert exit_info.value.code == 2
    status, _, err = _main(["compile", "--model-file", f"{model_file}:make", "--input-shape", "6",
                            "--input-dtype", "int64", "-o", str(out_path)])
    assert status == 2 and "no nn.Embedding" in err


def test_compile_dynamic_sequence(tmp_path, model_file):
    """--dynamic-seq MAX: one file for every sequence length up to MAX (axis 1 of every input)."""
    out_path = tmp_path / "tagger.spx"
    status, out, err = _main(["compile", "--model-file", f"{model_file}:Tagger", "--input-shape", "5",
                              "--input-dtype", "int64", "--input-shape", "5,3", "--input-dtype", "float32",
                              "--dynamic-seq", "12",
                              "--policy", "threshold", "-o", str(out_path)])
    assert status == 0, err
    exe = sparseprune.load(out_path)
    assert exe.dims == {"seq": (1, 12)}
    ids_full = np.arange(12)[None] % 11
    full = exe.run(ids_full, np.full((1, 12, 3), 2.0, np.float32))
    for length in (1, 7, 12):  # the model works per token: a shorter sequence is a prefix of the full one
        got = exe.run(ids_full[:, :length], np.full((1, length, 3), 2.0, np.float32))
        assert got.shape == (1, length, 3)
        np.testing.assert_allclose(got, full[:, :length], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"seq.*13.*1\.\.12"):
        exe.run(np.zeros((1, 13), np.int64), np.ones((1, 13, 3), np.float32))


def test_compile_model_file_with_two_inputs_and_sparsity(tmp_path, model_file):
    out_path = tmp_path / "two.spx"
    status, out, err = _main(["compile", "--model-file", f"{model_file}:Two", "--input-shape", "6",
                              "--input-shape", "5", "--sparsity", "0.5", "--policy", "threshold",
                              "-o", str(out_path)])
    assert status == 0, err
    exe = sparseprune.load(out_path)
    assert exe.input_shapes == ((6,), (5,)) and len(exe.output_shapes) == 2
    assert all(row["sparsity"] == pytest.approx(0.5, abs=0.05) for row in exe.layer_table())

    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((3, 6), dtype=np.float32), rng.standard_normal((3, 5), dtype=np.float32)]
    in_paths = [tmp_path / "x0.npy", tmp_path / "x1.npy"]
    out_paths = [tmp_path / "y0.out", tmp_path / "y1.out"]  # written exactly there (no .npy added)
    for p, x in zip(in_paths, xs):
        np.save(p, x)
    argv = ["run", str(out_path), "--input", str(in_paths[0]), "--input", str(in_paths[1]),
            "--output", str(out_paths[0]), "--output", str(out_paths[1])]
    status, out, err = _main(argv)
    assert status == 0, err
    expected = exe.run(*xs)
    for p, y in zip(out_paths, expected):
        np.testing.assert_allclose(np.load(p, allow_pickle=False), y, rtol=1e-6, atol=1e-7)
    assert "output 1: shape (3, 4)" in out


# ---------------------------------------------------------------------------------------- run
def test_run_matches_load(tmp_path, compiled):
    path = compiled[0]
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    x_path, y_path = tmp_path / "x.npy", tmp_path / "y.npy"
    np.save(x_path, x)
    status, out, err = _main(["run", str(path), "--input", str(x_path), "--output", str(y_path), "--threads", "1"])
    assert status == 0, err
    y = np.load(y_path, allow_pickle=False)
    expected = sparseprune.load(path).run(x)
    assert y.shape == (5, 10) and y.dtype == np.float32
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-7)
    assert "shape (5, 10)" in out
    assert f"min {float(expected.min()):.4g}" in out and f"max {float(expected.max()):.4g}" in out
    assert "argmax per row: " + " ".join(str(i) for i in expected.argmax(1)) in out


def test_run_random_inputs_are_seeded(compiled):
    path = str(compiled[0])
    a = _main(["run", path, "--batch", "3", "--seed", "4"])
    b = _main(["run", path, "--batch", "3", "--seed", "4"])
    c = _main(["run", path, "--batch", "3", "--seed", "5"])
    assert a[0] == b[0] == c[0] == 0
    assert "shape (3, 10)" in a[1]
    assert a[1] == b[1] and a[1] != c[1]


def test_run_converts_float64_inputs(tmp_path, compiled):
    x = np.random.default_rng(2).standard_normal((2, 64))  # float64, as numpy makes by default
    np.save(tmp_path / "x.npy", x)
    status, _, err = _main(["run", str(compiled[0]), "--input", str(tmp_path / "x.npy"),
                            "--output", str(tmp_path / "y.npy")])
    assert status == 0, err
    expected = sparseprune.load(compiled[0]).run(x.astype(np.float32))
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-6, atol=1e-7)


# -------------------------------------------------------------------------------------- bench
def test_bench_executable_json(compiled):
    path = str(compiled[0])
    status, out, err = _main(["bench", path, "--batch-sizes", "1,4", "--threads", "1", "--repeats", "2",
                              "--warmup", "1", "--json", "-"])
    assert status == 0, err
    data = json.loads(out)  # nothing but the JSON
    assert data["executable"] == path and data["input_shapes"] == [[64]] and data["output_shapes"] == [[10]]
    assert data["file_bytes"] == compiled[0].stat().st_size
    assert data["metadata"]["threads"] == [1] and "build_info" in data["metadata"]
    assert [(r["threads"], r["batch"]) for r in data["rows"]] == [(1, 1), (1, 4)]
    for r in data["rows"]:
        assert 0 < r["median_ms"] <= r["p90_ms"]
        assert r["runs"] >= 2
        assert r["samples_per_s"] == pytest.approx(r["batch"] / (r["median_ms"] / 1e3))


def test_bench_executable_table_and_json_file(tmp_path, compiled):
    json_path = tmp_path / "b.json"
    status, out, err = _main(["bench", str(compiled[0]), "--batch-sizes", "2", "--threads", "1,2",
                              "--repeats", "1", "--warmup", "0", "--json", str(json_path)])
    assert status == 0, err
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if "median ms" in line)
    assert lines[header].split() == ["batch", "threads", "median", "ms", "p90", "ms", "samples/s"]
    assert [line.split()[:2] for line in lines[header + 1:header + 3]] == [["2", "1"], ["2", "2"]]
    assert [(r["threads"], r["batch"]) for r in json.loads(json_path.read_text())["rows"]] == [(1, 2), (2, 2)]


def test_bench_executable_refuses_model_options(compiled, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", str(compiled[0]), "--sparsity", "0.5"])
    assert info.value.code == 2
    assert "--sparsity" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- errors
def test_run_errors(tmp_path, compiled):
    path = str(compiled[0])
    _assert_clean_error(*_main(["run", str(tmp_path / "missing.spx")])[::2], "no such file")
    np.save(tmp_path / "bad.npy", np.zeros((3, 5), np.float32))
    _assert_clean_error(*_main(["run", path, "--input", str(tmp_path / "bad.npy")])[::2], "(3, 5)", "(batch, 64)")
    _assert_clean_error(*_main(["run", str(tmp_path / "bad.npy")])[::2], "bad.npy")  # not an executable
    good = tmp_path / "good.npy"
    np.save(good, np.zeros((1, 64), np.float32))
    _assert_clean_error(*_main(["run", path, "--input", str(good), "--input", str(good)])[::2], "1 input")
    _assert_clean_error(*_main(["run", path, "--output", "a.npy", "--output", "b.npy"])[::2], "1 output")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _assert_clean_error(*_main(["run", path, "--input", str(tmp_path / "obj.npy")])[::2], "obj.npy")
    _assert_clean_error(*_main(["bench", str(tmp_path / "missing.spx")])[::2], "no such file")


def test_compile_errors(tmp_path, model_file):
    out = str(tmp_path / "out.spx")
    common = ["--policy", "threshold", "-o", out]
    _assert_clean_error(*_main(["compile", "--model-file", f"{model_file}:unsupported", "--input-shape", "6",
                                *common])[::2], "LeakyReLU")
    _assert_clean_error(*_main(["compile", "--model-file", f"{tmp_path / 'nope.py'}:make", "--input-shape", "6",
                                *common])[::2], "no such file")
    _assert_clean_error(*_main(["compile", "--model-file", f"{model_file}:missing", "--input-shape", "6",
                                *common])[::2], "missing")
    _assert_clean_error(*_main(["compile", "--model-file", f"{model_file}:broken", "--input-shape", "6",
                                *common])[::2], "cannot build this one")
    _assert_clean_error(*_main(["compile", "--model", "mlp-small", "--input-shape", "5", *common])[::2],
                        "--input-shape", "(1, 5)")
    wrong = tmp_path / "wrong.safetensors"
    save_file({"0.weight": torch.zeros(2, 2)}, str(wrong))
    _assert_clean_error(*_main(["compile", "--model-file", f"{model_file}:make", "--input-shape", "6",
                                "--weights", str(wrong), *common])[::2], "--weights")
    not_safetensors = tmp_path / "w.pt"
    not_safetensors.write_bytes(b"\x80\x04not a safetensors file")
    _assert_clean_error(*_main(["compile", "--model-file", f"{model_file}:make", "--input-shape", "6",
                                "--weights", str(not_safetensors), *common])[::2], "safetensors")
    _assert_clean_error(*_main(["compile", "--model", "mlp-small", "--policy", "threshold",
                                "-o", str(tmp_path / "no-dir" / "x.spx")])[::2], "cannot write")
    assert not (tmp_path / "out.spx").exists()


@pytest.mark.parametrize(
    "argv, option",
    [
        (["compile", "-o", "x.spx"], "--model"),
        (["compile", "--model", "mlp-small"], "--output"),
        (["compile", "--model", "no-such-model", "-o", "x.spx"], "--model"),
        (["compile", "--model-file", "m.py:make", "-o", "x.spx"], "--input-shape"),
        (["compile", "--model", "mlp-small", "--input-shape", "3,0", "-o", "x.spx"], "--input-shape"),
        (["compile", "--model", "mlp-small", "--weights", "w.safetensors", "-o", "x.spx"], "--weights"),
        (["run", "x.spx", "--input", "x.npy", "--batch", "2"], "--batch"),
        (["run"], "EXECUTABLE"),
    ],
)
def test_bad_arguments_exit_2(argv, option, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert option in capsys.readouterr().err


# ---------------------------------------------------------------------------------- torch-free
def test_run_and_bench_executable_do_not_import_torch(tmp_path, compiled):
    x_path = tmp_path / "x.npy"
    np.save(x_path, np.ones((2, 64), np.float32))
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # `import torch` now raises ImportError
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("the blocker does not work")
        import sparseprune.cli
        status = sparseprune.cli.main(["run", {str(compiled[0])!r}, "--input", {str(x_path)!r},
                                       "--output", {str(tmp_path / "y.npy")!r}])
        assert status == 0, status
        status = sparseprune.cli.main(["bench", {str(compiled[0])!r}, "--batch-sizes", "1", "--threads", "1",
                                       "--repeats", "1", "--warmup", "0", "--json", "-"])
        assert status == 0, status
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        assert loaded == ["torch"] and sys.modules["torch"] is None, loaded
        print("TORCH-FREE OK")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("TORCH-FREE OK")
    assert '"rows"' in proc.stdout
    expected = sparseprune.load(compiled[0]).run(np.ones((2, 64), np.float32))
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-6, atol=1e-7)


def test_compile_and_run_a_padding_mask_input(tmp_path):
    model_file = tmp_path / "masked.py"
    model_file.write_text(textwrap.dedent(
        """
        from torch import nn


        class Masked(nn.Module):
            def __init__(self):
                super().__init__()
                self.encoder = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)

            def forward(self, x, padding):
                return self.encoder(x, src_key_padding_mask=padding)
        """))
    out_path = tmp_path / "masked.spx"
    status, out, err = _main(["compile", "--model-file", f"{model_file}:Masked", "--input-shape", "6,8",
                              "--input-dtype", "float32", "--input-shape", "6", "--input-dtype", "bool",
                              "--batch", "3", "--policy", "threshold", "-o", str(out_path)])
    assert status == 0, err
    exe = sparseprune.load(out_path)
    assert exe.input_dtypes == ("float32", "bool")
    status, out, err = _main(["run", str(out_path), "--batch", "2"])  # random inputs: a mask too
    assert status == 0, err
    mask = np.zeros((1, 6), bool)
    mask[0, 4:] = True
    np.save(tmp_path / "x.npy", np.ones((1, 6, 8), np.float32))
    np.save(tmp_path / "m.npy", mask)
    np.save(tmp_path / "bad.npy", mask.astype(np.float32))
    status, _, err = _main(["run", str(out_path), "--input", str(tmp_path / "x.npy"), "--input",
                            str(tmp_path / "m.npy")])
    assert status == 0, err
    status, _, err = _main(["run", str(out_path), "--input", str(tmp_path / "x.npy"), "--input",
                            str(tmp_path / "bad.npy")])
    assert status == 2 and "bool padding mask" in err
