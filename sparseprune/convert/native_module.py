"""A torch module that runs its forward as a compiled native plan, keeping its own face.

convert() compiles a module (with compile's capture and lowering) and then changes the module's
class to a subclass of its own: the same object, so every attribute, child, parameter, `config`
and isinstance check model code relies on stays as it was; only `forward` now runs the executable.

A call the executable was not compiled for runs the module's own torch forward instead, with a
NativeFallbackWarning once per module and reason: other non-tensor arguments than at conversion
(e.g. output_attentions=True), an input of another dtype or outside the compiled shapes (a longer
sequence than the maximum), or inputs that require grad (the executable has no backward).
"""
from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from sparseprune.runtime import Executable

_NATIVE_CLASSES: Dict[type, type] = {}


class NativeFallbackWarning(UserWarning):
    """A natively converted module ran a call in torch, because the executable does not cover it."""


def _same_value(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, (bool, int, float, str, type(None))) and isinstance(b, (bool, int, float, str, type(None))):
        return type(a) is type(b) and a == b
    return False


class NativeCall:
    """How a module was called when it was compiled, and how to call its executable the same way.

    `tensors`: the argument names that were tensors (the executable's inputs, by name);
    `constants`: every other bound argument's value (defaults included) at conversion; a call must
    repeat them to run natively."""

    def __init__(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Mapping[str, Any], output: Any,
                 executable: Executable, num_threads: Optional[int]):
        self.signature = inspect.signature(type(module).forward)
        bound = self.bind(module, args, kwargs)
        self.tensors = [name for name, value in bound.items() if isinstance(value, torch.Tensor)]
        self.constants = {name: value for name, value in bound.items() if not isinstance(value, torch.Tensor)}
        self.dtypes = {name: bound[name].dtype for name in self.tensors}
        self.executable = executable
        self.input_names = executable.input_names
        self.num_threads = num_threads
        leaves, self.treespec = pytree.tree_flatten(output)
        self.tensor_leaves = [k for k, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        self.other_leaves = {k: leaf for k, leaf in enumerate(leaves) if not isinstance(leaf, torch.Tensor)}
        self.n_leaves = len(leaves)
        if len(self.tensor_leaves) != len(executable.output_names):
            raise ValueError(f"the module returns {len(self.tensor_leaves)} tensors, the executable "
                             f"{len(executable.output_names)}")
        self.warned: set = set()
        # The fast path of bind(): parameter names in order and their defaults (no *args / **kwargs).
        params = list(self.signature.parameters.values())[1:]
        plain = all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params)
        self.fast_names = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD] if plain else None
        self.fast_defaults = {p.name: p.default for p in params if p.default is not p.empty}
        self.all_names = {p.name for p in params}
        self.single_output = self.treespec.num_leaves == 1 and self.treespec.is_leaf() and bool(self.tensor_leaves)

    def __deepcopy__(self, memo: dict) -> "NativeCall":
        # A copied module shares the executable: immutable, thread-safe and not copyable.
        clone = copy.copy(self)
        clone.warned = set()
        return clone

    def bind(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Mapping[str, Any]) -> Dict[str, Any]:
        """The call's arguments by name, defaults included; *args / **kwargs catch-alls must be empty
        (compile never passes them) and are left out."""
        fast = getattr(self, "fast_names", None)
        if fast is not None and len(args) <= len(fast) and all(k in self.all_names for k in kwargs):
            # inspect.Signature.bind costs ~10 us a call: the same result for plain signatures
            bound = dict(zip(fast, args))
            for key, value in kwargs.items():
                if key in bound:
                    raise TypeError(f"multiple values for argument {key!r}")
                bound[key] = value
            for key, value in self.fast_defaults.items():
                bound.setdefault(key, value)
            if len(bound) != len(self.all_names):
                missing = sorted(self.all_names - set(bound))
                raise TypeError(f"missing argument(s) {missing}")
            return bound
        bound = self.signature.bind(module, *args, **kwargs)
        bound.apply_defaults()
        arguments = {}
        for k, (name, value) in enumerate(bound.arguments.items()):
            kind = self.signature.parameters[name].kind
            if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                if value:
                    raise TypeError(f"extra arguments {name}={value!r:.60}")
            elif k > 0:  # not self
                arguments[name] = value
        return arguments

    def arrays_for(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Mapping[str, Any]
                   ) -> Tuple[Optional[Tuple[List[np.ndarray], List[int]]], str]:
        """The plan's inputs and dim values for this call (checked as Executable.run checks them),
        or (None, why torch must run it)."""
        try:
            bound = self.bind(module, args, kwargs)
        except TypeError as exc:
            return None, f"arguments do not bind: {exc}"
        for name, value in self.constants.items():
            if not _same_value(bound.get(name), value):
                return None, f"argument {name}={bound.get(name)!r:.40} (compiled with {value!r:.40})"
        grad = torch.is_grad_enabled()
        arrays = []
        for name in self.input_names:
            value = bound.get(name)
            if not isinstance(value, torch.Tensor):
                return None, f"argument {name} is not a tensor (compiled with one)"
            if value.dtype != self.dtypes[name] or not value.is_cpu:
                return None, f"input {name} is {value.dtype} on {value.device} (compiled for {self.dtypes[name]} on cpu)"
            if grad and value.requires_grad:
                return None, "inputs require grad (the executable has no backward)"
            arrays.append(value.detach().numpy())
        try:  # shapes beyond the compiled ones (another rank, a longer sequence), ids out of range
            return self.executable._prepare(arrays, {}), ""
        except ValueError as exc:
            return None, str(exc)

    def outputs(self, flat: Sequence[np.ndarray]) -> Any:
        """The plan's outputs (in the executable's order) in the module's own structure, as tensors."""
        if self.single_output:
            return torch.from_numpy(flat[0])
        leaves: List[Any] = [self.other_leaves.get(k) for k in range(self.n_leaves)]
        for k, array in zip(self.tensor_leaves, flat):
            leaves[k] = torch.from_numpy(array)
        return pytree.tree_unflatten(leaves, self.treespec)


