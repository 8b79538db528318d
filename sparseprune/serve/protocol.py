"""The Open Inference Protocol (KServe v2) over REST: model metadata, infer requests and responses,
JSON tensors and the binary-tensor extension, for one Executable. No web framework here: bytes
and headers in, bytes and headers out, so the Starlette app and the Ray Serve replica share it.

Every check runs on the request's header before its tensors are read: a bad name, datatype or
shape, or a shape too large for the limits, is refused without allocating anything of its size.

numpy only: this module must not import torch.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from sparseprune.runtime import Executable, LimitExceeded
from sparseprune.runtime.spec import batch_shape_str

HEADER_LENGTH = "Inference-Header-Content-Length"  # the binary extension's JSON-part length
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"

# The protocol's datatype of each executable input kind, and the ones accepted for it: ids may
# come as INT32, a padding mask as integers 0/1 (transformers' attention_mask is int64).
DATATYPE = {"float32": "FP32", "int64": "INT64", "bool": "BOOL"}
ACCEPTED = {"float32": ("FP32",), "int64": ("INT64", "INT32"), "bool": ("BOOL", "INT64", "INT32")}
# Little-endian numpy dtypes of the wire (the extension sends raw row-major little-endian bytes;
# BOOL is one byte per element).
WIRE_DTYPE = {"FP32": np.dtype("<f4"), "INT64": np.dtype("<i8"), "INT32": np.dtype("<i4"), "BOOL": np.dtype("?")}
# numpy kinds a JSON "data" list may hold per datatype (JSON integers are fine for FP32; a float
# for an integer tensor is not).
JSON_KINDS = {"FP32": "iuf", "INT64": "iu", "INT32": "iu", "BOOL": "biu"}


class ProtocolError(Exception):
    """A request the server refuses: `status` is the HTTP status, the message the JSON error."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def bad_request(message: str) -> ProtocolError:
    return ProtocolError(400, message)


@dataclass
class InferRequest:
    """A validated infer request: the inputs in the executable's order (numpy, batch first), the
    dims' values they give (the batching key) and which outputs to return and how."""

    inputs: List[np.ndarray]
    rows: int
    dims: Tuple[int, ...]
    id: Optional[str] = None
    outputs: List[str] = field(default_factory=list)  # names, in the response's order
    binary: Dict[str, bool] = field(default_factory=dict)  # output name -> send as binary


# --------------------------------------------------------------------------------- metadata
def wire_shape(shape: Sequence[Any]) -> List[int]:
    """[-1, ...]: the batch and every dynamic entry as -1, as the protocol writes variable sizes."""
    return [-1] + [d if isinstance(d, int) else -1 for d in shape]


def model_metadata(name: str, exe: Executable, max_batch: int) -> Dict[str, Any]:
    """GET /v2/models/{name}: inputs and outputs with datatypes and shapes (-1 = variable), plus
    in "parameters" the symbolic per-sample shapes, the dims' ranges and the batch bound."""
    def tensors(names, shapes, dtypes):
        return [{"name": n, "datatype": DATATYPE[t], "shape": wire_shape(s),
                 "parameters": {"sample_shape": [list(d) if isinstance(d, (tuple, list)) else d for d in s]}}
                for n, s, t in zip(names, shapes, dtypes)]

    return {
        "name": name,
        "versions": ["1"],
        "platform": "sparseprune",
        "inputs": tensors(exe.input_names, exe.input_shapes, exe.input_dtypes),
        "outputs": tensors(exe.output_names, exe.output_shapes, ["float32"] * len(exe.output_names)),
        "parameters": {"dims": {n: {"min": lo, "max": hi} for n, (lo, hi) in exe.dims.items()},
                       "max_batch_size": max_batch},
    }


# ---------------------------------------------------------------------------------- requests
def _reject_constant(name: str) -> Any:
    raise bad_request(f"the request holds {name}: JSON numbers must be finite (send non-finite values as binary)")


def _parse_json(text: bytes) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, nested too deep
        raise bad_request(f"the request is not valid JSON: {str(exc)[:200]}") from None


