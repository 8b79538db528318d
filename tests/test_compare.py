"""`sparseprune compare` end to end in tiny configurations, its registry, outputs and arguments.

Tiny budgets (a few epochs, one sparsity, a subset of methods, minimal timing) and no assertion
on speed beyond "measured and positive": these check that every requested method gets a complete
row, that converted models reproduce the pruned ones, that runs are reproducible and that bad
arguments fail clearly.
"""
import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

import sparseprune.cli as cli
from sparseprune.compare import load_npz, run_compare
from sparseprune.experiments import registry
from sparseprune.experiments.config import QUICK, Budget
from sparseprune.experiments.measure import footprint, safetensors_size
from sparseprune.experiments.methods.structured import pattern_connectivity
from sparseprune.experiments.models import as_image, build_cnn
from sparseprune.experiments.registry import MethodUnavailable, Outcome, Method, require, select
from sparseprune.nn import SparseLinear

# mlp and cnn rows of these families cover every deployment path: masks + convert (Linear and
# conv), shrink + convert (units, filters), a rebuilt model (layer removal).
CLI_METHODS = "magnitude,units,network-slimming,layer-removal"
TINY = QUICK.with_(
    budgets={"mlp": Budget(4, 3e-3, 1, 1e-3), "cnn": Budget(1, 3e-3, 1, 1e-3)},
    rounds=1, timing_warmup=0, timing_repeats=1, timing_min_time_s=0.0,
)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    argv = ["compare", "--quick", "--sparsities", "0.8", "--methods", CLI_METHODS, "--schedules",
            "one-shot,one-shot+ft", "--dense-epochs", "2", "--budget", "1", "--seed", "3",
            "--out", str(out), "--no-progress"]
    status = cli.main(argv)
    return status, out, json.loads((out / "compare.json").read_text())


def _expected_keys(record):
    """(model, method, schedule) of every row the run should have, from its own config."""
    keys = set()
    for m in record["config"]["methods"]:
        for model in m["models"]:
            if model in record["config"]["models"]:
                keys.add((model, m["name"], m["schedule"]))
    return keys


def test_cli_compare_writes_every_output(cli_run):
    status, out, record = cli_run
    assert status == 0
    for name in ("compare.json", "compare.csv", "compare_accuracy_vs_sparsity.png",
                 "compare_speedup_vs_sparsity.png", "compare_accuracy_vs_speedup.png"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
    assert (out / "compare_accuracy_vs_speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "compare.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["method"], r["schedule"]) for r in rows] == [
        (r["model"], r["method"], r["schedule"]) for r in record["rows"]]


def test_cli_compare_every_requested_method_has_a_measured_row(cli_run):
    _, _, record = cli_run
    rows = record["rows"]
    got = {(r["model"], r["method"], r["schedule"]) for r in rows if r["method"] != "dense"}
    assert got == _expected_keys(record)
    assert {r["method"] for r in rows} == {"dense", *CLI_METHODS.split(",")}
    assert {r["model"] for r in rows if r["method"] == "dense"} == {"mlp", "cnn"}
    for r in rows:
        assert r["status"] == "ok", r
        for key in ("acc_dense", "acc_pruned", "acc_converted", "sparsity"):
            assert 0.0 <= r[key] <= 1.0, (key, r)
        for batch in ("1", "256"):
            t = r["timing"][batch]
            assert t["speedup"] > 0 and t["dense_ms"] > 0 and t["ours_ms"] > 0
        assert r["params"] > 0 and r["bytes_on_disk"] > 0
    assert record["summary"] == {"ok": len(rows), "unavailable": 0, "error": 0}


