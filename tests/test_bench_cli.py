"""sparseprune.bench (models, benchmark runner) and the sparseprune command line.

Tiny configurations only, and no assertion on speed: these check the records are complete and
consistent, not what the machine measured.
"""
import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import sparseprune.cli as cli
from sparseprune.bench import (
    BenchmarkResult,
    available_models,
    benchmark,
    build_model,
    prune_linear_layers,
)

METADATA_KEYS = {
    "build_info", "cpu", "torch_version", "numpy_version", "git_revision", "timestamp", "threads",
}
TINY = dict(batch_sizes=(1, 4), warmup=1, repeats=2)


@pytest.fixture(scope="module")
def small_result():
    model, shape = build_model("mlp-small")
    inputs = torch.randn(16, *shape, generator=torch.Generator().manual_seed(3))

    def accuracy(m):  # agreement of the argmax with the unpruned model, a stand-in for accuracy
        return float((m(inputs).argmax(1) == model(inputs).argmax(1)).float().mean())

    return benchmark(
        model, shape, sparsity=0.8, threads=(1, 2), convert_kwargs={"policy": "threshold"},
        accuracy_fn=accuracy, name="mlp-small", **TINY,
    )


# --------------------------------------------------------------------------------- models
def test_registry_has_required_models():
    assert {"bert-ffn", "bert-layer", "mlp-small", "resnet18"} <= set(available_models())


def test_bert_layer_is_a_base_sized_encoder_layer_and_prunes_its_attention_too():
    model, shape = build_model("bert-layer")
    assert shape == (128, 768) and isinstance(model, nn.TransformerEncoderLayer)
    attn = model.self_attn
    assert (attn.embed_dim, attn.num_heads, model.linear1.out_features) == (768, 12, 3072) and attn.batch_first
    assert prune_linear_layers(model, 0.9) == 4  # in_proj_weight, out_proj, linear1, linear2
    for w in (attn.in_proj_weight, attn.out_proj.weight, model.linear1.weight, model.linear2.weight):
        assert 1 - int(torch.count_nonzero(w)) / w.numel() == pytest.approx(0.9, abs=1e-3)
    assert not hasattr(attn, "in_proj_weight_mask")  # made permanent


def test_bert_ffn_architecture():
    model, shape = build_model("bert-ffn")
    assert shape == (768,)
    assert not model.training
    shapes = [tuple(m.weight.shape) for m in model if isinstance(m, nn.Linear)]
    assert shapes == [(3072, 768), (768, 3072), (768, 768)]
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]


def test_build_model_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, _ = build_model("mlp-small", seed=1)
    b, _ = build_model("mlp-small", seed=1)
    c, _ = build_model("mlp-small", seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a[0].weight, b[0].weight)
    assert not torch.equal(a[0].weight, c[0].weight)


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="mlp-small"):
        build_model("no-such-model")


def test_prune_linear_layers_reaches_sparsity():
    model, _ = build_model("mlp-small")
    assert prune_linear_layers(model, 0.75) == 3
    for m in model:
        if isinstance(m, nn.Linear):
            zeros = 1 - int(torch.count_nonzero(m.weight)) / m.weight.numel()
            assert zeros == pytest.approx(0.75, abs=1e-3)
            assert not hasattr(m, "weight_mask")  # made permanent


# ------------------------------------------------------------------------------ benchmark
def test_benchmark_rows_are_sane(small_result):
    rows = small_result.rows
    assert [(r.threads, r.batch) for r in rows] == [(1, 1), (1, 4), (2, 1), (2, 4)]
    for r in rows:
        for value in (r.dense_median_ms, r.sparse_median_ms, r.dense_p90_ms, r.sparse_p90_ms):
            assert value > 0 and math.isfinite(value)
        assert r.dense_p90_ms >= r.dense_median_ms and r.sparse_p90_ms >= r.sparse_median_ms
        assert r.speedup > 0
        assert r.speedup == pytest.approx(r.dense_median_ms / r.sparse_median_ms)
        assert r.sparse_throughput == pytest.approx(r.batch / (r.sparse_median_ms / 1e3))
        assert r.runs >= 2
        assert r.max_abs_error <= 1e-3


