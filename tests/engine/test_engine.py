"""The engine end to end on the tiny random-weight model: determinism, scheduling, cancellation, backpressure."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from service.diffusion.checkpoint import DiffusionModel
from service.diffusion.pipeline import sample
from service.engine.batcher import Engine, EngineSettings
from service.engine.client import (
    EngineError,
    EngineNotReadyError,
    GenerationRequest,
    ProgressEvent,
    QueueFullError,
    RequestCancelledError,
    RequestTimeoutError,
)

Req = GenerationRequest


async def _events(handle) -> list[ProgressEvent]:
    return [e async for e in handle.events()]


async def _iterations_when_done(engine: Engine, handle) -> tuple[float, object]:
    """(engine iterations when the request resolved, result or exception)."""
    try:
        result: object = await handle.result()
    except EngineError as exc:
        result = exc
    return engine.stats()["iterations"], result


def test_engine_images_equal_pipeline_sample(tiny_model: DiffusionModel, run_engine) -> None:
    requests = [Req(2, seed=7, sampler="ddpm", steps=30), Req(3, seed=8, sampler="ddim", steps=12, eta=0.5)]

    async def body(engine: Engine) -> list:
        out = []
        for r in requests:  # one at a time: each runs alone, like pipeline.sample
            out.append(await engine.submit(r).result())
        return out

    for req, res in zip(requests, run_engine(body), strict=True):
        expected = sample(tiny_model, req.num_images, req.seed, req.sampler, req.steps, req.eta)
        torch.testing.assert_close(res.images, expected, atol=1e-5, rtol=0)
        assert (res.seed, res.sampler, res.steps, res.eta) == (req.seed, req.sampler, req.steps, req.eta)
        assert res.images.dtype == torch.float32 and res.images.abs().max() <= 1.0
        assert 0.0 <= res.queue_seconds <= res.total_seconds


SAMPLER_MIX = [  # (sampler, steps, eta)
    ("ddpm", 40, 0.0), ("ddim", 25, 1.0), ("dpmpp_2m", 12, 0.0), ("dpmpp_3m", 20, 0.0), ("dpmpp_2m_sde", 15, 0.0),
    ("unipc", 10, 0.0),
]


@pytest.mark.parametrize(("sampler", "steps", "eta"), SAMPLER_MIX)
def test_same_request_alone_or_amid_five_others_gives_the_same_pixels(run_engine, sampler, steps, eta) -> None:
    target = Req(3, seed=1234, sampler=sampler, steps=steps, eta=eta)
    others = [Req(1 + i % 3, seed=i, sampler=s, steps=n + i, eta=e)
              for i, (s, n, e) in enumerate(m for m in SAMPLER_MIX if m[0] != sampler)]

    async def alone(engine: Engine) -> torch.Tensor:
        return (await engine.submit(target).result()).images

    async def amid(engine: Engine) -> tuple[torch.Tensor, float]:
        first = [engine.submit(r) for r in others[:3]]
        await anext(aiter(first[0].events()))  # the target joins a batch already in flight
        h = engine.submit(target)
        rest = [engine.submit(r) for r in others[3:]]
        images = (await h.result()).images
        await asyncio.gather(*(x.result() for x in first + rest))
        return images, engine.stats()["iterations"]

    a = run_engine(alone)
    b, iterations = run_engine(amid)
    assert iterations < sum(r.steps for r in [target, *others])  # rows really shared forwards
    assert (a - b).abs().max().item() <= 1 / 255


def test_cancelling_a_multistep_request_frees_its_state_at_the_next_iteration(run_engine) -> None:
    async def body(engine: Engine) -> tuple:
        victim = engine.submit(Req(4, seed=0, sampler="dpmpp_3m", steps=200))
        other = engine.submit(Req(1, seed=1, sampler="unipc", steps=150))
        events = victim.events()
        for _ in range(3):
            await anext(events)
        before = engine.stats()
        victim.cancel()
        with pytest.raises(RequestCancelledError):
            await victim.result()
        after = engine.stats()
        await other.result()
        return before, after, engine.stats()

    before, after, final = run_engine(body)
    image = 1 * 8 * 8 * 4  # one float32 image of the tiny model
    assert before["sampler_state_bytes"] == (4 * 2 + 1 * 3) * image  # 3M keeps 2 x̂_0, UniPC x and 2 x̂_0 per row
    assert after["sampler_state_bytes"] == 1 * 3 * image and after["active_rows"] == 1
    assert final["sampler_state_bytes"] == 0 and final["active_rows"] == 0


@pytest.mark.slow
def test_short_request_finishes_after_its_own_iterations_while_a_long_one_runs(run_engine) -> None:
    async def body(engine: Engine) -> tuple:
        long = engine.submit(Req(1, seed=0, sampler="ddpm", steps=1000))
        events = long.events()
        for _ in range(5):
            await anext(events)
        start = engine.stats()["iterations"]
        short = engine.submit(Req(2, seed=1, sampler="ddim", steps=10))
        short_done, short_result = await _iterations_when_done(engine, short)
        long_done, long_result = await _iterations_when_done(engine, long)
        return start, short_done, short_result, long_done, long_result

    start, short_done, short_result, long_done, long_result = run_engine(body)
    assert 10 <= short_done - start <= 15  # its own 10 iterations (+ the one in flight, + wake-up latency)
    assert short_result.images.shape == (2, 1, 8, 8)
    assert long_done == 1000 and long_result.images.shape == (1, 1, 8, 8)


def test_short_request_waits_for_the_whole_batch_in_request_level_mode(run_engine) -> None:
    async def body(engine: Engine) -> tuple:
        long = engine.submit(Req(1, seed=0, sampler="ddim", steps=60))
        await anext(aiter(long.events()))
        short = engine.submit(Req(2, seed=1, sampler="ddim", steps=10))
        short_done, short_result = await _iterations_when_done(engine, short)
        long_result = await long.result()
        long_finished_at = long.submitted_at + long_result.total_seconds
        return short_done, short.admitted_at - long_finished_at, short_result

    short_done, admitted_after_long, short_result = run_engine(body, batching="request")
    assert short_done == 70 and admitted_after_long >= 0  # the short one started only after the long one finished
    step_mode = run_engine(lambda e: e.submit(Req(2, seed=1, sampler="ddim", steps=10)).result())
    torch.testing.assert_close(short_result.images, step_mode.images, atol=1e-5, rtol=0)


def test_cancel_evicts_rows_at_the_next_iteration_and_others_finish(run_engine) -> None:
    async def body(engine: Engine) -> tuple:
        victim = engine.submit(Req(3, seed=0, sampler="ddpm", steps=1000))
        others = [engine.submit(Req(2, seed=1, sampler="ddim", steps=30)), engine.submit(Req(1, seed=2, steps=40))]
        events = victim.events()
        for _ in range(3):
            await anext(events)
        assert engine.stats()["active_rows"] == 6
        at_cancel = engine.stats()["iterations"]
        victim.cancel()
        victim.cancel()  # idempotent
        with pytest.raises(RequestCancelledError):
            await victim.result()
        after = engine.stats()
        late_events = [e async for e in events]
        results = await asyncio.gather(*(h.result() for h in others))
        return at_cancel, after, late_events, results, engine.stats()

    at_cancel, after, late_events, results, final = run_engine(body)
    assert after["iterations"] <= at_cancel + 2  # the one in flight, then the eviction
    assert after["active_rows"] == 3 and after["evicted_rows"] == 3
    assert len(late_events) <= 2
    assert [r.images.shape[0] for r in results] == [2, 1]
    assert final["requests_ok"] == 2 and final["requests_cancelled"] == 1 and final["active_rows"] == 0


def test_queue_full_rejects_at_once_with_retry_after_and_loses_nothing(run_engine) -> None:
    async def body(engine: Engine) -> tuple:
        accepted = [engine.submit(Req(2, seed=i, sampler="ddim", steps=20)) for i in range(4)]  # 8 rows = bound
        t0 = time.perf_counter()
        with pytest.raises(QueueFullError) as err:
            engine.submit(Req(1, seed=99, sampler="ddim", steps=20))
        rejected_in = time.perf_counter() - t0
        results = await asyncio.gather(*(h.result() for h in accepted))
        later = await engine.submit(Req(1, seed=99, sampler="ddim", steps=20)).result()  # room again
        return err.value, rejected_in, results, later, engine.stats()

    err, rejected_in, results, later, stats = run_engine(body, max_batch_rows=4, max_queue_rows=8)
    assert rejected_in < 0.05 and err.retry_after_s > 0
    assert [r.seed for r in results] == [0, 1, 2, 3] and later.seed == 99
    assert stats["requests_ok"] == 5 and stats["requests_rejected"] == 1 and stats["images_generated"] == 9


def test_retry_after_grows_with_the_backlog(run_engine) -> None:
    async def body(engine: Engine) -> tuple[float, float]:
        long = engine.submit(Req(4, seed=0, sampler="ddpm", steps=1000))
        await anext(aiter(long.events()))
        engine._step_seconds = 0.01  # pin the measured iteration time for the estimate
        with pytest.raises(QueueFullError) as full:
            engine.submit(Req(1, seed=1, sampler="ddim", steps=10))
        rows = engine.stats()["active_rows"] + engine.stats()["queued_rows"]
        long.cancel()
        return full.value.retry_after_s, rows

    retry, rows = run_engine(body, max_batch_rows=4, max_queue_rows=4)
    assert rows == 4
    assert 9.0 <= retry <= 10.0  # the ~990 remaining steps of the running request × 10 ms


def test_deadline_times_out_running_and_queued_requests(run_engine) -> None:
    async def body(engine: Engine) -> tuple:
        slow = engine.submit(Req(1, seed=0, sampler="ddpm", steps=1000, timeout_s=0.2))
        queued = engine.submit(Req(4, seed=1, sampler="ddpm", steps=10, timeout_s=0.1))
        ok = engine.submit(Req(1, seed=2, sampler="ddim", steps=5))
        out = []
        for h in (slow, queued):
            with pytest.raises(RequestTimeoutError):
                await h.result()
        out.append(await ok.result())
        return out, engine.stats()

    (ok,), stats = run_engine(body, max_batch_rows=4)
    assert ok.images.shape == (1, 1, 8, 8)
    assert stats["requests_timeout"] == 2 and stats["evicted_rows"] == 5 and stats["iterations"] < 1000


def test_drain_finishes_in_flight_work_then_refuses(tiny_model: DiffusionModel) -> None:
    async def main() -> None:
        engine = Engine(tiny_model, EngineSettings(threads=1))
        with pytest.raises(EngineNotReadyError):
            engine.submit(Req(1, seed=0))
        await engine.start()
        assert engine.ready
        h = engine.submit(Req(2, seed=0, sampler="ddim", steps=20))
        await engine.drain(timeout_s=30)
        assert not engine.ready and engine.stats()["ready"] == 0.0
        assert (await h.result()).images.shape == (2, 1, 8, 8)
        with pytest.raises(EngineNotReadyError):
            engine.submit(Req(1, seed=0))
        with pytest.raises(EngineNotReadyError):
            await engine.predict_eps(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long))

    asyncio.run(main())


def test_drain_timeout_fails_what_is_left(tiny_model: DiffusionModel) -> None:
    async def main() -> None:
        engine = Engine(tiny_model, EngineSettings(threads=1, max_batch_rows=2))
        await engine.start()
        running = engine.submit(Req(2, seed=0, sampler="ddpm", steps=1000))
        queued = engine.submit(Req(1, seed=1, sampler="ddpm", steps=1000))
        t0 = time.perf_counter()
        await engine.drain(timeout_s=0.2)
        assert time.perf_counter() - t0 < 2.0
        for h in (running, queued):
            with pytest.raises(RequestTimeoutError):
                await h.result()
        assert engine.stats()["requests_timeout"] == 2 and engine.stats()["queued_rows"] == 0

    asyncio.run(main())


def test_progress_events_and_previews(run_engine) -> None:
    async def body(engine: Engine) -> tuple:
        h = engine.submit(Req(2, seed=3, sampler="ddim", steps=9, preview_every=4))
        events = await _events(h)
        return events, await h.result()

    events, result = run_engine(body)
    assert [e.step for e in events] == list(range(1, 10)) and {e.total for e in events} == {9}
    previews = {e.step: e.preview for e in events if e.preview is not None}
    assert sorted(previews) == [4, 8]
    assert previews[8].shape == (2, 1, 8, 8) and previews[8].abs().max() <= 1.0
    assert result.images.shape == (2, 1, 8, 8)


def test_forward_errors_fail_the_batch_but_not_the_worker(tiny_model: DiffusionModel, run_engine) -> None:
    forward = tiny_model.unet.forward

    async def body(engine: Engine) -> tuple:
        tiny_model.unet.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))  # type: ignore[method-assign]
        h = engine.submit(Req(1, seed=0, sampler="ddim", steps=5))
        with pytest.raises(EngineError, match="boom") as err:
            await h.result()
        tiny_model.unet.forward = forward  # type: ignore[method-assign]
        ok = await engine.submit(Req(1, seed=0, sampler="ddim", steps=5)).result()
        return err.type, ok, engine.stats()

    try:
        err_type, ok, stats = run_engine(body)
    finally:
        tiny_model.unet.forward = forward  # type: ignore[method-assign]
    assert err_type is EngineError
    assert ok.images.shape == (1, 1, 8, 8)
    assert stats["requests_error"] == 1 and stats["requests_ok"] == 1 and stats["active_rows"] == 0


def test_predict_eps_runs_the_unet_on_the_worker(tiny_model: DiffusionModel, run_engine) -> None:
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 500, 999])

    async def body(engine: Engine) -> torch.Tensor:
        with pytest.raises(ValueError):
            await engine.predict_eps(torch.randn(3, 1, 4, 4), t)
        background = engine.submit(Req(2, seed=0, sampler="ddim", steps=20))
        eps = await engine.predict_eps(x, t)
        await background.result()
        return eps

    eps = run_engine(body)
    with torch.no_grad():
        torch.testing.assert_close(eps, tiny_model.unet(x, t), atol=1e-5, rtol=0)


def test_invalid_requests_are_refused(run_engine) -> None:
    async def body(engine: Engine) -> None:
        for bad in (Req(0, seed=0), Req(5, seed=0), Req(1, seed=0, steps=1001), Req(1, seed=0, sampler="euler"),
                    Req(1, seed=0, eta=1.5), Req(1, seed=0, timeout_s=0)):  # type: ignore[arg-type]
            with pytest.raises(ValueError):
                engine.submit(bad)
        assert engine.stats()["queued_rows"] == 0

    run_engine(body, max_batch_rows=4)
    with pytest.raises(ValueError):
        EngineSettings(max_batch_rows=8, max_queue_rows=4)
    with pytest.raises(ValueError):
        EngineSettings(dtype="float64")


def test_model_info(tiny_model: DiffusionModel) -> None:
    info = Engine(tiny_model, EngineSettings(dtype="bfloat16")).model_info
    assert (info.name, info.sha256, info.device, info.dtype) == ("tiny", tiny_model.sha256, "cpu", "bfloat16")
    assert (info.channels, info.image_size, info.num_train_timesteps) == (1, 8, 1000)
    assert info.schedule is tiny_model.schedule


def test_bfloat16_engine_runs_the_unet_under_autocast(tiny_model: DiffusionModel, run_engine) -> None:
    req = Req(2, seed=5, sampler="ddim", steps=10)
    bf16 = run_engine(lambda e: e.submit(req).result(), dtype="bfloat16")
    expected = sample(tiny_model, 2, 5, "ddim", 10, dtype=torch.bfloat16)
    torch.testing.assert_close(bf16.images, expected, atol=1e-4, rtol=0)
    fp32 = sample(tiny_model, 2, 5, "ddim", 10)
    assert (bf16.images - fp32).abs().max() > 1e-3  # really ran in reduced precision


def test_predict_eps_calls_are_bounded_too(tiny_model: DiffusionModel, run_engine) -> None:
    async def body(engine: Engine) -> tuple:
        with pytest.raises(QueueFullError) as err:
            await engine.predict_eps(torch.zeros(5, 1, 8, 8), torch.zeros(5, dtype=torch.long))
        ok = await engine.predict_eps(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
        return err.value.retry_after_s, ok.shape

    retry, shape = run_engine(body, max_batch_rows=4, max_queue_rows=4)
    assert retry > 0 and shape == (4, 1, 8, 8)


def test_worker_gets_the_threads_and_the_caller_is_left_with_one(tiny_model: DiffusionModel) -> None:
    """Only the worker runs torch multi-threaded (libgomp throttles a process with more OpenMP threads than CPUs)."""

    async def main() -> tuple[int, int]:
        torch.set_num_threads(2)
        engine = Engine(tiny_model, EngineSettings())  # threads=0: the caller's count where the engine is built
        await engine.start()
        try:
            worker = engine._thread
            assert worker is not None and worker is not threading.current_thread()
            got = await engine.submit(Req(1, seed=0, sampler="ddim", steps=2)).result()
            assert got.images.shape == (1, 1, 8, 8)
            return torch.get_num_threads(), int(engine.stats()["threads"])
        finally:
            await engine.drain(timeout_s=5)

    caller, worker = asyncio.run(main())
    assert (caller, worker) == (1, 2)
