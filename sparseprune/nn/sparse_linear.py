"""SparseLinear: an inference-only nn.Linear replacement running the native CSR/block kernels."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch
from torch import nn

from sparseprune import formats
from sparseprune._native import aligned, openmp_enabled
from sparseprune.config import resolve_threads


def conv1d_as_linear(conv1d: nn.Module) -> nn.Linear:
    """An nn.Linear computing what a transformers `Conv1D` does; shares its tensors (W.T is a
    view), so it costs no copy and times like the Conv1D. ValueError when the attributes do not
    have Conv1D's shapes."""
    weight, bias = getattr(conv1d, "weight", None), getattr(conv1d, "bias", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"Conv1D weight must be a 2-D tensor [nx, nf], got {getattr(weight, 'shape', weight)!r}")
    nx, nf = weight.shape
    if getattr(conv1d, "nf", nf) != nf:
        raise ValueError(f"Conv1D weight {tuple(weight.shape)} does not match nf={conv1d.nf}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (nf,)):
        raise ValueError(f"Conv1D bias must be None or a tensor [{nf}], got {getattr(bias, 'shape', bias)!r}")
    linear = nn.Linear(nx, nf, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().t(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return linear


def _dense_weight(linear: nn.Linear) -> np.ndarray:
    # `weight` is the effective (masked) tensor both for sparseprune masks and for
    # torch.nn.utils.prune, with or without prune.remove.
    return linear.weight.detach().to(torch.float32).cpu().contiguous().numpy()


def cached_packed_bias(module: nn.Module) -> Optional[torch.Tensor]:
    """A swapped-in layer's `bias` as model code reads it: a float32 tensor copied once from the
    packed native weights (module.packed.bias) and kept in module._bias_cache, or None."""
    if module._bias_cache is None and module.packed.bias is not None:
        module._bias_cache = torch.from_numpy(np.array(module.packed.bias, dtype=np.float32))
    return module._bias_cache


class SparseLinear(nn.Module):
    """y = x @ W.T + b (then ReLU when fused) with W packed once as CSR or block-sparse.

    Takes any leading batch shape (..., in_features) in float32; inputs whose leading dimensions
    collapse into one stride (contiguous, transposed, sliced) reach the kernel without a copy.
    The GIL is released while the kernel runs. There is no backward: it refuses inputs that
    require grad.

    Model code written for the layer it replaces keeps working: `in_features`, `out_features`,
    `bias` and `weight` are there (see `weight`). One converted from transformers' `Conv1D`
    (`from_conv1d`) also has `nf`/`nx` and shows `weight` in Conv1D's [in, out] layout.
    """

    def __init__(self, packed, relu: bool = False, num_threads: Optional[int] = None):
        super().__init__()
        self.packed = packed
        self.out_features, self.in_features = packed.shape
        self.relu = bool(relu)
        # True when it replaces a Conv1D (y = x @ W + b, W stored [in, out]): `weight` keeps that layout.
        self.weight_transposed = False
        self._weight_cache: Optional[torch.Tensor] = None
        self._bias_cache: Optional[torch.Tensor] = None
        # Checked once here (and the no-OpenMP warning given), not on every call.
        self.num_threads = resolve_threads(num_threads) if num_threads is not None else None
        if num_threads is None and not openmp_enabled():
            resolve_threads(None)  # warns once if torch asks for more threads than the build has

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

    @classmethod
    def from_conv1d(
        cls,
        conv1d: nn.Module,
        fmt: str = "csr",
        block: Tuple[int, int] = (1, 1),
        relu: bool = False,
        num_threads: Optional[int] = None,
    ) -> "SparseLinear":
        """Pack a transformers `Conv1D` (y = x @ W + b, W [nx, nf]) as the Linear it is (W.T).

        Read by duck typing (`weight` [nx, nf], `bias` [nf] or None), so transformers need not be
        installed or imported."""
        return cls.from_dense(conv1d_as_linear(conv1d), fmt, block, relu, num_threads).as_conv1d()

    def as_conv1d(self) -> "SparseLinear":
        """Present this module as a Conv1D (nf/nx, `weight` [in, out]); returns self."""
        self.weight_transposed = True
        self.nf, self.nx = self.out_features, self.in_features
        self._weight_cache = None
        return self

    @property
    def weight(self) -> torch.Tensor:
        """The dense effective weight [out_features, in_features] ([in, out] for a Conv1D), for
        model code that reads it (e.g. `layer.weight.dtype`). Read-only in meaning: the kernel
        runs from `packed`, so writing to this tensor changes nothing.

        Built on first access and then kept (a plain attribute, not a parameter or buffer): a
        model whose code never reads it pays no dense copy, and one that reads it on every
        forward pays it once."""
        if self._weight_cache is None:
            dense = torch.from_numpy(formats.unpack(self.packed))
            self._weight_cache = dense.t() if self.weight_transposed else dense
        return self._weight_cache

    @property
    def bias(self) -> Optional[torch.Tensor]:
        """The bias [out_features] (a copy of the packed one, kept like `weight`), or None."""
        return cached_packed_bias(self)

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
        # This runs per call at batch 1 too, where the kernel takes ~10 us: the checks are cheap
        # ones, and 2-D inputs (the common case) skip the reshape and view.
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if input.dtype is not torch.float32:
            raise TypeError(f"input must be float32, got {input.dtype} (convert with .float())")
        if not input.is_cpu:
            raise ValueError(f"input must be on the CPU, got device {input.device}")
        requires_grad = input.requires_grad
        if requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                "SparseLinear is inference-only (no backward): call it under torch.no_grad() or "
                "torch.inference_mode(), or train the masked nn.Linear before convert()"
            )
        shape = input.shape
        flat = len(shape) == 2 and shape[1] == self.in_features
        if not flat and (len(shape) == 0 or shape[-1] != self.in_features):
            raise ValueError(
                f"input must have shape (..., {self.in_features}), got {tuple(shape)}"
            )
        # A view whenever the strides allow; the explicit row count also covers in_features == 0.
        x2d = input if flat else input.reshape(math.prod(shape[:-1]), self.in_features)
        x = x2d.detach().numpy() if requires_grad else x2d.numpy()
        threads = self.num_threads if self.num_threads is not None else torch.get_num_threads()
        y = torch.from_numpy(self.packed.forward(aligned(x), self.relu, threads))
        return y if flat else y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"kernel={self.kernel}, sparsity={self.sparsity:.3f}, relu={self.relu}"
            + (", from Conv1D" if self.weight_transposed else "")
        )