def test_cli_compare_converted_outputs_match(cli_run):
    _, _, record = cli_run
    for r in record["rows"]:
        assert r["outputs_match"] is True
        assert r["max_abs_diff"] <= r["extra"]["output_tolerance"]  # 1e-3 x max(1, max |logit|)
        assert r["max_abs_diff"] < 1e-4  # in fact float32 rounding only
        # argmax can only flip on a near tie, so converted accuracy is the pruned model's
        assert r["acc_converted"] == pytest.approx(r["acc_pruned"], abs=1 / 449 + 1e-9)
    structured = [r for r in record["rows"] if r["method"] in ("units", "network-slimming")]
    assert structured and all(r["deploy"] == "shrink+convert" for r in structured)
    # shrink really deleted the pruned channels: fewer parameters than the dense model
    assert all(r["params"] < r["params_dense"] for r in structured)


def test_cli_compare_levels_that_are_not_sparsities(cli_run):
    _, _, record = cli_run
    removal = [r for r in record["rows"] if r["method"] == "layer-removal"]
    assert {r["model"] for r in removal} == {"mlp", "cnn"}
    for r in removal:
        assert r["target"] == "1 layer removed"
        assert len(r["extra"]["removed"]) == 1
        assert 0.0 < r["sparsity"] < 1.0  # the removed layer's weights are gone


# --------------------------------------------------------------------------- determinism, API
def _accuracies(seed):
    record = run_compare(config=TINY.with_(models=("mlp",)), methods=["magnitude", "random", "snip-at-init"],
                         schedules=["one-shot", "iterative", "at-init"], seed=seed, plots=False, progress=False,
                         strict=True, log=lambda _: None)
    return [(r["method"], r["schedule"], r["acc_dense"], r["acc_pruned"], r["mask_sparsity"]) for r in record["rows"]]


def test_same_seed_gives_identical_accuracies():
    first, second = _accuracies(5), _accuracies(5)
    assert first == second
    assert len(first) == 1 + 4 + 1


def test_row_seed_depends_on_the_row_not_on_the_other_rows():
    alone = run_compare(config=TINY.with_(models=("mlp",)), methods=["random/one-shot"], seed=5, plots=False,
                        progress=False, strict=True, log=lambda _: None)
    both = run_compare(config=TINY.with_(models=("mlp",)), methods=["magnitude/one-shot", "random/one-shot"],
                       seed=5, plots=False, progress=False, strict=True, log=lambda _: None)

    def acc(record):
        return next(r["acc_pruned"] for r in record["rows"] if r["method"] == "random")

    assert acc(alone) == acc(both)


@pytest.fixture
def fake_methods(monkeypatch):
    """Three extra registry entries: one whose API is missing, one that fails, one that works."""
    def missing(job):
        require("sparseprune.no_such_module", "prune")
        raise AssertionError("unreachable")

    def broken(job):
        raise RuntimeError("deliberate failure")

    def fine(job):
        return Outcome(job.dense, notes=["unchanged"])

    for name, fn in (("fake-missing", missing), ("fake-broken", broken), ("fake-fine", fine)):
        monkeypatch.setitem(registry._REGISTRY, f"{name}/one-shot", Method(name, "one-shot", ("mlp",), fn, name))
    return ["fake-missing", "fake-broken", "fake-fine"]


def test_unavailable_and_failing_methods_get_rows_not_silence(fake_methods, tmp_path):
    record = run_compare(config=TINY.with_(models=("mlp",)), methods=fake_methods, seed=0, out=str(tmp_path),
                         progress=False, log=lambda _: None)
    rows = {r["method"]: r for r in record["rows"]}
    assert rows["fake-missing"]["status"] == "unavailable"
    assert "sparseprune.no_such_module" in rows["fake-missing"]["message"]
    assert rows["fake-broken"]["status"] == "error"
    assert "deliberate failure" in rows["fake-broken"]["message"]
    assert rows["fake-fine"]["status"] == "ok" and rows["fake-fine"]["timing"]["1"]["speedup"] > 0
    assert record["summary"] == {"ok": 2, "unavailable": 1, "error": 1}
    table = record["table"]
    assert "unavailable: sparseprune.no_such_module" in table and "error: RuntimeError: deliberate failure" in table
    with open(tmp_path / "compare.csv", newline="") as f:
        statuses = {r["method"]: r["status"] for r in csv.DictReader(f)}
    assert statuses["fake-broken"] == "error"


