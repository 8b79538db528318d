"""Installing masks on modules, through torch.nn.utils.prune's reparametrisation.

A pruned parameter `name` becomes `name_orig` (the trainable Parameter), `name_mask` (a buffer)
and a forward pre-hook that sets `module.name = name_orig * name_mask` — exactly torch's layout,
so torch's `is_pruned`/`remove` understand modules pruned here, and modules pruned by torch can
be pruned further here (the current mask is the starting point).
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune


class InstalledMask(torch_prune.BasePruningMethod):
    """The hook torch keeps for a mask computed by sparseprune.

    It multiplies the mask computed by a sparseprune method into the current one when torch's
    machinery installs it, then drops its copy: torch only ever recomputes the newest method of
    a parameter, so the hooks of earlier rounds need not hold a mask each. `description` records
    what computed the mask.
    """

    PRUNING_TYPE = "global"  # the mask covers the whole tensor

    def __init__(self, mask: Tensor, description: str = "") -> None:
        self._pending: Optional[Tensor] = mask
        self.description = description

    def compute_mask(self, t: Tensor, default_mask: Tensor) -> Tensor:
        if self._pending is None:
            raise RuntimeError(f"the mask of {self!r} was installed already and cannot be recomputed")
        return default_mask * self._pending.to(device=default_mask.device, dtype=default_mask.dtype)

    def __repr__(self) -> str:
        return f"InstalledMask({self.description})"


def _check_module(module: object, arg: str = "module") -> nn.Module:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{arg} must be an nn.Module, got {type(module).__name__}")
    return module


def wrapper_layers(model: nn.Module, kind: type) -> List[Tuple[str, nn.Module]]:
    """(qualified name, module) for every `kind` wrapper in the model (channel gates,
    beta-Bernoulli dropout: the modules a learned-mask method wraps layers in)."""
    return [(name, m) for name, m in _check_module(model, "model").named_modules() if isinstance(m, kind)]


def require_wrapper_layers(model: nn.Module, kind: type, add_call: str) -> List[Tuple[str, nn.Module]]:
    """wrapper_layers(model, kind), or ValueError saying which call adds them."""
    found = wrapper_layers(model, kind)
    if not found:
        raise ValueError(f"model ({type(model).__name__}) has no {kind.__name__} layer: call {add_call}(model) first")
    return found


def pruning_hook(module: nn.Module, name: str) -> Optional[torch_prune.BasePruningMethod]:
    """torch's pruning hook for parameter `name` of `module`, or None if it is not pruned."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, torch_prune.BasePruningMethod) and hook._tensor_name == name:
            return hook
    return None


def has_parameter(module: nn.Module, name: str) -> bool:
    """Whether `module` has a prunable parameter `name` (plain, or already pruned)."""
    if pruning_hook(module, name) is not None:
        return True
    return module._parameters.get(name) is not None and name + "_orig" not in module._parameters


def parameter_state(module: object, name: object) -> Tuple[Tensor, Tensor]:
    """(original values, current mask) of parameter `name`; the mask is all ones if unpruned.

    Raises TypeError/ValueError naming the module type and the parameter when it cannot be pruned.
    """
    module = _check_module(module)
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    kind = type(module).__name__
    if pruning_hook(module, name) is not None:
        orig = module._parameters.get(name + "_orig")
        mask = module._buffers.get(name + "_mask")
        if orig is None or mask is None or mask.shape != orig.shape:
            raise ValueError(f"{kind} has a pruning hook for {name!r} but no matching {name}_orig/{name}_mask")
        return orig, mask.detach()
    if name + "_orig" in module._parameters:
        raise ValueError(f"{kind} has {name}_orig but no pruning hook for {name!r}; cannot prune it")
    param = module._parameters.get(name)
    if param is None:
        raise ValueError(f"{kind} has no parameter named {name!r}")
    return param, torch.ones_like(param, memory_format=torch.contiguous_format).detach()


def effective_weight(orig: Tensor, mask: Tensor) -> Tensor:
    """The values the module computes with: original times mask, without gradient."""
    return orig.detach() * mask


def install_mask(module: nn.Module, name: str, mask: Tensor, description: str = "") -> None:
    """Make `mask` (combined with any current mask) the mask of parameter `name`, via torch."""
    hook = InstalledMask.apply(module, name, mask=mask, description=description)
    installed = hook[-1] if isinstance(hook, torch_prune.PruningContainer) else hook
    installed._pending = None


def pruned_parameters(model: nn.Module) -> Iterator[Tuple[str, nn.Module, str]]:
    """(module path, module, parameter name) for every parameter pruned through torch's hooks."""
    for path, module in model.named_modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, torch_prune.BasePruningMethod):
                yield path, module, hook._tensor_name


def is_pruned(module: nn.Module) -> bool:
    """Whether `module` or any of its submodules has a pruned parameter (as torch sees it)."""
    return torch_prune.is_pruned(_check_module(module))


def remove(model_or_module: nn.Module) -> nn.Module:
    """Make every pruning in the model permanent and return it.

    Each pruned parameter becomes a plain Parameter again, holding the masked values (the same
    Parameter object as `name_orig`, so optimizers keep tracking it); `name_orig`, `name_mask`
    and the hooks are gone. Works on modules pruned by sparseprune or by torch.nn.utils.prune.
    A model with nothing pruned is returned unchanged.
    """
    model = _check_module(model_or_module, "model_or_module")
    targets: List[Tuple[nn.Module, str]] = [(m, n) for _, m, n in pruned_parameters(model)]
    for module, name in targets:
        torch_prune.remove(module, name)
    return model
