"""benchmarks/bench_engines.py: the engines benchmark runs in-process on small models and writes
rows where every engine is either timed (after matching torch) or reported with its reason (not
installed, failed to build, wrong outputs), never both."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--quick", "--batch-sizes", "1,2", "--repeats", "1", "--warmup", "0", "--budget-s", "0.01",
        "--profile-repeats", "2"]


@pytest.fixture(scope="module")
def bench():
    saved = os.environ.get("OMP_WAIT_POLICY")
    spec = importlib.util.spec_from_file_location("bench_engines", os.path.join(ROOT, "benchmarks", "bench_engines.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if saved is None:  # the script sets it for its own process; leave the test process's as it was
        os.environ.pop("OMP_WAIT_POLICY", None)
    return module


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _number(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _run(bench, tmp_path, argv):
    out_json, out_md = tmp_path / "engines.json", tmp_path / "engines.md"
    previous = torch.get_num_threads()
    assert bench.main([*FAST, *argv, "--json", str(out_json), "--markdown", str(out_md)]) == 0
    assert torch.get_num_threads() == previous  # restored
    return json.loads(out_json.read_text()), out_md.read_text()


def _check_row(row: dict, engines) -> None:
    times, errors = row["times_ms"], row["errors"]
    assert _number(times["torch"]["median_ms"]) and row["speedup_vs_torch"]["torch"] == 1.0
    for engine in engines:
        if engine in times:  # timed: it matched torch first
            assert _number(times[engine]["median_ms"]) and _number(times[engine]["p90_ms"])
            assert _number(row["speedup_vs_torch"][engine])
            assert row["max_rel_diff"][engine] <= 1e-3
            assert engine not in errors
        else:
            assert isinstance(errors[engine], str) and errors[engine]


def test_quick_run_writes_every_engine_timed_or_with_its_reason(bench, tmp_path):
    result, md = _run(bench, tmp_path, ["--models", "bert-ffn,resnet-stage"])
    meta = result["metadata"]
    for key in ("cpu", "build_info", "git_revision", "torch_version", "engine_versions", "command", "grid",
                "tolerance", "omp_wait_policy"):
        assert key in meta
    assert meta["build_info"]["simd_path_active"]
    assert meta["threads"] == [2] and meta["grid"]["engines"] == list(bench.ENGINES)
    rows = result["rows"]
    assert [(r["model"], r["batch"]) for r in rows] == [("bert-ffn", 1), ("bert-ffn", 2), ("resnet-stage", 1),
                                                        ("resnet-stage", 2)]
    for row in rows:
        assert row["threads"] == 2
        _check_row(row, bench.ENGINES[1:])
        # sparseprune runs these models: both of its engines must match torch and be timed
        assert "convert" in row["times_ms"] and "executable" in row["times_ms"]
        for engine, module in (("onnxruntime", "onnxruntime"), ("deepsparse", "deepsparse")):
            if not _installed(module):
                assert row["errors"][engine].startswith("not installed"), row["errors"][engine]
        if _installed("onnxruntime") and _installed("onnx"):
            assert "onnxruntime" in row["times_ms"], row["errors"].get("onnxruntime")
    assert rows[2]["input_shape"] == [1, 16, 16, 16]
    assert "| model | batch | torch | onnxruntime | deepsparse | convert | executable |" in md
    assert "| bert-ffn | 1 | " in md and "| resnet-stage | 2 | " in md
    assert meta["cpu"] in md and meta["build_info"]["simd_path_active"] in md
    if not _installed("deepsparse"):
        assert "* deepsparse: not installed" in md


def test_an_engine_with_wrong_outputs_is_reported_not_timed(bench, tmp_path, monkeypatch):
    def wrong(model, example, ctx):  # runs torch, then scales the result: off by 50%
        return lambda x: (lambda: [a * 1.5 for a in bench.flat_outputs(model(x))])

    def broken(model, example, ctx):
        raise RuntimeError("cannot build\nsecond line")

    monkeypatch.setitem(bench.BUILDERS, "onnxruntime", wrong)
    monkeypatch.setitem(bench.BUILDERS, "convert", broken)
    result, md = _run(bench, tmp_path, ["--models", "bert-ffn", "--engines", "onnxruntime,convert,executable"])
    for row in result["rows"]:
        assert set(row["times_ms"]) == {"torch", "executable"}
        assert "differs from torch" in row["errors"]["onnxruntime"]
        assert row["max_rel_diff"]["onnxruntime"] > 1e-3
        assert row["errors"]["convert"] == "RuntimeError: cannot build"
        _check_row(row, ("onnxruntime", "convert", "executable"))
    assert "* onnxruntime: output differs from torch" in md and "* convert: RuntimeError: cannot build" in md


def test_a_model_whose_torch_run_fails_is_an_error_row(bench, tmp_path, monkeypatch):
    def broken(model, example, ctx):
        raise RuntimeError("torch broke")

    monkeypatch.setitem(bench.BUILDERS, "torch", broken)
    result, md = _run(bench, tmp_path, ["--models", "bert-ffn", "--engines", "executable", "--batch-sizes", "1"])
    assert result["rows"] == [{"model": "bert-ffn", "error": "RuntimeError: torch eager failed: RuntimeError: torch broke"}]
    assert "| bert-ffn | | error: RuntimeError: torch eager failed" in md


def test_profile_of_the_bert_layer_executable(bench, tmp_path):
    result, md = _run(bench, tmp_path, ["--models", "bert-layer", "--engines", "executable", "--batch-sizes", "1"])
    (profile,) = result["metadata"]["profiles"]
    assert profile["model"] == "bert-layer" and profile["batch"] == 1 and profile["threads"] == 2
    ops = profile["ops"]
    assert {op["op"] for op in ops} >= {"linear", "attention", "layernorm"}
    assert sum(op["share"] for op in ops) == pytest.approx(1.0)
    assert "### Where the time goes: bert-layer executable, batch 1" in md and "self_attn.out_proj" in md


def test_outputs_are_compared_by_position(bench):
    ref = (torch.ones(2, 3), torch.zeros(2))
    assert bench.output_diff([np.ones((2, 3)), np.zeros(2)], ref) == 0.0
    assert bench.output_diff({"a": np.ones((2, 3)), "b": np.full(2, 0.5)}, ref) == 0.5
    with pytest.raises(ValueError, match="1 outputs, torch gives 2"):
        bench.output_diff(np.ones((2, 3)), ref)
    with pytest.raises(ValueError, match="shape"):
        bench.output_diff([np.ones((3, 2)), np.zeros(2)], ref)


def test_a_missing_engine_says_not_installed(bench):
    with pytest.raises(bench.EngineMissing, match=r"^not installed \(pip install nope: ModuleNotFoundError"):
        bench.import_engine("sparseprune_no_such_engine", "pip install nope")


@pytest.mark.parametrize("argv", [["--models", "bert-ffn,nope"], ["--engines", "tvm"], ["--sparsity", "1.0"],
                                  ["--batch-sizes", "0"], ["--threads", "0"]])
def test_bad_options_are_refused(bench, argv, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert "error" in capsys.readouterr().err


# ------------------------------------------------------------------ DeepSparse in its own interpreter
# deepsparse_worker.py run by --deepsparse-python, with a stand-in `deepsparse` package (ONNX Runtime
# behind deepsparse.Engine's interface) on PYTHONPATH: the protocol is tested without DeepSparse.
FAKE_DEEPSPARSE = '''
import numpy as np
import onnxruntime

__version__ = "0.0-fake"


class Engine:
    def __init__(self, model, batch_size, num_cores):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = num_cores
        self.session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.batch_size, self.cpu_avx_type, self.cpu_vnni = batch_size, "fake", False

    def run(self, inputs):
        assert all(a.shape[0] == self.batch_size for a in inputs), "compiled for another batch"
        names = [i.name for i in self.session.get_inputs()]
        return [SCALE * a for a in self.session.run(None, dict(zip(names, inputs)))]
'''


@pytest.fixture
def fake_deepsparse(tmp_path, monkeypatch):
    """write(scale=1.0, body=FAKE_DEEPSPARSE): puts a stand-in deepsparse on the worker's PYTHONPATH."""
    pytest.importorskip("onnxruntime")

    def write(scale=1.0, body=FAKE_DEEPSPARSE):
        package = tmp_path / "fake" / "deepsparse"
        package.mkdir(parents=True, exist_ok=True)
        (package / "__init__.py").write_text(f"SCALE = {scale}\n" + body)
        monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake"))
    return write


