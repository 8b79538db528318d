"""compile(): a pruned PyTorch model to one native executable (see sparseprune.runtime to run it).

    exe = sparseprune.compile(model, (x,))
    exe.save("model.safetensors")            # later, without torch:
    y = sparseprune.runtime.load("model.safetensors").run(x_numpy)
"""
from sparseprune.compile.compiler import (
    ATOL_SCALE,
    POLICIES,
    RTOL,
    UnsupportedOperation,
    VerificationError,
    compile,
    verify,
)

__all__ = ["compile", "verify", "UnsupportedOperation", "VerificationError", "POLICIES", "RTOL", "ATOL_SCALE"]