def _expect(where: str, value: Any, kind: type, what: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise bad_request(f"{where} must be {what}, got {type(value).__name__}")
    return value


def _describe(exe: Executable, k: int) -> str:
    kind = exe.input_dtypes[k]
    return f"input {exe.input_names[k]!r} ({DATATYPE[kind]}, shape {batch_shape_str(exe.input_shapes[k])})"


def split_body(body: bytes, header_length: Optional[str]) -> Tuple[bytes, bytes]:
    """(JSON part, binary part) of a body, from the Inference-Header-Content-Length header."""
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        n = -1
    if not 0 < n <= len(body):
        raise bad_request(f"{HEADER_LENGTH} is {header_length!r}: it must be the length of the JSON part, "
                          f"between 1 and the body's {len(body)} bytes")
    return body[:n], body[n:]


def parse_infer(exe: Executable, body: bytes, header_length: Optional[str], max_rows: int) -> InferRequest:
    """Validate an infer request for `exe` and read its tensors. Raises ProtocolError: 400 naming
    the tensor with its expected datatype and shape, 413 for more rows than `max_rows` or a call
    beyond the executable's limits."""
    text, binary = split_body(body, header_length)
    request = _expect("the request", _parse_json(text), dict, "a JSON object")
    request_id = request.get("id")
    if request_id is not None:
        _expect("id", request_id, str, "a string")
    params = _expect("parameters", request.get("parameters", {}), dict, "an object")
    entries = _expect("inputs", request.get("inputs"), list, "a list of tensors")
    names = exe.input_names
    if len(entries) != len(names):
        want = ", ".join(_describe(exe, k) for k in range(len(names)))
        raise bad_request(f"expected {len(names)} input tensor(s) [{want}], got {len(entries)}")
    by_name: Dict[str, Tuple[int, dict]] = {}
    for i, entry in enumerate(entries):
        entry = _expect(f"inputs[{i}]", entry, dict, "an object")
        name = _expect(f"inputs[{i}].name", entry.get("name"), str, "a string")
        if name not in names:
            raise bad_request(f"unknown input {name!r}: the inputs are " +
                              ", ".join(_describe(exe, k) for k in range(len(names))))
        if name in by_name:
            raise bad_request(f"input {name!r} given twice")
        by_name[name] = (i, entry)
    # Headers first: datatypes and shapes of every input, then the dims and the limits.
    shapes, datatypes = [], []
    for k, name in enumerate(names):
        i, entry = by_name[name]
        datatype = entry.get("datatype")
        if datatype not in ACCEPTED[exe.input_dtypes[k]]:
            accepted = " or ".join(ACCEPTED[exe.input_dtypes[k]])
            raise bad_request(f"{_describe(exe, k)}: datatype {datatype!r} given, expected {accepted}")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise bad_request(f"{_describe(exe, k)}: shape must be a list of non-negative ints, got {shape!r}"[:500])
        shapes.append(shape)
        datatypes.append(datatype)
    try:
        dims = exe.input_dims(shapes)
    except ValueError as exc:
        m = re.match(r"input (\d+) ", str(exc))  # the runtime names inputs "input K ('name')"
        k = int(m.group(1)) if m and int(m.group(1)) < len(names) else 0
        raise bad_request(f"{_describe(exe, k)}: {str(exc)[:500]}") from None
    rows = shapes[0][0]
    if rows > max_rows:
        raise ProtocolError(413, f"the request has {rows} rows, above the server's --max-batch {max_rows}")
    if exe.limits is not None:
        try:
            exe.limits.check(exe.cost(**dims), rows, "this request")
        except LimitExceeded as exc:
            raise ProtocolError(413, str(exc)) from None
    # Then the data: JSON lists, or slices of the binary part in the inputs' order.
    arrays: List[Optional[np.ndarray]] = [None] * len(names)
    offset = 0
    for i, entry in enumerate(entries):
        k = names.index(entry["name"])
        count = math.prod(shapes[k])
        size = _binary_size(exe, k, entry)
        if size is None:
            x = _json_tensor(exe, k, entry.get("data"), datatypes[k], count)
        else:
            wire = WIRE_DTYPE[datatypes[k]]
            if size != count * wire.itemsize:
                raise bad_request(f"{_describe(exe, k)}: binary_data_size {size} given, a {datatypes[k]} tensor "
                                  f"of shape {shapes[k]} takes {count * wire.itemsize} bytes")
            if offset + size > len(binary):
                raise bad_request(f"{_describe(exe, k)}: the binary part ends after {len(binary)} bytes, this "
                                  f"tensor needs bytes {offset} to {offset + size}: the body is truncated")
            x = np.frombuffer(binary, dtype=wire, count=count, offset=offset)
            offset += size
        arrays[k] = _as_input(exe, k, x.reshape(shapes[k]))
    if offset != len(binary):
        raise bad_request(f"the body holds {len(binary)} bytes after the JSON part, the inputs' binary_data_size "
                          f"add up to {offset}")
    return InferRequest(inputs=arrays, rows=rows, dims=tuple(dims.values()), id=request_id,
                        **_requested_outputs(exe, request.get("outputs"), params))


def _binary_size(exe: Executable, k: int, entry: Mapping[str, Any]) -> Optional[int]:
    params = _expect(f"{_describe(exe, k)}: parameters", entry.get("parameters", {}), dict, "an object")
    size = params.get("binary_data_size")
    if size is None:
        return None
    if "data" in entry:
        raise bad_request(f"{_describe(exe, k)}: give either data or parameters.binary_data_size, not both")
    return _expect(f"{_describe(exe, k)}: binary_data_size", size, int, "an int")


def _json_tensor(exe: Executable, k: int, data: Any, datatype: str, count: int) -> np.ndarray:
    if not isinstance(data, list):
        raise bad_request(f"{_describe(exe, k)}: data must be a list (flat or nested, row-major), "
                          f"got {type(data).__name__}")
    try:
        x = np.asarray(data)
    except (ValueError, OverflowError):  # ragged nesting, ints beyond 64 bits
        raise bad_request(f"{_describe(exe, k)}: data is not a regular array of numbers") from None
    if x.dtype.kind not in JSON_KINDS[datatype]:
        raise bad_request(f"{_describe(exe, k)}: data holds {x.dtype} values, not {datatype}")
    if x.size != count:
        raise bad_request(f"{_describe(exe, k)}: data holds {x.size} values, the shape needs {count}")
    if datatype == "FP32":
        with np.errstate(over="ignore"):
            x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise bad_request(f"{_describe(exe, k)}: data holds values beyond float32's range")
    return x


def _as_input(exe: Executable, k: int, x: np.ndarray) -> np.ndarray:
    """The array run() takes: float32, int64 ids, or a bool mask (one dtype per input, so requests
    concatenate into one batch without surprises)."""
    kind = exe.input_dtypes[k]
    if kind == "float32":
        return x.astype(np.float32, copy=False)
    if kind == "int64":
        return x.astype(np.int64, copy=False)
    return x != 0 if x.dtype != np.bool_ else x


def _requested_outputs(exe: Executable, outputs: Any, params: Mapping[str, Any]) -> Dict[str, Any]:
    binary_all = params.get("binary_data_output", False)
    _expect("parameters.binary_data_output", binary_all, bool, "a bool")
    if outputs is None:
        return {"outputs": list(exe.output_names), "binary": {n: binary_all for n in exe.output_names}}
    _expect("outputs", outputs, list, "a list")
    names, binary = [], {}
    for i, entry in enumerate(outputs):
        entry = _expect(f"outputs[{i}]", entry, dict, "an object")
        name = entry.get("name")
        if name not in exe.output_names:
            raise bad_request(f"unknown output {name!r}: the outputs are {', '.join(exe.output_names)}")
        p = _expect(f"outputs[{i}].parameters", entry.get("parameters", {}), dict, "an object")
        flag = p.get("binary_data", binary_all)
        _expect(f"outputs[{i}].parameters.binary_data", flag, bool, "a bool")
        names.append(name)
        binary[name] = flag
    return {"outputs": names, "binary": binary}


# --------------------------------------------------------------------------------- responses
def encode_infer(model: str, request: InferRequest, outputs: Mapping[str, np.ndarray]) -> Tuple[bytes, Dict[str, str]]:
    """The response body and headers: JSON data, or the binary extension for outputs asked as binary
    (raw little-endian float32 after the JSON part, whose length goes in Inference-Header-Content-Length)."""
    tensors, blobs = [], []
    for name in request.outputs:
        y = np.ascontiguousarray(outputs[name], dtype="<f4")
        tensor: Dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(y.shape)}
        if request.binary[name]:
            blob = y.tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            # float32 -> Python float is exact, and JSON's shortest repr reads back to the same float32.
            # Non-finite outputs (a model's NaN rows) are written as NaN/Infinity, which Python's and
            # rapidjson's readers take; ask for binary outputs to get them exactly everywhere.
            tensor["data"] = y.ravel().tolist()
        tensors.append(tensor)
    response: Dict[str, Any] = {"model_name": model, "model_version": "1", "outputs": tensors}
    if request.id is not None:
        response["id"] = request.id
    head = json.dumps(response, separators=(",", ":")).encode()
    if not blobs:
        return head, {"content-type": JSON_TYPE}
    return head + b"".join(blobs), {"content-type": BINARY_TYPE, HEADER_LENGTH.lower(): str(len(head))}


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()
