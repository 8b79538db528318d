"""What shrink() cut in each layer, what it kept and why."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import List, Optional


@dataclass
class LayerShrink:
    path: str  # dotted module path in the model
    layer_type: str
    in_before: Optional[int]  # input channels/features (the channels of a BatchNorm/PReLU)
    in_after: Optional[int]
    out_before: Optional[int]  # output channels/features
    out_after: Optional[int]
    params_before: int  # the module's own parameters
    params_after: int
    folded: int = 0  # removed inputs whose nonzero constant went into the bias


@dataclass
class KeptChannels:
    """Output channels of `path` that hold a constant (e.g. were pruned) but stay, and why."""

    path: str
    channels: List[int]
    reason: str


@dataclass
class ShrinkReport:
    layers: List[LayerShrink] = field(default_factory=list)
    kept: List[KeptChannels] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)  # unknown modules/ops whose channels were all kept
    params_before: int = 0  # whole model
    params_after: int = 0

    @property
    def changed(self) -> List[LayerShrink]:
        return [l for l in self.layers if (l.in_before, l.out_before) != (l.in_after, l.out_after)]

    @property
    def param_ratio(self) -> float:
        """Parameters after / before."""
        return self.params_after / self.params_before if self.params_before else 1.0

    def to_dict(self) -> dict:
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "layers": [asdict(l) for l in self.layers],
            "kept": [asdict(k) for k in self.kept],
            "notes": list(self.notes),
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def table(self) -> str:
        def span(a: Optional[int], b: Optional[int]) -> str:
            return "-" if a is None else (f"{a}" if a == b else f"{a} -> {b}")

        header = f"{'layer':<32} {'type':<12} {'in':>12} {'out':>12} {'params':>20} {'folded':>6}"
        lines = [header, "-" * len(header)]
        for l in self.layers:
            lines.append(
                f"{l.path:<32} {l.layer_type:<12} {span(l.in_before, l.in_after):>12} "
                f"{span(l.out_before, l.out_after):>12} {span(l.params_before, l.params_after):>20} {l.folded:>6}"
            )
        lines.append("-" * len(header))
        lines.append(f"total parameters: {self.params_before} -> {self.params_after} "
                     f"({100.0 * self.param_ratio:.1f}%)")
        for k in self.kept:
            shown = ", ".join(str(c) for c in k.channels[:12]) + (", ..." if len(k.channels) > 12 else "")
            lines.append(f"kept {len(k.channels)} constant output channel(s) of {k.path} [{shown}]: {k.reason}")
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
