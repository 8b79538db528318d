"""SparseConv2d: an inference-only nn.Conv2d replacement running the direct sparse conv kernel."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch import nn

from sparseprune import formats
from sparseprune._native import _C, aligned
from sparseprune.config import resolve_threads
from sparseprune.nn.sparse_linear import cached_packed_bias


class UnsupportedLayer(ValueError):
    """A layer setting the sparse kernel does not implement; convert() keeps such layers dense."""


def _pair(v) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_padding(conv: nn.Conv2d) -> Tuple[int, int]:
    """Symmetric zero padding of `conv`, or UnsupportedLayer when it has none the kernel runs."""
    if conv.padding_mode != "zeros":
        raise UnsupportedLayer(f"padding_mode={conv.padding_mode!r} (only 'zeros' has a sparse kernel)")
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            if total % 2:  # torch pads the extra row/column on one side only
                raise UnsupportedLayer("padding='same' with an even kernel span is asymmetric")
            pads.append(total // 2)
        return (pads[0], pads[1])
    return _pair(conv.padding)


class SparseConv2d(nn.Module):
    """y = conv2d(x, W, b) (then ReLU when fused) with W packed once per output channel.

    Any kernel size, stride, zero padding, dilation and groups; float32 NCHW (or unbatched CHW)
    input with any strides. The GIL is released while the kernel runs; inference only.

    Model code written for nn.Conv2d keeps working: `in_channels`, `out_channels`,
    `kernel_size`, `stride`, `padding` (as the replaced layer had it, e.g. 'same'), `dilation`,
    `groups`, `padding_mode`, `bias` and `weight` (see `weight`) are there, as nn.Conv2d
    spells them (int pairs).
    """

    def __init__(self, packed, relu: bool = False, num_threads: Optional[int] = None, name: str = ""):
        super().__init__()
        self.packed = packed
        self.in_channels = packed.in_channels
        self.out_channels = packed.out_channels
        self.kernel_size = _pair(packed.kernel_size)
        self.stride = _pair(packed.stride)
        self.padding = _pair(packed.padding)  # from_dense keeps the original spelling ('same', ...)
        self.dilation = _pair(packed.dilation)
        self.groups = int(packed.groups)
        self.padding_mode = "zeros"  # the only mode with a sparse kernel
        self.relu = bool(relu)
        self.num_threads = num_threads
        self.layer_name = name or "SparseConv2d"
        self._weight_cache: Optional[torch.Tensor] = None
        self._bias_cache: Optional[torch.Tensor] = None

    @classmethod
    def from_dense(
        cls,
        conv: nn.Conv2d,
        relu: bool = False,
        num_threads: Optional[int] = None,
        name: str = "",
        patterns: bool = False,
    ) -> "SparseConv2d":
        """Pack `conv`'s (masked) weight and bias. Raises UnsupportedLayer for settings the kernel
        does not implement (non-zero padding modes, asymmetric 'same' padding).

        patterns=True groups the weight by k x k kernel pattern and runs the pattern kernel (one
        specialised loop per pattern); it raises ValueError when the weight has more than 64
        distinct kernel patterns."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        padding = conv_padding(conv)
        weight = conv.weight.detach().to(torch.float32).cpu().contiguous().numpy()
        bias = None if conv.bias is None else conv.bias.detach().to(torch.float32).cpu().numpy()
        arrays = formats.conv_arrays(weight)
        packed = _C.PackedConv(
            conv.in_channels, conv.out_channels, _pair(conv.kernel_size), _pair(conv.stride), padding,
            _pair(conv.dilation), conv.groups, *arrays, bias, use_patterns=patterns,
        )
        sparse = cls(packed, relu=relu, num_threads=num_threads, name=name)
        sparse.padding = conv.padding if isinstance(conv.padding, str) else _pair(conv.padding)
        return sparse

    @property
    def kernel(self) -> str:
        return "pattern-conv" if self.packed.pattern_mode else "sparse-conv"

    @property
    def nnz(self) -> int:
        return int(self.packed.nnz)

    @property
    def sparsity(self) -> float:
        kh, kw = self.packed.kernel_size
        total = self.out_channels * (self.in_channels // self.packed.groups) * kh * kw
        return 1.0 - self.nnz / total if total else 0.0

    def _unpack_weight(self) -> np.ndarray:
        p = self.packed
        kh, kw = p.kernel_size
        flat = np.zeros((p.out_channels, (p.in_channels // p.groups) * kh * kw), dtype=np.float32)
        rows = np.repeat(np.arange(p.out_channels), np.diff(p.row_ptr))
        flat[rows, p.taps] = p.values
        return flat.reshape(p.out_channels, p.in_channels // p.groups, kh, kw)

    @property
    def weight(self) -> torch.Tensor:
        """The dense effective weight [out, in/groups, kh, kw] (BatchNorm folded in, if it was),
        for model code that reads it (e.g. `conv.weight.dtype`). Read-only in meaning: the
        kernel runs from `packed`, so writing to this tensor changes nothing.

        Built on first access and then kept (a plain attribute, not a parameter or buffer): a
        model whose code never reads it pays no dense copy, and one that reads it on every
        forward pays it once."""
        if self._weight_cache is None:
            self._weight_cache = torch.from_numpy(self._unpack_weight())
        return self._weight_cache

    @property
    def bias(self) -> Optional[torch.Tensor]:
        """The bias [out_channels] (a copy of the packed one, kept like `weight`), or None."""
        return cached_packed_bias(self)

    def to_dense(self) -> nn.Conv2d:
        """An equivalent nn.Conv2d (the ReLU, if fused, is not included)."""
        p = self.packed
        conv = nn.Conv2d(p.in_channels, p.out_channels, self.kernel_size, self.stride, p.padding, self.dilation,
                         self.groups, bias=p.bias is not None)
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(self._unpack_weight()))
            if p.bias is not None:
                conv.bias.copy_(torch.from_numpy(p.bias))
        return conv

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{self.layer_name}: input must be a torch.Tensor, got {type(input).__name__}")
        if input.dtype != torch.float32:
            raise TypeError(f"{self.layer_name}: input must be float32, got {input.dtype}")
        if input.device.type != "cpu":
            raise ValueError(f"{self.layer_name}: input must be on the CPU, got device {input.device}")
        if input.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                f"{self.layer_name}: SparseConv2d is inference-only (no backward): use torch.no_grad() or "
                "torch.inference_mode()"
            )
        unbatched = input.dim() == 3
        if input.dim() not in (3, 4) or input.shape[-3] != self.in_channels:
            raise ValueError(
                f"{self.layer_name}: input must have shape (N, {self.in_channels}, H, W) or "
                f"({self.in_channels}, H, W), got {tuple(input.shape)}"
            )
        x = input.unsqueeze(0) if unbatched else input
        try:
            y = self.packed.forward(aligned(x.detach().numpy()), self.relu, resolve_threads(self.num_threads))
        except ValueError as exc:  # e.g. an input smaller than the kernel
            raise ValueError(f"{self.layer_name}: {exc}") from None
        out = torch.from_numpy(y)
        return out[0] if unbatched else out

    def extra_repr(self) -> str:
        p = self.packed
        return (
            f"{p.in_channels}, {p.out_channels}, kernel_size={p.kernel_size}, stride={p.stride}, "
            f"padding={p.padding}, dilation={p.dilation}, groups={p.groups}, "
            f"kernel={self.kernel}, sparsity={self.sparsity:.3f}, relu={self.relu}"
        )
