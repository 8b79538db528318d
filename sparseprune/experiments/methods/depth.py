"""Depth: layer-wise sliding neuron pruning (MLP) and removal of whole layers (both models)."""
from __future__ import annotations

from sparseprune.experiments.methods.common import linear_layers
from sparseprune.experiments.registry import Job, Outcome, register, require


@register("layerwise-neurons", "layer-wise+ft", ("mlp",),
          "a Linear-act-Linear window slides input to output; each hidden layer loses the neurons whose "
          "removal changes the next pre-activations least, fine-tuned before the window moves; then shrink")
def layerwise_neurons(job: Job) -> Outcome:
    layerwise_neuron_prune = require("sparseprune.prune.depth", "layerwise_neuron_prune")
    model = job.dense
    n_hidden = len(linear_layers(model)) - 1
    epochs = job.split_budget(n_hidden)  # the budget split over the window's positions
    stages = iter(epochs + [0] * (n_hidden - len(epochs)))

    def train_fn(m, step) -> None:
        n = next(stages)
        if n:
            job.finetune(m, epochs=n)

    layerwise_neuron_prune(model, job.sparsity, job.data.x_train, train_fn=train_fn)
    report = getattr(model, "sparseprune_layerwise_report", [])
    pruned = [int(s.n_pruned) for s in report]
    return Outcome(model, shrink=True, notes=[f"{'+'.join(map(str, epochs))} epochs after the {n_hidden} layers"],
                   extra={"units_pruned_per_layer": pruned})


@register("layer-removal", "one-shot+ft", ("mlp", "cnn"),
          "the shape-preserving layer whose removal raises the training loss least is replaced by Identity "
          "(greedy, re-ranked after each), then fine-tuned", levels="layers_removed")
def layer_removal(job: Job) -> Outcome:
    remove_layers = require("sparseprune.prune.depth", "remove_layers")
    n = int(job.level)
    model, report = remove_layers(job.dense, n, (job.data.x_train, job.data.y_train))
    job.finetune(model)
    return Outcome(model, label=f"{n} layer{'s' if n != 1 else ''} removed",
                   notes=[f"removed {', '.join(report.removed)}"],
                   extra={"removed": list(report.removed), "loss_before": report.base_loss,
                          "loss_after_removal": report.final_loss})
