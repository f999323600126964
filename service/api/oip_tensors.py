"""Tensors of the Open Inference Protocol (KServe v2 REST): inference request and response bodies, as JSON and with
Triton's binary tensor data extension. No FastAPI here; a malformed request raises :class:`TensorError` (HTTP 400).

JSON tensors carry ``shape``, ``datatype`` and ``data``: the elements flat in row-major order, or nested as the shape.
With the binary extension the body is the JSON object followed by raw tensor bytes; the
``Inference-Header-Content-Length`` header gives the JSON's length, and each input with
``parameters.binary_data_size`` takes that many of the bytes, in the order of ``inputs``. Binary tensors are
little-endian and row-major; a BYTES element is its length (4 bytes, little-endian) followed by its bytes. A response
lays out the outputs asked for with ``binary_data`` the same way after its JSON.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "DATATYPES",
    "HEADER_LENGTH",
    "InferenceRequest",
    "OutputTensor",
    "RequestInput",
    "RequestOutput",
    "Tensor",
    "TensorError",
    "bytes_array",
    "decode_request",
    "encode_response",
    "inline_schema",
    "parameter",
]

HEADER_LENGTH = "Inference-Header-Content-Length"

NUMERIC: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in (
        ("BOOL", "?"), ("UINT8", "<u1"), ("UINT16", "<u2"), ("UINT32", "<u4"), ("UINT64", "<u8"), ("INT8", "<i1"),
        ("INT16", "<i2"), ("INT32", "<i4"), ("INT64", "<i8"), ("FP16", "<f2"), ("FP32", "<f4"), ("FP64", "<f8"),
    )
}
DATATYPES = (*NUMERIC, "BYTES")
Datatype = Literal[DATATYPES]  # type: ignore[valid-type]

_JSON_KINDS = {  # numpy kind → (JSON element check, what it must be)
    "b": (lambda v: isinstance(v, bool), "true or false"),
    "u": (lambda v: isinstance(v, int) and not isinstance(v, bool), "integers"),
    "i": (lambda v: isinstance(v, int) and not isinstance(v, bool), "integers"),
    "f": (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "numbers"),
}


class TensorError(ValueError):
    """A malformed inference request or tensor (HTTP 400)."""


class RequestInput(BaseModel):
    """One named input tensor, with ``data`` (JSON) or ``parameters.binary_data_size`` (binary extension)."""

    model_config = ConfigDict(strict=True)

    name: str
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: Datatype  # type: ignore[valid-type]
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(None, description="elements in row-major order, flat or nested as the shape")


class RequestOutput(BaseModel):
    """An output asked for; ``parameters.binary_data: true`` returns it as binary data after the JSON."""

    model_config = ConfigDict(strict=True)

    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    """The JSON object of ``POST /v2/models/{name}/infer`` (``parameters.binary_data_output``: all outputs binary)."""

    model_config = ConfigDict(
        strict=True,
        json_schema_extra={
            "examples": [{
                "id": "42",
                "inputs": [
                    {"name": "num_images", "shape": [1], "datatype": "INT32", "data": [2]},
                    {"name": "seed", "shape": [1], "datatype": "INT64", "data": [7]},
                    {"name": "sampler", "shape": [1], "datatype": "BYTES", "data": ["ddim"]},
                    {"name": "steps", "shape": [1], "datatype": "INT32", "data": [10]},
                ],
                "outputs": [{"name": "images"}],
            }]
        },
    )

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


@dataclass(frozen=True)
class Tensor:
    """A decoded input: numbers as a numpy array of the datatype, BYTES as an object array of ``bytes``."""

    name: str
    datatype: str
    data: np.ndarray  # shaped as the request said


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    data: np.ndarray  # numbers of the datatype, or an object array of bytes for BYTES
    binary: bool = False  # after the JSON (binary extension) instead of in it
    parameters: dict[str, Any] = field(default_factory=dict)


def bytes_array(items: list[bytes]) -> np.ndarray:
    """A 1-D object array of ``bytes`` (how BYTES tensors are held)."""
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def parameter(params: dict[str, Any] | None, key: str, kind: type[bool] | type[int]) -> Any:
    """``params[key]`` checked to be a bool, or a non-negative int; None when absent."""
    value = (params or {}).get(key)
    if value is None:
        return None
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise TensorError(f"parameter {key} must be {'true or false' if kind is bool else 'a non-negative integer'}")


def _summary(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON object, binary data) of a request body."""
    if header_length is None:
        return body, b""
    if not (header_length.isascii() and header_length.isdigit()):
        raise TensorError(f"{HEADER_LENGTH} must be a number of bytes")
    n = int(header_length)
    if not 0 < n <= len(body):
        raise TensorError(f"{HEADER_LENGTH} {n} does not fit the body's {len(body)} bytes")
    return body[:n], body[n:]


