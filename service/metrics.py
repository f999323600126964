"""Prometheus metrics of the service, declared in one place (prometheus-client, ``ddpm_`` prefix, base units).

Each class registers its metrics on the registry it is given (a private ``CollectorRegistry`` in
tests, the process-wide ``prometheus_client.REGISTRY`` when ``None``). Buckets follow the latencies
measured on the 2-core development CPU: one engine iteration takes from ~1 ms (tiny model, one row)
to ~1 s (28×28 model, 64 rows, fp32), and a request from ~50 ms (DDIM-10, one image) to ~10 min
(DDPM-1000 behind a full queue).

Engine metrics (:class:`EngineMetrics`, one :class:`ModelMetrics` view per served model). Every engine metric
carries a ``model`` label (the model's name), so one server with several models exports one series per model;
``ddpm_rejected_requests_total{reason="unauthorized"}`` has ``model=""`` (the request never named one).

===========================================  =========  ====================================================
name                                          type       meaning
===========================================  =========  ====================================================
ddpm_queue_depth_requests                     gauge      requests accepted but not yet admitted to the batch
ddpm_queue_depth_rows                         gauge      rows (images) of those requests
ddpm_active_rows                              gauge      resident rows (admitted; a forward steps up to max_batch_rows)
ddpm_batch_rows                               histogram  rows per UNet forward (one per iteration)
ddpm_step_duration_seconds                    histogram  one iteration: stack, forward, per-row updates
ddpm_time_to_first_step_seconds               histogram  submission → the request's first step finished
ddpm_request_duration_seconds{sampler}        histogram  submission → images ready (successful requests)
ddpm_images_generated_total                   counter    images of successful requests
ddpm_requests_total{outcome}                  counter    ok | rejected | cancelled | timeout | error
ddpm_rows_evicted_total{reason}               counter    rows dropped unfinished: cancelled | timeout | error
ddpm_rejected_requests_total{reason}          counter    turned away: queue_full | client_quota | unauthorized
ddpm_engine_iterations_total                  counter    iterations that ran a UNet forward over rows
ddpm_ready                                    gauge      1 while the engine admits work
ddpm_model_info{model,sha256,device,dtype}    info       the served model (value 1)
===========================================  =========  ====================================================

HTTP metrics (:class:`HttpMetrics`): ``ddpm_http_requests_total{route,method,status,model}`` (counter) and
``ddpm_http_request_duration_seconds{route,method,model}`` (histogram). ``route`` is the route template
(``/v1/generate``), never the raw path, so the label set stays bounded; ``model`` is the model the request
used, ``""`` for routes without one (health, metrics, the web page) and requests refused before naming one.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Info

from service.diffusion.samplers import SAMPLER_NAMES

__all__ = [
    "BATCH_ROWS_BUCKETS",
    "HTTP_DURATION_BUCKETS",
    "OUTCOMES",
    "REJECTION_REASONS",
    "REQUEST_DURATION_BUCKETS",
    "STEP_DURATION_BUCKETS",
    "TIME_TO_FIRST_STEP_BUCKETS",
    "EngineMetrics",
    "HttpMetrics",
    "ModelMetrics",
]

OUTCOMES = ("ok", "rejected", "cancelled", "timeout", "error")
EVICTION_REASONS = ("cancelled", "timeout", "error")
REJECTION_REASONS = ("queue_full", "client_quota", "unauthorized")  # no per-client labels: keys are secrets

# Rows per forward: powers of two up to twice the default max_batch_rows.
BATCH_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 256)
# One iteration: ~1 ms (tiny model) .. ~1 s (28×28 model, 64 rows, fp32) .. a few s for 32×32 models.
STEP_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Waiting for a slot in the batch: one iteration at best, a full DDPM-1000 run in request-level mode at worst.
TIME_TO_FIRST_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Whole requests: DDIM-10 of one image (~50 ms) .. DDPM-1000 behind a full queue (~10 min).
REQUEST_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# HTTP handlers: health checks (~1 ms) .. synchronous generation (minutes).
HTTP_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0)


class EngineMetrics:
    """The engine metric families, registered on ``registry`` (default: the process-wide registry); every one has
    a ``model`` label first. :meth:`for_model` gives one engine its view with the label bound."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else REGISTRY
        r = self.registry
        m = ["model"]
        self.queue_depth_requests = Gauge(
            "ddpm_queue_depth_requests", "Requests accepted but not yet admitted to the running batch", m, registry=r
        )
        self.queue_depth_rows = Gauge("ddpm_queue_depth_rows", "Rows (images) of the queued requests", m, registry=r)
        self.active_rows = Gauge(
            "ddpm_active_rows", "Resident rows (admitted; one forward steps up to max_batch_rows)", m, registry=r
        )
        self.batch_rows = Histogram(
            "ddpm_batch_rows", "Rows per UNet forward", m, buckets=BATCH_ROWS_BUCKETS, registry=r
        )
        self.step_duration = Histogram(
            "ddpm_step_duration_seconds",
            "Duration of one engine iteration (stack, UNet forward, per-row sampler updates)",
            m,
            buckets=STEP_DURATION_BUCKETS,
            registry=r,
        )
        self.time_to_first_step = Histogram(
            "ddpm_time_to_first_step_seconds",
            "Submission to the end of the request's first denoising step",
            m,
            buckets=TIME_TO_FIRST_STEP_BUCKETS,
            registry=r,
        )
        self.request_duration = Histogram(
            "ddpm_request_duration_seconds",
            "Submission to completion of successful requests",
            [*m, "sampler"],
            buckets=REQUEST_DURATION_BUCKETS,
            registry=r,
        )
        self.images_generated = Counter(
            "ddpm_images_generated", "Images returned by successful requests", m, registry=r
        )
        self.requests = Counter("ddpm_requests", "Generation requests by outcome", [*m, "outcome"], registry=r)
        self.rows_evicted = Counter(
            "ddpm_rows_evicted", "Rows dropped before finishing, by reason", [*m, "reason"], registry=r
        )
        self.rejections = Counter(
            "ddpm_rejected_requests", "Requests turned away before queueing, by reason", [*m, "reason"], registry=r
        )
        self.iterations = Counter(
            "ddpm_engine_iterations", "Engine iterations that ran a UNet forward over rows", m, registry=r
        )
        self.ready = Gauge("ddpm_ready", "1 while the model's engine admits work, else 0", m, registry=r)
        self.model = Info("ddpm_model", "The served model", m, registry=r)
        self.rejections.labels(model="", reason="unauthorized")  # before any model is named (auth)

    def for_model(self, model: str) -> ModelMetrics:
        """The metrics of the engine serving ``model`` (label bound; every label value exported from the start)."""
        return ModelMetrics(self, model)