def test_strict_raises_the_failure(fake_methods):
    with pytest.raises(RuntimeError, match="deliberate failure"):
        run_compare(config=TINY.with_(models=("mlp",)), methods=["fake-broken"], seed=0, plots=False,
                    progress=False, strict=True, log=lambda _: None)
    with pytest.raises(MethodUnavailable, match="no_such_module"):
        run_compare(config=TINY.with_(models=("mlp",)), methods=["fake-missing"], seed=0, plots=False,
                    progress=False, strict=True, log=lambda _: None)


def test_user_data_from_npz_and_a_model_the_data_does_not_fit(tmp_path, rng):
    y = np.arange(120) % 3
    x = (rng.standard_normal((120, 16)) + y[:, None]).astype(np.float32)  # 16 features: 4x4 images
    np.savez(tmp_path / "square.npz", x=x, y=y)
    np.savez(tmp_path / "wide.npz", x=x[:, :10], y=y)  # 10 features: no image for the CNN
    methods = ["magnitude/one-shot"]
    square = run_compare(config=TINY, methods=methods, seed=0, data=load_npz(str(tmp_path / "square.npz"), 0),
                         plots=False, progress=False, log=lambda _: None)
    assert square["config"]["data"] == "user data" and square["config"]["n_train"] == 90
    assert all(r["status"] == "ok" for r in square["rows"])
    assert {r["model"] for r in square["rows"]} == {"mlp", "cnn"}
    wide = run_compare(config=TINY, methods=methods, seed=0, data=load_npz(str(tmp_path / "wide.npz"), 0),
                       plots=False, progress=False, log=lambda _: None)
    by_model = {(r["model"], r["method"]): r for r in wide["rows"]}
    assert by_model[("mlp", "magnitude")]["status"] == "ok"
    assert by_model[("cnn", "magnitude")]["status"] == "unavailable"
    assert "image" in by_model[("cnn", "magnitude")]["message"]


