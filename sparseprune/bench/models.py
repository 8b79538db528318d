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
register_model(
    "mlp-small", lambda: _mlp(64, 256, 256, 10), (64,),
    "small MLP for quick tests: 64->256->256->10 with ReLUs",
)