APART = ["--models", "bert-ffn", "--engines", "deepsparse,executable", "--deepsparse-python", sys.executable]


def test_deepsparse_in_its_own_interpreter_is_checked_and_timed(bench, tmp_path, fake_deepsparse):
    fake_deepsparse()
    result, md = _run(bench, tmp_path, APART + ["--repeats", "2", "--warmup", "1"])
    assert result["metadata"]["deepsparse_python"] == sys.executable
    assert result["metadata"]["engine_versions"]["deepsparse"] == "0.0-fake"
    for row in result["rows"]:
        _check_row(row, ("deepsparse", "executable"))
        assert "deepsparse" in row["times_ms"], row["errors"]
        info = row["timed_apart"]["deepsparse"]
        # the in-process engines' warm-up and round count, 3 timed calls a round
        assert (info["warmup"], info["rounds"]) == (row["warmup"], row["runs"])
        assert info["samples"] == 3 * row["runs"] and info["cpu_avx_type"] == "fake"
        assert info["python"] == sys.executable and info["wall_s"] > 0
        assert info["nm_environment"]["NM_DISABLE_ANALYTICS"] == "1"  # no telemetry from a benchmark
    assert "deepsparse ran in its own process" in md


def test_deepsparse_worker_outputs_are_checked_against_torch(bench, tmp_path, fake_deepsparse):
    fake_deepsparse(scale=1.5)
    result, md = _run(bench, tmp_path, APART)
    for row in result["rows"]:
        assert "deepsparse" not in row["times_ms"]
        assert "differs from torch" in row["errors"]["deepsparse"]
        assert row["max_rel_diff"]["deepsparse"] > 1e-3
        _check_row(row, ("deepsparse", "executable"))


