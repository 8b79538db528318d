"""convert(): run the capturable parts of a model natively (compile's pipeline), swap the remaining
pruned layers for native sparse modules, and leave the rest to torch."""
from sparseprune.convert.converter import convert, convert_conv1d, convert_conv2d, convert_linear, register_converter
from sparseprune.convert.native_module import NativeFallbackWarning, is_native
from sparseprune.convert.report import ConversionReport, LayerChoice, ModuleChoice

__all__ = [
    "convert", "register_converter", "convert_linear", "convert_conv2d", "convert_conv1d",
    "ConversionReport", "LayerChoice", "ModuleChoice", "NativeFallbackWarning", "is_native",
]
