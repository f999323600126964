"""A typed Python client for the DDPM service, on httpx: :class:`Client` (sync) and :class:`AsyncClient` (async).

    from service.client import Client

    with Client("http://localhost:8000", api_key=KEY) as client:
        result = client.generate(4, seed=42, sampler="ddim", steps=20)
        result.images[0].save("digit.png")

The two classes share one core. Every operation is written once, in :class:`_Base`, as a function that builds the
``httpx.Request`` and says how to parse the ``httpx.Response`` (a :class:`_Call`); each class only sends it, with
``send`` or ``await send``, and sleeps between retries, as httpx's own sync/async auth flows do. Retries
(:class:`Retry`) cover 429 and 503 only, honouring ``Retry-After``; every error answer raises :class:`ServiceError`.

Importing this module needs only httpx and Pillow: numpy is imported when an array is decoded, torch never.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import email.utils
import functools
import inspect
import io
import json
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Concatenate, Generic, Literal, ParamSpec, TypeVar

import httpx
from PIL import Image

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "DEFAULT_TIMEOUT",
    "DEFAULT_URL",
    "ArrayResult",
    "AsyncClient",
    "Client",
    "DenoiseStepResult",
    "GenerationResult",
    "ModelInfo",
    "NoiseResult",
    "ProgressEvent",
    "Retry",
    "Sampler",
    "ServiceError",
    "Spacing",
    "StreamEvent",
    "Variance",
]

Sampler = Literal["ddpm", "ddim", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc"]
Spacing = Literal["leading", "trailing", "linspace", "karras", "logsnr"]
Variance = Literal["fixed_small", "fixed_large"]
Include = Literal["x0", "noise"]

DEFAULT_URL = "http://localhost:8000"
DEFAULT_TIMEOUT = httpx.Timeout(330.0, connect=10.0)  # past the server's own deadline (DDPM_REQUEST_TIMEOUT_S=300)

T = TypeVar("T")
P = ParamSpec("P")
D = TypeVar("D")


# ------------------------------------------------------------------------------------------------ errors, retries
class ServiceError(Exception):
    """An error answer from the service.

    ``status``: the HTTP status (or, for a stream, the status of its ``error`` event, e.g. 504); ``detail``: the
    server's message; ``request_id``: the request's id (``X-Request-ID``); ``errors``: one entry per invalid field
    on a 422; ``retry_after``: the ``Retry-After`` seconds of a 429/503 that was not (or no longer) retried.
    """

    def __init__(
        self,
        status: int,
        detail: str,
        request_id: str | None = None,
        errors: list[dict[str, Any]] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status}: {detail}" + (f" (request {request_id})" if request_id else ""))
        self.status = status
        self.detail = detail
        self.request_id = request_id
        self.errors = errors
        self.retry_after = retry_after


def _retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (delay-seconds or an HTTP date); None when absent or unreadable."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = (when.replace(tzinfo=when.tzinfo or UTC) - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _raise_for_status(response: httpx.Response) -> None:
    """Raise :class:`ServiceError` for a non-2xx answer (body ``{"detail", "request_id", "errors"?}``)."""
    if response.is_success:
        return
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):  # not our JSON (a proxy's page, say)
        body = {"detail": response.text or response.reason_phrase}
    raise ServiceError(
        response.status_code,
        str(body.get("detail", "")),
        body.get("request_id") or response.headers.get("x-request-id"),
        body.get("errors"),
        _retry_after(response),
    )


@dataclass(frozen=True)
class Retry:
    """When to retry: only on 429 (queue full) and 503 (loading, draining); never other statuses or transport errors.

    Each wait is the response's ``Retry-After`` (seconds or an HTTP date); without one, ``backoff · 2^(n−1)`` for
    the n-th retry, capped at ``max_wait``. A ``Retry-After`` above ``max_wait`` is not waited for: the error is
    raised at once. Retrying is safe: a 429/503 means the server started no work.
    """

    attempts: int = 4  # tries in all, the first included (1 = never retry)
    max_wait: float = 30.0  # seconds: the longest single wait
    backoff: float = 1.0  # seconds: the first wait when the server gives no Retry-After
    statuses: frozenset[int] = frozenset({429, 503})

    def delay(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before trying again after ``response`` to try number ``attempt``; None: stop here."""
        if response.status_code not in self.statuses or attempt >= self.attempts:
            return None
        wait = _retry_after(response)
        if wait is None:
            return min(self.backoff * 2.0 ** (attempt - 1), self.max_wait)
        return wait if wait <= self.max_wait else None


