"""The model zoo (transformers' BERT, DistilBERT, GPT-2, ViT, ResNet, ConvNeXt, MobileNetV2,
EfficientNet: code nobody here wrote, small configs with seeded random weights), each pruned 90%
with torch.nn.utils.prune, through compile (and convert with the same inputs): outputs equal to the pruned torch model at several
batch sizes (and sequence lengths, from one executable), the output structure by name, a saved
file run torch-free."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import sparseprune as sp
from sparseprune.bench import zoo

pytest.importorskip("transformers")

_RTOL, _ATOL = 1e-4, 1e-4


def _close(got, ref, what):
    ref = ref.detach().numpy()
    scale = max(1.0, float(np.abs(ref).max())) if ref.size else 1.0
    np.testing.assert_allclose(got, ref, rtol=_RTOL, atol=_ATOL * scale, err_msg=what)


def _reference(model, kwargs):
    with torch.no_grad():
        out = model(**kwargs)
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


@pytest.fixture(scope="module", params=zoo.NAMES)
def compiled(request):
    name = request.param
    model, inputs = zoo.build(name, "small", batch=2, seq=16)
    assert zoo.prune_all(model, 0.9, calibrate=inputs) > 0
    exe = sp.compile(model, kwargs=inputs.kwargs, dynamic_shapes=inputs.dynamic_shapes(64), policy="threshold",
                     num_threads=2)
    return name, model, inputs, exe


def _inputs(name, model, batch, seq, seed):
    gen = torch.Generator().manual_seed(seed)
    if name in zoo.TEXT:
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)
        mask = torch.ones(batch, seq, dtype=torch.int64)
        if batch > 1:
            mask[0, seq // 2 + 1:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    size = model.config.image_size if hasattr(model.config, "image_size") else 32
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=gen)}


def test_outputs_match_the_pruned_model(compiled):
    name, model, _inputs_unused, exe = compiled
    lengths = (5, 16, 33) if name in zoo.TEXT else (None,)
    for batch in (1, 3):
        for seq in lengths:
            kwargs = _inputs(name, model, batch, seq or 0, seed=batch * 100 + (seq or 0))
            got = exe.run(**{k: v.numpy() for k, v in kwargs.items()})
            ref = _reference(model, kwargs)
            assert isinstance(got, dict) and set(got) == set(ref), (name, set(got), set(ref))
            for key in ref:
                # a degenerate output (a pruned random network collapsing to ~0) would check nothing
                assert float(ref[key].std()) > 1e-3, f"{name} {key}: torch's output is ~constant"
                _close(got[key], ref[key], f"{name} {key} batch {batch} seq {seq}")


def test_layers_are_sparse_and_named(compiled):
    name, model, _, exe = compiled
    layers = [row for row in exe.metadata["layers"] if row["op"] in ("linear", "conv2d")]
    assert layers and all(row["sparsity"] >= 0.85 for row in layers), name
    # threshold policy: every 90%-sparse linear is CSR, every conv a sparse or depthwise kernel
    assert all(row["kernel"] in ("csr", "sparse-conv", "depthwise-conv") for row in layers), name
    if name in zoo.TEXT:
        assert exe.dims == {"seq": (2, 64)}
    assert exe.metadata["frontend"] == "torch.export"


def test_sequence_longer_than_the_maximum_is_refused(compiled):
    name, model, _, exe = compiled
    if name not in zoo.TEXT:
        pytest.skip("image model")
    kwargs = _inputs(name, model, 1, 65, seed=0)
    with pytest.raises(ValueError, match=r"input_ids.*65.*seq.*2\.\.64"):
        exe.run(**{k: v.numpy() for k, v in kwargs.items()})
    bad = _inputs(name, model, 1, 8, seed=0)
    bad["input_ids"][0, 0] = model.config.vocab_size
    with pytest.raises(ValueError, match="input_ids"):
        exe.run(**{k: v.numpy() for k, v in bad.items()})


_TORCH_FREE = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # any import of torch now fails
    import numpy as np
    import sparseprune.runtime as rt
    exe = rt.load(sys.argv[1])
    data = np.load(sys.argv[2])
    ref = np.load(sys.argv[3])
    got = exe.run(**{k: data[k] for k in data.files})
    for key in ref.files:
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-6, atol=1e-6)
    print("ok")
    """
)


@pytest.mark.parametrize("name", ["bert", "resnet"])
def test_saved_file_runs_without_torch(name, tmp_path):
    model, inputs = zoo.build(name, "small", batch=2, seq=12)
    zoo.prune_all(model, 0.9, calibrate=inputs)
    exe = sp.compile(model, kwargs=inputs.kwargs, dynamic_shapes=inputs.dynamic_shapes(32), policy="threshold")
    path = tmp_path / f"{name}.safetensors"
    exe.save(path)
    kwargs = _inputs(name, model, 2, 9, seed=3) if name in zoo.TEXT else inputs.kwargs
    arrays = {k: v.numpy() for k, v in kwargs.items()}
    np.savez(tmp_path / "x.npz", **arrays)
    np.savez(tmp_path / "y.npz", **exe.run(**arrays))
    proc = subprocess.run([sys.executable, "-c", _TORCH_FREE, str(path), str(tmp_path / "x.npz"),
                           str(tmp_path / "y.npz")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.parametrize("name", zoo.NAMES)
def test_convert_runs_the_zoo_model_natively(name):
    """convert with the same example inputs compiles the whole model and keeps its face: the
    transformers class, its config, its ModelOutput; outputs equal at several shapes."""
    from sparseprune.convert import is_native

    model, inputs = zoo.build(name, "small", batch=2, seq=16)
    zoo.prune_all(model, 0.9, calibrate=inputs)
    model.eval()
    converted = sp.convert(model, kwargs=inputs.kwargs, dynamic_shapes=inputs.dynamic_shapes(64),
                           policy="threshold", num_threads=2)
    assert is_native(converted) and isinstance(converted, type(model))
    assert converted.config.to_dict() == model.config.to_dict()
    assert [m.native for m in converted.sparseprune_report.modules] == [True]
    lengths = (5, 33) if name in zoo.TEXT else (None,)
    for batch in (1, 3):
        for seq in lengths:
            kwargs = _inputs(name, model, batch, seq or 0, seed=batch * 10 + (seq or 0))
            with torch.no_grad():
                got, want = converted(**kwargs), model(**kwargs)
            ref = _reference(model, kwargs)
            assert type(got) is type(want)  # the same ModelOutput class
            for key in ref:
                _close(got[key].numpy(), ref[key], f"convert {name} {key} batch {batch} seq {seq}")
