"""benchmarks/bench_models.py: the zoo benchmark runs in-process on small configs and writes rows
that hold either numbers or the error of the candidate that failed (models that do not compile
yet must not stop the run)."""
from __future__ import annotations

import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_models", os.path.join(ROOT, "benchmarks", "bench_models.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _number(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_model_row(row: dict) -> None:
    if row.get("error"):  # the model itself could not be built
        assert isinstance(row["error"], str)
        return
    times = row["times_ms"]
    assert _number(times["dense"]["median_ms"])
    for cand in ("convert", "executable"):
        if cand in times:  # timed: it matched torch first
            assert _number(times[cand]["median_ms"]) and _number(row["speedup_vs_dense"][cand])
            assert row["max_rel_diff"][cand] <= 1e-3
            assert cand not in row["errors"]
        else:
            assert isinstance(row["errors"][cand], str) and row["errors"][cand]
    assert row["threads"] == 1 and row["batch"] == 1


def test_quick_run_writes_rows_with_numbers_or_errors(bench, tmp_path):
    out_json, out_md = tmp_path / "models.json", tmp_path / "models.md"
    previous = torch.get_num_threads()
    assert bench.main(["--quick", "--models", "resnet,bert", "--threads", "1", "--repeats", "2",
                       "--json", str(out_json), "--markdown", str(out_md)]) == 0
    assert torch.get_num_threads() == previous  # restored
    result = json.loads(out_json.read_text())
    meta = result["metadata"]
    for key in ("cpu", "build_info", "git_revision", "threads", "command", "grid", "tolerance"):
        assert key in meta
    assert meta["threads"] == [1] and meta["grid"]["models"] == ["resnet", "bert"]
    rows = [r for r in result["rows"] if r["section"] == "models"]
    assert [r["model"] for r in rows] == ["resnet", "bert"]
    for row in rows:
        _check_model_row(row)
    resnet = rows[0]
    assert resnet["image"] == 32 and resnet["seq"] is None
    assert rows[1]["seq"] == 128 and rows[1]["image"] is None
    if "executable" in resnet["times_ms"]:  # the saved file holds 10% of the conv weights plus indices
        assert 0 < resnet["file_ratio"] < 1
        assert sum(resnet["compile"]["kernels"].values()) == resnet["pruned_layers"]
    # the sweep runs by default with bert: either an error row or lengths 8, 32, 128 and the ratio
    sweep = [r for r in result["rows"] if r["section"] == "seq_sweep"]
    assert sweep
    if not sweep[0].get("error"):
        assert [r["seq"] for r in sweep] == [8, 32, 128]
    md = out_md.read_text()
    assert "| resnet | 32² | 1 | 1 |" in md and "| bert | seq 128 | 1 | 1 |" in md


class _FakeExecutable:
    """Runs the torch model on numpy inputs: stands in for compile's result, to test the script's
    plumbing (dynamic sweep, ratio, error paths) whatever compile supports today."""

    def __init__(self, model, names, scale=1.0):
        self.model, self.names, self.scale, self.n_threads = model, names, scale, None

    def run(self, *arrays):
        with torch.inference_mode():
            out = self.model(**{n: torch.from_numpy(a) for n, a in zip(self.names, arrays)})
        return tuple(v.numpy() * self.scale for v in out.values())

    def layer_table(self):
        return [{"op": "linear", "format": "csr"}]

    def save(self, path):
        with open(path, "wb") as f:
            f.write(b"x" * 10)
        return 10


def test_sweep_and_wrong_outputs_with_a_stand_in_executable(bench, tmp_path, monkeypatch):
    def fake_compile(model, *, kwargs, dynamic_shapes, policy, batch_sizes, num_threads):
        assert set(dynamic_shapes) == {"input_ids", "attention_mask"}  # text: a dynamic sequence
        return _FakeExecutable(model, list(kwargs))

    monkeypatch.setattr(bench.sparseprune, "compile", fake_compile)
    out = tmp_path / "r.json"
    args = ["--quick", "--models", "bert", "--threads", "1", "--repeats", "1", "--json", str(out),
            "--markdown", str(tmp_path / "r.md")]
    assert bench.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    sweep = [r for r in rows if r["section"] == "seq_sweep"]
    assert [r["seq"] for r in sweep] == [8, 32, 128] and all(r["error"] is None for r in sweep)
    assert all(_number(r["times_ms"]["executable"]["median_ms"]) for r in sweep)
    ratio = [r for r in rows if r["section"] == "seq_sweep_ratio"][0]
    assert set(ratio["ratio_128_over_32"]) == {"dense", "executable"}
    assert ratio["meets_target"] == (ratio["ratio_128_over_32"]["executable"] >= 3.0)
    assert rows[0]["file_bytes"] == 10 and "executable" in rows[0]["times_ms"]

    # An executable whose outputs are off is reported, not timed; convert is still timed.
    monkeypatch.setattr(bench.sparseprune, "compile",
                        lambda model, *, kwargs, **_: _FakeExecutable(model, list(kwargs), scale=1.5))
    assert bench.main(args + ["--no-seq-sweep"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["section"] for r in rows] == ["models"]
    assert "executable" not in rows[0]["times_ms"] and "differs from torch" in rows[0]["errors"]["executable"]
    assert rows[0]["max_rel_diff"]["executable"] > 1e-3


def test_output_diff_matches_names_and_positions(bench):
    ref = {"a": torch.ones(2, 3), "b": torch.zeros(2)}
    assert bench.output_diff((np.ones((2, 3)), np.zeros(2)), ref) == 0.0
    assert bench.output_diff({"b": np.full(2, 0.5)}, ref) == 0.5  # by name
    with pytest.raises(ValueError, match="1 outputs, torch gives 2"):
        bench.output_diff(np.ones((2, 3)), ref)
    with pytest.raises(ValueError, match="shape"):
        bench.output_diff((np.ones((3, 2)), np.zeros(2)), ref)
    with pytest.raises(ValueError, match="not among"):
        bench.output_diff({"c": np.ones(2)}, ref)


@pytest.mark.parametrize("argv", [["--models", "bert,nope"], ["--sparsity", "1.0"], ["--seq", "600"],
                                  ["--batch-sizes", "0"]])
def test_bad_options_are_refused(bench, argv, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_a_failure_outside_the_checks_is_a_row_and_the_markdown_shows_errors(bench, monkeypatch):
    def broken(*_):
        raise RuntimeError("timing blew up\nsecond line")

    rows = bench.guarded(broken, {"section": "models", "model": "vit"})
    assert rows == [{"section": "models", "model": "vit", "error": "RuntimeError: timing blew up"}]
    rows += bench.guarded(broken, {"section": "seq_sweep", "model": "bert"})
    rows.append({"section": "models", "model": "gpt2", "seq": 128, "image": None, "batch": 1, "threads": 2,
                 "times_ms": {"dense": {"median_ms": 5.0}}, "speedup_vs_dense": {}, "max_rel_diff": {},
                 "errors": {"convert": "ValueError: a", "executable": "UnsupportedOperation: b"},
                 "file_bytes": None, "compile": None, "steal_s": 0.0})
    meta = {"command": "c", "cpu": "cpu", "cpu_count": 2, "threads": [2], "timestamp": "t",
            "grid": {"size": "full", "sparsity": 0.9, "policy": "measure"}}
    md = bench.markdown({"metadata": meta, "rows": rows})
    assert "| vit | | | | error: RuntimeError: timing blew up | | | | | | | | | |" in md
    assert "| gpt2 | seq 128 | 1 | 2 | 5.00 | error |  | error |" in md
    assert "* gpt2, executable: UnsupportedOperation: b" in md
    assert "error: RuntimeError: timing blew up" in md.split("### BERT")[1]