def test_benchmark_metadata_and_report(small_result):
    meta = small_result.metadata
    assert METADATA_KEYS <= set(meta)
    assert meta["threads"] == [1, 2]
    assert meta["torch_version"] == torch.__version__
    assert "compiler" in meta["build_info"]
    assert meta["sparsity"] == 0.8 and meta["model"] == "mlp-small"
    assert meta["git_revision"] is None or len(meta["git_revision"]) == 40
    layers = small_result.conversion["layers"]
    assert len(layers) == 3 and small_result.conversion["policy"] == "threshold"
    assert all(layer["kernel"] == "csr" for layer in layers)  # 0.8 >= the threshold policy's bar
    assert small_result.model_summary["linear_sparsity"] == pytest.approx(0.8, abs=1e-3)


def test_benchmark_accuracy_side_by_side(small_result):
    acc = small_result.accuracy
    assert set(acc) == {"unpruned", "dense", "sparse"}
    assert acc["unpruned"] == 1.0
    assert acc["sparse"] == pytest.approx(acc["dense"])


def test_benchmark_json_round_trip(small_result):
    text = small_result.to_json()
    data = json.loads(text)
    assert data == small_result.to_dict()
    again = BenchmarkResult.from_json(text)
    assert again.rows == small_result.rows
    assert again.to_dict() == small_result.to_dict()


def test_benchmark_table_and_summary(small_result):
    table = small_result.table()
    lines = table.splitlines()
    assert "speedup" in lines[0] and "threads" in lines[0]
    assert len({len(line) for line in lines[:6]}) == 1  # aligned
    assert "accuracy:" in table
    assert "build:" in small_result.summary()
    assert "layer" in small_result.conversion_table()


def test_benchmark_leaves_model_and_threads_alone():
    model, shape = build_model("mlp-small")
    before = model[0].weight.clone()
    threads = torch.get_num_threads()
    benchmark(model, shape, sparsity=0.5, threads=(1,), convert_kwargs={"policy": "threshold"}, **TINY)
    assert torch.equal(model[0].weight, before)
    assert torch.get_num_threads() == threads


def test_benchmark_on_already_pruned_model_with_measure_policy():
    model, shape = build_model("mlp-small")
    prune_linear_layers(model, 0.9)
    result = benchmark(model, shape, sparsity=None, threads=(1,), batch_sizes=(2,), warmup=0, repeats=1)
    assert result.accuracy is None and result.metadata["sparsity"] is None
    assert result.metadata["convert_kwargs"]["policy"] == "measure"
    assert len(result.rows) == 1 and result.rows[0].speedup > 0


def test_benchmark_rejects_a_wrong_conversion(monkeypatch):
    module = sys.modules["sparseprune.bench.benchmark"]  # the package attribute is the function

    def broken_convert(model, **kwargs):
        out = _real_convert(model, **kwargs)
        with torch.no_grad():
            out[-1].bias.add_(1.0)  # the last Linear stays dense under "threshold" at 0 sparsity
        return out

    _real_convert = module.convert
    monkeypatch.setattr(module, "convert", broken_convert)
    model, shape = build_model("mlp-small")
    with pytest.raises(RuntimeError, match="disagrees with dense"):
        benchmark(model, shape, sparsity=0.0, threads=(1,), convert_kwargs={"policy": "threshold"}, **TINY)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sparsity": 1.5}, "sparsity"),
        ({"batch_sizes": (1, 0)}, "batch_sizes"),
        ({"batch_sizes": ()}, "batch_sizes"),
        ({"threads": (0,)}, "threads"),
        ({"repeats": 0}, "repeats"),
        ({"warmup": -1}, "warmup"),
        ({"convert_kwargs": {"inplace": True}}, "inplace"),
    ],
)
def test_benchmark_rejects_bad_arguments(kwargs, match):
    model, shape = build_model("mlp-small")
    with pytest.raises(ValueError, match=match):
        benchmark(model, shape, **kwargs)