# ------------------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize("argv,message", [
    (["--sparsities", "1.5"], "[0, 1)"),
    (["--sparsities", "0.5,abc"], "comma-separated"),
    (["--methods", "magnitude,no-such-method"], "unknown method(s) no-such-method"),
    (["--schedules", "sometimes"], "unknown schedule(s) sometimes"),
    (["--models", "resnet"], "unknown model(s) resnet"),
    (["--seed", "-1"], "must be >= 0"),
])
def test_bad_arguments_exit_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["compare", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_data_file_and_list(tmp_path, capsys):
    np.savez(tmp_path / "bad.npz", a=np.zeros(3))
    assert cli.main(["compare", "--data", str(tmp_path / "bad.npz"), "--no-progress"]) == 1
    assert "must hold arrays x and y" in capsys.readouterr().err
    assert cli.main(["compare", "--methods", "units", "--schedules", "at-init", "--no-progress"]) == 1
    assert "no method has schedule at-init" in capsys.readouterr().err
    assert cli.main(["compare", "--list"]) == 0
    listing = capsys.readouterr().out
    for name in registry.method_names():
        assert name in listing


def test_select_and_run_compare_reject_bad_input():
    with pytest.raises(ValueError, match="unknown method"):
        select(["nope"])
    with pytest.raises(ValueError, match="sparsity"):
        run_compare(config=TINY.with_(sparsities=(1.0,)), plots=False, progress=False)
    with pytest.raises(ValueError, match="models"):
        run_compare(config=TINY.with_(models=("vgg",)), plots=False, progress=False)


# --------------------------------------------------------------------------------- the pieces
def test_registry_covers_every_method_family_of_the_issue():
    names = set(registry.method_names())
    assert {"magnitude", "global-magnitude", "random", "block-magnitude", "obd", "snip-at-init", "random-at-init",
            "magnitude-at-init", "layerwise-neurons", "layer-removal", "random-ensemble", "random-single",
            "channel-gates", "filters-l1", "filters-l2", "network-slimming", "units", "kernels", "patterns"} <= names
    schedules = {m.schedule for m in registry.all_methods() if m.name == "magnitude"}
    assert schedules == {"one-shot", "one-shot+ft", "iterative", "gradual"}


def test_footprint_counts_nonzeros_and_bytes_shrink_with_sparsity():
    import sparseprune.prune as P

    layer = nn.Linear(256, 128)
    P.magnitude(layer, 0.9)
    P.remove(layer)
    dense = footprint(nn.Sequential(layer))
    sparse = footprint(nn.Sequential(SparseLinear.from_dense(layer)))
    nnz = int((layer.weight != 0).sum())
    assert dense.weights == sparse.weights == nnz
    assert dense.params == sparse.params == nnz + 128
    assert sparse.tensors["0.indices"].dtype == np.uint16  # 256 inputs: 16-bit column indices
    assert sparse.bytes_on_disk() < 0.25 * dense.bytes_on_disk()
    # the file holds the arrays plus a small JSON header
    raw = sum(a.nbytes for a in dense.tensors.values())
    assert raw < safetensors_size(dense.tensors) < raw + 1024


def test_cnn_and_image_layouts():
    model = build_cnn((1, 8, 8), 10)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert as_image(torch.zeros(3, 64)).shape == (3, 1, 8, 8)
    assert as_image(torch.zeros(3, 5, 5)).shape == (3, 1, 5, 5)
    with pytest.raises(ValueError, match="image"):
        as_image(torch.zeros(3, 10))


def test_pattern_connectivity_reaches_the_target():
    for target in (0.6, 0.8, 0.9, 0.95):
        c = pattern_connectivity(target, 4, 9)
        assert 1 - (4 / 9) * (1 - c) == pytest.approx(target)
    assert pattern_connectivity(0.5, 4, 9) == 0.0  # 4-of-9 patterns alone remove 56%


# --------------------------------------------------------------------- issue 14: equal budgets
def test_every_row_trains_the_same_budget_after_pruning():
    cfg = TINY.with_(models=("mlp",), rounds=2).with_budget(4)
    record = run_compare(config=cfg, methods=["magnitude", "random", "snip-at-init", "random-ensemble"], seed=0,
                         plots=False, progress=False, strict=True, log=lambda _: None)
    epochs = {(r["method"], r["schedule"]): r["epochs"] for r in record["rows"] if r["method"] != "dense"}
    assert epochs.pop(("magnitude", "one-shot")) == epochs.pop(("random", "one-shot")) == 0
    assert epochs.pop(("random-ensemble", "one-shot")) == 0
    assert set(epochs.values()) == {4}, epochs  # fine-tuned, iterative (2 + 2), gradual, at init
    rounds = next(r for r in record["rows"] if r["schedule"] == "iterative")["extra"]["rounds"]
    assert len(rounds) == 2
    assert "epochs" in record["table"].splitlines()[0]


def test_ensemble_rows_count_all_members_at_equal_total_parameters():
    record = run_compare(config=TINY.with_(models=("mlp",), sparsities=(0.5,)), methods=["random-ensemble/one-shot"],
                         seed=0, plots=False, progress=False, strict=True, log=lambda _: None)
    row = next(r for r in record["rows"] if r["method"] == "random-ensemble")
    assert row["sparsity"] == pytest.approx(0.5, abs=2e-3)  # 3 members at 83.3% each
    assert row["extra"]["member_sparsity"] == pytest.approx(1 - 0.5 / 3)


@pytest.mark.parametrize("bad", [0, -2])
def test_a_budget_below_one_epoch_is_refused(bad, capsys):
    with pytest.raises(ValueError, match="budget"):
        TINY.with_budget(bad)
    with pytest.raises(ValueError, match="budget"):
        Budget(4, 3e-3, bad, 1e-3)
    with pytest.raises(SystemExit):
        cli.main(["compare", "--budget", str(bad)])
    assert "argument --budget" in capsys.readouterr().err
