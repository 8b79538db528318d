"""The demo end to end (quick mode), the digits split, and the trainer's contract with pruning masks."""
import argparse
import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from sparseprune import demo
from sparseprune.data import load_digits_split, split_arrays
from sparseprune.train import evaluate_accuracy, train

# Quick mode trains for a few epochs only; pruned to 90% and fine-tuned it lands ~2 points under
# dense on digits (seed 0), so 5 points leaves room for other seeds and BLAS builds.
MAX_FINETUNE_DROP = 0.05


def _args(*argv):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    status = demo.run(_args("--quick", "--no-progress", "--seed", "0", "--out", str(out)))
    return status, out


def _rows(out):
    record = json.loads((out / "demo.json").read_text())
    return record, {(row["method"], row["schedule"]): row for row in record["rows"]}


def test_demo_returns_zero_and_writes_files(demo_run):
    status, out = demo_run
    assert status == 0
    for name in ("demo.json", "demo.csv", "demo_accuracy_vs_sparsity.png", "demo_speedup_vs_sparsity.png",
                 "demo_accuracy_vs_speedup.png"):
        assert (out / name).is_file(), name


def test_demo_json_has_every_method_with_valid_accuracies(demo_run):
    _, out = demo_run
    record, rows = _rows(out)
    assert set(rows) == {("dense", "-"), *demo.METHODS}
    for row in rows.values():
        assert row["status"] == "ok"
        assert row["model"] == "mlp"
        for key in ("acc_dense", "acc_pruned", "acc_converted"):
            assert 0.0 <= row[key] <= 1.0
        assert set(row["timing"]) == {"1", "256"}
        assert all(t["speedup"] > 0 for t in row["timing"].values())
        if row["method"] not in ("dense", "units"):
            assert row["sparsity"] == pytest.approx(0.9, abs=1e-3)
    # units: 90% of the hidden neurons go, and their columns in the next layer with them
    assert rows[("units", "iterative")]["sparsity"] > 0.9
    assert rows[("units", "iterative")]["deploy"] == "shrink+convert"
    assert record["config"]["sparsities"] == [0.9]
    assert record["config"]["threads"] == torch.get_num_threads()


def test_demo_accuracies(demo_run):
    _, out = demo_run
    _, rows = _rows(out)
    dense = rows[("dense", "-")]["acc_pruned"]
    assert dense > 0.9
    assert rows[demo.MAIN_METHOD]["acc_pruned"] >= dense - MAX_FINETUNE_DROP
    # the criterion matters: magnitude beats random, with or without fine-tuning
    assert rows[("magnitude", "iterative")]["acc_pruned"] > rows[("random", "iterative")]["acc_pruned"]
    assert rows[("magnitude", "one-shot")]["acc_pruned"] > rows[("random", "one-shot")]["acc_pruned"]
    # and fine-tuning matters
    assert rows[("magnitude", "iterative")]["acc_pruned"] > rows[("magnitude", "one-shot")]["acc_pruned"]


def test_demo_converted_outputs_match_masked_model(demo_run):
    _, out = demo_run
    _, rows = _rows(out)
    for row in rows.values():
        assert row["outputs_match"] is True
        assert row["max_abs_diff"] < 1e-4
        # argmax can only flip on an exact tie, so converted accuracy equals the masked one
        assert row["acc_converted"] == pytest.approx(row["acc_pruned"], abs=1 / 450 + 1e-9)
        assert row["extra"]["conversion"]["layers"]


