"""The inference engine: an asyncio-facing queue in front of a step-level continuous-batching loop.

A request becomes ``num_images`` rows (:class:`~service.diffusion.rows.RowGroup`). A dedicated worker
thread owns the model and loops; each iteration it

1. drops the rows of cancelled and expired requests (queued or running),
2. admits queued requests round-robin over clients, each client up to ``max_batch_rows`` resident rows, oldest
   first within one (:mod:`service.engine.admission`: the bounded queue and each client's share of it),
3. picks at most ``max_batch_rows`` resident rows, max-min fair between clients (all of them when they fit), and
   runs ONE UNet forward over them — each at its own t, of its own sampler and step count — and the per-row
   sampler updates (:func:`~service.diffusion.rows.batched_step`),
4. posts progress events and retires finished requests, resolving their futures on the submitting event
   loop with ``loop.call_soon_threadsafe``.

Faults fail fast. A forward that raises, or returns NaN/Inf, fails the requests of that iteration (``error``
outcome, ``EngineError`` naming each request id) and the loop goes on with later requests. If the worker thread
itself dies, every queued and running request fails at once with ``EngineNotReadyError``, the engine stops
admitting (``ready`` false) and ``on_fatal`` is called, so the server can exit for its supervisor to restart it.

``batching="request"`` is the request-level baseline: requests are admitted only when the running batch
is empty, so a request that arrives just after a batch started waits for the whole batch's loop.

Threads. The worker is the only thread that runs torch with more than one thread; the event loop thread only
queues requests, encodes responses and serves HTTP. ``EngineSettings.threads`` sets the worker's intra-op
thread count (``torch.set_num_threads`` is per-thread under OpenMP, so it is applied inside the worker); 0
means the value ``torch.get_num_threads()`` has where the engine is built, i.e. one thread per physical
core. All cores go to the UNet because it is the bottleneck: torch releases the GIL inside every op and the
event loop needs a small fraction of a core (microseconds per request between forwards), so reserving a core
for it would halve throughput on a 2-core machine; ``bench/load.py`` measures the event-loop lag under load
to check this.

:meth:`Engine.start` sets the *calling* thread to one torch thread. A thread that has run a multi-threaded op
keeps its OpenMP team until it exits, and libgomp (the OpenMP runtime of PyTorch's Linux CPU wheels) stops
spin-waiting between parallel regions once a process has more OpenMP threads than CPUs: its idle workers
then sleep after ~100 spins and every one of a forward's hundreds of short parallel regions pays a wake-up.
On the 2-core development machine a 16-row bf16 forward took 37 ms on the worker when the main thread had
run a 2-thread op before, 25 ms when it had not (docs/benchmarks.md). So a process that embeds the engine
should keep other threads single-threaded from the start (the HTTP app does so before loading the model).
A server with several models has one engine per model, each with its own worker thread and threads (measured
best on the 2-core CPU, README); with ``DDPM_MODEL_SHARING=worker`` their compute goes to one shared
:class:`~service.engine.device.DeviceWorker` thread (``device_worker``) instead, and each engine's own worker
thread stays at one torch thread.
The one case to set ``threads`` lower is a machine shared with other CPU-heavy processes: OpenMP workers
spin while waiting for each other, and on this 2-core machine with a training run beside it a forward of
the tiny test model took 5 ms with 1 thread and 155 ms with 2.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import torch
from prometheus_client import CollectorRegistry

from service.diffusion.checkpoint import DiffusionModel
from service.diffusion.conditioning import default_guidance_scale, num_classes, supported_conditioning
from service.diffusion.pipeline import default_steps, prepare_unet
from service.diffusion.rows import RowGroup, batched_step
from service.diffusion.runner import Compiled, UNetRunner
from service.diffusion.samplers import SAMPLERS, get_sampler
from service.engine.admission import FairQueue
from service.engine.client import (
    ClientQuotaError,
    EngineError,
    EngineNotReadyError,
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    ProgressEvent,
    QueueFullError,
    RequestCancelledError,
    RequestTimeoutError,
)
from service.engine.device import DeviceWorker
from service.engine.handle import Handle, post
from service.metrics import EngineMetrics

__all__ = ["DTYPES", "Engine", "EngineSettings", "claim_threads_for_worker"]

log = logging.getLogger(__name__)

T = TypeVar("T")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def claim_threads_for_worker(requested: int = 0) -> int:
    """The worker's thread count (``requested``, or 0 for the calling thread's current count), leaving the
    calling thread at one torch thread from now on, before it loads a model (module docstring, "Threads")."""
    threads = requested or torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


@dataclass
class EngineSettings:
    max_batch_rows: int = 64  # rows per UNet forward; also the largest num_images of one request
    max_queue_rows: int = 512  # bound on queued + running rows; beyond it submit raises QueueFullError
    max_rows_per_client: int = 0  # one client's queued + running rows (0 = half the queue, >= one full batch)
    request_timeout_s: float = 300.0  # default deadline, from submission
    batching: Literal["step", "request"] = "step"  # "request" = baseline request-level batching
    dtype: str = "float32"  # float32 | bfloat16 | float16 (autocast; channels_last)
    threads: int = 0  # torch intra-op threads for the worker (0 = leave torch's default)
    compiled: Compiled = "auto"  # auto: the model's compiled UNet when valid (diffusion/runner.py); off: eager
    cuda_graphs: bool = True  # on CUDA: replay the forward from CUDA graphs, one per batch-size bucket

    def __post_init__(self) -> None:
        if self.max_batch_rows < 1:
            raise ValueError("max_batch_rows must be >= 1")
        if self.max_queue_rows < self.max_batch_rows:
            raise ValueError("max_queue_rows must be >= max_batch_rows")
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be > 0")
        if self.batching not in ("step", "request"):
            raise ValueError(f"batching must be 'step' or 'request', got {self.batching!r}")
        if self.compiled not in ("auto", "off"):
            raise ValueError(f"compiled must be 'auto' or 'off', got {self.compiled!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.threads < 0:
            raise ValueError("threads must be >= 0")
        if self.max_rows_per_client < 0:
            raise ValueError("max_rows_per_client must be >= 0")
        if self.max_rows_per_client == 0:
            self.max_rows_per_client = max(self.max_queue_rows // 2, self.max_batch_rows)


@dataclass(eq=False)
class _Entry:
    handle: Handle
    steps: int  # steps (UNet forwards) its rows run: the image-to-image tail or the resampled plan, else request.steps
    group: RowGroup | None = None  # created when the request joins the running batch

    @property
    def rows(self) -> int:
        """Rows it counts in the queue bound and the batch: a guided row weighs more (GenerationRequest.queue_rows)."""
        return self.handle.request.queue_rows

    @property
    def client(self) -> str | None:
        return self.handle.request.client

    def remaining_steps(self) -> int:
        return self.group.remaining if self.group is not None else self.steps


@dataclass(eq=False)
class _Job:
    """A bare ε_θ(x_t, t) forward asked for through :meth:`Engine.predict_eps`."""

    x: torch.Tensor
    t: torch.Tensor
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future = field(repr=False)


class NonFiniteOutputError(EngineError):
    """The UNet returned NaN or Inf."""


class Engine:
    """Step-level continuous batching over one model (implements ``client.EngineClient``).

    ``runner`` replaces the UNet forward (default :class:`UNetRunner`; tests wrap it to inject faults);
    ``on_fatal`` is called from the worker thread if the worker dies; ``device_worker``, when given, runs this
    engine's compute, shared with the other engines on the device (:mod:`service.engine.device`).
    """

    def __init__(
        self,
        model: DiffusionModel,
        settings: EngineSettings,
        metrics: EngineMetrics | None = None,
        runner: UNetRunner | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
        device_worker: DeviceWorker | None = None,
    ) -> None:
        self.model = model
        self.settings = settings
        # Without an explicit EngineMetrics the engine keeps its metrics on a private registry (not exported).
        families = metrics if metrics is not None else EngineMetrics(CollectorRegistry())
        self.metrics = families.for_model(model.spec.name)  # every series labelled model=<name>
        self._dtype = DTYPES[settings.dtype]
        self._device = next(model.unet.parameters()).device
        self._device_worker = device_worker
        self._threads = device_worker.threads if device_worker else settings.threads or torch.get_num_threads()
        self._forward = runner if runner is not None else UNetRunner(
            model, self._dtype, settings.compiled, settings.cuda_graphs
        )
        self._on_fatal = on_fatal
        spec = model.spec
        self._info = ModelInfo(
            name=spec.name,
            sha256=model.sha256,
            channels=spec.channels,
            image_size=spec.image_size,
            num_train_timesteps=spec.num_train_timesteps,
            beta_schedule=spec.beta_schedule,
            variance_type=spec.variance_type,
            clip_sample=spec.clip_sample,
            ddpm_clip_range=get_sampler("ddpm").clip_range(spec.options),
            device=str(self._device),
            dtype=settings.dtype,
            schedule=model.schedule,
            default_steps={name: default_steps(model, name) for name in SAMPLERS},
            max_steps={name: s.max_steps(spec.num_train_timesteps) for name, s in SAMPLERS.items()},
            default_timestep_spacing={name: spec.default_spacing(name) for name in SAMPLERS},
            eps_scale={name: spec.eps_scale(name) for name in SAMPLERS},
            conditioning=supported_conditioning(model),
            num_classes=num_classes(model.guidance) if model.guidance is not None else None,
            default_guidance_scale=default_guidance_scale(model),
        )
        self.metrics.set_model(model.sha256, str(self._device), settings.dtype)
        self.metrics.ready.set(0)
        self._cond = threading.Condition()  # guards everything below that both threads touch
        self._queue: FairQueue[_Entry] = FairQueue(settings.max_queue_rows, settings.max_rows_per_client)
        self._active: list[_Entry] = []
        self._jobs: list[_Job] = []
        self._active_rows = 0
        self._accepting = False
        self._stop = False  # finish what was accepted, then exit
        self._abort = False  # exit at the next iteration, failing what is left
        self._died: BaseException | None = None  # what killed the worker thread
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._step_seconds = 0.0  # moving average of one iteration, for retry-after estimates
        self._counts = dict.fromkeys(
            ("iterations", "evicted_rows", "ok", "rejected", "cancelled", "timeout", "error", "images"), 0
        )

    # ------------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Warm the model up on a new worker thread, start its loop, then admit work (``ready``).

        The calling thread is left with one torch intra-op thread when the worker uses more (module docstring).
        """
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._loop = asyncio.get_running_loop()
        if self._threads > 1:
            torch.set_num_threads(1)  # one multi-threaded OpenMP team per process: the worker's (module docstring)
        prepare_unet(self.model, self._dtype)
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._worker, args=(started,), name="ddpm-engine", daemon=True)
        self._thread.start()
        try:
            await asyncio.wrap_future(started)
        except asyncio.CancelledError:  # startup abandoned: the worker exits once its warm-up is done
            with self._cond:
                self._stop = True
                self._cond.notify_all()
            # wait for it: a process that exits while a thread is inside a torch op aborts (SIGABRT)
            await asyncio.to_thread(self._thread.join)
            raise
        with self._cond:
            self._accepting = True
        self.metrics.ready.set(1)

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Stop admitting, finish in-flight work (failing what is left after ``timeout_s``), stop the worker."""
        with self._cond:
            self._accepting = False
            self._stop = True
            self._cond.notify_all()
        self.metrics.ready.set(0)
        thread = self._thread
        if thread is None:
            return
        await asyncio.to_thread(thread.join, max(timeout_s, 0.0))
        if thread.is_alive():
            with self._cond:
                self._abort = True
                self._cond.notify_all()
            await asyncio.to_thread(thread.join)

    # ------------------------------------------------------------------------------ client API
    @property
    def model_info(self) -> ModelInfo:
        return self._info

    @property
    def ready(self) -> bool:
        with self._cond:
            return self._accepting

    @property
    def failed(self) -> bool:
        """True once the worker thread died (the engine will not serve again)."""
        return self._died is not None

    def submit(self, request: GenerationRequest) -> Handle:
        """Queue a request; QueueFullError at once when its rows do not fit, EngineNotReadyError if not running."""
        steps = self._validate(request)
        loop = self._submit_loop()
        n = request.queue_rows  # a guided row weighs more
        with self._cond:
            if not self._accepting:
                raise EngineNotReadyError("the engine is not accepting requests (starting, draining or stopped)")
            refusal = self._queue.refusal(request.client, n)
            if refusal is not None:
                self._counts["rejected"] += 1
                self.metrics.requests.labels(outcome="rejected").inc()
                self.metrics.rejections.labels(reason=refusal).inc()
                if refusal == "client_quota":
                    raise ClientQuotaError(
                        f"client quota: this client has {self._queue.client_rows(request.client)} rows queued or "
                        f"running, {n} more exceed max_rows_per_client={self.settings.max_rows_per_client}",
                        self._retry_after_locked(n, request.client),
                    )
                raise QueueFullError(
                    f"queue full: {self._queue.queued_rows} queued + {self._active_rows} running rows, "
                    f"{n} more exceed max_queue_rows={self.settings.max_queue_rows}",
                    self._retry_after_locked(n),
                )
            now = time.monotonic()
            timeout = request.timeout_s if request.timeout_s is not None else self.settings.request_timeout_s
            handle = Handle(request, loop, now, now + timeout, self._wake)
            self._queue.push(_Entry(handle, steps))
            self._set_gauges_locked()
            self._cond.notify_all()
        return handle

    async def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One UNet forward ε_θ(x_t, t) on the worker (between iterations); float32 CPU result.

        Waiting calls are bounded by ``max_queue_rows`` rows (QueueFullError beyond), separately from generation.
        """
        spec = self.model.spec
        shape = (spec.channels, spec.image_size, spec.image_size)
        if x_t.ndim != 4 or tuple(x_t.shape[1:]) != shape:
            raise ValueError(f"x_t must have shape (B, {', '.join(map(str, shape))}), got {tuple(x_t.shape)}")
        if t.ndim != 1 or t.shape[0] != x_t.shape[0]:
            raise ValueError(f"t must have shape ({x_t.shape[0]},), got {tuple(t.shape)}")
        if bool(((t < 0) | (t >= spec.num_train_timesteps)).any()):
            raise ValueError(f"t must be in 0..{spec.num_train_timesteps - 1}")
        loop = asyncio.get_running_loop()
        job = _Job(x_t.detach().to(torch.float32), t.detach().to(torch.long), loop, loop.create_future())
        with self._cond:
            if not self._accepting:
                raise EngineNotReadyError("the engine is not accepting requests (starting, draining or stopped)")
            waiting = sum(j.x.shape[0] for j in self._jobs)
            if waiting + x_t.shape[0] > self.settings.max_queue_rows:
                self._counts["rejected"] += 1
                raise QueueFullError(
                    f"{waiting} rows of predict_eps calls are waiting; max_queue_rows={self.settings.max_queue_rows}",
                    max(self._step_seconds, 1e-3) * (1 + waiting // self.settings.max_batch_rows),
                )
            self._jobs.append(job)
            self._cond.notify_all()
        return await job.future

    def stats(self) -> dict[str, float]:
        """Queue depth, running rows, worker threads, iterations, evicted rows, outcomes and the mean iteration time."""
        with self._cond:
            c = self._counts
            return {
                "ready": float(self._accepting),
                "failed": float(self._died is not None),
                "compiled": float(getattr(self._forward, "compiled", False)),
                "queued_requests": float(len(self._queue)),
                "queued_rows": float(self._queue.queued_rows),
                "active_requests": float(len(self._active)),
                "active_rows": float(self._active_rows),
                "sampler_state_bytes": float(sum(e.group.state_bytes for e in self._active if e.group is not None)),
                "max_batch_rows": float(self.settings.max_batch_rows),
                "max_queue_rows": float(self.settings.max_queue_rows),
                "max_rows_per_client": float(self.settings.max_rows_per_client),
                "threads": float(self._threads),
                "iterations": float(c["iterations"]),
                "evicted_rows": float(c["evicted_rows"]),
                "requests_ok": float(c["ok"]),
                "requests_rejected": float(c["rejected"]),
                "requests_cancelled": float(c["cancelled"]),
                "requests_timeout": float(c["timeout"]),
                "requests_error": float(c["error"]),
                "images_generated": float(c["images"]),
                "step_seconds": self._step_seconds,
            }

    # ------------------------------------------------------------------------------ helpers (any thread)
    def _validate(self, r: GenerationRequest) -> int:
        """ValueError for a request this engine cannot run; else the steps its rows will run."""
        limit = self.settings.max_batch_rows
        if not 1 <= r.num_images <= limit:
            raise ValueError(f"num_images must be in 1..{limit} (max_batch_rows), got {r.num_images}")
        sampler = get_sampler(r.sampler)  # ValueError names the known samplers
        spacing = r.timestep_spacing or self.model.spec.default_spacing(r.sampler)
        sampler.check(self.model.spec.num_train_timesteps, r.steps, spacing)
        if not 0.0 <= r.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {r.eta}")
        if r.timeout_s is not None and r.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {r.timeout_s}")
        if r.preview_every < 0:
            raise ValueError(f"preview_every must be >= 0, got {r.preview_every}")
        if r.queue_rows > limit:  # a guided row weighs more in the queue bound (GenerationRequest.queue_rows)
            weight = r.queue_rows // r.num_images
            raise ValueError(f"guided rows count {weight}x: num_images must be in 1..{limit // weight} "
                             f"(max_batch_rows={limit}), got {r.num_images}")
        conditioning = r.conditioning(self.model)  # ValueError: ranges, shapes, classes, strength vs steps
        if conditioning is None:
            return r.steps
        conditioning.check(self.model, r.sampler, r.steps)
        return conditioning.row_steps(r.steps)

    def _submit_loop(self) -> asyncio.AbstractEventLoop:
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            if self._loop is None:
                raise EngineNotReadyError("the engine has not been started") from None
            return self._loop

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _set_gauges_locked(self) -> None:
        self.metrics.queue_depth_requests.set(len(self._queue))
        self.metrics.queue_depth_rows.set(self._queue.queued_rows)
        self.metrics.active_rows.set(self._active_rows)

    def _retry_after_locked(self, need: int, client: str | None = None) -> float:
        """Seconds until ``need`` more rows (of ``client``, against its quota, when given) are likely to fit,
        from the measured iteration time and the backlog.

        Running requests advance one step per iteration, so they leave in order of remaining steps; if
        they cannot free enough rows, fall back to the whole backlog (row-steps) at full batches.
        """
        step = max(self._step_seconds, 1e-3)
        if client is None:
            overflow = self._queue.total_rows + need - self.settings.max_queue_rows
            active = self._active
        else:
            overflow = self._queue.client_rows(client) + need - self.settings.max_rows_per_client
            active = [e for e in self._active if e.client == client]
        freed = 0
        for remaining, rows in sorted((e.remaining_steps(), e.rows) for e in active):
            freed += rows
            if freed >= overflow:
                return max(remaining * step, step)
        backlog = sum(e.rows * e.remaining_steps() for e in (*self._active, *self._queue))
        return max(backlog / self.settings.max_batch_rows * step, step)

    # ------------------------------------------------------------------------------ worker thread
    def _worker(self, started: concurrent.futures.Future[None]) -> None:
        try:
            torch.set_num_threads(1 if self._device_worker is not None else self._threads)
            self._on_device(self._warm_up)
        except BaseException as exc:
            started.set_exception(exc)
            return
        started.set_result(None)
        try:
            while True:
                with self._cond:
                    while not (self._queue or self._active or self._jobs or self._stop):
                        self._cond.wait()
                    if self._abort or (self._stop and not (self._queue or self._active or self._jobs)):
                        break
                    jobs, self._jobs = self._jobs, []
                for job in jobs:
                    self._run_job(job)
                self._iterate()
        except BaseException as exc:  # a bug or a fatal error: nothing will serve these requests any more
            log.critical("engine worker died: %r", exc, exc_info=exc)
            self._died = exc
        finally:
            self._shutdown()
        if self._died is not None and self._on_fatal is not None:
            self._on_fatal(self._died)

    def _warm_up(self) -> None:
        """Load the compiled UNet if valid, then forwards at one row and at a full batch (allocators, oneDNN
        primitives).

        The full-batch forward seeds the step-time estimate used for retry-after.
        """
        self._forward.prepare(self.settings.max_batch_rows)
        spec = self.model.spec
        shape = (spec.channels, spec.image_size, spec.image_size)
        t_mid = spec.num_train_timesteps // 2
        for rows in (1, self.settings.max_batch_rows):
            x = torch.randn((rows, *shape), device=self._device)
            t = torch.full((rows,), t_mid, dtype=torch.long, device=self._device)
            start = time.perf_counter()
            self._forward(x, t)
            self._step_seconds = time.perf_counter() - start

    def _on_device(self, fn: Callable[[], T]) -> T:
        """``fn()`` where this engine's compute runs: the shared device worker, or this worker thread."""
        return fn() if self._device_worker is None else self._device_worker.run(fn)

    def _checked_forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε_θ(x, t), or NonFiniteOutputError when any value is NaN/Inf (it would only spread through the rows).

        On CUDA the check would cost a host sync per step; NaN/Inf stays in x to the end, so there the images are
        checked once, when they come back (:meth:`_finish`).
        """
        eps = self._forward(x, t)
        if self._device.type != "cuda" and not bool(torch.isfinite(eps).all()):
            raise NonFiniteOutputError("the UNet returned non-finite values (NaN or Inf)")
        return eps

    def _run_job(self, job: _Job) -> None:
        try:
            eps = self._on_device(lambda: self._checked_forward(job.x.to(self._device), job.t.to(self._device)).cpu())
        except Exception as exc:  # a bad job must not kill the worker
            log.exception("predict_eps failed")
            error: BaseException = EngineError(f"UNet forward failed: {exc}")
            post([(job.loop, lambda: job.future.done() or job.future.set_exception(error))])
            return
        post([(job.loop, lambda: job.future.done() or job.future.set_result(eps))])

    def _finish(self, entry: _Entry, outcome: str, calls: list, error: BaseException | None = None) -> None:
        """Resolve a request that left the queue and the running batch (worker thread, lock held)."""
        h = entry.handle
        if h.finished:
            return
        h.finished = True
        images = None
        if outcome == "ok":
            assert entry.group is not None
            images = entry.group.x.to("cpu", torch.float32)
            if not bool(torch.isfinite(images).all()):
                outcome, error = "error", EngineError(f"request {h.id}: the UNet returned non-finite values")
        self._counts[outcome] += 1
        self.metrics.requests.labels(outcome=outcome).inc()
        if outcome == "ok":
            assert entry.group is not None and images is not None
            now = time.monotonic()
            r = h.request
            result = GenerationResult(
                images=images.clamp(-1.0, 1.0),
                seed=r.seed,
                sampler=r.sampler,
                steps=r.steps,
                eta=r.eta,
                timestep_spacing=entry.group.plan.spacing,
                queue_seconds=(h.admitted_at or now) - h.submitted_at,
                total_seconds=now - h.submitted_at,
            )
            self._counts["images"] += r.num_images
            self.metrics.images_generated.inc(r.num_images)
            self.metrics.request_duration.labels(sampler=r.sampler).observe(result.total_seconds)
            calls.append(h.callbacks_for_result(result))
        else:
            assert error is not None
            calls.append(h.callbacks_for_error(error))

    def _retire_locked(self, entries: list[_Entry]) -> None:
        """Take running requests out of the batch; their rows no longer count against the queue or their client."""
        if not entries:
            return
        gone = set(map(id, entries))
        self._active = [e for e in self._active if id(e) not in gone]
        for e in entries:
            self._active_rows -= e.rows
            self._queue.release(e)

    def _evict_locked(self, now: float, calls: list) -> None:
        """Drop cancelled and expired requests, queued or running; their rows are counted as evicted."""

        def failure(e: _Entry) -> tuple[str, EngineError] | None:
            h = e.handle
            if h.cancel_requested:
                return "cancelled", RequestCancelledError(f"request {h.id} was cancelled")
            if now >= h.deadline:
                waited = now - h.submitted_at
                return "timeout", RequestTimeoutError(f"request {h.id} passed its deadline of {waited:.1f} s")
            return None

        verdicts: dict[int, tuple[str, EngineError]] = {}

        def drop(e: _Entry) -> bool:
            verdict = failure(e)  # once per entry: a cancel may arrive from another thread meanwhile
            if verdict is not None:
                verdicts[id(e)] = verdict
            return verdict is not None

        running = [e for e in self._active if drop(e)]
        self._retire_locked(running)
        for e in (*running, *self._queue.remove_queued(drop)):
            reason, error = verdicts[id(e)]
            self._counts["evicted_rows"] += e.rows
            self.metrics.rows_evicted.labels(reason=reason).inc(e.rows)
            self._finish(e, reason, calls, error)

    def _admit_locked(self) -> list[_Entry]:
        """Make queued requests resident: each client up to ``max_batch_rows`` resident rows of its own (step-level
        batching), or, request-level, one batch of rows when nothing is resident. Round-robin over clients."""
        admitted: list[_Entry] = []
        limit = self.settings.max_batch_rows
        if self.settings.batching == "request":
            if self._active:
                return admitted

            def free(client: str | None) -> int:
                return limit - self._active_rows
        else:
            resident = Counter(e.client for e in self._active)

            def free(client: str | None) -> int:
                return limit - resident[client]

        while (e := self._queue.pop_fitting(free)) is not None:
            self._active_rows += e.rows
            self._active.append(e)
            admitted.append(e)
            if self.settings.batching == "step":
                resident[e.client] += e.rows
        return admitted

    def _select_locked(self) -> list[_Entry]:
        """The resident requests this iteration's forward steps, at most ``max_batch_rows`` rows, max-min fair
        between clients (:mod:`service.engine.admission`, "Batch"): the oldest resident request always (so every
        request advances once it is the oldest), then up to an equal share of rows per client, oldest first
        within each, then whatever else fits, oldest first. Requests left out keep their state and wait."""
        limit = self.settings.max_batch_rows
        if self._active_rows <= limit:
            return list(self._active)
        chosen: dict[int, _Entry] = {}
        used = 0

        def take(e: _Entry) -> None:
            nonlocal used
            chosen[id(e)] = e
            used += e.rows

        take(self._active[0])  # admission order: the oldest
        by_client: dict[str | None, list[_Entry]] = {}
        for e in self._active:
            by_client.setdefault(e.client, []).append(e)
        share = limit // len(by_client)
        for entries in by_client.values():
            mine = sum(e.rows for e in entries if id(e) in chosen)
            for e in entries:
                if id(e) not in chosen and mine + e.rows <= share and used + e.rows <= limit:
                    take(e)
                    mine += e.rows
        for e in self._active:
            if id(e) not in chosen and used + e.rows <= limit:
                take(e)
        return [e for e in self._active if id(e) in chosen]

    def _iterate(self) -> None:
        """One iteration: evict, admit, one forward over every running row, events, retire."""
        calls: list = []
        now = time.monotonic()
        with self._cond:
            self._evict_locked(now, calls)
            admitted = self._admit_locked()
            running = self._select_locked()
            self._set_gauges_locked()
        def compute() -> None:  # on the device (the shared device worker, when there is one)
            for e in admitted:
                r = e.handle.request
                e.group = RowGroup.start(self.model, r.num_images, r.seed, r.sampler, r.steps, r.eta,
                                         r.timestep_spacing, self._device, conditioning=r.conditioning(self.model))
                e.handle.admitted_at = now
            groups = [e.group for e in running if e.group is not None]
            batched_step(self.model, groups, self._dtype, self._checked_forward)

        try:
            if running:
                r0 = time.perf_counter()
                self._on_device(compute)
                seconds = time.perf_counter() - r0
        except Exception as exc:  # fail this batch's requests, keep the worker alive
            self._fail_batch(running, exc, calls)
            post(calls)
            return
        if not running:
            post(calls)
            return
        rows = sum(e.rows for e in running)
        self.metrics.iterations.inc()
        self.metrics.batch_rows.observe(rows)
        self.metrics.step_duration.observe(seconds)
        done_at = time.monotonic()
        finished = []
        for e in running:
            g, h = e.group, e.handle
            assert g is not None
            if h.first_step_at is None:
                h.first_step_at = done_at
                self.metrics.time_to_first_step.observe(done_at - h.submitted_at)
            k = h.request.preview_every
            preview = g.pred_x0.clamp(-1.0, 1.0).to("cpu", torch.float32) if k and g.index % k == 0 else None
            calls.append(h.callbacks_for_event(ProgressEvent(step=g.index, total=g.total, preview=preview)))
            if g.done:
                finished.append(e)
        with self._cond:
            self._counts["iterations"] += 1
            self._step_seconds = 0.8 * self._step_seconds + 0.2 * seconds if self._step_seconds else seconds
            self._retire_locked(finished)
            for e in finished:
                self._finish(e, "ok", calls)
            self._set_gauges_locked()
        post(calls)

    def _fail_batch(self, running: list[_Entry], exc: Exception, calls: list) -> None:
        """An iteration raised: fail the requests whose rows were in it (one log line each, with its id)."""
        log.error("engine iteration over %d requests failed", len(running), exc_info=exc)
        what = str(exc) if isinstance(exc, NonFiniteOutputError) else f"UNet forward failed: {exc!r}"
        with self._cond:
            self._retire_locked(running)
            for e in running:
                log.error("request failed: %s", what, extra={"request_id": e.handle.id})
                self._finish(e, "error", calls, EngineError(f"request {e.handle.id}: {what}"))
            self._set_gauges_locked()

    def _shutdown(self) -> None:
        """Fail whatever is left when the worker exits: 504 after a drain timeout, 503 when the worker died."""
        calls: list = []
        died = self._died
        stopped = EngineNotReadyError(f"the engine worker died: {died!r}" if died else "the engine stopped")
        with self._cond:
            self._accepting = False
            self._stop = True
            left = [*self._active, *self._queue.clear()]
            self._retire_locked(self._active)
            for e in left:
                self._counts["evicted_rows"] += e.rows
                if died is not None:
                    self.metrics.rows_evicted.labels(reason="error").inc(e.rows)
                    error: EngineError = EngineNotReadyError(f"request {e.handle.id}: {stopped}")
                    self._finish(e, "error", calls, error)
                else:
                    self.metrics.rows_evicted.labels(reason="timeout").inc(e.rows)
                    error = RequestTimeoutError(f"request {e.handle.id}: the engine was drained")
                    self._finish(e, "timeout", calls, error)
            for job in self._jobs:
                calls.append((job.loop, lambda job=job: job.future.done() or job.future.set_exception(stopped)))
            self._jobs = []
            self._set_gauges_locked()
        self.metrics.ready.set(0)
        post(calls)
