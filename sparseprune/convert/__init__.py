"""convert(): replace pruned layers with native sparse modules, choosing each kernel by measurement."""
from sparseprune.convert.converter import convert, convert_conv1d, convert_conv2d, convert_linear, register_converter
from sparseprune.convert.report import ConversionReport, LayerChoice
from sparseprune.convert import attention_handlers as _attention_handlers  # noqa: F401 (registers handlers)

__all__ = [
    "convert", "register_converter", "convert_linear", "convert_conv2d", "convert_conv1d",
    "ConversionReport", "LayerChoice",
]
