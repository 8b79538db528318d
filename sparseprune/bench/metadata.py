"""What every benchmark record carries: build, CPU, library versions, git revision, threads, time.

A number without these is not comparable to anything, so the benchmark runner, the CLI and the
scripts in benchmarks/ all build their records here.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from sparseprune.config import build_info, cpu_model

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "-C", _PACKAGE_DIR, *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_revision() -> Optional[str]:
    """HEAD of the checkout sparseprune is imported from, or None (installed copy, no git)."""
    rev = _git("rev-parse", "HEAD")
    return rev if rev else None


def git_dirty() -> Optional[bool]:
    """True when tracked files in that checkout differ from HEAD; None without git."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def run_metadata(threads: Sequence[int] = ()) -> Dict[str, Any]:
    """The facts to store next to any timing (JSON-serialisable)."""
    import sparseprune

    return {
        "sparseprune_version": sparseprune.__version__,
        "build_info": build_info(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "torch_default_threads": torch.get_num_threads(),
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "git_revision": git_revision(),
        "git_dirty": git_dirty(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "threads": [int(t) for t in threads],
        "argv": list(sys.argv),
    }


def summary_line(meta: Dict[str, Any]) -> str:
    """One line for the console: compiler, OpenMP, SIMD path, CPU, torch, git."""
    info = meta.get("build_info", {})
    rev = meta.get("git_revision")
    rev_text = "unknown" if rev is None else rev[:12] + ("+dirty" if meta.get("git_dirty") else "")
    return (
        f"build: {info.get('compiler', '?')}, openmp={info.get('openmp', '?')}, "
        f"simd={info.get('simd_path_active', '?')} | cpu: {meta.get('cpu', '?')} "
        f"({meta.get('cpu_count', '?')} logical) | torch {meta.get('torch_version', '?')} | "
        f"numpy {meta.get('numpy_version', '?')} | git {rev_text} | threads {meta.get('threads')}"
    )