def test_demo_csv_matches_json(demo_run):
    _, out = demo_run
    with open(out / "demo.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    record = json.loads((out / "demo.json").read_text())
    assert [(r["method"], r["schedule"]) for r in rows] == [(r["method"], r["schedule"]) for r in record["rows"]]
    for r, j in zip(rows, record["rows"]):
        assert float(r["acc_pruned"]) == pytest.approx(j["acc_pruned"])


def test_demo_arguments_defaults_and_errors():
    args = _args()
    assert (args.seed, args.sparsity, args.out, args.quick, args.progress) == (0, 0.9, None, False, True)
    for bad in (["--sparsity", "1.5"], ["--sparsity", "nan"], ["--seed", "-1"]):
        with pytest.raises(SystemExit):
            _args(*bad)
    with pytest.raises(ValueError, match="sparsity"):
        demo.run_demo(sparsity=1.0)


# ------------------------------------------------------------------------------------ data
def test_digits_split_shapes_scale_and_dtypes():
    x_tr, y_tr, x_te, y_te = load_digits_split(seed=0)
    assert x_tr.dtype == x_te.dtype == torch.float32
    assert y_tr.dtype == y_te.dtype == torch.int64
    assert x_tr.shape[1] == x_te.shape[1] == 64
    assert x_tr.shape[0] + x_te.shape[0] == 1797
    assert x_te.shape[0] == round(0.25 * 1797)
    assert float(x_tr.min()) >= 0.0 and float(x_tr.max()) == 1.0
    # stratified: every class keeps its share in the test half
    counts_te = np.bincount(y_te.numpy(), minlength=10)
    counts_all = counts_te + np.bincount(y_tr.numpy(), minlength=10)
    assert np.all(np.abs(counts_te - 0.25 * counts_all) <= 1)


def test_digits_split_deterministic_for_a_seed_and_different_for_another():
    a, b, c = load_digits_split(seed=3), load_digits_split(seed=3), load_digits_split(seed=4)
    for ta, tb in zip(a, b):
        assert torch.equal(ta, tb)
    assert not torch.equal(a.x_test, c.x_test)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, float("nan"), "0.25", True])
def test_bad_test_fraction_raises_naming_it(bad):
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_split(seed=0, test_fraction=bad)
    with pytest.raises(ValueError, match="test_fraction"):
        split_arrays(np.zeros((8, 2)), np.arange(8) % 2, test_fraction=bad)


def test_split_arrays_validates_shapes_naming_the_argument(rng):
    x = rng.standard_normal((20, 3))
    y = np.arange(20) % 2
    with pytest.raises(ValueError, match="y"):
        split_arrays(x, y[:-1])
    with pytest.raises(ValueError, match="x"):
        split_arrays(x[:, 0], y)
    with pytest.raises(ValueError, match="y"):
        split_arrays(x, y.reshape(10, 2))
    with pytest.raises(ValueError, match="y"):
        split_arrays(x, y - 1)
    with pytest.raises(ValueError, match="seed"):
        split_arrays(x, y, seed=-1)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="x"):
        split_arrays(bad, y)


def test_split_arrays_partitions_user_data(rng):
    x = torch.from_numpy(rng.standard_normal((40, 5)))
    y = torch.arange(40) % 4
    x_tr, y_tr, x_te, y_te = split_arrays(x, y, seed=1, test_fraction=0.25)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert (x_tr.shape[0], x_te.shape[0]) == (30, 10)
    assert sorted(np.bincount(y_te.numpy()).tolist()) == [2, 2, 3, 3]
    rows = sorted(map(tuple, torch.cat([x_tr, x_te]).tolist()))
    assert rows == sorted(map(tuple, x.float().tolist()))


# ----------------------------------------------------------------------------------- train
def _blobs(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centres = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]])
    return centres[y] + 0.3 * torch.randn(n, 2, generator=g), y


def test_train_is_deterministic_and_learns():
    x, y = _blobs()
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))
        losses = train(model, x, y, epochs=5, lr=1e-2, batch_size=32, seed=7, progress=False, num_threads=1)
        results.append((losses, evaluate_accuracy(model, x, y)))
    assert results[0] == results[1]
    losses, acc = results[0]
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert acc > 0.95