def _flatten(data: list[Any], shape: list[int], name: str) -> list[Any]:
    """The elements of ``data`` in row-major order: ``data`` itself when flat, else nested exactly as ``shape``."""
    if not any(isinstance(v, list) for v in data):
        return data
    flat: list[Any] = []

    def walk(node: Any, dims: list[int]) -> None:
        if not dims:
            if isinstance(node, list):
                raise TensorError(f"input {name!r}: data nested deeper than shape {shape}")
            flat.append(node)
            return
        if not isinstance(node, list) or len(node) != dims[0]:
            raise TensorError(f"input {name!r}: nested data does not match shape {shape}")
        for child in node:
            walk(child, dims[1:])

    walk(data, shape)
    return flat


def _from_json(inp: RequestInput) -> np.ndarray:
    assert inp.data is not None
    flat = _flatten(inp.data, inp.shape, inp.name)
    count = math.prod(inp.shape)
    if len(flat) != count:
        raise TensorError(f"input {inp.name!r}: {len(flat)} elements, shape {inp.shape} has {count}")
    if inp.datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise TensorError(f"input {inp.name!r}: BYTES data must be strings")
        return bytes_array([v.encode("utf-8") for v in flat]).reshape(inp.shape)
    dtype = NUMERIC[inp.datatype]
    check, what = _JSON_KINDS[dtype.kind]
    if not all(check(v) for v in flat):
        raise TensorError(f"input {inp.name!r}: {inp.datatype} data must be {what}")
    try:
        return np.array(flat, dtype=dtype).reshape(inp.shape)
    except OverflowError as exc:
        raise TensorError(f"input {inp.name!r}: a value out of range for {inp.datatype}") from exc


def _from_bytes(inp: RequestInput, raw: bytes) -> np.ndarray:
    count = math.prod(inp.shape)
    if inp.datatype != "BYTES":
        dtype = NUMERIC[inp.datatype]
        if len(raw) != count * dtype.itemsize:
            raise TensorError(f"input {inp.name!r}: {len(raw)} bytes, shape {inp.shape} of {inp.datatype} needs "
                              f"{count * dtype.itemsize}")
        return np.frombuffer(raw, dtype=dtype).reshape(inp.shape)
    items: list[bytes] = []
    pos = 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise TensorError(f"input {inp.name!r}: BYTES element length cut off")
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            raise TensorError(f"input {inp.name!r}: BYTES element of {n} bytes cut off")
        items.append(raw[pos + 4 : pos + 4 + n])
        pos += 4 + n
    if len(items) != count:
        raise TensorError(f"input {inp.name!r}: {len(items)} BYTES elements, shape {inp.shape} has {count}")
    return bytes_array(items).reshape(inp.shape)


def decode_request(body: bytes, header_length: str | None) -> tuple[InferenceRequest, dict[str, Tensor]]:
    """The inference request and its inputs by name; ``header_length``: the ``Inference-Header-Content-Length``."""
    header, binary = _split(body, header_length)
    try:
        request = InferenceRequest.model_validate_json(header)
    except ValidationError as exc:
        raise TensorError(_summary(exc)) from exc
    tensors: dict[str, Tensor] = {}
    offset = 0
    for inp in request.inputs:
        if inp.name in tensors:
            raise TensorError(f"input {inp.name!r} given twice")
        size = parameter(inp.parameters, "binary_data_size", int)
        if size is not None:
            if inp.data is not None:
                raise TensorError(f"input {inp.name!r}: both data and parameters.binary_data_size")
            if offset + size > len(binary):
                raise TensorError(f"input {inp.name!r}: binary_data_size {size}, only {len(binary) - offset} "
                                  f"bytes of binary data left (is {HEADER_LENGTH} set?)")
            array = _from_bytes(inp, binary[offset : offset + size])
            offset += size
        elif inp.data is not None:
            array = _from_json(inp)
        else:
            raise TensorError(f"input {inp.name!r}: no data (give data, or parameters.binary_data_size)")
        tensors[inp.name] = Tensor(inp.name, inp.datatype, array)
    if offset != len(binary):
        raise TensorError(f"{len(binary) - offset} bytes of binary data that no input claims")
    return request, tensors


def _to_bytes(out: OutputTensor) -> bytes:
    if out.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in out.data.ravel())
    return np.ascontiguousarray(out.data, dtype=NUMERIC[out.datatype]).tobytes()


def encode_response(head: dict[str, Any], outputs: list[OutputTensor]) -> tuple[bytes, int | None]:
    """The response body (``head`` plus ``outputs``), and the JSON's length when binary data follows it.

    BYTES outputs in JSON are base64 strings (``parameters.content_type: "base64"``): JSON strings cannot carry
    arbitrary bytes such as PNG files.
    """
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for out in outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": list(out.data.shape)}
        params = dict(out.parameters)
        if out.binary:
            raw = _to_bytes(out)
            params["binary_data_size"] = len(raw)
            chunks.append(raw)
        elif out.datatype == "BYTES":
            params["content_type"] = "base64"
            entry["data"] = [base64.b64encode(v).decode("ascii") for v in out.data.ravel()]
        else:
            entry["data"] = out.data.ravel().tolist()
        if params:
            entry["parameters"] = params
        entries.append(entry)
    text = json.dumps({**head, "outputs": entries}).encode()
    if not chunks:
        return text, None
    return b"".join([text, *chunks]), len(text)


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` put in place of their references (for an OpenAPI request body)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)
