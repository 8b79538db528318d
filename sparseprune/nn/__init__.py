"""torch.nn modules backed by the native sparse kernels (inference only)."""
from sparseprune.nn.sparse_conv import SparseConv2d, UnsupportedLayer
from sparseprune.nn.sparse_linear import SparseLinear

__all__ = [
    "SparseConv2d",
    "SparseLinear",
    "UnsupportedLayer",
]
