"""What convert() decided for each layer, and why."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple


@dataclass
class LayerChoice:
    path: str  # dotted module path in the model
    layer_type: str
    shape: Tuple[int, ...]  # weight shape
    sparsity: float
    kernel: str  # "dense", "csr", "bsr4x1", ..., or "dense" with a reason
    reason: str = ""
    dense_ms: Dict[int, float] = field(default_factory=dict)  # best-of-N ms by batch size, when measured
    chosen_ms: Dict[int, float] = field(default_factory=dict)

    @property
    def expected_speedup(self) -> Optional[float]:
        """Geometric-mean dense/chosen time ratio over the measured batch sizes."""
        ratios = [self.dense_ms[b] / self.chosen_ms[b] for b in self.dense_ms if self.chosen_ms.get(b)]
        if not ratios:
            return None
        product = 1.0
        for r in ratios:
            product *= r
        return product ** (1.0 / len(ratios))


@dataclass
class ModuleChoice:
    """Whether a module was compiled to run natively as a whole, and why (not)."""

    path: str
    module_type: str
    native: bool
    reason: str


@dataclass
class ConversionReport:
    layers: List[LayerChoice] = field(default_factory=list)
    policy: str = "measure"
    num_threads: int = 1
    modules: List[ModuleChoice] = field(default_factory=list)  # the compile attempts, top down

    def add(self, choice: LayerChoice) -> None:
        self.layers.append(choice)

    def add_module(self, choice: ModuleChoice) -> None:
        self.modules.append(choice)

    @property
    def native_modules(self) -> List[ModuleChoice]:
        return [m for m in self.modules if m.native]

    @property
    def converted(self) -> List[LayerChoice]:
        return [c for c in self.layers if c.kernel != "dense"]

    def to_dict(self) -> dict:
        rows = []
        for c in self.layers:
            row = asdict(c)
            row["shape"] = list(c.shape)
            row["expected_speedup"] = c.expected_speedup
            rows.append(row)
        return {"policy": self.policy, "num_threads": self.num_threads, "layers": rows,
                "modules": [asdict(m) for m in self.modules]}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def table(self) -> str:
        lines = [f"{'native' if m.native else 'torch':<7} {m.path:<32} {m.module_type:<20} {m.reason}"
                 for m in self.modules]
        if lines:
            lines.append("")
        header = f"{'layer':<32} {'shape':<14} {'sparsity':>8} {'kernel':<8} {'speedup':>8}  reason"
        lines += [header, "-" * len(header)]
        for c in self.layers:
            shape = "x".join(str(s) for s in c.shape)
            speedup = c.expected_speedup
            sp = f"{speedup:7.2f}x" if speedup else "       -"
            lines.append(f"{c.path:<32} {shape:<14} {c.sparsity:8.3f} {c.kernel:<8} {sp}  {c.reason}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
