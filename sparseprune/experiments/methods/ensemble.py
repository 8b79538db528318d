"""Randomized pruning: K random masks of the trained model averaged, against one random mask.

Both start from the trained dense model; "+ft" fine-tunes them for the same number of epochs
(the ensemble as one model, through its averaged logits). The ensemble keeps K sparse copies,
so its measured sparsity (against ONE dense model) and its speed pay for all K.
"""
from __future__ import annotations

from sparseprune.experiments.registry import Job, Outcome, register, require

BOTH = ("mlp", "cnn")


def _ensemble(finetune: bool):
    def run(job: Job) -> Outcome:
        RandomMaskEnsemble = require("sparseprune.prune.ensemble", "RandomMaskEnsemble")
        k = job.config.ensemble_k
        model = RandomMaskEnsemble(job.dense, k, job.sparsity, seed=job.seed)
        if finetune:
            job.finetune(model)
        return Outcome(model, notes=[f"K={k} members, logits averaged"], extra={"k": k})

    return run


def _single(finetune: bool):
    def run(job: Job) -> Outcome:
        single_random_mask = require("sparseprune.prune.ensemble", "single_random_mask")
        model = single_random_mask(job.dense, job.sparsity, seed=job.seed)
        if finetune:
            job.finetune(model)
        return Outcome(model, notes=["member 0 of the ensemble alone"])

    return run


for _schedule, _ft in (("one-shot", False), ("one-shot+ft", True)):
    register("random-ensemble", _schedule, BOTH,
             "K=3 copies of the trained model, each with its own random mask, logits averaged"
             + (", fine-tuned together" if _ft else ""))(_ensemble(_ft))
    register("random-single", _schedule, BOTH,
             "one random mask, the ensemble's member 0 (the baseline it must beat)"
             + (", fine-tuned" if _ft else ""))(_single(_ft))
