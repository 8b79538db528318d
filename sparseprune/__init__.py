"""sparseprune: prune PyTorch models, convert them to sparse native kernels, measure the speedup.

The torch-side API (prune, convert, compile, benchmarks...) is imported on first use, so that
`import sparseprune.runtime` (load and run compiled executables) works where torch is absent.
"""
import importlib
import types

from sparseprune.config import build_info, show_config  # torch-free

__version__ = "0.1.0"

# name -> (module, attribute or None for the module itself)
_LAZY = {
    "prune": ("sparseprune.prune", None),
    "shrink": ("sparseprune.shrink", None),
    "runtime": ("sparseprune.runtime", None),
    "BenchmarkResult": ("sparseprune.bench", "BenchmarkResult"),
    "available_models": ("sparseprune.bench", "available_models"),
    "benchmark": ("sparseprune.bench", "benchmark"),
    "build_model": ("sparseprune.bench", "build_model"),
    "ConversionReport": ("sparseprune.convert", "ConversionReport"),
    "convert": ("sparseprune.convert", "convert"),
    "register_converter": ("sparseprune.convert", "register_converter"),
    "SparseConv2d": ("sparseprune.nn", "SparseConv2d"),
    "SparseLinear": ("sparseprune.nn", "SparseLinear"),
    "compile": ("sparseprune.compile", "compile"),
    "UnsupportedOperation": ("sparseprune.compile", "UnsupportedOperation"),
    "Executable": ("sparseprune.runtime", "Executable"),
    "load": ("sparseprune.runtime", "load"),
    "Limits": ("sparseprune.runtime", "Limits"),
    "LimitExceeded": ("sparseprune.runtime", "LimitExceeded"),
}
# Functions named like the subpackage that holds them: importing the subpackage (which Python
# binds as an attribute of this package) must not hide the function, as with eager imports.
_FUNCTIONS_NAMED_LIKE_SUBPACKAGES = {"convert", "compile"}


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        if name in _FUNCTIONS_NAMED_LIKE_SUBPACKAGES and isinstance(value, types.ModuleType):
            return  # `sparseprune.convert` stays the function (found through __getattr__)
        super().__setattr__(name, value)

    def __getattr__(self, name):
        try:
            module, attr = _LAZY[name]
        except KeyError:
            raise AttributeError(f"module 'sparseprune' has no attribute {name!r}") from None
        value = importlib.import_module(module)
        if attr is not None:
            value = getattr(value, attr)
        self.__dict__[name] = value  # next time found without __getattr__
        return value

    def __dir__(self):
        return sorted(set(self.__dict__) | set(_LAZY))


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _Package

__all__ = sorted(set(_LAZY) - {"runtime"} | {"build_info", "show_config", "__version__"})