class _Bound:
    """A labelled metric family with ``model`` fixed: ``.labels(outcome=...)`` adds the rest."""

    def __init__(self, family: Counter | Histogram, model: str) -> None:
        self.family = family
        self.model = model

    def labels(self, **labels: str) -> Counter | Histogram:
        return self.family.labels(model=self.model, **labels)


class ModelMetrics:
    """One model's view of :class:`EngineMetrics`: the attributes the engine uses, ``model`` label bound."""

    def __init__(self, families: EngineMetrics, model: str) -> None:
        f = families
        self.name = model
        self.registry = f.registry
        self.queue_depth_requests = f.queue_depth_requests.labels(model=model)
        self.queue_depth_rows = f.queue_depth_rows.labels(model=model)
        self.active_rows = f.active_rows.labels(model=model)
        self.batch_rows = f.batch_rows.labels(model=model)
        self.step_duration = f.step_duration.labels(model=model)
        self.time_to_first_step = f.time_to_first_step.labels(model=model)
        self.images_generated = f.images_generated.labels(model=model)
        self.iterations = f.iterations.labels(model=model)
        self.ready = f.ready.labels(model=model)
        self.request_duration = _Bound(f.request_duration, model)
        self.requests = _Bound(f.requests, model)
        self.rows_evicted = _Bound(f.rows_evicted, model)
        self.rejections = _Bound(f.rejections, model)
        self._info = f.model.labels(model=model)
        # Export every label value from the start (zeros), so rates and alerts work before the first event.
        for outcome in OUTCOMES:
            self.requests.labels(outcome=outcome)
        for reason in EVICTION_REASONS:
            self.rows_evicted.labels(reason=reason)
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason=reason)
        for sampler in SAMPLER_NAMES:
            self.request_duration.labels(sampler=sampler)

    def set_model(self, sha256: str, device: str, dtype: str) -> None:
        """Expose ``ddpm_model_info{model,sha256,device,dtype} 1``."""
        self._info.info({"sha256": sha256, "device": device, "dtype": dtype})


class HttpMetrics:
    """The HTTP layer's metrics, registered on ``registry`` (default: the process-wide registry)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else REGISTRY
        self.requests = Counter(
            "ddpm_http_requests",
            "HTTP requests by route template, method and status code",
            ["route", "method", "status", "model"],
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "ddpm_http_request_duration_seconds",
            "HTTP request handling time by route template and method",
            ["route", "method", "model"],
            buckets=HTTP_DURATION_BUCKETS,
            registry=self.registry,
        )

    def observe(self, route: str, method: str, status: int, seconds: float, model: str = "") -> None:
        """Record one finished HTTP request (``model``: the model it used, "" for none)."""
        self.requests.labels(route=route, method=method, status=str(status), model=model).inc()
        self.request_duration.labels(route=route, method=method, model=model).observe(seconds)
