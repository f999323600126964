"""Prometheus metrics move as documented in service/metrics.py (private registries)."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from service.diffusion.checkpoint import DiffusionModel
from service.engine.batcher import Engine, EngineSettings
from service.engine.client import GenerationRequest as Req
from service.engine.client import QueueFullError, RequestCancelledError, RequestTimeoutError
from service.metrics import EngineMetrics, HttpMetrics


def test_engine_metrics_follow_requests_through_the_engine(tiny_model: DiffusionModel, run_engine) -> None:
    registry = CollectorRegistry()
    metrics = EngineMetrics(registry)

    def value(metric: str, **labels: str) -> float:
        v = registry.get_sample_value(metric, {"model": "tiny", **labels})
        assert v is not None, f"{metric}{labels} is not exported"
        return v

    seen: dict[str, float] = {}

    async def body(engine: Engine) -> dict[str, float]:
        seen["ready"] = value("ddpm_ready")
        # two requests one after the other: 5 + 3 iterations of 2 and 1 rows
        await engine.submit(Req(2, seed=0, sampler="ddpm", steps=5)).result()
        await engine.submit(Req(1, seed=1, sampler="ddim", steps=3)).result()
        seen["rows_sum"] = value("ddpm_batch_rows_sum")
        seen["rows_count"] = value("ddpm_batch_rows_count")
        seen["iterations"] = value("ddpm_engine_iterations_total")
        # a running request filling the batch, one queued behind it, one rejected
        long = engine.submit(Req(4, seed=2, sampler="ddpm", steps=1000))
        await anext(aiter(long.events()))
        queued = engine.submit(Req(2, seed=3, sampler="ddim", steps=10))
        seen["active_rows"] = value("ddpm_active_rows")
        seen["queue_rows"] = value("ddpm_queue_depth_rows")
        seen["queue_requests"] = value("ddpm_queue_depth_requests")
        with pytest.raises(QueueFullError):
            engine.submit(Req(1, seed=4, sampler="ddim", steps=10))
        long.cancel()
        queued.cancel()
        for h in (long, queued):
            with pytest.raises(RequestCancelledError):
                await h.result()
        late = engine.submit(Req(1, seed=5, sampler="ddpm", steps=1000, timeout_s=0.05))
        with pytest.raises(RequestTimeoutError):
            await late.result()
        await asyncio.sleep(0)
        return engine.stats()

    stats = run_engine(body, metrics=metrics, max_batch_rows=4, max_queue_rows=6)
    assert seen["ready"] == 1.0 and value("ddpm_ready") == 0.0  # drained at the end
    assert seen["rows_sum"] == 2 * 5 + 1 * 3 and seen["rows_count"] == 8 and seen["iterations"] == 8
    assert (seen["active_rows"], seen["queue_rows"], seen["queue_requests"]) == (4, 2, 1)
    assert value("ddpm_active_rows") == value("ddpm_queue_depth_rows") == value("ddpm_queue_depth_requests") == 0
    assert value("ddpm_images_generated_total") == 3
    outcomes = {o: value("ddpm_requests_total", outcome=o) for o in ("ok", "rejected", "cancelled", "timeout", "error")}
    assert outcomes == {"ok": 2, "rejected": 1, "cancelled": 2, "timeout": 1, "error": 0}
    assert value("ddpm_rows_evicted_total", reason="cancelled") == 6
    assert value("ddpm_rows_evicted_total", reason="timeout") == 1
    assert value("ddpm_request_duration_seconds_count", sampler="ddpm") == 1
    assert value("ddpm_request_duration_seconds_count", sampler="ddim") == 1
    assert value("ddpm_request_duration_seconds_sum", sampler="ddpm") > 0
    iterations = value("ddpm_engine_iterations_total")
    assert iterations == stats["iterations"] == value("ddpm_step_duration_seconds_count")
    assert value("ddpm_batch_rows_count") == iterations
    assert 3 <= value("ddpm_time_to_first_step_seconds_count") <= 4  # the queued one never took a step
    labels = {"sha256": tiny_model.sha256, "device": "cpu", "dtype": "float32"}
    assert value("ddpm_model_info", **labels) == 1.0
    assert "# TYPE ddpm_model_info gauge" in generate_latest(registry).decode()


def test_model_info_carries_model_sha256_device_dtype(tiny_model: DiffusionModel) -> None:
    registry = CollectorRegistry()
    Engine(tiny_model, EngineSettings(dtype="bfloat16"), EngineMetrics(registry))
    labels = {"model": "tiny", "sha256": tiny_model.sha256, "device": "cpu", "dtype": "bfloat16"}
    assert registry.get_sample_value("ddpm_model_info", labels) == 1.0
    assert registry.get_sample_value("ddpm_ready", {"model": "tiny"}) == 0.0


def test_two_models_on_one_registry_have_separate_series() -> None:
    registry = CollectorRegistry()
    families = EngineMetrics(registry)
    a, b = families.for_model("a"), families.for_model("b")
    a.requests.labels(outcome="ok").inc(3)
    b.requests.labels(outcome="ok").inc()
    a.batch_rows.observe(4)
    b.ready.set(1)
    get = registry.get_sample_value
    assert get("ddpm_requests_total", {"model": "a", "outcome": "ok"}) == 3
    assert get("ddpm_requests_total", {"model": "b", "outcome": "ok"}) == 1
    assert get("ddpm_requests_total", {"model": "b", "outcome": "error"}) == 0  # exported before the first event
    assert get("ddpm_batch_rows_count", {"model": "a"}) == 1 and get("ddpm_batch_rows_count", {"model": "b"}) == 0
    assert (get("ddpm_ready", {"model": "a"}), get("ddpm_ready", {"model": "b"})) == (0, 1)
    assert get("ddpm_rejected_requests_total", {"model": "", "reason": "unauthorized"}) == 0


def test_http_metrics() -> None:
    registry = CollectorRegistry()
    http = HttpMetrics(registry)
    http.observe("/v1/generate", "POST", 200, 0.3, "mnist")
    http.observe("/v1/generate", "POST", 429, 0.001, "mnist")
    http.observe("/v1/generate", "POST", 200, 0.5, "mnist")
    http.observe("/healthz", "GET", 200, 0.001)
    get = registry.get_sample_value
    post = {"route": "/v1/generate", "method": "POST", "model": "mnist"}
    assert get("ddpm_http_requests_total", {**post, "status": "200"}) == 2
    assert get("ddpm_http_requests_total", {**post, "status": "429"}) == 1
    assert get("ddpm_http_requests_total", {"route": "/healthz", "method": "GET", "status": "200", "model": ""}) == 1
    labels = post
    assert get("ddpm_http_request_duration_seconds_count", labels) == 3
    assert get("ddpm_http_request_duration_seconds_bucket", {**labels, "le": "0.25"}) == 1
    assert get("ddpm_http_request_duration_seconds_sum", labels) == pytest.approx(0.801)


def test_metric_sets_coexist_on_one_registry() -> None:
    registry = CollectorRegistry()
    EngineMetrics(registry)
    HttpMetrics(registry)
    names = {m.name for m in registry.collect()}
    expected = {
        "ddpm_queue_depth_requests", "ddpm_queue_depth_rows", "ddpm_active_rows", "ddpm_batch_rows",
        "ddpm_step_duration_seconds", "ddpm_time_to_first_step_seconds", "ddpm_request_duration_seconds",
        "ddpm_images_generated", "ddpm_requests", "ddpm_rows_evicted", "ddpm_engine_iterations", "ddpm_ready",
        "ddpm_model", "ddpm_http_requests", "ddpm_http_request_duration_seconds",
    }
    assert expected <= names