class NativeForward:
    """Placed first in a converted module's class: its forward runs the module's executable."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        call: NativeCall = self.__dict__["_sparseprune_native"]
        prepared, why = call.arrays_for(self, args, kwargs)
        if prepared is None:
            if why not in call.warned:
                call.warned.add(why)
                warnings.warn(f"{type(self).__name__}: running this call in torch, not natively: {why}",
                              NativeFallbackWarning, stacklevel=2)
            return super().forward(*args, **kwargs)
        # None: torch's count, as torch's own layers use (checked by resolve_threads at conversion)
        threads = call.num_threads if call.num_threads is not None else torch.get_num_threads()
        arrays, dims = prepared
        return call.outputs(call.executable._plan.run(arrays, threads, dims))

    @property
    def native_executable(self) -> Executable:
        """The executable this module's forward runs."""
        return self.__dict__["_sparseprune_native"].executable


def make_native(module: nn.Module, call: NativeCall) -> nn.Module:
    """Turn `module` (in place) into a module of a subclass of its own class whose forward runs
    `call`'s executable; returns it."""
    cls = type(module)
    native = _NATIVE_CLASSES.get(cls)
    if native is None:
        native = type(cls.__name__, (NativeForward, cls), {"__module__": cls.__module__,
                                                           "__qualname__": cls.__qualname__})
        _NATIVE_CLASSES[cls] = native
    module.__class__ = native
    module.__dict__["_sparseprune_native"] = call
    return module


def is_native(module: nn.Module) -> bool:
    return isinstance(module, NativeForward)


def make_torch(module: nn.Module) -> nn.Module:
    """Undo make_native in place: the module runs its own torch forward again; returns it."""
    if is_native(module):
        module.__class__ = type(module).__bases__[1]
        del module.__dict__["_sparseprune_native"]
    return module
