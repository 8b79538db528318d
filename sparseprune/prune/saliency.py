"""Data-driven saliency: Optimal Brain Damage (Hessian diagonal) and pruning at initialisation (SNIP).

Both score each weight by what the loss on some data says about it, then drop the lowest scores
through the same masks as every other method (`MagnitudeUnstructured`'s rule on these scores,
installed with torch.nn.utils.prune's reparametrisation):

  * `hessian_diagonal` estimates diag(H) of the mean loss over `batches`, exactly (one
    Hessian-vector product per coordinate, small parameter sets only), with Hutchinson's
    estimator E[z * Hz] over Rademacher probes z, or as the empirical Fisher diagonal (mean
    squared per-sample gradient);
  * `obd` prunes the weights with the lowest saliency 1/2 * h_ii * w_i^2 (LeCun et al., 1990),
    by default with the empirical Fisher diagonal: nonnegative, as the Gauss-Newton diagonal of
    the paper is. Hutchinson's estimate ("hutchinson") keeps its sign and its noise: at 8 probes
    36% of the digits MLP's estimates were negative (the exact diagonal has none) and ranked
    first, so OBD removed large weights that matter;
  * `at_init` prunes an untrained network at random, by magnitude, or by SNIP's connection
    sensitivity |dL/dw * w| (Lee et al., 2019), computed by `snip_scores`.

Global rankings (`global_=True`, the default) take `min_kept`, a share of every layer that
survives, and warn when a layer would be emptied (`sparseprune.prune.api.global_masks`).

Derivatives are taken with respect to the trainable tensors (`weight_orig` for a pruned layer),
at the effective weights (`weight_orig * weight_mask`). So masked entries have a zero gradient,
a zero Hessian diagonal and a zero saliency, and they stay pruned. OBD measures a trained model
in eval mode (no dropout; BatchNorm uses its running statistics). SNIP measures an untrained one
as its training will see it: BatchNorm in training mode, normalising with the scoring batch's
own statistics (at init the running statistics are 0 and 1, not the data's), and its running
statistics are restored afterwards. Parameters, buffers and `.grad` fields are left as they
were, and so is the train/eval mode.
Everything is checked and computed before the first mask is installed, so on an error the model
is left as it was.
"""
from __future__ import annotations

import contextlib
import numbers
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

from sparseprune.prune.amount import Amount, check_amount
from sparseprune.prune.api import LayerTypes, check_layer_types, check_min_kept, global_masks
from sparseprune.prune.importance import l1_magnitude, random_scores
from sparseprune.prune.methods import GeneratorLike, MagnitudeUnstructured, make_generator
from sparseprune.prune.reparam import _check_module, effective_weight, has_parameter, install_mask, parameter_state

HESSIAN_METHODS = ("hutchinson", "exact", "fisher")
OBD_DEFAULT_HESSIAN = "fisher"  # nonnegative; "hutchinson" is the signed estimate, by name
AT_INIT_METHODS = ("random", "magnitude", "snip")

# method="exact" costs one Hessian-vector product per coordinate: refused above this many.
EXACT_MAX_PARAMS = 20_000

# Batched Hessian-vector products hold this many vectors of the parameters' size at once (at most).
HVP_BUDGET = 1 << 22  # elements
PROBE_CHUNK = 16  # Hutchinson probes per batched product
FISHER_CHUNK = 64  # samples per vmapped per-sample-gradient call

LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = Tuple[Tensor, Tensor]


# ---------------------------------------------------------------------------------------------
# Importance functions (same style as sparseprune.prune.importance: detached, at least float32)


def _at_least_float32(t: Tensor) -> Tensor:
    t = t.detach()
    if t.is_floating_point():
        return t.to(torch.promote_types(t.dtype, torch.float32))
    return t.to(torch.float32)


