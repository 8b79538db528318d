"""Named built-in models for the CLI and the benchmarks, built reproducibly from a seed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    factory: Callable[[], nn.Module]
    input_shape: Tuple[int, ...]  # one sample, without the batch dimension
    description: str


_MODELS: Dict[str, ModelSpec] = {}


def register_model(
    name: str, factory: Callable[[], nn.Module], input_shape: Tuple[int, ...], description: str = ""
) -> None:
    """Add a model to the registry (its weights come from torch's RNG, seeded by build_model)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {type(factory).__name__}")
    shape = tuple(input_shape)
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
        raise ValueError(f"input_shape must be positive ints, got {input_shape!r}")
    _MODELS[name] = ModelSpec(factory, shape, description)


def available_models() -> List[str]:
    return sorted(_MODELS)


def describe_model(name: str) -> str:
    return _spec(name).description


def _spec(name: str) -> ModelSpec:
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; available: {', '.join(available_models())}"
        ) from None


def build_model(name: str, seed: int = 0) -> Tuple[nn.Module, Tuple[int, ...]]:
    """(model in eval mode, input shape of one sample). Same name and seed, same weights.

    The global torch RNG is left as it was.
    """
    spec = _spec(name)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.factory()
    return model.eval(), spec.input_shape


def _mlp(*widths: int) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _bert_ffn() -> nn.Sequential:
    # BERT-base's feed-forward block (768 -> 3072 -> 768) followed by a 768x768 projection, so the
    # three BERT layer shapes that matter for the CPU (up, down, square) are all present.
    return nn.Sequential(
        nn.Linear(768, 3072), nn.ReLU(),
        nn.Linear(3072, 768), nn.ReLU(),
        nn.Linear(768, 768),
    )


register_model(
    "bert-ffn", _bert_ffn, (768,),
    "BERT-base FFN shapes: Linear 768->3072, ReLU, 3072->768, ReLU, 768->768",
)
def _bert_layer() -> nn.Module:
    # One BERT-base encoder layer (torch's own module): 12-head self-attention over d=768, GELU FFN
    # 768 -> 3072 -> 768, post-norm; input one sequence of 128 tokens.
    return nn.TransformerEncoderLayer(768, 12, 3072, dropout=0.1, activation="gelu", batch_first=True)


register_model(
    "bert-layer", _bert_layer, (128, 768),
    "BERT-base encoder layer: nn.TransformerEncoderLayer(768, 12 heads, FFN 3072, GELU), sequence 128",
)
register_model(
    "mlp-small", lambda: _mlp(64, 256, 256, 10), (64,),
    "small MLP for quick tests: 64->256->256->10 with ReLUs",
)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN pairs and an identity (or 1x1 conv) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + shortcut)


def resnet18(width: int = 64, num_classes: int = 1000) -> nn.Sequential:
    """ResNet-18's layer shapes (torchvision's layout) built from torch.nn, random weights."""
    widths = [width, 2 * width, 4 * width, 8 * width]
    layers: List[nn.Module] = [
        nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
    ]
    cin = width
    for i, w in enumerate(widths):
        stride = 1 if i == 0 else 2
        layers += [BasicBlock(cin, w, stride), BasicBlock(w, w, 1)]
        cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


class TinyTransformer(nn.Module):
    """Token ids [batch, seq] in [0, 30) -> embedding -> encoder layer -> hand-written causal
    attention -> cat -> head: every op family of the executor besides convolutions, in a few KB
    (the executable tests and the fuzzer's transformer seed)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, activation="gelu")
        self.qkv = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
        self.head = nn.Linear(32, 5)

    def forward(self, ids):
        x = self.encoder(self.emb(ids))
        b, n, e = x.shape
        q, k, v = (f(x).view(b, n, 2, 8).transpose(1, 2) for f in self.qkv)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, e)
        return self.head(torch.cat([x, a * 0.5], dim=-1)).softmax(dim=-1)


def _with_random_bn_stats(model: nn.Module) -> nn.Module:
    # Fresh BatchNorms are identities; give them running statistics like a trained network's so
    # folding them is exercised for real.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
    return model


register_model(
    "resnet18", lambda: _with_random_bn_stats(resnet18()), (3, 224, 224),
    "ResNet-18 layer shapes (torchvision layout) from torch.nn, random weights, 224x224 input",
)
register_model(
    "resnet18-small", lambda: _with_random_bn_stats(resnet18(width=16, num_classes=10)), (3, 32, 32),
    "ResNet-18 structure at a quarter of the width on 32x32 inputs, for quick runs",
)
