"""Unstructured and block pruning: magnitude (per layer, global), random, block magnitude."""
from __future__ import annotations

from torch import nn

from sparseprune.experiments.methods.common import (
    gradual,
    iterative,
    linear_layers,
    magnitude_global,
    magnitude_per_layer,
    one_shot,
    random_per_layer,
)
from sparseprune.experiments.registry import Job, Outcome, register

BOTH = ("mlp", "cnn")
BLOCK = (4, 1)  # 4 output rows of one input: one input load feeds 4 rows in the block kernel


@register("magnitude", "one-shot", BOTH, "smallest |w| of each layer removed, no training")
def magnitude_one_shot(job: Job) -> Outcome:
    return one_shot(job, magnitude_per_layer)


@register("magnitude", "one-shot+ft", BOTH, "smallest |w| of each layer removed at once, then fine-tuned")
def magnitude_one_shot_ft(job: Job) -> Outcome:
    return one_shot(job, magnitude_per_layer, finetune=True)


@register("magnitude", "iterative", BOTH, "prune-train-repeat: geometric rounds of per-layer magnitude "
          "pruning, fine-tuned after each")
def magnitude_iterative(job: Job) -> Outcome:
    return iterative(job, magnitude_per_layer)


@register("magnitude", "gradual", BOTH, "polynomial sparsity ramp (Zhu & Gupta) while fine-tuning")
def magnitude_gradual(job: Job) -> Outcome:
    return gradual(job, magnitude_per_layer)


@register("global-magnitude", "one-shot", BOTH, "one |w| threshold over all layers, no training")
def global_one_shot(job: Job) -> Outcome:
    return one_shot(job, magnitude_global)


@register("global-magnitude", "iterative", BOTH, "one |w| threshold over all layers, in fine-tuned rounds")
def global_iterative(job: Job) -> Outcome:
    return iterative(job, magnitude_global)


@register("random", "one-shot", BOTH, "entries of each layer removed uniformly at random, no training")
def random_one_shot(job: Job) -> Outcome:
    return one_shot(job, random_per_layer(job.generator()))


@register("random", "one-shot+ft", BOTH, "entries of each layer removed uniformly at random, then fine-tuned "
          "(the control every informed method must beat at the same budget)")
def random_one_shot_ft(job: Job) -> Outcome:
    return one_shot(job, random_per_layer(job.generator()), finetune=True)


@register("random", "iterative", BOTH, "random entries removed in fine-tuned rounds")
def random_iterative(job: Job) -> Outcome:
    return iterative(job, random_per_layer(job.generator()))


def _block(model: nn.Module, sparsity: float) -> None:
    import sparseprune.prune as P

    for layer in linear_layers(model):
        P.block_magnitude(layer, sparsity, block=BLOCK)


@register("block-magnitude", "one-shot", ("mlp",), f"whole {BLOCK[0]}x{BLOCK[1]} blocks of each Linear by "
          "L2 norm, no training")
def block_one_shot(job: Job) -> Outcome:
    return one_shot(job, _block)


@register("block-magnitude", "iterative", ("mlp",), f"{BLOCK[0]}x{BLOCK[1]} blocks in fine-tuned rounds")
def block_iterative(job: Job) -> Outcome:
    return iterative(job, _block)
