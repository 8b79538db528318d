"""sparseprune: prune PyTorch models, convert them to sparse native kernels, measure the speedup."""
from sparseprune import prune, shrink
from sparseprune.bench import BenchmarkResult, available_models, benchmark, build_model
from sparseprune.config import build_info, show_config
from sparseprune.convert import ConversionReport, convert, register_converter
from sparseprune.nn import SparseConv2d, SparseLinear

__version__ = "0.1.0"

__all__ = [
    "BenchmarkResult",
    "available_models",
    "benchmark",
    "build_model",
    "ConversionReport",
    "SparseConv2d",
    "SparseLinear",
    "build_info",
    "prune",
    "shrink",
    "convert",
    "register_converter",
    "show_config",
    "__version__",
]
