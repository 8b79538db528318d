"""How hard `sparseprune compare` works: training budgets, sweep, timing. Three presets.

FULL is the default of `sparseprune compare` (<= 20 minutes on 2 cores), QUICK its `--quick`
(and the test suite's starting point), DEMO what `sparseprune demo` runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Tuple

DEFAULT_SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)


@dataclass(frozen=True)
class Budget:
    """Training budget of one model.

    `finetune_epochs` is the comparison's budget (`--budget`): every row of the model gets that
    many epochs of training after pruning starts, whatever its schedule: one fine-tuning run
    after a one-shot prune, the same epochs split over the rounds of iterative pruning or along
    a gradual ramp, the whole training from scratch of a network pruned at initialisation. So a
    row beats another by its method, not by training longer. (Rows named "one-shot" measure the
    pruned model before any training: 0 epochs.)
    """

    dense_epochs: int  # training of the dense model the pruned rows start from
    dense_lr: float  # also the rate of training from scratch (at-init rows)
    finetune_epochs: int  # the budget after pruning, the same for every row of the model
    finetune_lr: float

    def __post_init__(self) -> None:
        for arg, value in (("dense_epochs", self.dense_epochs), ("finetune_epochs (the budget)", self.finetune_epochs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be an int >= 1, got {value!r}")
        for arg, value in (("dense_lr", self.dense_lr), ("finetune_lr", self.finetune_lr)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{arg} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class CompareConfig:
    sparsities: Tuple[float, ...] = DEFAULT_SPARSITIES
    models: Tuple[str, ...] = ("mlp", "cnn")
    # Digits test accuracy levels off at ~97-98% after ~25 epochs (MLP) / ~12 (CNN, 0.5 s each).
    # After pruning every row gets the same 6 epochs (3 iterative rounds of 2).
    budgets: Dict[str, Budget] = field(default_factory=lambda: {
        "mlp": Budget(dense_epochs=30, dense_lr=2e-3, finetune_epochs=6, finetune_lr=1e-3),
        "cnn": Budget(dense_epochs=12, dense_lr=3e-3, finetune_epochs=6, finetune_lr=1e-3),
    })
    rounds: int = 3  # prune-train rounds of the iterative schedule
    batch_size: int = 64
    # Training, pruning and accuracy run on one thread: deterministic whatever the thread setting,
    # and on a shared 2-core machine a 2-thread team whose second core is busy ran the demo's
    # epochs 10-30x slower. Conversion and timing use torch's thread count, the same for dense
    # and converted.
    train_threads: int = 1
    convert_batch_sizes: Tuple[int, ...] = (1, 64)  # convert() picks kernels by timing these
    timing_batch_sizes: Tuple[int, ...] = (1, 256)  # latency of one request; throughput of a batch
    timing_warmup: int = 2
    timing_repeats: int = 8
    timing_min_time_s: float = 0.15  # per batch size; batch-1 calls take ~0.05 ms, so many rounds
    ensemble_k: int = 3
    # L1 strength on the channel gates (one row each); on the digits MLP 1e-3 -> 3e-2 closes
    # ~40% -> ~95% of the hidden units, on the CNN (only its last conv is gated) 10% -> 40%
    gate_penalties: Tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)
    layers_removed: Tuple[int, ...] = (1,)  # how many layers `layer-removal` takes out (one row each)
    # Also compile every deployed model to a native executable (sparseprune.compile), check it on
    # the test set, time it at batch 1 against dense and size its file (the demo's last table).
    executable: bool = False
    pattern_size: int = 4  # positions kept per 3x3 kernel by pattern pruning
    n_patterns: int = 8

    def budget(self, model: str) -> Budget:
        return self.budgets[model]

    def with_(self, **changes) -> "CompareConfig":
        return replace(self, **changes)

    def with_budget(self, epochs: int) -> "CompareConfig":
        """This config with `epochs` of training after pruning for every row of every model."""
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"budget must be an int >= 1 (epochs of training after pruning), got {epochs!r}")
        return self.with_(budgets={k: replace(b, finetune_epochs=epochs) for k, b in self.budgets.items()})


FULL = CompareConfig()

QUICK = CompareConfig(
    sparsities=(0.9,),
    budgets={
        "mlp": Budget(dense_epochs=10, dense_lr=3e-3, finetune_epochs=3, finetune_lr=1e-3),
        "cnn": Budget(dense_epochs=3, dense_lr=3e-3, finetune_epochs=2, finetune_lr=1e-3),
    },
    rounds=2,
    timing_warmup=1,
    timing_repeats=3,
    timing_min_time_s=0.0,
    gate_penalties=(3e-3,),
)

# The MLP's budgets and rounds are compare's, so with the same seed the demo's rows reproduce the
# accuracies of the same rows of `sparseprune compare` (row seeds depend on the row only).
DEMO = CompareConfig(
    sparsities=(0.9,),
    models=("mlp",),
    budgets={"mlp": FULL.budgets["mlp"]},
    rounds=FULL.rounds,
    timing_repeats=10,
    timing_min_time_s=0.2,
    executable=True,
)

PRESETS = {"full": FULL, "quick": QUICK, "demo": DEMO}
