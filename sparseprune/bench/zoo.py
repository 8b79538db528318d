"""The model zoo: model code nobody here wrote (transformers' BERT, DistilBERT, ViT, ResNet,
ConvNeXt, MobileNetV2, EfficientNet, GPT-2), built from configs with seeded random weights (no
download), in a small size for tests and the real size for benchmarks.

    model, inputs = build("bert", "small", batch=2, seq=16)
    model(**inputs.kwargs)

Each entry also says which inputs have a dynamic sequence length (text models), so compile can
serve every length up to `max_seq` from one executable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

TEXT = ("bert", "distilbert", "gpt2")
IMAGE = ("vit", "resnet", "convnext", "mobilenetv2", "efficientnet")
NAMES = TEXT + IMAGE
SIZES = ("small", "full")
VOCAB_SMALL = 100


@dataclass
class ZooInputs:
    kwargs: Dict[str, torch.Tensor]
    seq_inputs: Tuple[str, ...] = ()  # inputs whose axis 1 is the sequence
    max_seq: Optional[int] = None

    def dynamic_shapes(self, max_seq: Optional[int] = None) -> Optional[Dict[str, Dict[int, Any]]]:
        """torch.export dynamic shapes for the sequence axis of the text inputs (None for images)."""
        if not self.seq_inputs:
            return None
        seq = torch.export.Dim("seq", min=2, max=max_seq or self.max_seq)
        return {name: {1: seq} for name in self.seq_inputs}


def _configs(size: str) -> Dict[str, Callable[[], nn.Module]]:
    import transformers as T  # imported on use: only the zoo needs transformers

    small = size == "small"
    text = dict(vocab_size=VOCAB_SMALL if small else 30522)
    return {
        "bert": lambda: T.BertModel(T.BertConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=128, **text) if small else T.BertConfig(**text), add_pooling_layer=True),
        "distilbert": lambda: T.DistilBertModel(T.DistilBertConfig(
            dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=128, **text)
            if small else T.DistilBertConfig(**text)),
        "gpt2": lambda: T.GPT2Model(T.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=VOCAB_SMALL, bos_token_id=0, eos_token_id=0)
            if small else T.GPT2Config()),
        "vit": lambda: T.ViTModel(T.ViTConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
            patch_size=8) if small else T.ViTConfig()),
        "resnet": lambda: T.ResNetModel(T.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1]) if small else T.ResNetConfig()),
        "convnext": lambda: T.ConvNextModel(T.ConvNextConfig(
            hidden_sizes=[16, 32], depths=[1, 1], num_stages=2) if small else T.ConvNextConfig()),
        "mobilenetv2": lambda: T.MobileNetV2Model(T.MobileNetV2Config(
            image_size=32, depth_multiplier=0.35) if small else T.MobileNetV2Config()),
        "efficientnet": lambda: T.EfficientNetModel(T.EfficientNetConfig(
            image_size=32, width_coefficient=0.25, depth_coefficient=0.2, hidden_dim=320)
            if small else T.EfficientNetConfig()),
    }


def build(name: str, size: str = "small", *, batch: int = 1, seq: int = 16, seed: int = 0
          ) -> Tuple[nn.Module, ZooInputs]:
    """The eval-mode model `name` with seeded random weights, and example inputs."""
    if name not in NAMES:
        raise ValueError(f"name must be one of {NAMES}, got {name!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    torch.manual_seed(seed)
    model = _configs(size)[name]().eval()
    if name == "gpt2":
        model.config.use_cache = False  # no key/value cache object in the outputs
    return model, example_inputs(name, model, size, batch=batch, seq=seq, seed=seed)


def example_inputs(name: str, model: nn.Module, size: str = "small", *, batch: int = 1, seq: int = 16,
                   seed: int = 0) -> ZooInputs:
    """Seeded inputs for a model `build(name, size)` returned, at another batch size or sequence
    length (building a full-size model again for each would take seconds and memory)."""
    if name not in NAMES:
        raise ValueError(f"name must be one of {NAMES}, got {name!r}")
    gen = torch.Generator().manual_seed(seed + 1)
    if name in TEXT:
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        mask = torch.ones(batch, seq, dtype=torch.int64)
        if batch > 1:
            mask[-1, seq // 2:] = 0  # one padded sequence
        max_seq = model.config.max_position_embeddings if name != "gpt2" else model.config.n_positions
        return ZooInputs({"input_ids": ids, "attention_mask": mask}, ("input_ids", "attention_mask"),
                         min(max_seq, 512))
    image = model.config.image_size if hasattr(model.config, "image_size") else (32 if size == "small" else 224)
    if size == "full":
        image = 224
    return ZooInputs({"pixel_values": torch.randn(batch, 3, image, image, generator=gen)})


def prune_all(model: nn.Module, amount: float = 0.9, calibrate: Optional[ZooInputs] = None) -> int:
    """Prune every Linear, Conv2d and transformers Conv1D weight by magnitude (torch.nn.utils.prune,
    per layer); returns how many layers were pruned. With `calibrate` (example inputs), the
    BatchNorm statistics are then recomputed on them (see calibrate_batchnorm)."""
    from torch.nn.utils import prune

    count = 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) or type(module).__name__ == "Conv1D":
            prune.l1_unstructured(module, "weight", amount)
            count += 1
    if calibrate is not None:
        calibrate_batchnorm(model, calibrate)
    return count


def calibrate_batchnorm(model: nn.Module, inputs: ZooInputs) -> None:
    """Scale 1, shift 0 and running statistics from one forward pass on `inputs` for every
    BatchNorm. A randomly initialised network keeps BatchNorm's default statistics (mean 0,
    variance 1) and, in some transformers models, scales drawn N(0, 0.02), so after 90% pruning its
    activations shrink layer by layer until a deep CNN outputs ~0 (MobileNetV2 ~1e-32, EfficientNet
    exactly 0): comparisons against torch would then check nothing, and denormal floats would
    distort timings. Calibrated, the activations keep a trained network's scale."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        if m.affine:
            with torch.no_grad():
                m.weight.fill_(1.0)
                m.bias.zero_()
        m.momentum = None  # cumulative average: one batch sets the statistics to its own
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            model(**inputs.kwargs)
    finally:
        model.train(was_training)
        for m, momentum in saved:
            m.momentum = momentum
