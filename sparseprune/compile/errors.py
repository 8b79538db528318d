"""What compile() raises."""
from __future__ import annotations

CONVERT_HINT = (
    "sparseprune.convert(model, example_inputs) still works for this model: it compiles the parts "
    "that can be captured, swaps the other pruned layers one by one and leaves the rest to torch"
)


class UnsupportedOperation(ValueError):
    """The model uses an op (or an op setting) the native executor does not run."""


class VerificationError(RuntimeError):
    """The compiled executable does not reproduce the model on the example inputs."""
