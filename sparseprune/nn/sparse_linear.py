"""SparseLinear: an inference-only nn.Linear replacement running the native CSR/block kernels."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch
from torch import nn

from sparseprune import formats
from sparseprune.config import resolve_threads


def _dense_weight(linear: nn.Linear) -> np.ndarray:
    # `weight` is the effective (masked) tensor both for sparseprune masks and for
    # torch.nn.utils.prune, with or without prune.remove.
    return linear.weight.detach().to(torch.float32).cpu().contiguous().numpy()


class SparseLinear(nn.Module):
    """y = x @ W.T + b (then ReLU when fused) with W packed once as CSR or block-sparse.

    Takes any leading batch shape (..., in_features) in float32; inputs whose leading dimensions
    collapse into one stride (contiguous, transposed, sliced) reach the kernel without a copy.
    The GIL is released while the kernel runs. There is no backward: it refuses inputs that
    require grad.
    """

    def __init__(self, packed, relu: bool = False, num_threads: Optional[int] = None):
        super().__init__()
        self.packed = packed
        self.out_features, self.in_features = packed.shape
        self.relu = bool(relu)
        self.num_threads = num_threads

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        fmt: str = "csr",
        block: Tuple[int, int] = (1, 1),
        relu: bool = False,
        num_threads: Optional[int] = None,
    ) -> "SparseLinear":
        """Pack `linear`'s (masked) weight and bias; zeros in the weight are skipped."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        bias = None if linear.bias is None else linear.bias.detach().to(torch.float32).cpu().numpy()
        return cls(formats.pack(_dense_weight(linear), bias, fmt, block), relu=relu, num_threads=num_threads)

    @property
    def kernel(self) -> str:
        r, c = self.packed.block_shape
        return "csr" if self.packed.format == "csr" else f"bsr{r}x{c}"

    @property
    def nnz(self) -> int:
        return int(np.count_nonzero(self.packed.values))

    @property
    def sparsity(self) -> float:
        total = self.out_features * self.in_features
        return 1.0 - self.nnz / total if total else 0.0

    def to_dense(self) -> nn.Linear:
        """An equivalent nn.Linear (the ReLU, if fused, is not included)."""
        bias = self.packed.bias
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(formats.unpack(self.packed)))
            if bias is not None:
                linear.bias.copy_(torch.from_numpy(bias))
        return linear

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if input.dtype != torch.float32:
            raise TypeError(f"input must be float32, got {input.dtype} (convert with .float())")
        if input.device.type != "cpu":
            raise ValueError(f"input must be on the CPU, got device {input.device}")
        if input.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                "SparseLinear is inference-only (no backward): call it under torch.no_grad() or "
                "torch.inference_mode(), or train the masked nn.Linear before convert()"
            )
        if input.dim() == 0 or input.shape[-1] != self.in_features:
            raise ValueError(
                f"input must have shape (..., {self.in_features}), got {tuple(input.shape)}"
            )
        lead = input.shape[:-1]
        # A view whenever the strides allow; the explicit row count also covers in_features == 0.
        x2d = input.reshape(math.prod(lead), self.in_features)
        y = self.packed.forward(x2d.detach().numpy(), self.relu, resolve_threads(self.num_threads))
        return torch.from_numpy(y).view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"kernel={self.kernel}, sparsity={self.sparsity:.3f}, relu={self.relu}"
        )