# ------------------------------------------------------------------------------------ CLI
def test_cli_bench_writes_json(tmp_path, capsys):
    path = tmp_path / "r.json"
    argv = ["bench", "--model", "mlp-small", "--repeats", "2", "--warmup", "1",
            "--batch-sizes", "1,4", "--threads", "1", "--json", str(path)]
    assert cli.main(argv) == 0
    data = json.loads(path.read_text())
    assert [(r["threads"], r["batch"]) for r in data["rows"]] == [(1, 1), (1, 4)]
    assert data["metadata"]["model"] == "mlp-small" and data["metadata"]["threads"] == [1]
    out = capsys.readouterr().out
    assert "speedup" in out and "build:" in out and "conversion:" in out and "layer" in out


def test_benchmark_compile_engine(capsys):
    model, shape = build_model("mlp-small")
    result = benchmark(model, shape, engine="compile", sparsity=0.9, batch_sizes=(1, 3), threads=(1,), warmup=0,
                       repeats=2, convert_kwargs={"policy": "threshold"})
    assert result.metadata["engine"] == "compile"
    assert [(r.threads, r.batch) for r in result.rows] == [(1, 1), (1, 3)]
    assert all(r.speedup > 0 and r.max_abs_error < 1e-4 for r in result.rows)
    kernels = [layer["kernel"] for layer in result.conversion["layers"]]
    assert kernels == ["csr", "csr", "csr"]  # compile's choices, in the conversion table's shape
    assert "csr" in result.conversion_table()
    with pytest.raises(ValueError, match="engine"):
        benchmark(model, shape, engine="jit")
    assert cli.main(["bench", "--model", "mlp-small", "--engine", "compile", "--repeats", "1", "--warmup", "0",
                     "--batch-sizes", "2", "--threads", "1", "--policy", "threshold"]) == 0
    assert "compiled executable: 3 of 3 layers sparse" in capsys.readouterr().out


def test_cli_bench_json_to_stdout(capsys):
    argv = ["bench", "--model", "mlp-small", "--repeats", "1", "--warmup", "0",
            "--batch-sizes", "2", "--threads", "1", "--policy", "threshold", "--json", "-"]
    assert cli.main(argv) == 0
    data = json.loads(capsys.readouterr().out)  # nothing but the JSON
    assert len(data["rows"]) == 1 and data["conversion"]["policy"] == "threshold"


@pytest.mark.parametrize(
    "argv, option",
    [
        (["bench", "--model", "no-such-model"], "--model"),
        (["bench", "--sparsity", "1.5"], "--sparsity"),
        (["bench", "--sparsity", "abc"], "--sparsity"),
        (["bench", "--batch-sizes", "1,0"], "--batch-sizes"),
        (["bench", "--batch-sizes", "x"], "--batch-sizes"),
        (["bench", "--threads", "0"], "--threads"),
        (["bench", "--repeats", "0"], "--repeats"),
        ([], "COMMAND"),
    ],
)
def test_cli_bad_arguments_exit_with_a_clear_error(argv, option, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert option in err and "error" in err


def test_cli_info_prints_the_compiler(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "compiler:" in out and "openmp" in out


def test_cli_demo_is_lazy(monkeypatch, capsys):
    # bench/info never import the demo; with it missing, `demo` fails cleanly (status 1).
    monkeypatch.setitem(sys.modules, "sparseprune.demo", None)  # makes the import fail
    assert cli.main(["info"]) == 0
    assert cli.main(["demo", "--quick"]) == 1
    assert "demo" in capsys.readouterr().err


def test_cli_demo_dispatches_to_the_module(monkeypatch, tmp_path):
    import types

    calls = []
    fake = types.ModuleType("sparseprune.demo")
    fake.add_arguments = lambda p: (p.add_argument("--quick", action="store_true"), p.add_argument("--out"))
    fake.run = lambda args: calls.append((args.quick, args.out)) or 0
    monkeypatch.setitem(sys.modules, "sparseprune.demo", fake)
    assert cli.main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    assert calls == [(True, str(tmp_path))]


def test_python_dash_m_sparseprune():
    proc = subprocess.run(
        [sys.executable, "-m", "sparseprune", "--version"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith("sparseprune ")
