"""A small, deterministic trainer for pruning experiments (classification, cross-entropy, CPU).

Pruning masks stay in force while training: a layer pruned through torch.nn.utils.prune (or
sparseprune.prune, which uses the same reparametrisation) computes `weight = weight_orig *
weight_mask` in a forward pre-hook, so the optimizer updates `weight_orig`, the gradient at masked
entries is zero, and the effective weight keeps its zeros. Nothing here assigns `.weight`.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("cosine", None)

# SGD is run with heavy-ball momentum: plain SGD needs many more epochs on the demo's MLP.
SGD_MOMENTUM = 0.9

# evaluate_accuracy runs the model on this many samples at a time (bounded memory, any size).
EVAL_BATCH = 1024


def _check_xy(model: object, x: object, y: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must hold at least one sample, got shape {tuple(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"y must hold integer class indices, got dtype {y.dtype}")


def _positive_int(value: object, arg: str, minimum: int = 1) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or int(value) < minimum:
        raise ValueError(f"{arg} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay)


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    optimizer: str = "adam",
    seed: int = 0,
    progress: bool = True,
    lr_schedule: Optional[str] = "cosine",
    weight_decay: float = 0.0,
    desc: str = "train",
    position: Optional[int] = None,
    num_threads: Optional[int] = None,
    on_step: Optional[Callable[[int], object]] = None,
    on_epoch: Optional[Callable[[int], object]] = None,
    objective: object = None,
    penalty: Optional[Callable[[nn.Module], torch.Tensor]] = None,
) -> List[float]:
    """Train `model` in place with cross-entropy on (x, y); returns the mean loss of each epoch.

    `penalty(model)`, when given, is added to every batch's loss (a regulariser such as network
    slimming's L1 on BatchNorm scales, `sparseprune.prune.slimming.batchnorm_l1` times a strength).

    Mini-batches are drawn by a shuffle seeded by `seed` (the model's initial weights are the
    caller's business: seed torch before building it). `lr_schedule="cosine"` anneals the
    learning rate per step from `lr` to 0 over the run; None keeps it constant. A tqdm bar over
    the epochs shows the loss unless `progress` is False. `num_threads` sets torch's intra-op
    threads for the run (restored after); default: leave torch's setting. The model is left in
    eval mode if it was in eval mode before, else in train mode.

    Callbacks (return values ignored; an exception stops training and propagates):
    `on_step(i)` runs after optimizer step i (0-based, counted across the epochs of this call),
    `on_epoch(e)` after epoch e (0-based). They may prune the model (e.g.
    `sparseprune.schedules.GradualPruner.step`): the optimizer holds the parameter objects, which
    torch's pruning keeps as `weight_orig`, so new masks take effect from the next forward.

    `objective`: adversarial training and its relatives (`sparseprune.robust`). An attack
    (`PGD(eps=0.1)`, `FGSM(eps=0.1)`) trains on the attack's examples of each batch (Madry et
    al.); a `RobustObjective` mixes clean and adversarial loss, adds vulnerability suppression
    and, for models with beta-Bernoulli dropout layers, their KL term (masks at their own
    learning rate). Attacks' random starts are drawn from a generator seeded by `seed`.
    """
    _check_xy(model, x, y)
    epochs = _positive_int(epochs, "epochs", minimum=0)
    batch_size = _positive_int(batch_size, "batch_size")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if num_threads is not None and (
        not isinstance(num_threads, numbers.Integral) or isinstance(num_threads, bool) or num_threads < 1
    ):
        raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real) or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    for arg, fn in (("on_step", on_step), ("on_epoch", on_epoch), ("penalty", penalty)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{arg} must be a callable or None, got {type(fn).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    from sparseprune.robust.objective import as_objective  # torch-only, small; imported when training

    objective = as_objective(objective)
    if objective is not None and penalty is not None:
        raise ValueError("penalty applies to the plain cross-entropy loss; with an objective, pass neither or "
                         "fold the penalty into the objective")
    if objective is not None:
        objective.check_model(model)

    n = x.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = epochs * steps_per_epoch
    groups = params if objective is None else objective.param_groups(model, float(lr), float(weight_decay))
    opt = _make_optimizer(optimizer, groups, float(lr), float(weight_decay))
    base_lrs = [group["lr"] for group in opt.param_groups]
    generator = torch.Generator().manual_seed(int(seed))
    attack_generator = torch.Generator().manual_seed(int(seed) + 1)
    was_training = model.training
    labels = y.long()
    losses: List[float] = []
    step = 0
    bar = tqdm(range(epochs), desc=desc, unit="epoch", leave=False, disable=not progress, position=position)
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    model.train()
    try:
        for epoch in bar:
            order = torch.randperm(n, generator=generator)
            total = 0.0
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                if lr_schedule == "cosine":
                    # set before the step, so step 0 runs at `lr` and the last one near 0
                    for group, base in zip(opt.param_groups, base_lrs):
                        group["lr"] = 0.5 * base * (1.0 + math.cos(math.pi * step / total_steps))
                opt.zero_grad(set_to_none=True)
                if objective is None:
                    loss = F.cross_entropy(model(x[idx]), labels[idx])
                    if penalty is not None:
                        loss = loss + penalty(model)
                    value = loss.item()
                    if math.isfinite(value):
                        loss.backward()
                else:
                    value = objective.backward(model, x[idx], labels[idx], n_train=n, generator=attack_generator)
                if not math.isfinite(value):
                    raise FloatingPointError(f"training diverged (loss {value}); lower lr")
                opt.step()
                total += value * idx.numel()
                if on_step is not None:
                    on_step(step)
                step += 1
            losses.append(total / n)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if on_epoch is not None:
                on_epoch(epoch)
    finally:
        bar.close()
        model.train(was_training)
        torch.set_num_threads(previous_threads)
    return losses


def evaluate_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of samples whose argmax output is the label, in eval mode under torch.no_grad().

    Works on converted models too (their sparse layers are inference-only). The model's
    train/eval mode is restored afterwards.
    """
    _check_xy(model, x, y)
    was_training = model.training
    model.eval()
    correct = 0
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], EVAL_BATCH):
                out = model(x[start:start + EVAL_BATCH])
                correct += int((out.argmax(dim=-1) == y[start:start + EVAL_BATCH].to(out.device)).sum())
    finally:
        model.train(was_training)
    return correct / x.shape[0]
