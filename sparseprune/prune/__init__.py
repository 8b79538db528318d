"""Pruning: masks on module parameters, computed by small methods from importance scores.

Three separate pieces:
  * importance (`sparseprune.prune.importance`): how each entry or block is scored;
  * methods (`PruningMethod` subclasses): which entries go for a given amount, from the scores
    and the current mask (masks only ever remove more; `amount` is the total target);
  * application (`prune_parameter`, `prune_global`, `remove`): installing masks through
    torch.nn.utils.prune's reparametrisation (`weight_orig`, `weight_mask`, forward pre-hook),
    so torch's pruning utilities and sparseprune's work on each other's modules.

Structured pruning (`structured`, `kernel_patterns`, `layers`): whole conv filters (`filters`,
`global_filters`), input channels (`channels`), Linear units (`units`), k x k kernels
(`kernels`, `global_kernels`) and intra-kernel patterns with connectivity pruning (`patterns`,
`pattern_assignment_from_weight`), through the same masks. Pruning an output channel also masks
its bias (and the BatchNorm after it when given).

Data-driven saliency (`saliency`): Optimal Brain Damage (`obd`, 1/2 h_ii w_i^2 with the Hessian
diagonal from `hessian_diagonal`: exact, Hutchinson or empirical Fisher) and pruning at
initialisation (`at_init`: random, magnitude or SNIP's |g * w| from `snip_scores`).

Bayesian pruning (`bayesian`): beta-Bernoulli dropout, a learned keep-probability per unit with
its KL term (`add_beta_bernoulli`, `beta_bernoulli_kl`), units under a threshold pruned
(`prune_beta_bernoulli`); trained adversarially it is Adversarial Neural Pruning (`sparseprune.robust`).

An int amount is a count (of entries, or of blocks, filters, units, kernels), a float a fraction.
"""
from sparseprune.prune.amount import amount_to_count, check_amount
from sparseprune.prune.api import (
    block_magnitude,
    global_magnitude,
    magnitude,
    prune_global,
    prune_parameter,
    random_unstructured,
)
from sparseprune.prune.importance import (
    block_l2,
    filter_norm,
    kernel_norm,
    l1_magnitude,
    random_scores,
    slice_norm,
    squared_magnitude,
)
from sparseprune.prune.layers import (
    batchnorm_scale,
    channels,
    conv_bn_pairs,
    filters,
    global_filters,
    global_kernels,
    kernels,
    patterns,
    units,
)
from sparseprune.prune.methods import BlockMagnitude, MagnitudeUnstructured, PruningMethod, RandomUnstructured
from sparseprune.prune.kernel_patterns import PatternAssignment, PatternPruning, pattern_assignment_from_weight
from sparseprune.prune.reparam import InstalledMask, is_pruned, remove
from sparseprune.prune.saliency import (
    at_init,
    connection_sensitivity,
    hessian_diagonal,
    obd,
    obd_saliency,
    snip_scores,
)
from sparseprune.prune.stats import sparsity
from sparseprune.prune.depth import LayerRemovalReport, LayerwiseStep, layerwise_neuron_prune, remove_layers
from sparseprune.prune.ensemble import RandomMaskEnsemble, single_random_mask
from sparseprune.prune.bayesian import (
    BetaBernoulliDropout,
    add_beta_bernoulli,
    beta_bernoulli_kl,
    keep_probabilities,
    prune_beta_bernoulli,
)
from sparseprune.prune.gates import (
    GatedLayer,
    add_channel_gates,
    gate_l1_penalty,
    gated_layers,
    remove_gates,
    train_with_gate_penalty,
)
from sparseprune.prune.structured import (
    ChannelPruning,
    FilterPruning,
    KernelPruning,
    StructuredPruning,
    UnitPruning,
    global_keep,
    prune_global_structured,
)

__all__ = [
    "BetaBernoulliDropout",
    "add_beta_bernoulli",
    "beta_bernoulli_kl",
    "keep_probabilities",
    "prune_beta_bernoulli",
    "GatedLayer",
    "LayerRemovalReport",
    "LayerwiseStep",
    "RandomMaskEnsemble",
    "add_channel_gates",
    "gate_l1_penalty",
    "gated_layers",
    "layerwise_neuron_prune",
    "remove_gates",
    "remove_layers",
    "single_random_mask",
    "train_with_gate_penalty",
    "BlockMagnitude",
    "ChannelPruning",
    "FilterPruning",
    "InstalledMask",
    "KernelPruning",
    "MagnitudeUnstructured",
    "PatternAssignment",
    "PatternPruning",
    "PruningMethod",
    "RandomUnstructured",
    "StructuredPruning",
    "UnitPruning",
    "amount_to_count",
    "at_init",
    "batchnorm_scale",
    "block_l2",
    "block_magnitude",
    "channels",
    "check_amount",
    "connection_sensitivity",
    "conv_bn_pairs",
    "filter_norm",
    "filters",
    "global_filters",
    "global_keep",
    "global_kernels",
    "global_magnitude",
    "hessian_diagonal",
    "is_pruned",
    "kernel_norm",
    "kernels",
    "l1_magnitude",
    "magnitude",
    "obd",
    "obd_saliency",
    "pattern_assignment_from_weight",
    "patterns",
    "prune_global",
    "prune_global_structured",
    "prune_parameter",
    "random_scores",
    "random_unstructured",
    "remove",
    "slice_norm",
    "snip_scores",
    "sparsity",
    "squared_magnitude",
    "units",
]
