"""Executable: a whole model as one native plan, with a one-file format and strict input checks.

The file is a safetensors file: the weight arrays as tensors plus the JSON spec in the header's
metadata under "sparseprune_spec". Loading parses JSON and raw little-endian arrays only (no
pickle, no code), validates the whole spec in Python (spec.validate) and then again natively,
so a truncated, corrupted or hostile file ends in a ValueError.

numpy only: this module must not import torch.
"""
from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from sparseprune._native import _C, aligned
from sparseprune.config import check_threads, resolve_threads
from sparseprune.runtime import limits as _limits
from sparseprune.runtime.limits import COST_KEY, Cost, Limits, LimitExceeded, check_limits
from sparseprune.runtime.signature import bind_inputs, structure_outputs
from sparseprune.runtime.spec import SPEC_FORMAT, SpecError, batch_shape_str, shape_json, stored_kernel, validate

SPEC_KEY = "sparseprune_spec"  # safetensors metadata key holding the JSON spec
# "int64" inputs travel to the native plan as float32, which holds every integer of magnitude up
# to 2**24 exactly: an input that indexes an embedding must hold row numbers [0, rows), any other
# int64 input values in [-MAX_INT_INPUT, MAX_INT_INPUT].
MAX_INT_INPUT = 1 << 24
# Costs kept per executable for recent dim assignments (a service sees few lengths at a time).
_COST_CACHE = 64

PathLike = Union[str, "os.PathLike[str]"]


