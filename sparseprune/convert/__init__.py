"""convert(): replace pruned layers with native sparse modules, choosing each kernel by measurement."""
from sparseprune.convert.converter import convert, register_converter
from sparseprune.convert.report import ConversionReport, LayerChoice

__all__ = ["convert", "register_converter", "ConversionReport", "LayerChoice"]
