"""Build facts and thread settings: what the native kernels were compiled with and use now."""
from __future__ import annotations

import numbers
import os
import platform
import warnings
from typing import Any, Dict, Optional

from sparseprune import _native


def cpu_model() -> str:
    """The CPU's model name with its family and model numbers (from /proc/cpuinfo on Linux), for
    benchmark records. Cloud VMs often report a bare "AMD EPYC": the numbers tell Zen 3 (family
    25, model 1) from Zen 4 (family 25, model 17), whose figures must never be compared."""
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break  # the first processor's block is enough
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        return f"{name} (family {fields['cpu family']}, model {fields['model']})"
    return name


def build_info() -> Dict[str, Any]:
    """Compiler, flags, OpenMP and SIMD facts of the native build, plus the CPU it runs on."""
    info = dict(_native.build_info())
    info["openmp_max_threads"] = _native.max_threads()
    info["cpu"] = cpu_model()
    info["cpu_count"] = os.cpu_count()
    return info


def show_config(file=None) -> None:
    """Print build_info() as `key: value` lines."""
    for key, value in build_info().items():
        print(f"{key}: {value}", file=file)


_warned_no_openmp = False

# The most intra-op threads a call may ask for: far above any CPU this runs on, low enough that a
# typo (n_threads=2**31) is an error rather than thousands of OpenMP threads or a C int overflow.
MAX_THREADS = 256


def check_threads(value: Optional[int], what: str = "n_threads") -> Optional[int]:
    """None, or an int in [1, MAX_THREADS] (bool and other types refused); ValueError naming `what`."""
    if value is None:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):  # numpy ints are fine
        raise ValueError(f"{what} must be None or an int in [1, {MAX_THREADS}], got {type(value).__name__} {value!r}")
    if not 1 <= value <= MAX_THREADS:
        raise ValueError(f"{what} must be None or an int in [1, {MAX_THREADS}], got {value}")
    return int(value)


def resolve_threads(requested: Optional[int]) -> int:
    """The thread count a kernel call uses: `requested`, else torch's intra-op count when torch is
    loaded (so sparse and dense run with the same threads), else OpenMP's default."""
    global _warned_no_openmp
    if requested is None:
        import sys

        torch = sys.modules.get("torch")
        requested = torch.get_num_threads() if torch is not None else _native.max_threads()
        requested = max(1, min(int(requested), MAX_THREADS))
    else:
        requested = check_threads(requested, "num_threads")
    if requested > 1 and not _native.openmp_enabled() and not _warned_no_openmp:
        _warned_no_openmp = True
        warnings.warn(
            "sparseprune was built without OpenMP: kernels run on one thread", RuntimeWarning, stacklevel=3
        )
    return requested