def test_deepsparse_worker_failures_are_row_entries(bench, tmp_path, fake_deepsparse, monkeypatch):
    fake_deepsparse(body="class Engine:\n    def __init__(self, **kw):\n        raise ValueError('no such op\\nmore')\n")
    result, md = _run(bench, tmp_path, APART + ["--batch-sizes", "1"])
    (row,) = result["rows"]
    assert row["errors"]["deepsparse"] == "RuntimeError: deepsparse worker: ValueError: no such op"
    assert "* deepsparse: RuntimeError: deepsparse worker: ValueError: no such op" in md
    # an interpreter without deepsparse (this one, with the stand-in off the path): not installed
    monkeypatch.delenv("PYTHONPATH")
    if _installed("deepsparse"):
        pytest.skip("deepsparse is installed in the test interpreter")
    result, md = _run(bench, tmp_path, APART + ["--batch-sizes", "1"])
    (row,) = result["rows"]
    assert row["errors"]["deepsparse"].startswith(f"not installed (deepsparse in {sys.executable}: ModuleNotFoundError")
    assert "| bert-ffn | 1 | " in md and " | not installed | " in md


def test_deepsparse_python_must_be_an_executable(bench, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--deepsparse-python", str(tmp_path / "nope")])
    assert "--deepsparse-python" in capsys.readouterr().err
    not_executable = tmp_path / "python"
    not_executable.write_text("")
    monkeypatch.setenv("SPARSEPRUNE_DEEPSPARSE_PYTHON", str(not_executable))
    with pytest.raises(SystemExit):
        bench.parse_args([])
    assert "SPARSEPRUNE_DEEPSPARSE_PYTHON" in capsys.readouterr().err
    monkeypatch.setenv("SPARSEPRUNE_DEEPSPARSE_PYTHON", sys.executable)  # the default comes from it
    assert bench.parse_args([]).deepsparse_python == sys.executable
    monkeypatch.delenv("SPARSEPRUNE_DEEPSPARSE_PYTHON")
    assert bench.parse_args([]).deepsparse_python is None


def test_deepsparse_worker_restamps_ir_10_files(tmp_path):
    """DeepSparse 1.8 loads ONNX IR <= 9; the torch.export exporter writes IR 10 for opset 17:
    the worker hands DeepSparse an IR 9 copy, and a file already readable as it is."""
    onnx = pytest.importorskip("onnx")
    spec = importlib.util.spec_from_file_location("deepsparse_worker", os.path.join(ROOT, "benchmarks", "deepsparse_worker.py"))
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])])
    for ir, restamped in ((10, True), (9, False), (8, False)):
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
        model.ir_version = ir
        path = str(tmp_path / f"m{ir}.onnx")
        onnx.save(model, path)
        got = worker.readable_model(path, str(tmp_path))
        assert (got != path) == restamped
        assert onnx.load(got).ir_version == min(ir, worker.MAX_IR_VERSION)
        assert onnx.load(got).graph == model.graph
