"""Structured pruning: units (MLP) and filters (CNN) removed for good by shrink; k x k kernels and
intra-kernel patterns (CNN) run by the sparse convolution.

The level is the share of units / filters / kernels removed from each pruned layer; the row's
measured sparsity is what that leaves of all the weights (a removed unit also takes its column
out of the next layer, so it can exceed the level).
"""
from __future__ import annotations

from torch import nn

from sparseprune.experiments.methods.common import conv_layers, iterative, linear_layers, one_shot
from sparseprune.experiments.registry import Job, MethodUnavailable, Outcome, register, require


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
            P.filters(conv, sparsity, importance=importance, bn=pairs.get(conv))

    return prune


def _filter_runner(importance: str, schedule: str):
    def run(job: Job) -> Outcome:
        prune = _filters(importance)
        if schedule == "iterative":
            return iterative(job, prune, shrink=True)
        return one_shot(job, prune, finetune=True, shrink=True)

    return run


for _imp, _what in (("l1", "L1 norm"), ("l2", "L2 norm")):
    register(f"filters-{_imp}", "one-shot+ft", ("cnn",),
             f"whole conv filters by {_what}, fine-tuned, then deleted (shrink)")(_filter_runner(_imp, "one-shot+ft"))
    register(f"filters-{_imp}", "iterative", ("cnn",),
             f"whole conv filters by {_what} in fine-tuned rounds, then deleted (shrink)")(
        _filter_runner(_imp, "iterative"))


# ------------------------------------------------------------------ network slimming (CNN) + shrink
# L1 strength on the BatchNorm scales while the trained CNN keeps training (Liu et al. used 1e-4
# with SGD over 160 epochs from scratch; Adam over 12 epochs needs a stronger pull).
SLIMMING_L1 = 1e-3
SLIMMING_LR = 1e-3


@register("network-slimming", "one-shot+ft", ("cnn",),
          "L1 on the BatchNorm scales while training (dense epochs), then the channels with the smallest |gamma| "
          "go under one threshold across layers (the conv without a BatchNorm by L1), fine-tuned, shrink")
def network_slimming(job: Job) -> Outcome:
    batchnorm_l1, slim = require("sparseprune.prune.slimming", "batchnorm_l1", "slim")
    from sparseprune.experiments.methods.common import GLOBAL_MIN_KEPT
    from sparseprune.train import train
    import sparseprune.prune as P

    model = job.dense
    epochs = job.budget.dense_epochs
    train(model, job.data.x_train, job.data.y_train, epochs=epochs, lr=SLIMMING_LR,
          batch_size=job.config.batch_size, seed=job.seed, progress=False, lr_schedule="cosine",
          penalty=lambda m: SLIMMING_L1 * batchnorm_l1(m))
    pruned = slim(model, job.sparsity, min_kept=GLOBAL_MIN_KEPT)
    pairs = P.conv_bn_pairs(model)
    for conv in conv_layers(model):
        if conv not in pairs:
            P.filters(conv, job.sparsity, importance="l1")
    job.finetune(model)
    per_layer = ", ".join(f"{n}/{c.out_channels}" for c, n in pruned.items())
    return Outcome(model, shrink=True, notes=[f"{epochs} epochs with L1 {SLIMMING_L1:g} on gamma; "
                                              f"channels pruned by gamma {per_layer}"],
                   extra={"l1": SLIMMING_L1, "sparsity_epochs": epochs})


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
