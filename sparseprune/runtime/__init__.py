"""The torch-free runtime: load and run executables made by sparseprune.compile.

    from sparseprune.runtime import load
    exe = load("model.safetensors")
    y = exe.run(x)            # x: float32 numpy array [batch, *exe.input_shapes[0]]

Only numpy, safetensors and the native extension are imported here (never torch), so a
deployment service can run pruned models without installing torch.
"""
from sparseprune.runtime.executable import SPEC_KEY, Executable, file_size, load, weight_bytes_ratio
from sparseprune.runtime.limits import Cost, LimitExceeded, Limits
from sparseprune.runtime.reference import run_reference
from sparseprune.runtime.spec import (
    ACTIVATIONS,
    MAX_SAMPLE_ELEMENTS,
    OP_FIELDS,
    SPEC_FORMAT,
    SPEC_VERSION,
    PlanLayout,
    SpecError,
    validate,
)

__all__ = [
    "ACTIVATIONS",
    "Cost",
    "Executable",
    "LimitExceeded",
    "Limits",
    "MAX_SAMPLE_ELEMENTS",
    "OP_FIELDS",
    "PlanLayout",
    "SPEC_FORMAT",
    "SPEC_KEY",
    "SPEC_VERSION",
    "SpecError",
    "file_size",
    "load",
    "run_reference",
    "validate",
    "weight_bytes_ratio",
]
