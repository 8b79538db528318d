"""The two networks `sparseprune compare` prunes, and how each one sees the data.

A `ModelSpec` pairs a builder with the input layout it wants: the MLP reads flat feature
vectors, the CNN single-channel images (the digits' 64 features are an 8x8 picture). Both are
plain `nn.Sequential`s so that `convert` can fuse their ReLUs and fold the CNN's BatchNorms, and
`shrink` can trace them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch
from torch import nn

from sparseprune.data import DataSplit
from sparseprune.prune.reparam import effective_weight, parameter_state

MLP_HIDDEN = 512  # the demo's width: the 512x512 layer is big enough for a sparse kernel to pay
CNN_CHANNELS = (32, 64, 64)

# Layers whose weights count towards a model's sparsity and parameter figures.
WEIGHT_LAYERS = (nn.Linear, nn.Conv2d)


def build_mlp(in_features: int, n_classes: int, hidden: int = MLP_HIDDEN) -> nn.Sequential:
    """in -> hidden -> ReLU -> hidden -> ReLU -> n_classes."""
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, n_classes),
    )


def build_cnn(image_shape: Tuple[int, int, int], n_classes: int, channels: Tuple[int, int, int] = CNN_CHANNELS):
    """Conv3x3-BN-ReLU, Conv3x3-BN-ReLU, MaxPool 2, Conv3x3-ReLU, flatten, Linear (3x3 convs padded).

    For 1x8x8 digits: 8x8 -> 8x8 -> 4x4 -> 4x4, so the classifier reads 64 * 4 * 4 features.
    The last conv keeps its input's shape, so layer removal has a layer it can take out.
    """
    c_in, h, w = image_shape
    c1, c2, c3 = channels
    if min(h, w) < 2:
        raise ValueError(f"the CNN needs images of at least 2x2, got {h}x{w}")
    features = nn.Sequential(
        nn.Conv2d(c_in, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(),
        nn.Flatten(),
    )
    with torch.no_grad():
        n_flat = features(torch.zeros(1, c_in, h, w)).shape[1]
    return nn.Sequential(*features, nn.Linear(n_flat, n_classes))


def as_image(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) as is; (N, H, W) -> (N, 1, H, W); (N, F) with F a square -> (N, 1, s, s)."""
    if x.dim() == 4:
        return x
    if x.dim() == 3:
        return x.unsqueeze(1)
    if x.dim() == 2:
        side = math.isqrt(x.shape[1])
        if side * side == x.shape[1]:
            return x.reshape(x.shape[0], 1, side, side)
    raise ValueError(
        f"the CNN needs image inputs: x of shape (N, C, H, W), (N, H, W) or (N, F) with F a square "
        f"number, got {tuple(x.shape)}"
    )


def as_flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    prepare: Callable[[torch.Tensor], torch.Tensor]  # raw features -> this model's input layout
    build: Callable[[torch.Tensor, int], nn.Module]  # (prepared example batch, n_classes) -> model

    def split(self, data: DataSplit) -> DataSplit:
        """`data` with its features in this model's layout (contiguous)."""
        return DataSplit(self.prepare(data.x_train).contiguous(), data.y_train,
                         self.prepare(data.x_test).contiguous(), data.y_test)


MODELS = {
    "mlp": ModelSpec(
        "mlp", f"MLP in-{MLP_HIDDEN}-{MLP_HIDDEN}-classes", as_flat,
        lambda x, n: build_mlp(x.shape[1], n),
    ),
    "cnn": ModelSpec(
        "cnn", "CNN conv32-bn-conv64-bn-pool-conv64-linear", as_image,
        lambda x, n: build_cnn(tuple(x.shape[1:]), n),
    ),
}


def weight_layers(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, WEIGHT_LAYERS)]


def count_weights(model: nn.Module) -> Tuple[int, int]:
    """(nonzero, total) entries of the effective weights of every Linear and Conv2d."""
    nonzero = total = 0
    with torch.no_grad():
        for layer in weight_layers(model):
            # weight_orig * weight_mask while pruned: `.weight` is stale after an optimizer step
            w = effective_weight(*parameter_state(layer, "weight"))
            nonzero += int(torch.count_nonzero(w))
            total += w.numel()
    return nonzero, total
