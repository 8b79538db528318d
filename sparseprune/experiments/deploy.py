"""From a pruned model to what would be shipped: masks made permanent, shrink, convert, checked.

Every method's result goes through `deploy`: the masks are folded into plain weights (the
reference the converted model must reproduce), structured results are shrunk (removed channels
and units deleted), then `sparseprune.convert` picks each layer's kernel by timing it on this
machine. The deployed model's outputs are compared with the reference's on the whole test set;
a mismatch raises `OutputMismatch`, so a wrong kernel can never produce a row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from sparseprune.convert import ConversionReport, LayerChoice, convert
from sparseprune.prune.reparam import remove

# Converted and reference logits differ by float32 summation order only (~1e-6 here); a wrong
# index, a dropped bias or a badly folded BatchNorm shows up as O(0.1). Relative to max |logit|.
OUTPUT_RTOL = 1e-3


class OutputMismatch(RuntimeError):
    """The deployed model does not compute what the pruned model computes."""


@dataclass
class Deployed:
    reference: nn.Module  # the pruned model with its masks folded in, eval mode
    model: nn.Module  # shrunk (if asked) and converted: what is timed
    steps: str  # "convert" or "shrink+convert"
    max_abs_diff: float
    tolerance: float
    kernels: List[str] = field(default_factory=list)  # convert's choice per layer, in order
    conversion: Dict[str, Any] = field(default_factory=dict)
    shrink: Optional[Dict[str, int]] = None  # parameters before/after shrink


def finalize(model: nn.Module) -> nn.Module:
    """Eval mode, every mask made permanent (weights hold their zeros); in place, returned."""
    model.eval()
    return remove(model)


def deploy(model: nn.Module, *, shrink: bool, example: torch.Tensor, x_check: torch.Tensor,
           batch_sizes: Sequence[int], num_threads: int) -> Deployed:
    """Finalise `model` (in place), shrink it when asked, convert it, and check it on `x_check`."""
    reference = finalize(model)
    target, shrink_info = reference, None
    if shrink:
        from sparseprune.shrink import shrink as shrink_model

        target = shrink_model(reference, (example,))
        report = target.sparseprune_shrink_report
        shrink_info = {"params_before": report.params_before, "params_after": report.params_after}
    converted = convert(target, example_inputs=(example,), batch_sizes=tuple(batch_sizes), num_threads=num_threads)
    with torch.no_grad():
        want = reference(x_check)
        got = converted(x_check)
    diff = float((got - want).abs().max())
    tol = OUTPUT_RTOL * max(1.0, float(want.abs().max()))
    if not diff <= tol:  # also catches nan
        raise OutputMismatch(f"converted outputs differ from the pruned model's by {diff:.3g} (tolerance {tol:.3g})")
    report = converted.sparseprune_report
    return Deployed(
        reference=reference, model=converted, steps="shrink+convert" if shrink else "convert",
        max_abs_diff=diff, tolerance=tol, kernels=[c.kernel for c in report.layers],
        conversion=report.to_dict(), shrink=shrink_info,
    )


def conversion_table(conversion: Dict[str, Any]) -> str:
    """convert()'s per-layer table from a `Deployed.conversion` record (`ConversionReport.to_dict()`)."""
    report = ConversionReport(policy=conversion.get("policy", "measure"), num_threads=conversion.get("num_threads", 1))
    for layer in conversion.get("layers", []):
        report.add(LayerChoice(layer["path"], layer["layer_type"], tuple(layer["shape"]), layer["sparsity"],
                               layer["kernel"], layer.get("reason", ""), dict(layer.get("dense_ms", {})),
                               dict(layer.get("chosen_ms", {}))))
    return report.table()