@pytest.mark.parametrize("optimizer,schedule", [("adam", "cosine"), ("sgd", None)])
def test_train_keeps_pruning_masks_in_force(optimizer, schedule):
    x, y = _blobs()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))
    torch_prune.l1_unstructured(model[0], "weight", amount=0.5)
    mask = model[0].weight_mask.clone()
    orig_before = model[0].weight_orig.detach().clone()
    train(model, x, y, epochs=3, lr=1e-2, batch_size=32, optimizer=optimizer, lr_schedule=schedule,
          progress=False)
    model(x[:1])  # refresh the effective weight through the pre-hook
    assert torch.all(model[0].weight[mask == 0] == 0)
    assert torch.equal(model[0].weight, model[0].weight_orig * mask)
    assert not torch.equal(model[0].weight_orig[mask == 1], orig_before[mask == 1])


def test_evaluate_accuracy_restores_mode_and_train_checks_arguments():
    x, y = _blobs(30)
    model = nn.Sequential(nn.Linear(2, 3))
    model.train()
    assert 0.0 <= evaluate_accuracy(model, x, y) <= 1.0
    assert model.training
    with pytest.raises(ValueError, match="optimizer"):
        train(model, x, y, epochs=1, lr=0.1, optimizer="rmsprop", progress=False)
    with pytest.raises(ValueError, match="lr_schedule"):
        train(model, x, y, epochs=1, lr=0.1, lr_schedule="step", progress=False)
    with pytest.raises(ValueError, match="lr"):
        train(model, x, y, epochs=1, lr=-1.0, progress=False)
    with pytest.raises(ValueError, match="y"):
        train(model, x, y[:-1], epochs=1, lr=0.1, progress=False)


def test_run_demo_accepts_user_data():
    x, y = _blobs(120, seed=1)
    data = split_arrays(x, y, seed=0, test_fraction=0.25)
    result = demo.run_demo(seed=0, sparsity=0.5, quick=True, progress=False, data=data, log=lambda _: None)
    assert result["config"]["data"] == "user data"
    rows = result["rows"]
    assert {(row["method"], row["schedule"]) for row in rows} == {("dense", "-"), *demo.METHODS}
    assert all(row["status"] == "ok" and row["max_abs_diff"] < 1e-4 for row in rows)
    assert rows[0]["acc_dense"] > 0.9  # three well separated blobs


def test_demo_compiles_every_deployed_model_to_an_executable(demo_run):
    _, out = demo_run
    _, rows = _rows(out)
    dense = rows[("dense", "-")]["extra"]["executable"]
    for key, row in rows.items():
        e = row["extra"]["executable"]
        assert e["b1_dense_ms"] > 0 and e["b1_exe_ms"] > 0
        assert e["speedup_b1"] == pytest.approx(e["b1_dense_ms"] / e["b1_exe_ms"], rel=1e-6)
        assert e["max_abs_diff"] < 1e-3  # checked against the deployed model on the whole test set
        assert e["accuracy"] == pytest.approx(row["acc_converted"], abs=0.002)  # the same predictions
        if key[0] != "dense":
            # 90% of the weights gone: the file is a fraction of the dense one when every layer
            # runs a sparse kernel; a layer the measurement kept dense (slower sparse, e.g. 64
            # inputs per row) is stored dense.
            assert e["kernels"] and e["file_bytes"] <= dense["file_bytes"] + 4096, key
            if not {"dense", "dense-conv"} & set(e["kernels"]):
                assert e["file_bytes"] < 0.3 * dense["file_bytes"], key
    table = demo.executable_table([SimpleNamespace(**r) for r in rows.values()])
    assert table.splitlines()[0].startswith("compiled to a native executable")
    assert len(table.splitlines()) == 2 + len(rows)


def test_demo_robust_part_has_one_network_per_family(demo_run):
    _, out = demo_run
    record = json.loads((out / "demo_robust.json").read_text())
    rows = {r["network"]: r for r in record["rows"]}
    assert set(rows) == {"standard", "bp", "at", "anp-vs"}
    for r in rows.values():
        assert r["status"] == "ok" and r["model"] == "mlp"
        assert 0.0 <= r["pgd_acc"] <= r["clean_acc"] + 0.05
    assert rows["anp-vs"]["deploy"] == "shrink+convert" and rows["standard"]["deploy"] == "convert"
