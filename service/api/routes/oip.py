"""The Open Inference Protocol (KServe v2 REST, also Triton's HTTP API) under ``/v2``: health, metadata, inference.

A thin face over the same engine as ``/generate``: the input tensors become a ``GenerateRequest`` that goes
through ``generation_request`` and ``submit``, so the limits, fair share, auth, metrics and disconnect → cancel are
the same. Every served model (``GET /v1/models``) is a v2 model of that name, version ``1``; any other name or
version is 404.
``/v2/health/*`` stay open, as ``/healthz`` and ``/readyz`` (orchestrators probe them without keys); every other
``/v2`` route needs the API key. Errors are the protocol's ``{"error": "..."}`` (``service.api.errors`` renders
them under ``/v2``; invalid input is 400 there, not 422). Tensor encoding is in ``service.api.oip_tensors``.
"""

from __future__ import annotations

import base64
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, ValidationError

from service.api.auth import RequireApiKey
from service.api.deps import (
    ClientDisconnected,
    SettingsDep,
    await_unless_disconnected,
    engine_for,
    served_model,
    submit,
)
from service.api.errors import CLIENT_CLOSED_REQUEST
from service.api.middleware import log_fields
from service.api.models import ServedModel
from service.api.oip_tensors import (
    HEADER_LENGTH,
    InferenceRequest,
    OutputTensor,
    Tensor,
    TensorError,
    bytes_array,
    decode_request,
    encode_response,
    inline_schema,
    parameter,
)
from service.api.routes.generate import generation_request
from service.api.schemas import GenerateRequest
from service.engine.client import EngineClient
from service.imaging import png_bytes

__all__ = ["INPUTS", "OUTPUTS", "VERSION", "router"]

router = APIRouter(prefix="/v2", tags=["open inference protocol"])

VERSION = "1"  # the one version of the served model
EXTENSIONS = ["binary_tensor_data"]
INPUTS: dict[str, tuple[str, bool]] = {  # name: (datatype, required); each of shape [1]
    "num_images": ("INT32", True),
    "seed": ("INT64", False),
    "sampler": ("BYTES", True),
    "steps": ("INT32", False),
    "eta": ("FP32", False),
    "timestep_spacing": ("BYTES", False),
    "init_image": ("BYTES", False),  # the file itself (PNG, JPEG or .npy), as /generate's base64 field holds it
    "strength": ("FP32", False),
    "mask": ("BYTES", False),  # PNG/JPEG (white = regenerate) or .npy
    "class_label": ("INT32", False),
    "guidance_scale": ("FP32", False),
}
FILE_INPUTS = ("init_image", "mask")  # BYTES holding a file, not text
OUTPUTS = {"images": "FP32", "png": "BYTES"}  # images: (N, C, H, W) in [-1, 1]; png: N PNG files, only when asked


class InferenceErrorResponse(BaseModel):
    """Every ``/v2`` error (the request id is in the ``X-Request-ID`` header)."""

    error: str = Field(examples=["unknown model 'cifar'; this server serves 'mnist'"])


class ServerLiveResponse(BaseModel):
    live: bool


class ServerReadyResponse(BaseModel):
    ready: bool


class ModelReadyResponse(BaseModel):
    name: str
    ready: bool


class ServerMetadataResponse(BaseModel):
    name: str
    version: str
    extensions: list[str]


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: any size")