class Executable:
    """A compiled model: run(*inputs) executes every op in one native call with the GIL released.

    Build one with sparseprune.compile(model, example_inputs), Executable.from_spec(spec, arrays)
    or sparseprune.runtime.load(path). One Executable may be shared by many threads: each call
    gets its own scratch buffers. Inputs are numpy arrays [batch, *input_shapes[k]], any batch
    size (including 0 and 1): float32, or for an input the spec marks "int64" (input_dtypes; token
    ids) an array of any integer dtype with values in [0, 2**24), or for a "bool" input (an
    attention padding mask, True = padding) a bool array.

    A spec with dims (see sparseprune.runtime.spec) serves every size in the dims' ranges from one
    plan: input_shapes then hold dim names ("seq") or [k, "seq"] entries, run() reads the dims'
    values off the inputs and does only the work of those sizes, and the outputs get the concrete
    shapes.
    """

    def __init__(self, *args, **kwargs):
        raise TypeError("use sparseprune.compile(), Executable.from_spec() or sparseprune.runtime.load()")

    @classmethod
    def from_spec(cls, spec: Union[Mapping[str, Any], str], arrays: Mapping[str, np.ndarray], *,
                  n_threads: Optional[int] = None, limits: Optional[Limits] = None) -> "Executable":
        """Validate `spec` (a dict or its JSON text) with its weight `arrays` and build the plan.

        The executable's cost (work and memory per sample at the dims' max values, see
        sparseprune.runtime.limits) is computed and written to spec.metadata["cost"]; a spec that
        states a smaller cost is refused. `limits` bound every run(), and one sample at the dims'
        max values must fit them; the default None sets none (the caller built the spec: compile
        and convert); pass Limits() for a spec from elsewhere (load does).

        Raises SpecError (a ValueError) naming the bad field, LimitExceeded (a ValueError) when one
        sample at the dims' max values is beyond `limits`, or TypeError for an array of the wrong
        type or dtype."""
        limits = check_limits(limits)
        n_threads = check_threads(n_threads)
        if isinstance(spec, (str, bytes)):
            spec = _parse_json(spec, "spec")
        layout = validate(spec, arrays)
        # Only the arrays the ops use (validate refuses others), contiguous, owned by us.
        owned = {name: aligned(np.ascontiguousarray(arrays[name])) for name in sorted(layout.used_arrays)}
        try:
            spec_json = json.dumps(layout.spec, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:  # metadata holding a non-JSON value
            raise SpecError(f"spec.metadata must hold only JSON values: {exc}") from None
        plan = _C.Plan(spec_json, owned)
        self = object.__new__(cls)
        self._layout = layout
        self._arrays = owned
        self._plan = plan
        self._n_threads = n_threads
        self._limits = limits
        self._costs: Dict[Tuple[int, ...], Cost] = {}
        # The cost at the dims' max values: checked against what the spec states, stated in its
        # metadata, and one sample of it must fit the limits.
        worst = self._cost(tuple(hi for _, _, hi in layout.dims))
        metadata = layout.spec.setdefault("metadata", {})
        if COST_KEY in metadata:
            _limits.check_claims(metadata[COST_KEY], worst)
        metadata[COST_KEY] = _limits.cost_metadata(worst, self.nbytes)
        if limits is not None:
            limits.check(worst, 1, "one sample at the dims' max values" if layout.dims else "one sample")
        self._spec_json = json.dumps(layout.spec, allow_nan=False, separators=(",", ":"))
        spec = layout.spec
        buffers = spec["buffers"]
        self._input_names = tuple(buffers[b].get("name") or f"input_{k}" for k, b in enumerate(spec["inputs"]))
        self._output_names = tuple(buffers[b].get("name") or f"output_{k}" for k, b in enumerate(spec["outputs"]))
        metadata = spec.get("metadata")
        self._output_kind = metadata.get("output_kind") if isinstance(metadata, dict) else None
        self._id_limits = _id_limits(spec, owned)
        return self

    def _cost(self, dims: Tuple[int, ...]) -> Cost:
        """The per-sample cost at these dim values (one per dim, in spec order), from the spec and
        the native plan's arena layout (computed, never run); cached."""
        cost = self._costs.get(dims)
        if cost is None:
            layout = self._layout
            env = {name: v for (name, _, _), v in zip(layout.dims, dims)}
            arena = self._plan.arena_floats_per_sample(list(dims))
            cost = _limits.sample_cost(layout.spec, layout.concrete_shapes(env), self._arrays, arena,
                                       tuple(env.items()))
            if len(self._costs) >= _COST_CACHE:
                self._costs.clear()
            self._costs[dims] = cost
        return cost

    def cost(self, **dims: int) -> Cost:
        """Work (FLOP) and memory (bytes) per sample at these dim values (default: their max);
        a call of batch b costs b times these."""
        known = {name: hi for name, _, hi in self._layout.dims}
        unknown = sorted(set(dims) - set(known))
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a dim of this executable (dims: {sorted(known)})")
        for name, lo, hi in self._layout.dims:
            v = dims.get(name, hi)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise ValueError(f"dim {name!r} must be an int in [{lo}, {hi}], got {v!r}")
        return self._cost(tuple(dims.get(name, hi) for name, _, hi in self._layout.dims))

    @property
    def limits(self) -> Optional[Limits]:
        """The Limits every run() is checked against, or None (settable; one Limits object may
        serve many executables)."""
        return self._limits

    @limits.setter
    def limits(self, value: Optional[Limits]) -> None:
        self._limits = check_limits(value)

    def trim(self) -> None:
        """Free the calling thread's arena and kernel scratch now (they are shared by every
        executable this thread runs; the next call allocates again). run() also frees them after
        a call far larger than usual: see sparseprune.runtime.limits."""
        _limits.release_thread_scratch()

    # --- running -------------------------------------------------------------------------------

    def run(self, *inputs: np.ndarray, n_threads: Optional[int] = None, **named: np.ndarray):
        """The outputs for the inputs, given in order and/or by name (numpy arrays, one per model
        input: float32, integer ids for an "int64" input, bool or integer 0/1 for a "bool" mask).
        The outputs come back as the model returned them when compile recorded it (an array, a
        tuple, a list, or a dict by name for a dict / transformers ModelOutput); otherwise one
        array for one output, else a tuple. n_threads overrides the executable's setting."""
        threads = resolve_threads(check_threads(n_threads) or self._n_threads)
        arrays, dims = self._prepare(inputs, named)
        try:
            outs = self._plan.run(arrays, threads, dims)
        except ValueError as exc:  # data the plan checks per call (an embedding id made inside the model)
            raise ValueError(self._name_op(str(exc))) from None
        batch = arrays[0].shape[0]
        _limits.after_call(batch * self._cost(tuple(dims)).held)
        return structure_outputs(self._output_kind, self._output_names, outs)

    def _prepare(self, inputs: Sequence[Any], named: Mapping[str, Any]) -> Tuple[List[np.ndarray], List[int]]:
        """The plan's float32 inputs (ids and masks converted, every check done, the limits
        checked) and the dims' values."""
        layout = self._layout
        if named:
            inputs = tuple(bind_inputs(self.input_names, inputs, named))
        if len(inputs) != len(layout.input_shapes):
            want = ", ".join(f"{n} {_batch_shape(s)}" for n, s in zip(layout.input_names, layout.input_shapes))
            raise ValueError(f"expected {len(layout.input_shapes)} input(s) [{want}], got {len(inputs)}")
        batch = None
        env: Dict[str, int] = {}
        for k, (name, shape, dtype, x) in enumerate(zip(layout.input_names, layout.input_shapes, layout.input_dtypes,
                                                         inputs)):
            ids, mask = dtype == "int64", dtype == "bool"
            kind = "an integer (token id)" if ids else "a bool (padding mask)" if mask else "a float32"
            if not isinstance(x, np.ndarray):
                hint = " (call .numpy() on a torch tensor)" if hasattr(x, "numpy") else ""
                raise TypeError(
                    f"{name} must be {kind} numpy array of shape {_batch_shape(shape)}, got {type(x).__name__}{hint}"
                )
            if ids and not np.issubdtype(x.dtype, np.integer):
                raise TypeError(f"{name} must hold integer token ids (input dtype int64), got {x.dtype} "
                                f"(expected shape {_batch_shape(shape)})")
            if mask and not (x.dtype == np.bool_ or np.issubdtype(x.dtype, np.integer)):
                raise TypeError(f"{name} must be a bool (or integer 0/1) mask, got {x.dtype} "
                                f"(expected shape {_batch_shape(shape)})")
            if dtype == "float32" and x.dtype != np.float32:
                raise TypeError(f"{name} must be float32, got {x.dtype} (expected shape {_batch_shape(shape)})")
            layout.match_input(k, x.shape, env)  # static sizes; the dims' values, in range and agreeing
            if batch is not None and x.shape[0] != batch:
                raise ValueError(
                    f"{name} has batch size {x.shape[0]}, but input 0 has {batch}: all inputs share the batch")
            batch = x.shape[0]
        # Limits before any copy or native call: from the spec, at these dims.
        dims = tuple(env[name] for name, _, _ in layout.dims)
        cost = self._cost(dims)
        if self._limits is not None:
            self._limits.check(cost, batch)
        arrays = []
        for k, (name, dtype, x) in enumerate(zip(layout.input_names, layout.input_dtypes, inputs)):
            if dtype == "int64":
                if x.size:
                    self._check_ids(k, name, x)
                x = x.astype(np.float32)  # exact up to 2**24
            elif dtype == "bool":
                x = (x != 0).astype(np.float32)  # nonzero -> 1.0
            # .view: the canonical float32 dtype object (an unpickled array carries an equal but
            # distinct one, which the native binding's exact dtype check refuses)
            arrays.append(aligned(np.ascontiguousarray(x)).view(np.float32))
        return arrays, list(dims)

    def input_dims(self, shapes: Sequence[Sequence[int]]) -> Dict[str, int]:
        """The dims' values that inputs of these full shapes ([batch, *per-sample], one per input,
        in order) give, checked as run() checks them but without any data: a server validates a
        request's header before reading its tensors. Raises ValueError naming the input."""
        layout = self._layout
        if len(shapes) != len(layout.input_shapes):
            raise ValueError(f"expected {len(layout.input_shapes)} input(s), got {len(shapes)}")
        env: Dict[str, int] = {}
        for k, shape in enumerate(shapes):
            layout.match_input(k, tuple(shape), env)
            if shape[0] != shapes[0][0]:
                raise ValueError(f"{layout.input_names[k]} has batch size {shape[0]}, but input 0 has "
                                 f"{shapes[0][0]}: all inputs share the batch")
        return {name: env[name] for name, _, _ in layout.dims}

    def profile(self, *inputs: np.ndarray, repeats: int = 20, warmup: int = 3, n_threads: Optional[int] = None,
                **named: np.ndarray):
        """Where one call's time goes: each op's median wall time over `repeats` calls (after
        `warmup`), its share, its kernel and format and, for weighted layers, the achieved GFLOP/s
        (useful: nonzero weights only; dense-equivalent: as if every weight were there). Returns a
        sparseprune.runtime.profile.Profile (print it for the table, .rows for the numbers)."""
        from sparseprune.runtime.profile import profile_executable

        return profile_executable(self, inputs, named, repeats=repeats, warmup=warmup, n_threads=n_threads)

    def _check_ids(self, k: int, name: str, x: np.ndarray) -> None:
        """Input k's integer values: rows of the embedding it indexes, else exact as float32."""
        lo, hi = int(x.min()), int(x.max())
        if k in self._id_limits:
            rows, table = self._id_limits[k]
            if lo < 0 or hi >= rows:
                bad = lo if lo < 0 else hi
                at = tuple(int(i) for i in np.argwhere(x == bad)[0])
                raise ValueError(f"{name} holds {bad} at {at}, not a row of embedding '{table}': ids must lie in "
                                 f"[0, {rows})")
        elif lo < -MAX_INT_INPUT or hi > MAX_INT_INPUT:
            bad = lo if lo < -MAX_INT_INPUT else hi
            raise ValueError(f"{name} holds {bad}, outside [-{MAX_INT_INPUT}, {MAX_INT_INPUT}]: integer inputs "
                             "reach the native plan as float32, exact only in that range")

    def _name_op(self, message: str) -> str:
        """The native plan's "ops[i] ..." message with the op's name and the buffer it reads."""
        m = re.match(r"ops\[(\d+)\] ", message)
        ops = self._layout.spec["ops"]
        if not m or int(m.group(1)) >= len(ops):
            return message
        op = ops[int(m.group(1))]
        buffers = self._layout.spec["buffers"]
        b = op.get("in")
        source = ""
        if b is not None:
            inputs = [self._layout.input_names[k] for k, i in enumerate(self._layout.spec["inputs"])
                      if self._layout.roots[i] == self._layout.roots[b]]
            source = f", reading {inputs[0]}" if inputs else f", reading buffer {b}" + (
                f" ({buffers[b]['name']!r})" if buffers[b].get("name") else "")
        label = f"ops[{m.group(1)}] ({op['op']} {op.get('name') or op.get('weight', '')!r}{source})"
        rest = message[m.end():]
        rest = rest[len(f"({op['op']}): "):] if rest.startswith(f"({op['op']}): ") else rest
        return f"{label}: {rest}"

    @property
    def input_names(self) -> Tuple[str, ...]:
        """The inputs' names (the model's argument names when compiled from torch)."""
        return self._input_names

    @property
    def output_names(self) -> Tuple[str, ...]:
        """The outputs' names (the keys of a dict / ModelOutput the model returned)."""
        return self._output_names

    __call__ = run

    @property
    def n_threads(self) -> Optional[int]:
        """Intra-op threads for run(); None = torch's thread count when torch is loaded, else
        OpenMP's default. Set per executable."""
        return self._n_threads

    @n_threads.setter
    def n_threads(self, value: Optional[int]) -> None:
        self._n_threads = check_threads(value)

    # --- description ---------------------------------------------------------------------------

    @property
    def input_shapes(self) -> Tuple[Tuple[Any, ...], ...]:
        """Per-sample shapes of the inputs (the batch dimension comes first at run time): ints, and
        for dynamic dims the spec's entries (a dim name "seq", or [k, "seq"] for k * seq)."""
        return tuple(tuple(shape_json(s)) for s in self._layout.input_shapes)

    @property
    def output_shapes(self) -> Tuple[Tuple[Any, ...], ...]:
        """Per-sample shapes of the outputs, symbolic entries as in input_shapes."""
        return tuple(tuple(shape_json(s)) for s in self._layout.output_shapes)

    @property
    def dims(self) -> Dict[str, Tuple[int, int]]:
        """The dynamic dims: name -> (min, max); empty when every shape is static."""
        return {name: (lo, hi) for name, lo, hi in self._layout.dims}

    @property
    def input_dtypes(self) -> Tuple[str, ...]:
        """Per input, "float32", "int64" (integer token ids) or "bool" (a padding mask), see run()."""
        return self._layout.input_dtypes

    @property
    def spec(self) -> Dict[str, Any]:
        """A copy of the canonical spec (a JSON-compatible dict)."""
        return json.loads(self._spec_json)

    @property
    def spec_json(self) -> str:
        return self._spec_json

    @property
    def arrays(self) -> Mapping[str, np.ndarray]:
        """The weight arrays by name (read-only view; the plan holds its own packed copy)."""
        return MappingProxyType(self._arrays)

    @property
    def metadata(self) -> Dict[str, Any]:
        return dict(self.spec.get("metadata", {}))

    @property
    def n_ops(self) -> int:
        return len(self._layout.spec["ops"])

    @property
    def nbytes(self) -> int:
        """Bytes of all weight arrays (what the file stores, without its small JSON header)."""
        return int(sum(a.nbytes for a in self._arrays.values()))

    @property
    def dense_nbytes(self) -> int:
        """Bytes the same weights take as dense float32 tensors (weights, biases, norm params,
        embedding tables). Arrays several ops share are counted once, as in nbytes."""
        dense: Dict[str, int] = {}  # array name -> its bytes as a dense float32 tensor
        for op in self._layout.spec["ops"]:
            w = op.get("weight")
            if w is None:
                continue
            if op["op"] == "linear":
                main = f"{w}.weight" if op["format"] == "dense" else f"{w}.values"
                dense[main] = op["rows"] * op["cols"] * 4
            elif op["op"] == "conv2d":
                kh, kw = op["kernel"]
                main = f"{w}.weight" if op.get("format") == "dense" else f"{w}.values"
                dense[main] = op["out_channels"] * (op["in_channels"] // op["groups"]) * kh * kw * 4
            elif op["op"] == "embedding":
                dense[f"{w}.table"] = self._arrays[f"{w}.table"].size * 4
            elif op["op"] == "constant":
                dense[f"{w}.value"] = self._arrays[f"{w}.value"].size * 4
            for part in ("bias", "gamma", "beta"):
                a = self._arrays.get(f"{w}.{part}")
                if a is not None:
                    dense[f"{w}.{part}"] = a.nbytes
        return int(sum(dense.values()))

    def layer_table(self) -> List[Dict[str, Any]]:
        """One row per weighted op (linear, conv2d, embedding): name, op, format (the stored
        format's kernel), stored nonzeros, sparsity and dense_from (the input rows from which it
        runs the dense kernel, or None). Dense linear weights and embedding tables have format "dense"."""
        rows = []
        for i, op in enumerate(self._layout.spec["ops"]):
            if op["op"] not in ("linear", "conv2d", "embedding"):
                continue
            w = op["weight"]
            if op["op"] == "linear":
                total = op["rows"] * op["cols"]
                stored = self._arrays[f"{w}.weight" if op["format"] == "dense" else f"{w}.values"]
                nnz = int(np.count_nonzero(stored))
            elif op["op"] == "embedding":
                table = self._arrays[f"{w}.table"]
                total, fmt, nnz = table.size, "dense", int(np.count_nonzero(table))
            else:
                kh, kw = op["kernel"]
                total = op["out_channels"] * (op["in_channels"] // op["groups"]) * kh * kw
                dense_conv = op.get("format") == "dense"
                nnz = int(np.count_nonzero(self._arrays[f"{w}.weight" if dense_conv else f"{w}.values"]))
            fmt = "dense" if op["op"] == "embedding" else stored_kernel(op)
            rows.append({"index": i, "name": op.get("name", w), "op": op["op"], "format": fmt, "nnz": nnz,
                         "sparsity": 1.0 - nnz / total if total else 0.0, "activation": op.get("activation"),
                         "dense_from": op.get("dense_from")})
        return rows

    def __repr__(self) -> str:
        ins = ", ".join(_batch_shape(s) for s in self.input_shapes)
        outs = ", ".join(_batch_shape(s) for s in self.output_shapes)
        return (f"Executable(inputs=[{ins}], outputs=[{outs}], ops={self.n_ops}, "
                f"weights={self.nbytes / 1e6:.2f} MB ({self.nbytes / max(self.dense_nbytes, 1):.0%} of dense), "
                f"n_threads={self._n_threads})")

    # --- files ---------------------------------------------------------------------------------

    def save(self, path: PathLike) -> int:
        """Write the executable to one safetensors file (replaced atomically); returns its size
        in bytes. Load it back with sparseprune.runtime.load (no torch needed)."""
        from safetensors.numpy import save_file

        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".sparseprune-", suffix=".tmp", dir=directory)
        os.close(fd)
        try:
            save_file(dict(self._arrays), tmp, metadata={SPEC_KEY: self._spec_json, "format": SPEC_FORMAT})
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return os.path.getsize(path)

    # Executables hold a native plan; copying or pickling one is not supported (save/load it).
    def __reduce__(self):
        raise TypeError("an Executable cannot be pickled: use .save(path) and sparseprune.runtime.load(path)")


_batch_shape = batch_shape_str


def _parse_json(text: Union[str, bytes], what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, int too long, nesting too deep
        raise SpecError(f"{what} is not valid JSON: {str(exc)[:200]}") from None


def load(path: PathLike, *, n_threads: Optional[int] = None, limits: Optional[Limits] = None) -> Executable:
    """Read an executable written by Executable.save. Needs numpy and the native extension only.

    Everything in the file is checked before use; a file that is not a valid executable
    (truncated, corrupted, from a newer version, hostile, or stating a smaller cost than its spec
    needs) raises SpecError (a ValueError). A file whose one sample at the dims' max values is
    beyond `limits` (default: Limits(), see sparseprune.runtime.limits) raises LimitExceeded (a
    ValueError); the executable then checks every run() against them. The file system's errors
    stay themselves, naming the path: FileNotFoundError, PermissionError, IsADirectoryError (all
    OSError); running out of memory raises MemoryError."""
    from safetensors import safe_open

    n_threads = check_threads(n_threads)
    limits = Limits() if limits is None else check_limits(limits)
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "is a directory, not an executable file", path)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "no such file", path)
    with open(path, "rb"):  # FileNotFoundError / PermissionError from the OS, naming the path
        pass
    # Reading an untrusted file: any other failure of the safetensors parser is a bad file.
    try:
        with safe_open(path, framework="np") as f:
            meta = f.metadata() or {}
            spec_text = meta.get(SPEC_KEY)
            if not isinstance(spec_text, str):
                raise SpecError(
                    f"{path!r} is a safetensors file but not a sparseprune executable (no {SPEC_KEY!r} metadata)")
            spec = _parse_json(spec_text, f"the spec in {path!r}")
            arrays = {name: f.get_tensor(name) for name in f.keys()}
    except (SpecError, OSError):
        raise
    except MemoryError:
        raise MemoryError(f"out of memory reading {path!r}") from None
    except Exception as exc:  # SafetensorError, unsupported dtypes, ...
        raise SpecError(f"{path!r} is not a valid executable file: {type(exc).__name__}: {str(exc)[:300]}") from exc
    try:
        return Executable.from_spec(spec, arrays, n_threads=n_threads, limits=limits)
    except LimitExceeded as exc:
        raise LimitExceeded(exc.limit, exc.value, exc.maximum, f"{path!r}: {exc.what}") from None
    except MemoryError:
        raise MemoryError(f"out of memory building the executable in {path!r}") from None
    except Exception as exc:  # whatever a hostile spec triggers, the caller gets one clean error
        raise SpecError(f"{path!r} is not a valid executable: {str(exc)[:1000]}") from exc


def file_size(path: PathLike) -> int:
    """Size of a saved executable in bytes."""
    return os.path.getsize(os.fspath(path))


def weight_bytes_ratio(executable: Executable) -> float:
    """Stored weight bytes / dense float32 weight bytes (the issue's file-size target is <= 0.25
    at 90% sparsity)."""
    return executable.nbytes / max(executable.dense_nbytes, 1)


__all__ = ["Executable", "Limits", "LimitExceeded", "load", "file_size", "weight_bytes_ratio", "SPEC_KEY"]


def _id_limits(spec: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Dict[int, Tuple[int, Optional[str]]]:
    """Per int64 input (by position): the rows of the smallest embedding table its ids index, so
    run() names the input and the real range (the native plan checks them again)."""
    buffers = spec["buffers"]

    def root(b: int) -> int:
        while buffers[b].get("alias_of") is not None:
            b = buffers[b]["alias_of"]
        return b

    position = {root(b): k for k, b in enumerate(spec["inputs"])}
    limits: Dict[int, Tuple[int, Optional[str]]] = {}
    for op in spec["ops"]:
        if op["op"] != "embedding":
            continue
        k = position.get(root(op["in"]))
        table = arrays.get(f"{op['weight']}.table")
        if k is None or table is None:
            continue
        rows = int(table.shape[0])
        if k not in limits or rows < limits[k][0]:
            limits[k] = (rows, op.get("name") or op["weight"])
    return limits
