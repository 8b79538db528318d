"""Learned channel gates: an L1 penalty drives per-channel gates to zero; the closed channels go.

The level is the penalty strength, not a sparsity: the row reports the sparsity it produced.
Layers followed by a BatchNorm are not gated (the BatchNorm would undo the gate's scale in
training, so the penalty would close gates for free); the classifier is not gated either.
"""
from __future__ import annotations

from typing import List

from torch import nn

from sparseprune.experiments.registry import Job, Outcome, register, require

GATE_THRESHOLD = 1e-2  # |gate| below this closes the channel (remove_gates' default)
GATE_EPOCHS_SHARE = 1.0  # penalised training, in dense-training epochs
# Adam moves a gate by about lr per step whatever the penalty, and gates start at 1: at the dense
# rate (2e-3) 30 MLP epochs (660 steps, cosine) closed no gate at all; at 1e-2 the penalties
# 1e-3 / 3e-3 closed 42% / 78% of the MLP's units at 97.5% / 97.1% test accuracy (dense 96.9%).
GATE_LR = 1e-2


def ungated_layers(model: nn.Module) -> List[str]:
    """Names of the layers to leave without a gate: convs with a BatchNorm after them, the last layer."""
    import sparseprune.prune as P

    paired = set(map(id, P.conv_bn_pairs(model)))
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return [name for name, m in layers if id(m) in paired] + [layers[-1][0]]


@register("channel-gates", "trained", ("mlp", "cnn"),
          "a gate per unit/channel trained with an L1 penalty from the dense model; gates below 1e-2 close "
          "their channel, the rest fold into the weights; fine-tuned, then shrink", levels="gate_penalties")
def channel_gates(job: Job) -> Outcome:
    add_channel_gates, train_with_gate_penalty, remove_gates, gated_layers = require(
        "sparseprune.prune.gates", "add_channel_gates", "train_with_gate_penalty", "remove_gates", "gated_layers")
    model = job.dense
    l1 = float(job.level)
    add_channel_gates(model, exclude=ungated_layers(model))
    b = job.budget
    epochs = max(1, int(round(b.dense_epochs * GATE_EPOCHS_SHARE)))
    train_with_gate_penalty(model, job.data.x_train, job.data.y_train, l1=l1, epochs=epochs,
                            lr=GATE_LR, batch_size=job.config.batch_size, seed=job.seed,
                            progress=False)
    kept = {name: int((g.gate.detach().abs() >= GATE_THRESHOLD).sum()) for name, g in gated_layers(model)}
    widths = {name: int(g.gate.numel()) for name, g in gated_layers(model)}
    model = remove_gates(model, threshold=GATE_THRESHOLD)
    job.finetune(model)
    summary = ", ".join(f"{name}: {kept[name]}/{widths[name]}" for name in kept)
    return Outcome(model, shrink=True, label=f"L1 {l1:g}",
                   notes=[f"{epochs} penalised epochs; channels kept {summary}"],
                   extra={"l1": l1, "channels_kept": kept, "channels": widths})
