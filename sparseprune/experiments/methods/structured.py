"""Structured pruning: units (MLP) and filters (CNN) removed for good by shrink; k x k kernels and
intra-kernel patterns (CNN) run by the sparse convolution.

The level is the share of units / filters / kernels removed from each pruned layer; the row's
measured sparsity is what that leaves of all the weights (a removed unit also takes its column
out of the next layer, so it can exceed the level).
"""
from __future__ import annotations

from torch import nn

from sparseprune.experiments.methods.common import conv_layers, iterative, linear_layers, one_shot
from sparseprune.experiments.registry import Job, MethodUnavailable, Outcome, register


# ---------------------------------------------------------------------------- units (MLP) + shrink
def _units(model: nn.Module, sparsity: float) -> None:
    import sparseprune.prune as P

    for layer in linear_layers(model)[:-1]:  # the last layer's units are the classes
        P.units(layer, sparsity)


@register("units", "one-shot+ft", ("mlp",), "whole neurons of each hidden layer by L2 norm, fine-tuned, "
          "then deleted (shrink)")
def units_one_shot(job: Job) -> Outcome:
    return one_shot(job, _units, finetune=True, shrink=True)


@register("units", "iterative", ("mlp",), "whole neurons in fine-tuned rounds, then deleted (shrink)")
def units_iterative(job: Job) -> Outcome:
    return iterative(job, _units, shrink=True)


# ------------------------------------------------------------------------- filters (CNN) + shrink
def _filters(importance: str):
    def prune(model: nn.Module, sparsity: float) -> None:
        import sparseprune.prune as P

        pairs = P.conv_bn_pairs(model)
        for conv in conv_layers(model):
            bn = pairs.get(conv)
            how = importance if (importance != "bn" or bn is not None) else "l1"
            P.filters(conv, sparsity, importance=how, bn=bn)

    return prune


def _filter_runner(importance: str, schedule: str):
    def run(job: Job) -> Outcome:
        prune = _filters(importance)
        if schedule == "iterative":
            out = iterative(job, prune, shrink=True)
        else:
            out = one_shot(job, prune, finetune=True, shrink=True)
        if importance == "bn":
            out.notes.append("convs without a BatchNorm ranked by L1")
        return out

    return run


for _imp, _what in (("l1", "L1 norm"), ("l2", "L2 norm"), ("bn", "BatchNorm |gamma| (network slimming)")):
    register(f"filters-{_imp}", "one-shot+ft", ("cnn",),
             f"whole conv filters by {_what}, fine-tuned, then deleted (shrink)")(_filter_runner(_imp, "one-shot+ft"))
    register(f"filters-{_imp}", "iterative", ("cnn",),
             f"whole conv filters by {_what} in fine-tuned rounds, then deleted (shrink)")(
        _filter_runner(_imp, "iterative"))


# -------------------------------------------------------------------------------- kernels (CNN)
def _kernels(model: nn.Module, sparsity: float) -> None:
    import sparseprune.prune as P

    for conv in conv_layers(model):
        P.kernels(conv, sparsity)


@register("kernels", "one-shot+ft", ("cnn",), "whole 3x3 kernels w[o, i] of each conv by L2 norm, fine-tuned")
def kernels_one_shot(job: Job) -> Outcome:
    return one_shot(job, _kernels, finetune=True)


@register("kernels", "iterative", ("cnn",), "whole 3x3 kernels in fine-tuned rounds")
def kernels_iterative(job: Job) -> Outcome:
    return iterative(job, _kernels)


# ------------------------------------------------------------------------------- patterns (CNN)
def pattern_connectivity(sparsity: float, pattern_size: int, kernel_positions: int) -> float:
    """Share of whole kernels to drop so that patterns of `pattern_size` reach `sparsity` overall
    (0 when the patterns alone are already sparser than asked)."""
    density_of_patterns = pattern_size / kernel_positions
    return max(0.0, 1.0 - (1.0 - sparsity) / density_of_patterns)


def _patterns(job: Job):
    def prune(model: nn.Module, sparsity: float) -> None:
        import sparseprune.prune as P

        for conv in conv_layers(model):
            kh, kw = conv.kernel_size
            if kh * kw <= job.config.pattern_size:
                raise MethodUnavailable(f"pattern pruning needs kernels larger than {job.config.pattern_size} "
                                        f"positions, got {kh}x{kw}")
            c = pattern_connectivity(sparsity, job.config.pattern_size, kh * kw)
            # an int count would be exact, but a fraction just below 1 is what patterns() takes
            P.patterns(conv, n_patterns=job.config.n_patterns, pattern_size=job.config.pattern_size,
                       connectivity=min(c, 0.999))

    return prune


@register("patterns", "one-shot+ft", ("cnn",), "each 3x3 kernel keeps 4 positions from 8 per-layer patterns, "
          "plus whole kernels dropped (connectivity) to reach the target, fine-tuned")
def patterns_one_shot(job: Job) -> Outcome:
    out = one_shot(job, _patterns(job), finetune=True)
    low = 1.0 - job.config.pattern_size / 9
    if job.sparsity < low:
        out.notes.append(f"patterns alone already remove {100 * low:.0f}% of each 3x3 conv")
    return out