def _check_same_shape(a: Tensor, b: Tensor, what: str) -> None:
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError(f"{what} must be tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.shape != b.shape:
        raise ValueError(f"{what} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def obd_saliency(weight: Tensor, hdiag: Tensor) -> Tensor:
    """Optimal Brain Damage saliency 1/2 * h_ii * w_i^2 for every entry.

    The second-order estimate of how much the loss grows when w_i alone is set to zero, at a
    minimum (zero gradient). A negative Hessian diagonal (non-convex loss, or estimator noise)
    gives a negative saliency, which is pruned first.
    """
    _check_same_shape(weight, hdiag, "weight and hdiag")
    w = _at_least_float32(weight)
    return 0.5 * _at_least_float32(hdiag).to(w.device) * w.square()


def connection_sensitivity(weight: Tensor, grad: Tensor) -> Tensor:
    """SNIP's connection sensitivity |g_i * w_i|: the first-order change of the loss when w_i is
    removed."""
    _check_same_shape(weight, grad, "weight and grad")
    w = _at_least_float32(weight)
    return (_at_least_float32(grad).to(w.device) * w).abs()


# ---------------------------------------------------------------------------------------------
# Argument checks


def _check_choice(value: object, choices: Sequence[str], arg: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{arg} must be one of {tuple(choices)}, got {value!r}")
    return value


def _check_loss_fn(loss_fn: object) -> LossFn:
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(output, y), got {type(loss_fn).__name__}")
    return loss_fn  # type: ignore[return-value]


def _check_batch(item: object, arg: str, index: int) -> Batch:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise TypeError(f"{arg} must yield (x, y) pairs of tensors, got {type(item).__name__} at batch {index}")
    x, y = item
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(
            f"{arg} must yield (x, y) pairs of tensors, got ({type(x).__name__}, {type(y).__name__}) "
            f"at batch {index}"
        )
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{arg}: batch {index} has no samples (x has shape {tuple(x.shape)})")
    if y.dim() < 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"{arg}: batch {index} has {x.shape[0]} inputs but y has shape {tuple(y.shape)}"
        )
    return x, y


def _as_batches(data: object, arg: str) -> List[Batch]:
    """A list of checked (x, y) batches from one (x, y) pair or an iterable of them."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return [_check_batch(data, arg, 0)]
    if isinstance(data, (Tensor, str, bytes)) or data is None:
        raise TypeError(f"{arg} must be an (x, y) pair of tensors or an iterable of them, got {type(data).__name__}")
    try:
        items = iter(data)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(
            f"{arg} must be an (x, y) pair of tensors or an iterable of them, got {type(data).__name__}"
        ) from None
    batches = [_check_batch(item, arg, i) for i, item in enumerate(items)]
    if not batches:
        raise ValueError(f"{arg} holds no (x, y) batches")
    return batches


def _check_params(model: nn.Module, params: Optional[Iterable[nn.Parameter]]) -> List[nn.Parameter]:
    owned = list(model.parameters())  # deduplicated by torch
    if params is None:
        if not owned:
            raise ValueError("model has no parameters")
        return owned
    if isinstance(params, Tensor):
        params = [params]
    try:
        given = list(params)
    except TypeError:
        raise TypeError(
            f"params must be an iterable of the model's parameters, got {type(params).__name__}"
        ) from None
    owned_ids = {id(p) for p in owned}
    result, seen = [], set()
    for p in given:
        if not isinstance(p, nn.Parameter) or id(p) not in owned_ids:
            shape = tuple(p.shape) if isinstance(p, Tensor) else ""
            raise ValueError(f"params must hold parameters of the model, got {type(p).__name__} {shape}".rstrip())
        if id(p) not in seen:
            seen.add(id(p))
            result.append(p)
    if not result:
        raise ValueError("params is empty")
    return result


def _check_n_samples(n_samples: object) -> int:
    if not isinstance(n_samples, numbers.Integral) or isinstance(n_samples, bool) or int(n_samples) < 1:
        raise ValueError(f"n_samples must be an int >= 1, got {n_samples!r}")
    return int(n_samples)


def _generator_from(seed: object, arg: str) -> Optional[torch.Generator]:
    try:
        return make_generator(seed)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{arg} must be None, an int seed or a torch.Generator, got {seed!r}") from None


def _targets(model: nn.Module, layer_types: LayerTypes) -> List[Tuple[nn.Module, str]]:
    types = check_layer_types(layer_types)
    targets = [(m, "weight") for m in model.modules() if isinstance(m, types) and has_parameter(m, "weight")]
    if not targets:
        kinds = ", ".join(t.__name__ for t in types)
        raise ValueError(f"nothing to prune: no module of layer_types ({kinds}) with a 'weight' in the model")
    return targets


def _labels(model: nn.Module, targets: Sequence[Tuple[nn.Module, str]]) -> List[str]:
    """'name.weight' of each target (for warnings), from the model's module names."""
    names = {id(m): n or type(m).__name__ for n, m in model.named_modules()}
    return [f"{names.get(id(m), type(m).__name__)}.{p}" for m, p in targets]


# ---------------------------------------------------------------------------------------------
# Measuring the model without changing it


def _refresh_pruned_attributes(model: nn.Module) -> None:
    """Recompute `module.name = name_orig * name_mask` for every pruned parameter, as torch does
    when it installs a mask: a forward under torch.func leaves a transformed tensor there."""
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, torch_prune.BasePruningMethod):
                setattr(module, hook._tensor_name, hook.apply_mask(module))


@contextlib.contextmanager
def _measuring(model: nn.Module, params: Sequence[nn.Parameter], batchnorm_train: bool = False) -> Iterator[None]:
    """Eval mode (BatchNorm layers in training mode when `batchnorm_train`), gradients on, every
    parameter in `params` requiring grad; all restored after, BatchNorm running statistics too."""
    was_training = {m: m.training for m in model.modules()}
    requires = [p.requires_grad for p in params]
    model.eval()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if batchnorm_train else []
    saved = [{k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None} for m in norms]
    for m in norms:
        m.train()
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, r in zip(params, requires):
            p.requires_grad_(r)
        for m, mode in was_training.items():
            m.training = mode
        with torch.no_grad():
            for m, buffers in zip(norms, saved):
                for k, value in buffers.items():
                    getattr(m, k).copy_(value)
            _refresh_pruned_attributes(model)


def _loss_of(output: Tensor, loss_fn: LossFn, y: Tensor) -> Tensor:
    loss = loss_fn(output, y)
    if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar floating-point tensor (mean over the batch), got {shape}")
    return loss.reshape(())


def _loss(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> Tensor:
    return _loss_of(model(x), loss_fn, y)


def _zeros_like(params: Sequence[nn.Parameter]) -> List[Tensor]:
    return [torch.zeros_like(p, memory_format=torch.contiguous_format).detach() for p in params]


def _batched_vjp(outputs: Sequence[Tensor], inputs: Sequence[Tensor], vectors: Sequence[Tensor]) -> List[Tensor]:
    """sum_k d(outputs[k] . vectors[k][b]) / d inputs for every b along the vectors' first dim.

    One vmapped backward (is_grads_batched) when torch can batch it, else one backward per b.
    Inputs that the outputs do not depend on get zeros. Keeps the graph.
    """
    batch = vectors[0].shape[0]
    try:
        grads = torch.autograd.grad(
            outputs, inputs, grad_outputs=list(vectors), retain_graph=True, allow_unused=True, is_grads_batched=True
        )
    except (RuntimeError, NotImplementedError):  # an op without a batching rule: one at a time
        rows = [
            torch.autograd.grad(
                outputs, inputs, grad_outputs=[v[b] for v in vectors], retain_graph=True, allow_unused=True
            )
            for b in range(batch)
        ]
        grads = tuple(
            None if rows[0][i] is None else torch.stack([r[i] for r in rows]) for i in range(len(inputs))
        )
    return [
        torch.zeros((batch,) + tuple(p.shape), dtype=p.dtype, device=p.device) if g is None else g.detach()
        for g, p in zip(grads, inputs)
    ]


def _first_order(loss: Tensor, params: Sequence[nn.Parameter], create_graph: bool) -> List[Optional[Tensor]]:
    return list(torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True))


def _exact_diagonal(
    model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch], params: Sequence[nn.Parameter], total: int
) -> List[Tensor]:
    diag = _zeros_like(params)
    for x, y in batches:
        weight = x.shape[0] / total
        grads = _first_order(_loss(model, loss_fn, x, y), params, create_graph=True)
        for k, (p, g) in enumerate(zip(params, grads)):
            if g is None or not g.requires_grad:
                continue  # the loss is at most linear in p: its Hessian block is zero
            n = p.numel()
            chunk = max(1, min(n, HVP_BUDGET // max(n, 1)))
            flat = diag[k].view(-1)
            for start in range(0, n, chunk):
                idx = torch.arange(start, min(n, start + chunk), device=p.device)
                basis = torch.zeros((idx.numel(), n), dtype=p.dtype, device=p.device)
                basis[torch.arange(idx.numel()), idx] = 1
                (columns,) = _batched_vjp([g], [p], [basis.view((idx.numel(),) + tuple(p.shape))])
                flat[idx] += weight * columns.reshape(idx.numel(), n)[torch.arange(idx.numel()), idx]
    return diag


def _rademacher(shape: Tuple[int, ...], like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    device = generator.device if generator is not None else like.device
    z = torch.randint(0, 2, shape, generator=generator, device=device)
    return (z * 2 - 1).to(device=like.device, dtype=like.dtype)


def _hutchinson_diagonal(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    params: Sequence[nn.Parameter],
    total: int,
    n_samples: int,
    generator: Optional[torch.Generator],
) -> List[Tensor]:
    diag = _zeros_like(params)
    for x, y in batches:
        weight = x.shape[0] / total
        grads = _first_order(_loss(model, loss_fn, x, y), params, create_graph=True)
        live = [k for k, g in enumerate(grads) if g is not None and g.requires_grad]
        if not live:
            continue
        outputs = [grads[k] for k in live]
        for start in range(0, n_samples, PROBE_CHUNK):
            b = min(PROBE_CHUNK, n_samples - start)
            # one probe z over all parameters; entries of p whose gradient is constant add nothing to Hz
            probes = [_rademacher((b,) + tuple(p.shape), p, generator) for p in params]
            hz = _batched_vjp(outputs, params, [probes[k] for k in live])
            for k in range(len(params)):
                diag[k] += (weight / n_samples) * (probes[k] * hz[k]).sum(dim=0)
    return diag


def _fisher_loop(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, params: Sequence[nn.Parameter]
) -> List[Tensor]:
    """Sum over the samples of (d loss_i / d p)^2, one backward per sample."""
    sums = _zeros_like(params)
    for i in range(x.shape[0]):
        grads = _first_order(_loss(model, loss_fn, x[i:i + 1], y[i:i + 1]), params, create_graph=False)
        for s, g in zip(sums, grads):
            if g is not None:
                s += g.detach().square()
    return sums


def _fisher_vmap(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, params: Sequence[nn.Parameter]
) -> List[Tensor]:
    """As _fisher_loop, with per-sample gradients from torch.func (vmap over grad)."""
    from torch.func import functional_call, grad, vmap

    names = {id(p): name for name, p in model.named_parameters()}
    keys = [names[id(p)] for p in params]

    def sample_loss(values: Dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return _loss_of(functional_call(model, values, (xi.unsqueeze(0),)), loss_fn, yi.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    sums = _zeros_like(params)
    values = {k: p.detach() for k, p in zip(keys, params)}
    with torch.no_grad():  # torch.func.grad still differentiates; no graph for the other tensors
        for start in range(0, x.shape[0], FISHER_CHUNK):
            grads = per_sample(values, x[start:start + FISHER_CHUNK], y[start:start + FISHER_CHUNK])
            for s, k in zip(sums, keys):
                s += grads[k].square().sum(dim=0)
    return sums


def _fisher_diagonal(
    model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch], params: Sequence[nn.Parameter], total: int
) -> List[Tensor]:
    diag = _zeros_like(params)
    use_vmap = True
    for x, y in batches:
        sums = None
        if use_vmap:
            # loss_fn is checked on the whole batch first (a per-sample loss is not a scalar there),
            # in plain autograd, so its error is not mistaken for a vmap limit
            with torch.no_grad():
                _loss(model, loss_fn, x, y)
            try:
                sums = _fisher_vmap(model, loss_fn, x, y, params)
            except (RuntimeError, NotImplementedError):  # an op torch.func cannot batch: loop instead
                use_vmap = False
        if sums is None:
            sums = _fisher_loop(model, loss_fn, x, y, params)
        for d, s in zip(diag, sums):
            d += s / total
    return diag


def hessian_diagonal(
    model: nn.Module,
    loss_fn: LossFn,
    batches: object,
    *,
    method: str = "hutchinson",
    params: Optional[Iterable[nn.Parameter]] = None,
    n_samples: int = 16,
    generator: GeneratorLike = None,
) -> Dict[nn.Parameter, Tensor]:
    """The diagonal of the Hessian of the loss over `batches`, for each parameter in `params`.

    `batches` is one (x, y) pair of tensors or an iterable of them; the loss is
    `loss_fn(model(x), y)`, which must be a mean over the batch, and batches are weighted by
    their size (so the result is for the mean loss over all the samples). `params` defaults to
    every parameter of the model; for a pruned layer pass its `weight_orig`. Returns
    {parameter: tensor of its shape}, detached.

    method:
      * "exact": exact diagonal, one Hessian-vector product (double backward) per coordinate,
        batched; refused (ValueError) above EXACT_MAX_PARAMS entries in `params`;
      * "hutchinson": unbiased estimate mean(z * Hz) over `n_samples` Rademacher probes z per
        batch (exact Hessian-vector products); probes come from `generator` (None for torch's
        RNG, an int seed or a torch.Generator);
      * "fisher": the empirical Fisher diagonal, mean of squared per-sample gradients (each sample
        through loss_fn alone), a nonnegative stand-in for the Hessian near a minimum.
    """
    model = _check_module(model, "model")
    loss_fn = _check_loss_fn(loss_fn)
    method = _check_choice(method, HESSIAN_METHODS, "method")
    n_samples = _check_n_samples(n_samples)
    generator = _generator_from(generator, "generator")
    plist = _check_params(model, params)
    data = _as_batches(batches, "batches")
    return _hessian_diagonal(model, loss_fn, data, method, plist, n_samples, generator)


def _hessian_diagonal(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    method: str,
    params: List[nn.Parameter],
    n_samples: int,
    generator: Optional[torch.Generator],
    arg: str = "method",
) -> Dict[nn.Parameter, Tensor]:
    if method == "exact":
        count = sum(p.numel() for p in params)
        if count > EXACT_MAX_PARAMS:
            raise ValueError(
                f"{arg}='exact' needs one Hessian-vector product per entry and is limited to "
                f"{EXACT_MAX_PARAMS} entries; the weights hold {count}: use {arg}='hutchinson' or "
                f"'fisher'" + (", or pass fewer params" if arg == "method" else "")
            )
    total = sum(x.shape[0] for x, _ in batches)
    with _measuring(model, params):
        if method == "exact":
            diag = _exact_diagonal(model, loss_fn, batches, params, total)
        elif method == "hutchinson":
            diag = _hutchinson_diagonal(model, loss_fn, batches, params, total, n_samples, generator)
        else:
            diag = _fisher_diagonal(model, loss_fn, batches, params, total)
    return {p: d for p, d in zip(params, diag)}


def _mean_gradient(
    model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch], params: List[nn.Parameter],
    batchnorm_train: bool = False,
) -> List[Tensor]:
    """Gradient of the mean loss over all samples of `batches` (batches weighted by size)."""
    total = sum(x.shape[0] for x, _ in batches)
    result = _zeros_like(params)
    with _measuring(model, params, batchnorm_train):
        for x, y in batches:
            grads = _first_order(_loss(model, loss_fn, x, y), params, create_graph=False)
            for r, g in zip(result, grads):
                if g is not None:
                    r += g.detach() * (x.shape[0] / total)
    return result


# ---------------------------------------------------------------------------------------------
# Pruning by precomputed scores


def _prune_by_scores(
    targets: Sequence[Tuple[nn.Module, str]],
    scores: Sequence[Tensor],
    amount: Amount,
    global_: bool,
    description: str,
    min_kept: float = 0.0,
    labels: Optional[Sequence[str]] = None,
) -> None:
    """Drop the lowest `scores` (one tensor per target) to a total of `amount`, across all
    targets (`global_`, each keeping at least `min_kept` of its entries) or in each; every mask is
    computed before the first is installed."""
    method = MagnitudeUnstructured()
    masks = [parameter_state(module, name)[1] for module, name in targets]
    for (module, name), s, mask in zip(targets, scores, masks):
        if s.shape != mask.shape:
            raise ValueError(f"scores for {type(module).__name__}.{name} have shape {tuple(s.shape)}, "
                             f"expected {tuple(mask.shape)}")
    if global_:
        new_masks = global_masks(scores, masks, amount, method, min_kept, labels)
        description = f"global {description} over {len(targets)} tensors"
    else:
        new_masks = [method.compute_mask(s.to(m.device), m, amount) for s, m in zip(scores, masks)]
    for (module, name), new in zip(targets, new_masks):
        install_mask(module, name, new, description)


def _check_global(global_: object) -> bool:
    if not isinstance(global_, bool):
        raise TypeError(f"global_ must be a bool, got {type(global_).__name__}")
    return global_


def obd(
    model: nn.Module,
    amount: Amount,
    data: object,
    *,
    loss_fn: LossFn = F.cross_entropy,
    hessian: str = OBD_DEFAULT_HESSIAN,
    layer_types: LayerTypes = (nn.Linear, nn.Conv2d),
    global_: bool = True,
    n_samples: int = 16,
    generator: GeneratorLike = None,
    min_kept: float = 0.0,
) -> nn.Module:
    """Optimal Brain Damage: prune the weights with the lowest saliency 1/2 * h_ii * w_i^2.

    The Hessian diagonal h of the mean loss over `data` (an (x, y) pair or an iterable of them)
    is estimated at the current, masked weights with `hessian_diagonal(method=hessian)`:
    "fisher" (default: the empirical Fisher diagonal, never negative, LeCun et al.'s
    nonnegative Gauss-Newton stand-in), "exact" (small models), or "hutchinson", the signed
    estimate from `n_samples` probes per batch drawn from `generator` (negative estimates rank
    first). Call it again after training to re-estimate (the paper's prune-retrain loop).
    `amount` (a count or a fraction, the total pruned as for every method) is taken across all
    those weights with one ranking (`global_=True`, every layer keeping at least `min_kept` of
    its weights; a warning names a layer the ranking empties) or in each layer. Weights pruned
    before have saliency 0 and stay pruned. Returns `model`.
    """
    model = _check_module(model, "model")
    check_amount(amount)
    loss_fn = _check_loss_fn(loss_fn)
    hessian = _check_choice(hessian, HESSIAN_METHODS, "hessian")
    global_ = _check_global(global_)
    min_kept = check_min_kept(min_kept)
    n_samples = _check_n_samples(n_samples)
    generator = _generator_from(generator, "generator")
    targets = _targets(model, layer_types)
    batches = _as_batches(data, "data")
    states = [parameter_state(module, name) for module, name in targets]
    params = [orig for orig, _ in states]
    diag = _hessian_diagonal(model, loss_fn, batches, hessian, params, n_samples, generator, "hessian")
    scores = [obd_saliency(effective_weight(orig, mask), diag[orig]) for orig, mask in states]
    _prune_by_scores(targets, scores, amount, global_, f"OBD (hessian={hessian!r}), amount={amount!r}", min_kept,
                     _labels(model, targets))
    return model


def snip_scores(
    model: nn.Module,
    data: object,
    loss_fn: LossFn = F.cross_entropy,
    *,
    layer_types: LayerTypes = (nn.Linear, nn.Conv2d),
) -> Dict[nn.Module, Tensor]:
    """SNIP connection sensitivity |dL/dw * w| of the weight of every module of `layer_types`.

    L is the mean loss over `data` (one (x, y) pair or an iterable of them), at the current,
    masked weights (so entries pruned before score 0), with BatchNorm in training mode (batch
    statistics, as training will run it; running statistics restored). Returns {module: scores
    of its weight's shape}, in at least float32.
    """
    model = _check_module(model, "model")
    loss_fn = _check_loss_fn(loss_fn)
    targets = _targets(model, layer_types)
    batches = _as_batches(data, "data")
    return _snip_scores(model, loss_fn, targets, batches)


def _snip_scores(
    model: nn.Module, loss_fn: LossFn, targets: Sequence[Tuple[nn.Module, str]], batches: Sequence[Batch]
) -> Dict[nn.Module, Tensor]:
    states = [parameter_state(module, name) for module, name in targets]
    grads = _mean_gradient(model, loss_fn, batches, [orig for orig, _ in states], batchnorm_train=True)
    return {
        module: connection_sensitivity(effective_weight(orig, mask), g)
        for (module, _), (orig, mask), g in zip(targets, states, grads)
    }


def at_init(
    model: nn.Module,
    amount: Amount,
    method: str = "random",
    data: object = None,
    loss_fn: LossFn = F.cross_entropy,
    seed: GeneratorLike = None,
    *,
    layer_types: LayerTypes = (nn.Linear, nn.Conv2d),
    global_: bool = True,
    min_kept: float = 0.0,
) -> nn.Module:
    """Prune a network before training ("from scratch"); returns `model`.

    The name documents intent: the training state is not checked. `method`:
      * "random": uniformly at random, drawn from `seed` (None for torch's RNG, an int or a
        torch.Generator), so a seed reproduces the masks;
      * "magnitude": smallest |w| first;
      * "snip": lowest connection sensitivity |dL/dw * w| on `data` (one (x, y) batch or a few;
        required), see `snip_scores`.
    The weights of every module of `layer_types` are ranked together (`global_=True`; one
    threshold, so layers end up with different sparsities, each keeping at least `min_kept` of
    its weights; a warning names a layer the ranking empties, as magnitude at init does to a
    classifier whose initial weights are smaller) or each layer loses `amount`. `data` and
    `loss_fn` are used by "snip" only.
    """
    model = _check_module(model, "model")
    check_amount(amount)
    method = _check_choice(method, AT_INIT_METHODS, "method")
    global_ = _check_global(global_)
    min_kept = check_min_kept(min_kept)
    generator = _generator_from(seed, "seed")
    targets = _targets(model, layer_types)
    if method == "snip":
        if data is None:
            raise ValueError("method='snip' needs data: pass data=(x, y) (one or a few batches)")
        loss_fn = _check_loss_fn(loss_fn)
        by_module = _snip_scores(model, loss_fn, targets, _as_batches(data, "data"))
        scores = [by_module[module] for module, _ in targets]
    else:
        weights = [effective_weight(*parameter_state(module, name)) for module, name in targets]
        if method == "random":
            scores = [random_scores(w, generator) for w in weights]
        else:
            scores = [l1_magnitude(w) for w in weights]
    _prune_by_scores(targets, scores, amount, global_, f"at_init({method!r}), amount={amount!r}", min_kept,
                     _labels(model, targets))
    return model