class ModelMetadataResponse(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size: the tensor follows the JSON")
    data: list[Any] | None = Field(None, description="row-major elements; BYTES as base64 strings")


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = Field(None, description="the request's id, when it gave one")
    parameters: dict[str, Any] = Field(description="seed, sampler, steps, eta, timestep_spacing used")
    outputs: list[ResponseOutput]


_DESCRIPTIONS = {
    400: "Malformed request: bad JSON, tensor, shape, datatype, unknown or missing input, value out of range",
    401: "API key missing or wrong (`WWW-Authenticate: Bearer`)",
    404: "Unknown model or version",
    413: "Request body larger than DDPM_MAX_UPLOAD_BYTES",
    429: "Queue full, or this client's share of it; retry after `Retry-After` seconds",
    500: "The engine failed on this request",
    503: "Model not loaded/warm yet, draining for shutdown, or the engine failed",
    504: "Request deadline (DDPM_REQUEST_TIMEOUT_S) passed",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for ``/v2`` error statuses, all ``{"error": str}``."""
    return {code: {"model": InferenceErrorResponse, "description": _DESCRIPTIONS[code]} for code in codes}


def _model(request: Request, name: str, version: str | None) -> ServedModel:
    """The served model ``name`` (at ``version``, if given); 404 for any other."""
    served = served_model(request, name)
    if version is not None and version != VERSION:
        raise HTTPException(404, f"model {name!r} has no version {version!r}; versions: {VERSION}")
    return served


def _engine(request: Request, name: str, version: str | None) -> EngineClient:
    """The ready engine of model ``name`` (404 unknown, 503 loading or draining)."""
    _model(request, name, version)
    return engine_for(request, name)


# ------------------------------------------------------------------------------------------------ health
@router.get("/health/live", summary="Server live (OIP)", response_model=ServerLiveResponse,
            responses={503: {"model": ServerLiveResponse, "description": "the engine failed; the process is exiting"}})
async def server_live(request: Request) -> JSONResponse:
    """200 while the process serves HTTP, as `/healthz`; 503 once the engine failed."""
    live = not getattr(request.app.state, "fatal", False)
    return JSONResponse({"live": live}, status_code=200 if live else 503)


@router.get("/health/ready", summary="Server ready (OIP)", response_model=ServerReadyResponse,
            responses={503: {"model": ServerReadyResponse, "description": "loading, warming up, draining or failed"}})
async def server_ready(request: Request) -> JSONResponse:
    """200 once every model is loaded and warm, as `/readyz`; 503 before that, while draining and once failed."""
    ready = request.app.state.models.ready and not request.app.state.draining
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


_MODEL_READY: dict[str, Any] = {
    "response_model": ModelReadyResponse,
    "responses": {503: {"model": ModelReadyResponse, "description": "not loaded/warm yet, or draining"},
                  **_errors(401, 404)},
    "dependencies": [RequireApiKey],
}


@router.get("/models/{name}/ready", summary="Model ready (OIP)", **_MODEL_READY)
@router.get("/models/{name}/versions/{version}/ready", summary="Model version ready (OIP)", **_MODEL_READY)
async def model_ready(name: str, request: Request, version: str | None = None) -> JSONResponse:
    """200 when the model is ready for inference; 503 while it loads, warms up or drains; 404 for other models."""
    ready = _model(request, name, version).ready and not request.app.state.draining
    return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)


# ---------------------------------------------------------------------------------------------- metadata
@router.get("", summary="Server metadata (OIP)", response_model=ServerMetadataResponse,
            responses=_errors(401), dependencies=[RequireApiKey])
async def server_metadata(request: Request) -> ServerMetadataResponse:
    """The server's name, version and protocol extensions (`binary_tensor_data`)."""
    return ServerMetadataResponse(name="ddpm-service", version=request.app.version, extensions=EXTENSIONS)


_MODEL_METADATA: dict[str, Any] = {
    "response_model": ModelMetadataResponse, "responses": _errors(401, 404, 503), "dependencies": [RequireApiKey],
}


@router.get("/models/{name}", summary="Model metadata (OIP)", **_MODEL_METADATA)
@router.get("/models/{name}/versions/{version}", summary="Model version metadata (OIP)", **_MODEL_METADATA)
async def model_metadata(name: str, request: Request, version: str | None = None) -> ModelMetadataResponse:
    """The model's inputs (each of shape [1]; `num_images` and `sampler` required) and outputs (-1: N images)."""
    engine = _engine(request, name, version)
    info = engine.model_info
    image = [-1, info.channels, info.image_size, info.image_size]
    return ModelMetadataResponse(
        name=info.name,
        versions=[VERSION],
        platform="pytorch",
        inputs=[MetadataTensor(name=n, datatype=dt, shape=[1]) for n, (dt, _) in INPUTS.items()],
        outputs=[MetadataTensor(name="images", datatype="FP32", shape=image),
                 MetadataTensor(name="png", datatype="BYTES", shape=[-1])],
    )


# --------------------------------------------------------------------------------------------- inference
def _generate_body(tensors: dict[str, Tensor]) -> GenerateRequest:
    """The ``/generate`` body the input tensors stand for (400 for a wrong name, datatype, shape or value)."""
    fields: dict[str, Any] = {}
    for name, tensor in tensors.items():
        if name not in INPUTS:
            raise HTTPException(400, f"unknown input {name!r}; inputs: {', '.join(INPUTS)}")
        datatype = INPUTS[name][0]
        if tensor.datatype != datatype:
            raise HTTPException(400, f"input {name!r}: datatype {tensor.datatype}, expected {datatype}")
        if tensor.data.shape != (1,):
            raise HTTPException(400, f"input {name!r}: shape {list(tensor.data.shape)}, expected [1]")
        value = tensor.data.item()
        if name in FILE_INPUTS:
            value = base64.b64encode(value).decode("ascii")
        elif datatype == "BYTES":
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise HTTPException(400, f"input {name!r}: not UTF-8 text") from exc
        fields[name] = value
    missing = [n for n, (_, required) in INPUTS.items() if required and n not in fields]
    if missing:
        raise HTTPException(400, f"missing input(s): {', '.join(missing)}")
    try:
        return GenerateRequest(**fields, format="npy")
    except ValidationError as exc:  # rendered by service.api.errors: 400 {"error": "steps: ..."} under /v2
        raise RequestValidationError(exc.errors()) from exc


def _requested(body: InferenceRequest) -> dict[str, bool]:
    """Output name → whether it goes as binary data; default: ``images`` alone."""
    default = parameter(body.parameters, "binary_data_output", bool) or False
    if not body.outputs:
        return {"images": default}
    wanted: dict[str, bool] = {}
    for out in body.outputs:
        if out.name not in OUTPUTS:
            raise TensorError(f"unknown output {out.name!r}; outputs: {', '.join(OUTPUTS)}")
        if out.name in wanted:
            raise TensorError(f"output {out.name!r} asked for twice")
        binary = parameter(out.parameters, "binary_data", bool)
        wanted[out.name] = default if binary is None else binary
    return wanted


_INFER_200 = {
    "model": InferenceResponse,
    "description": "JSON; with binary outputs, `application/octet-stream`: the JSON (its length in the "
    f"`{HEADER_LENGTH}` header), then each binary output's bytes",
    "headers": {HEADER_LENGTH: {"description": "length of the JSON part (binary outputs only)",
                                "schema": {"type": "integer"}}},
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
}
_INFER: dict[str, Any] = {
    "response_class": Response,
    "responses": {200: _INFER_200, **_errors(400, 401, 404, 413, 429, 500, 503, 504)},
    "dependencies": [RequireApiKey],
    "openapi_extra": {"requestBody": {  # the body is read raw: JSON, or JSON + binary tensors
        "required": True,
        "description": f"The JSON object; with the binary extension, followed by the binary inputs (`{HEADER_LENGTH}`"
        " gives the JSON's length, `parameters.binary_data_size` each input's)",
        "content": {"application/json": {"schema": inline_schema(InferenceRequest)}},
    }},
}


@router.post("/models/{name}/infer", summary="Inference (OIP)", **_INFER)
@router.post("/models/{name}/versions/{version}/infer", summary="Model version inference (OIP)", **_INFER)
async def infer(name: str, request: Request, settings: SettingsDep, version: str | None = None) -> Response:
    """Generate images from named tensors: `num_images` (INT32), `sampler` (BYTES), optional `seed` (INT64),
    `steps` (INT32), `eta` (FP32), `timestep_spacing` (BYTES), each of shape [1], as in `POST /generate`.

    Outputs `images` (FP32 [N, C, H, W] in [-1, 1]; the default) and `png` (BYTES [N], when asked for in
    `outputs`); `parameters.binary_data` (per output) or `binary_data_output` (request) sends them as binary data
    after the JSON. The same seed and options give the same images as `/generate`. Disconnecting cancels the request.
    """
    engine = _engine(request, name, version)
    try:
        body, tensors = decode_request(await request.body(), request.headers.get(HEADER_LENGTH))
        wanted = _requested(body)
    except TensorError as exc:
        raise HTTPException(400, str(exc)) from exc
    gen = _generate_body(tensors)
    log_fields(request.scope, sampler=gen.sampler, images=gen.num_images)
    handle = submit(engine, generation_request(gen, engine, settings, request))
    try:
        result = await await_unless_disconnected(request, handle.result())  # EngineError → its status (errors.py)
    except ClientDisconnected:
        handle.cancel()
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    outputs = []
    for out, binary in wanted.items():
        if out == "images":
            outputs.append(OutputTensor("images", "FP32", result.images.numpy(), binary))
        else:
            pngs = [png_bytes(image) for image in result.images]
            outputs.append(OutputTensor("png", "BYTES", bytes_array(pngs), binary))
    head: dict[str, Any] = {"model_name": engine.model_info.name, "model_version": VERSION}
    if body.id is not None:
        head["id"] = body.id
    head["parameters"] = {"seed": result.seed, "sampler": result.sampler, "steps": result.steps,
                          "eta": result.eta, "timestep_spacing": result.timestep_spacing}
    content, json_length = encode_response(head, outputs)
    if json_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(json_length)})


# ----------------------------------------------------------------------------------- anything else in /v2
@router.api_route("{path:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
                  include_in_schema=False)
async def not_found(request: Request) -> None:
    """404 (or 405 with ``Allow`` for a known path) in the protocol's error form, instead of the web page's."""
    here = request.scope["path"]
    allowed = {m for r in router.routes if isinstance(r, APIRoute) and r.endpoint is not not_found
               and r.path_regex.match(here) for m in r.methods}
    if allowed:
        raise HTTPException(405, "method not allowed", headers={"Allow": ", ".join(sorted(allowed))})
    raise HTTPException(404, f"no such endpoint: {here}")
