"""benchmarks/bench_gemm_libraries.py: every candidate is checked against float64 numpy before it
is timed; a library that is not installed is a row entry with the install command; a wrong one
is left out with its error."""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--quick", "--threads", "1", "--repeats", "1", "--min-repeats", "1", "--warmup", "0", "--budget-s", "0.01"]


@pytest.fixture(scope="module")
def bench():
    saved = os.environ.get("OMP_WAIT_POLICY")
    spec = importlib.util.spec_from_file_location("bench_gemm_libraries",
                                                  os.path.join(ROOT, "benchmarks", "bench_gemm_libraries.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if saved is None:
        os.environ.pop("OMP_WAIT_POLICY", None)
    return module


def test_quick_run_times_checked_candidates(bench, tmp_path):
    out_json, out_md = tmp_path / "g.json", tmp_path / "g.md"
    assert bench.main(FAST + ["--json", str(out_json), "--markdown", str(out_md)]) == 0
    result = json.loads(out_json.read_text())
    rows = result["rows"]
    assert [r["shape"] for r in rows] == [s[0] for s in bench.SHAPES if s[0] in bench.QUICK]
    for row in rows:
        assert {"torch", "ours"} <= set(row["times"])
        assert not set(row["times"]) & set(row["errors"])  # timed or explained, never both
        for name in ("openblas", "onednn"):
            assert name in row["times"] or name not in row["errors"]
    md = out_md.read_text()
    assert result["metadata"]["build_info"]["simd_path_active"] in md
    for lib in ("openblas", "onednn"):
        if "not installed" in result["metadata"][lib]:
            assert "not installed" in md


def test_ours_matches_float64(bench, rng):
    x = rng.standard_normal((9, 33)).astype(np.float32)
    w = rng.standard_normal((17, 33)).astype(np.float32)
    got = bench.candidates(x, w, 1, None, None)["ours"]()
    np.testing.assert_allclose(got, x.astype(np.float64) @ w.astype(np.float64).T, rtol=1e-5, atol=1e-5)


def test_a_wrong_library_is_not_timed(bench, tmp_path, monkeypatch):
    real = bench.candidates

    def with_wrong(x, w, threads, openblas, onednn):
        fns = real(x, w, threads, openblas, onednn)
        fns["openblas"] = lambda: np.zeros((x.shape[0], w.shape[0]), np.float32)
        return fns

    monkeypatch.setattr(bench, "candidates", with_wrong)
    out_json = tmp_path / "g.json"
    bench.main(FAST + ["--json", str(out_json), "--markdown", str(tmp_path / "g.md")])
    for row in json.loads(out_json.read_text())["rows"]:
        assert "openblas" not in row["times"]
        assert "differs" in row["errors"]["openblas"]