# ------------------------------------------------------------------------------------------------ results
def _png(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def _npy(data: bytes) -> np.ndarray:
    import numpy as np

    array: np.ndarray = np.load(io.BytesIO(data), allow_pickle=False)
    return array


def _b64_npy(data: str | None) -> np.ndarray | None:
    return None if data is None else _npy(base64.b64decode(data))


def _to_b64_npy(array: Any) -> str:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(array, dtype=np.float32), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _pick(cls: type[D], body: Mapping[str, Any], **values: Any) -> D:
    """``cls`` from the JSON fields it declares (fields a newer server adds are ignored); ``values`` win."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{**{k: v for k, v in body.items() if k in names}, **values})


def _request_id(response: httpx.Response) -> str | None:
    value: str | None = response.headers.get("x-request-id")
    return value


@dataclass(frozen=True)
class GenerationResult:
    """The images of one generation (``POST /generate`` as JSON, or the stream's ``result`` event) and their recipe:
    the same seed, sampler, steps, eta and timestep_spacing give the same images."""

    images: list[Image.Image]  # one per image: mode L (grey) or RGB
    seed: int
    sampler: str
    steps: int
    eta: float
    timestep_spacing: str
    shape: list[int]  # (N, C, H, W)
    queue_seconds: float  # submission → first denoising step
    total_seconds: float  # submission → completion
    model: str | None = None  # the model that made them (None from servers older than DDPM_MODELS)
    request_id: str | None = None

    def numpy(self) -> np.ndarray:
        """float32 (N, C, H, W) in [-1, 1], decoded from the 8-bit PNGs: within 1/255 of the model's output (clipped
        to [-1, 1]). For the exact floats use ``generate_array``."""
        import numpy as np

        pixels = np.stack([np.asarray(img, dtype=np.float32) for img in self.images])  # (N, H, W) or (N, H, W, 3)
        pixels = pixels[:, None] if pixels.ndim == 3 else pixels.transpose(0, 3, 1, 2)
        return (pixels / np.float32(127.5) - np.float32(1.0)).astype(np.float32)


def _generation(body: Mapping[str, Any], request_id: str | None) -> GenerationResult:
    return _pick(GenerationResult, body, images=[_png(s) for s in body["images"]], request_id=request_id)


@dataclass(frozen=True)
class ArrayResult:
    """``POST /generate`` with ``format=npy``: the model's exact output."""

    array: np.ndarray  # float32 (N, C, H, W) in [-1, 1]
    seed: int
    request_id: str | None = None


@dataclass(frozen=True)
class ProgressEvent:
    """A stream's ``progress`` event."""

    step: int  # steps finished, 1..total
    total: int
    preview: Image.Image | None = None  # the predicted x̂_0 (a grid for several images), every k steps


StreamEvent = ProgressEvent | GenerationResult


@dataclass(frozen=True)
class NoiseResult:
    """The forward process x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε at each t, all sharing one ε (``/noise`` as JSON)."""

    image: str  # the example's name, or "upload"
    seed: int  # seed of ε
    ts: list[int]
    alpha_bar: list[float]  # ᾱ_t for each t
    x_t: np.ndarray  # float32 (K, C, H, W), one per t
    images: list[Image.Image]  # x_t as PNGs, one per t (upscaled by ``scale``)
    x0: np.ndarray | None = None  # (C, H, W), with include "x0"
    noise: np.ndarray | None = None  # ε, (C, H, W), with include "noise"
    request_id: str | None = None


@dataclass(frozen=True)
class DenoiseStepResult:
    """One reverse step x_t → x_{t-1} (``POST /denoise-step``); arrays are float32 (C, H, W).

    ``x_prev = posterior_mean + √sigma_squared · noise`` and
    ``posterior_mean = posterior_mean_coef_x0 · x0_pred + posterior_mean_coef_xt · x_t``.
    """

    t: int
    seed: int
    variance: str
    x_prev: np.ndarray
    eps: np.ndarray  # ε_θ(x_t, t)
    x0_pred: np.ndarray
    posterior_mean: np.ndarray
    noise: np.ndarray  # z added (zeros at t = 0)
    x_prev_image: Image.Image
    x0_pred_image: Image.Image
    alpha_t: float
    alpha_bar_t: float
    alpha_bar_prev: float
    beta_t: float
    posterior_mean_coef_x0: float
    posterior_mean_coef_xt: float
    posterior_variance: float
    sigma_squared: float
    request_id: str | None = None


@dataclass(frozen=True)
class ModelInfo:
    """``GET /v1/model``: the served model and the server's limits."""

    name: str
    sha256: str
    image_shape: list[int]  # (C, H, W)
    num_train_timesteps: int  # T; timesteps are 0-based, 0..T-1
    schedule: dict[str, Any]  # beta_schedule, num_train_timesteps, beta_start, beta_end
    variance_type: str
    clip_sample: bool
    device: str
    dtype: str
    samplers: list[str]
    default_sampler: str  # what generate() runs when sampler is None
    default_steps: dict[str, int]
    max_steps: dict[str, int]
    timestep_spacings: dict[str, list[str]]
    default_timestep_spacing: dict[str, str]
    max_images_per_request: int
    examples: list[str]  # example images for noise(image=...)
    ready: bool = True  # its engine is warm and admits work


def _noise_result(body: Mapping[str, Any], request_id: str | None) -> NoiseResult:
    return _pick(
        NoiseResult,
        body,
        x_t=_b64_npy(body["x_t"]),
        images=[_png(s) for s in body["x_t_png"]],
        x0=_b64_npy(body.get("x0")),
        noise=_b64_npy(body.get("noise")),
        request_id=request_id,
    )


def _denoise_result(body: Mapping[str, Any], request_id: str | None) -> DenoiseStepResult:
    arrays = {k: _b64_npy(body[k]) for k in ("x_prev", "eps", "x0_pred", "posterior_mean", "noise")}
    return _pick(
        DenoiseStepResult,
        body,
        **arrays,
        x_prev_image=_png(body["x_prev_png"]),
        x0_pred_image=_png(body["x0_pred_png"]),
        request_id=request_id,
    )


def _model_info(body: Mapping[str, Any], request_id: str | None) -> ModelInfo:
    return _pick(ModelInfo, body)


# ------------------------------------------------------------------------------------------------ server-sent events
class _EventReader:
    """``POST /generate/stream`` lines → :data:`StreamEvent` s; an ``error`` event raises :class:`ServiceError`."""

    def __init__(self, response: httpx.Response) -> None:
        self._status = response.status_code
        self._request_id = _request_id(response)
        self._event = ""
        self._data: list[str] = []
        self._done = False

    def feed(self, line: str) -> StreamEvent | None:
        """One line (without its newline); an event once a blank line ends it."""
        if line:
            field, _, value = line.partition(":")
            if field == "event":
                self._event = value.removeprefix(" ")
            elif field == "data":
                self._data.append(value.removeprefix(" "))
            return None  # also comments (":...") and fields we do not use
        event, data = self._event, "\n".join(self._data)
        self._event, self._data = "", []
        if not data:
            return None
        body = json.loads(data)
        if event == "progress":
            preview = body.get("preview")
            return ProgressEvent(body["step"], body["total"], _png(preview) if preview else None)
        if event == "result":
            self._done = True
            return _generation(body, self._request_id)
        if event == "error":
            raise ServiceError(
                int(body.get("status", 500)), str(body.get("detail", "")), body.get("request_id") or self._request_id
            )
        return None  # an event this client does not know

    def finish(self) -> None:
        if not self._done:
            raise ServiceError(self._status, "the stream ended without a result event", self._request_id)


# ------------------------------------------------------------------------------------------------ the shared core
@dataclass(frozen=True)
class _Call(Generic[T]):
    """One operation: the request to send, how to read its answer, and whether a 429/503 may be retried."""

    request: httpx.Request
    parse: Callable[[httpx.Response], T]
    retry: bool = True


def _json(kind: Callable[[Mapping[str, Any], str | None], T]) -> Callable[[httpx.Response], T]:
    def parse(response: httpx.Response) -> T:
        _raise_for_status(response)
        return kind(response.json(), _request_id(response))

    return parse


def _generation_body(
    num_images: int,
    seed: int | None,
    sampler: str | None,
    steps: int | None,
    eta: float | None,
    timestep_spacing: str | None,
    model: str | None,
    extra: Mapping[str, Any] | None,
    **fixed: Any,
) -> dict[str, Any]:
    """The JSON body; fields left None are not sent, so the server's defaults apply."""
    body = {
        "model": model,
        "num_images": num_images,
        "seed": seed,
        "sampler": sampler,
        "steps": steps,
        "eta": None if eta is None else float(eta),
        "timestep_spacing": timestep_spacing,
        **fixed,
    }
    return {**{k: v for k, v in body.items() if v is not None}, **(extra or {})}


def _sniff(data: bytes) -> str:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    return "image/jpeg" if data.startswith(b"\xff\xd8\xff") else "application/octet-stream"


class _Base:
    """What both clients share: each operation's request and the parsing of its answer."""

    _http: httpx.Client | httpx.AsyncClient
    retry: Retry

    def __init__(self, http: httpx.Client | httpx.AsyncClient, retry: Retry | None) -> None:
        self._http = http
        self.retry = retry or Retry()

    @property
    def base_url(self) -> httpx.URL:
        return self._http.base_url

    def _request(self, method: str, path: str, request_id: str | None, **kwargs: Any) -> httpx.Request:
        headers = {**kwargs.pop("headers", {}), **({"X-Request-ID": request_id} if request_id else {})}
        return self._http.build_request(method, path, headers=headers, **kwargs)

    def _generate(
        self,
        num_images: int = 1,
        *,
        seed: int | None = None,
        sampler: Sampler | None = None,
        steps: int | None = None,
        eta: float | None = None,
        timestep_spacing: Spacing | None = None,
        model: str | None = None,
        extra: Mapping[str, Any] | None = None,
        request_id: str | None = None,
    ) -> _Call[GenerationResult]:
        """Generate ``num_images`` images (``POST /generate``).

        Options left None take the server's defaults (``model().default_steps`` and ``default_timestep_spacing``);
        ``eta`` is DDIM's η; ``model`` names one of ``models()`` (default: the server's first). ``extra`` adds body
        fields this client does not name; ``request_id`` sets ``X-Request-ID``. Returns the PIL images and how
        they were made; ``.numpy()`` decodes them to floats.
        """
        body = _generation_body(num_images, seed, sampler, steps, eta, timestep_spacing, model, extra, format="json")
        return _Call(self._request("POST", "/generate", request_id, json=body), _json(_generation))

    def _generate_array(
        self,
        num_images: int = 1,
        *,
        seed: int | None = None,
        sampler: Sampler | None = None,
        steps: int | None = None,
        eta: float | None = None,
        timestep_spacing: Spacing | None = None,
        model: str | None = None,
        extra: Mapping[str, Any] | None = None,
        request_id: str | None = None,
    ) -> _Call[ArrayResult]:
        """Like ``generate``, but the model's exact float32 output (N, C, H, W) in [-1, 1] (``format=npy``)."""
        body = _generation_body(num_images, seed, sampler, steps, eta, timestep_spacing, model, extra, format="npy")

        def parse(response: httpx.Response) -> ArrayResult:
            _raise_for_status(response)
            return ArrayResult(_npy(response.content), int(response.headers["x-seed"]), _request_id(response))

        return _Call(self._request("POST", "/generate", request_id, json=body), parse)

    def _stream(
        self,
        num_images: int = 1,
        *,
        seed: int | None = None,
        sampler: Sampler | None = None,
        steps: int | None = None,
        eta: float | None = None,
        timestep_spacing: Spacing | None = None,
        model: str | None = None,
        extra: Mapping[str, Any] | None = None,
        request_id: str | None = None,
    ) -> httpx.Request:
        """Generate with progress (``POST /generate/stream``): yields :class:`ProgressEvent` s (``preview`` every k
        steps), then the :class:`GenerationResult`. The request is sent when iteration starts. An error before
        sampling (422, 429, 503) or an ``error`` event (e.g. 504) raises :class:`ServiceError`. Closing the iterator
        early closes the connection, which cancels the request (a sync ``for`` closes it on ``break``; wrap an
        ``async for`` in ``contextlib.aclosing`` to close it at once).
        """
        body = _generation_body(num_images, seed, sampler, steps, eta, timestep_spacing, model, extra)
        return self._request("POST", "/generate/stream", request_id, json=body)

    def _noise(
        self,
        t: int | Sequence[int] | None = None,
        *,
        image: str | None = None,
        upload: bytes | Image.Image | os.PathLike[str] | None = None,
        seed: int | None = None,
        include: Iterable[Include] = (),
        scale: int = 1,
        model: str | None = None,
        request_id: str | None = None,
    ) -> _Call[NoiseResult]:
        """The forward process at timestep ``t`` (0-based), or at each of a list of timesteps (one shared ε).

        On the example ``image`` (``GET /noise``, names in ``model().examples``; default: the first) or on
        ``upload``, a PNG/JPEG given as bytes, a path or a PIL image (``POST /noise``). ``include`` adds x_0
        and/or ε; ``scale`` upscales the PNGs; ``model`` as in ``generate``.
        """
        params: dict[str, Any] = {"format": "json", "scale": scale}
        if model is not None:
            params["model"] = model
        if isinstance(t, Iterable):
            params["ts"] = ",".join(str(int(v)) for v in t)
        elif t is not None:
            params["t"] = int(t)
        if seed is not None:
            params["seed"] = seed
        if extras := ",".join([include] if isinstance(include, str) else include):
            params["include"] = extras
        parse = _json(_noise_result)
        if upload is None:
            if image is not None:
                params["image"] = image
            return _Call(self._request("GET", "/noise", request_id, params=params), parse)
        if image is not None:
            raise ValueError("give an example image name or an upload, not both")
        if isinstance(upload, Image.Image):
            data = _png_bytes(upload)
        elif isinstance(upload, bytes):
            data = upload
        else:
            with open(upload, "rb") as f:
                data = f.read()
        headers = {"Content-Type": _sniff(data)}
        return _Call(self._request("POST", "/noise", request_id, params=params, content=data, headers=headers), parse)

    def _denoise_step(
        self,
        x_t: np.ndarray | Image.Image,
        t: int,
        *,
        seed: int | None = None,
        noise: np.ndarray | None = None,
        variance: Variance | None = None,
        model: str | None = None,
        request_id: str | None = None,
    ) -> _Call[DenoiseStepResult]:
        """One ancestral step x_t → x_{t-1} at 0-based timestep ``t`` (``POST /denoise-step``).

        ``x_t``: an array (C, H, W) or (1, C, H, W), or a PIL image (taken as x_t). With ``seed``, z is the draw
        ``generate(seed=seed, sampler="ddpm", steps=T)`` makes for image 0 at t; ``noise`` gives z explicitly;
        ``variance`` picks σ_t² (default: the model's).
        """
        body: dict[str, Any] = {"t": t}
        if isinstance(x_t, Image.Image):
            body["image"] = base64.b64encode(_png_bytes(x_t)).decode("ascii")
        else:
            body["x_t"] = _to_b64_npy(x_t)
        for key, value in (("seed", seed), ("variance", variance), ("model", model)):
            if value is not None:
                body[key] = value
        if noise is not None:
            body["noise"] = _to_b64_npy(noise)
        return _Call(self._request("POST", "/denoise-step", request_id, json=body), _json(_denoise_result))

    def _model(self, name: str | None = None, *, request_id: str | None = None) -> _Call[ModelInfo]:
        """A served model (``name``; default: the server's first): shape, T, schedule, samplers with their default
        and maximum steps, limits."""
        params = {"model": name} if name is not None else {}
        return _Call(self._request("GET", "/v1/model", request_id, params=params), _json(_model_info))

    def _models(self, *, request_id: str | None = None) -> _Call[list[ModelInfo]]:
        """Every served model (``GET /v1/models``), the default first."""

        def parse(response: httpx.Response) -> list[ModelInfo]:
            _raise_for_status(response)
            return [_model_info(m, _request_id(response)) for m in response.json()["models"]]

        return _Call(self._request("GET", "/v1/models", request_id), parse)

    def _health(self) -> _Call[bool]:
        """Liveness (``GET /healthz``): True while the process serves HTTP; transport errors raise."""
        return _Call(self._request("GET", "/healthz", None), lambda r: r.status_code == 200, retry=False)

    def _ready(self) -> _Call[bool]:
        """Readiness (``GET /readyz``): True once the model is loaded and warm, False while loading or draining."""
        return _Call(self._request("GET", "/readyz", None), lambda r: r.status_code == 200, retry=False)


def _public(method: Callable[..., Any], op: Callable[..., Any], returns: str | None = None) -> None:
    """Name ``method`` after ``op`` (less its underscore), with op's docstring and parameters, returning ``returns``
    (default: what op's ``_Call`` parses to)."""
    functools.update_wrapper(method, op)
    signature = inspect.signature(op)
    returns = returns or str(signature.return_annotation).removeprefix("_Call[").removesuffix("]")
    method.__signature__ = signature.replace(return_annotation=returns)  # type: ignore[attr-defined]
    method.__name__ = method.__qualname__ = op.__name__.removeprefix("_")


def _sync(op: Callable[Concatenate[Any, P], _Call[T]]) -> Callable[Concatenate[Client, P], T]:
    def method(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        call = op(self, *args, **kwargs)
        return call.parse(self._send(call.request, call.retry))

    _public(method, op)
    return method


def _async(
    op: Callable[Concatenate[Any, P], _Call[T]],
) -> Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]]:
    async def method(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        call = op(self, *args, **kwargs)
        return call.parse(await self._send(call.request, call.retry))

    _public(method, op)
    return method


def _sync_stream(
    op: Callable[Concatenate[Any, P], httpx.Request],
) -> Callable[Concatenate[Client, P], Iterator[StreamEvent]]:
    def method(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> Iterator[StreamEvent]:
        response = self._send(op(self, *args, **kwargs), stream=True)
        try:
            if response.is_error:
                response.read()
                _raise_for_status(response)
            reader = _EventReader(response)
            for line in response.iter_lines():
                if (event := reader.feed(line)) is not None:
                    yield event
            reader.finish()
        finally:
            response.close()

    _public(method, op, "Iterator[StreamEvent]")
    return method


def _async_stream(
    op: Callable[Concatenate[Any, P], httpx.Request],
) -> Callable[Concatenate[AsyncClient, P], AsyncIterator[StreamEvent]]:
    async def method(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> AsyncIterator[StreamEvent]:
        response = await self._send(op(self, *args, **kwargs), stream=True)
        try:
            if response.is_error:
                await response.aread()
                _raise_for_status(response)
            reader = _EventReader(response)
            async for line in response.aiter_lines():
                if (event := reader.feed(line)) is not None:
                    yield event
            reader.finish()
        finally:
            await response.aclose()

    _public(method, op, "AsyncIterator[StreamEvent]")
    return method


def _http_options(
    base_url: str, api_key: str | None, timeout: float | httpx.Timeout, headers: Mapping[str, str] | None
) -> dict[str, Any]:
    all_headers = {"User-Agent": "ddpm-service-client", **(headers or {})}
    if api_key:
        all_headers["Authorization"] = f"Bearer {api_key}"
    return {"base_url": base_url, "timeout": timeout, "headers": all_headers}


# ------------------------------------------------------------------------------------------------ the two clients
class Client(_Base):
    """Synchronous client: ``with Client(url, api_key=...) as client: client.generate(4, seed=1)``.

    ``retry``: the :class:`Retry` policy; ``timeout``: httpx's (the default waits past the server's deadline);
    ``transport``: an httpx transport (e.g. ``httpx.MockTransport`` in tests); ``sleep``: how to wait between
    retries.
    """

    _http: httpx.Client

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        retry: Retry | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(httpx.Client(transport=transport, **_http_options(base_url, api_key, timeout, headers)), retry)
        self._sleep = sleep

    def _send(self, request: httpx.Request, retry: bool = True, stream: bool = False) -> httpx.Response:
        attempt = 1
        while True:
            response = self._http.send(request, stream=stream)
            wait = self.retry.delay(response, attempt) if retry else None
            if wait is None:
                return response
            response.close()
            self._sleep(wait)
            attempt += 1

    generate = _sync(_Base._generate)
    generate_array = _sync(_Base._generate_array)
    stream = _sync_stream(_Base._stream)
    noise = _sync(_Base._noise)
    denoise_step = _sync(_Base._denoise_step)
    model = _sync(_Base._model)
    models = _sync(_Base._models)
    health = _sync(_Base._health)
    ready = _sync(_Base._ready)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """Asynchronous client: ``async with AsyncClient(url) as client: await client.generate(4, seed=1)``.

    The same operations and options as :class:`Client`; ``sleep`` is awaited between retries.
    """

    _http: httpx.AsyncClient

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        retry: Retry | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        http = httpx.AsyncClient(transport=transport, **_http_options(base_url, api_key, timeout, headers))
        super().__init__(http, retry)
        self._sleep = sleep

    async def _send(self, request: httpx.Request, retry: bool = True, stream: bool = False) -> httpx.Response:
        attempt = 1
        while True:
            response = await self._http.send(request, stream=stream)
            wait = self.retry.delay(response, attempt) if retry else None
            if wait is None:
                return response
            await response.aclose()
            await self._sleep(wait)
            attempt += 1

    generate = _async(_Base._generate)
    generate_array = _async(_Base._generate_array)
    stream = _async_stream(_Base._stream)
    noise = _async(_Base._noise)
    denoise_step = _async(_Base._denoise_step)
    model = _async(_Base._model)
    models = _async(_Base._models)
    health = _async(_Base._health)
    ready = _async(_Base._ready)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
