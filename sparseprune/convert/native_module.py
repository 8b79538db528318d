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
from typing import Any, Dict, List, Mapping, Optional, Tuple

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
        self.num_threads = num_threads
        leaves, self.treespec = pytree.tree_flatten(output)
        self.tensor_leaves = [k for k, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        self.other_leaves = {k: leaf for k, leaf in enumerate(leaves) if not isinstance(leaf, torch.Tensor)}
        self.n_leaves = len(leaves)
        if len(self.tensor_leaves) != len(executable.output_names):
            raise ValueError(f"the module returns {len(self.tensor_leaves)} tensors, the executable "
                             f"{len(executable.output_names)}")
        self.warned: set = set()

    def __deepcopy__(self, memo: dict) -> "NativeCall":
        # A copied module shares the executable: immutable, thread-safe and not copyable.
        clone = copy.copy(self)
        clone.warned = set()
        return clone

    def bind(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Mapping[str, Any]) -> Dict[str, Any]:
        """The call's arguments by name, defaults included; *args / **kwargs catch-alls must be empty
        (compile never passes them) and are left out."""
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
                   ) -> Tuple[Optional[Dict[str, np.ndarray]], str]:
        """The executable's inputs for this call, or (None, why torch must run it)."""
        try:
            bound = self.bind(module, args, kwargs)
        except TypeError as exc:
            return None, f"arguments do not bind: {exc}"
        for name, value in self.constants.items():
            if not _same_value(bound.get(name), value):
                return None, f"argument {name}={bound.get(name)!r:.40} (compiled with {value!r:.40})"
        arrays = {}
        for name in self.tensors:
            value = bound.get(name)
            if not isinstance(value, torch.Tensor):
                return None, f"argument {name} is not a tensor (compiled with one)"
            if value.dtype != self.dtypes[name] or value.device.type != "cpu":
                return None, f"input {name} is {value.dtype} on {value.device} (compiled for {self.dtypes[name]} on cpu)"
            if value.requires_grad and torch.is_grad_enabled():
                return None, "inputs require grad (the executable has no backward)"
            arrays[name] = value.detach().numpy()
        layout = self.executable._layout
        env: Dict[str, int] = {}
        try:
            for k, name in enumerate(self.executable.input_names):
                layout.match_input(k, arrays[name].shape, env)
        except ValueError as exc:
            return None, str(exc)
        return arrays, ""

    def outputs(self, result: Any) -> Any:
        """The executable's result in the module's own output structure, as tensors."""
        if isinstance(result, dict):
            flat = [result[name] for name in self.executable.output_names]
        elif isinstance(result, (tuple, list)):
            flat = list(result)
        else:
            flat = [result]
        leaves: List[Any] = [self.other_leaves.get(k) for k in range(self.n_leaves)]
        for k, array in zip(self.tensor_leaves, flat):
            leaves[k] = torch.from_numpy(array)
        return pytree.tree_unflatten(leaves, self.treespec)


class NativeForward:
    """Placed first in a converted module's class: its forward runs the module's executable."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        call: NativeCall = self.__dict__["_sparseprune_native"]
        arrays, why = call.arrays_for(self, args, kwargs)
        if arrays is None:
            if why not in call.warned:
                call.warned.add(why)
                warnings.warn(f"{type(self).__name__}: running this call in torch, not natively: {why}",
                              NativeFallbackWarning, stacklevel=2)
            return super().forward(*args, **kwargs)
        threads = call.num_threads if call.num_threads is not None else torch.get_num_threads()
        return call.outputs(call.executable.run(n_threads=threads, **arrays))

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
