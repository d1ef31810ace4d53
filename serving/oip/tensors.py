"""Typed tensors of the Open Inference Protocol, as its wire formats carry them.

A tensor is a name, a datatype ("FP32", "INT64", "BYTES", ...), a shape and its elements in
row-major order. Numeric elements travel as little-endian raw bytes (gRPC's
raw_*_contents, HTTP's binary tensor data extension) or as JSON numbers; BYTES elements as
raw bytes each preceded by its length (4 bytes, little-endian), or as JSON strings (UTF-8,
or base64 where the tensor's parameters say "content_type": "base64", MLServer's convention).
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.errors import ApiError

# The numeric datatypes this service reads and writes, and their little-endian numpy types.
NUMERIC: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "INT64": np.dtype("<i8"),
    "INT32": np.dtype("<i4"),
}
BYTES = "BYTES"


def invalid(detail: str) -> ApiError:
    return ApiError(400, "invalid_request", detail)


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[bytes]  # numeric: an array of `shape`; BYTES: the elements, flattened
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


def check_shape(name: str, shape: Any) -> list[int]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise invalid(f"input {name!r}: shape must be a list of non-negative integers, not {shape!r}")
    return shape


def from_raw(name: str, datatype: str, shape: list[int], raw: bytes | memoryview) -> Tensor:
    """A tensor from its raw bytes (row-major; BYTES elements length-prefixed)."""
    n = math.prod(shape)
    if datatype == BYTES:
        return Tensor(name, datatype, shape, split_bytes(name, raw, n))
    dtype = NUMERIC.get(datatype)
    if dtype is None:
        raise invalid(f"input {name!r}: datatype {datatype!r} is not one this model takes")
    if len(raw) != n * dtype.itemsize:
        raise invalid(
            f"input {name!r}: {len(raw)} bytes of data for shape {shape} of {datatype} ({n * dtype.itemsize} expected)"
        )
    return Tensor(name, datatype, shape, np.frombuffer(raw, dtype=dtype).reshape(shape))


def from_json(name: str, datatype: str, shape: list[int], data: Any, parameters: dict[str, Any]) -> Tensor:
    """A tensor from the JSON form: `data` flat or nested, row-major."""
    n = math.prod(shape)
    if datatype == BYTES:
        items = list(_flatten(data))
        if len(items) != n or not all(isinstance(x, str) for x in items):
            raise invalid(f"input {name!r}: BYTES data must be {n} string(s) for shape {shape}")
        b64 = parameters.get("content_type") == "base64"
        try:
            elements = [base64.b64decode(x, validate=True) if b64 else x.encode("utf-8") for x in items]
        except (binascii.Error, ValueError):
            raise invalid(f"input {name!r}: an element is not valid base64") from None
        return Tensor(name, datatype, shape, elements, parameters)
    dtype = NUMERIC.get(datatype)
    if dtype is None:
        raise invalid(f"input {name!r}: datatype {datatype!r} is not one this model takes")
    try:
        array = np.asarray(data, dtype=dtype)
    except (TypeError, ValueError):
        raise invalid(f"input {name!r}: data is not an array of {datatype} numbers") from None
    if array.size != n:
        raise invalid(f"input {name!r}: {array.size} values for shape {shape} ({n} expected)")
    return Tensor(name, datatype, shape, array.reshape(shape), parameters)


def _flatten(data: Any):
    if isinstance(data, list):
        for x in data:
            yield from _flatten(x)
    else:
        yield data


def split_bytes(name: str, raw: bytes | memoryview, count: int) -> list[bytes]:
    """`count` length-prefixed elements, exactly filling `raw`."""
    view, at = memoryview(raw), 0
    out: list[bytes] = []
    for _ in range(count):
        if at + 4 > len(view):
            raise invalid(f"input {name!r}: BYTES data ends inside element {len(out)} of {count}")
        (size,) = struct.unpack_from("<I", view, at)
        at += 4
        if at + size > len(view):
            raise invalid(f"input {name!r}: BYTES element {len(out)} says {size} bytes; fewer follow")
        out.append(bytes(view[at : at + size]))
        at += size
    if at != len(view):
        raise invalid(f"input {name!r}: {len(view) - at} bytes left after the {count} BYTES element(s) of its shape")
    return out


def to_raw(tensor: Tensor) -> bytes:
    """The tensor's raw bytes (row-major; BYTES length-prefixed)."""
    if tensor.datatype == BYTES:
        items = tensor.data if isinstance(tensor.data, list) else list(np.asarray(tensor.data).reshape(-1))
        return b"".join(struct.pack("<I", len(x)) + x for x in items)
    return np.ascontiguousarray(tensor.data, dtype=NUMERIC[tensor.datatype]).tobytes()


def to_json_data(tensor: Tensor) -> list:
    """The elements as a flat JSON list (BYTES as strings: the outputs here are ASCII)."""
    if tensor.datatype == BYTES:
        items = tensor.data if isinstance(tensor.data, list) else list(np.asarray(tensor.data).reshape(-1))
        return [x.decode("utf-8") for x in items]
    return np.asarray(tensor.data).reshape(-1).tolist()


def from_contents(name: str, datatype: str, shape: list[int], values: Any) -> Tensor:
    """A tensor from gRPC's typed contents (InferTensorContents: a repeated field per type)."""
    if datatype == BYTES:
        items = list(values)
        if len(items) != math.prod(shape):
            raise invalid(f"input {name!r}: {len(items)} BYTES elements for shape {shape}")
        return Tensor(name, datatype, shape, items)
    return from_json(name, datatype, shape, list(values), {})
