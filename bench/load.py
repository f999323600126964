"""Open-loop load: Poisson arrivals at a fraction of measured capacity, step-level vs request-level batching.

Run from the repository root::

    .venv/bin/python bench/load.py --model model_store/mnist --duration 300 --load 0.7 --threads 2 --max-batch-rows 16

1. Capacity: the engine (step-level) works through ``--calibration-rounds`` saturating bursts of requests
   from the mix; capacity is the median image-steps per second it sustains, divided by the mix's mean
   image-steps per request.
2. One arrival trace (seeded): exponential inter-arrival times at ``--load`` × capacity for ``--duration``
   seconds; each request draws its sampler steps and image count from the mix (DDIM, 10/20/50 steps,
   1/2/4 images by default — sized to this 2-core CPU).
3. The same trace is replayed, in process (no HTTP; bf16, eager UNet by default), against the engine with
   ``batching="step"`` and with ``batching="request"``. Latency is completion minus the scheduled arrival
   time, so a late submission counts against the engine. The asyncio event-loop lag (how late a 10 ms
   timer fires) is recorded too, to check that the worker thread does not starve the loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from service.diffusion.checkpoint import DiffusionModel, load_model
from service.engine.batcher import Engine, EngineSettings, claim_threads_for_worker
from service.engine.client import EngineError, GenerationRequest, QueueFullError


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the start of the run
    images: int
    steps: int
    seed: int



def parse_mix(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def make_trace(rate: float, duration: float, steps: list[int], images: list[int], seed: int) -> list[Arrival]:
    rng = random.Random(seed)
    out, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return out
        out.append(Arrival(t, rng.choice(images), rng.choice(steps), rng.randrange(1 << 31)))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def settings(args: argparse.Namespace, batching: str) -> EngineSettings:
    return EngineSettings(max_batch_rows=args.max_batch_rows, max_queue_rows=args.max_queue_rows,
                          request_timeout_s=args.timeout, batching=batching, dtype=args.dtype,  # type: ignore[arg-type]
                          threads=args.threads, compiled=args.compiled)


async def measure_capacity(model: DiffusionModel, args: argparse.Namespace) -> float:
    """Image-steps per second the step-level engine sustains on saturating bursts drawn from the mix (median)."""
    engine = Engine(model, settings(args, "step"))
    await engine.start()
    try:
        rng = random.Random(args.seed + 1)
        await engine.submit(GenerationRequest(1, seed=0, sampler="ddim", steps=2)).result()  # warm-up
        rates = []
        for _ in range(args.calibration_rounds):
            reqs, work = [], 0
            while work < args.calibration_work:
                n, s = rng.choice(args.images), rng.choice(args.steps)
                reqs.append(GenerationRequest(n, seed=rng.randrange(1 << 31), sampler="ddim", steps=s))
                work += n * s
            start = time.perf_counter()
            await asyncio.gather(*(engine.submit(r).result() for r in reqs))
            rates.append(work / (time.perf_counter() - start))
        print(json.dumps({"calibration_image_steps_per_s": rates}), flush=True)
        return statistics.median(rates)
    finally:
        await engine.drain(timeout_s=5)


async def loop_lag(samples: list[float], stop: asyncio.Event, period: float = 0.01) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        await asyncio.sleep(period)
        samples.append(time.perf_counter() - t0 - period)


async def replay(model: DiffusionModel, args: argparse.Namespace, batching: str, trace: list[Arrival]) -> dict:
    engine = Engine(model, settings(args, batching))
    await engine.start()
    lags: list[float] = []
    stop = asyncio.Event()
    lag_task = asyncio.create_task(loop_lag(lags, stop))
    latencies: list[float] = []
    ttfs: list[float] = []
    outcomes = {"ok": 0, "rejected": 0, "failed": 0, "unfinished": 0}
    done_at: list[float] = []
    images_done = 0
    t0 = time.perf_counter()

    async def one(a: Arrival) -> None:
        nonlocal images_done
        await asyncio.sleep(max(0.0, t0 + a.at - time.perf_counter()))
        try:
            handle = engine.submit(GenerationRequest(a.images, seed=a.seed, sampler="ddim", steps=a.steps))
        except QueueFullError:
            outcomes["rejected"] += 1
            return
        try:
            result = await handle.result()
        except EngineError:
            outcomes["failed"] += 1
            return
        now = time.perf_counter()
        outcomes["ok"] += 1
        images_done += a.images
        latencies.append(now - (t0 + a.at))
        ttfs.append(result.queue_seconds)
        done_at.append(now - t0)

    tasks = [asyncio.create_task(one(a)) for a in trace]
    _, pending = await asyncio.wait(tasks, timeout=args.duration + args.grace)
    outcomes["unfinished"] = len(pending)
    for task in pending:
        task.cancel()
    stop.set()
    await lag_task
    stats = engine.stats()
    await engine.drain(timeout_s=1)
    span = max(done_at) if done_at else float("nan")
    return {
        "batching": batching,
        "requests": len(trace),
        **outcomes,
        "latency_p50_s": percentile(latencies, 0.50),
        "latency_p95_s": percentile(latencies, 0.95),
        "latency_p99_s": percentile(latencies, 0.99),
        "latency_mean_s": statistics.fmean(latencies) if latencies else float("nan"),
        "queue_p50_s": percentile(ttfs, 0.50),
        "queue_p99_s": percentile(ttfs, 0.99),
        "throughput_images_per_s": images_done / span,
        "throughput_requests_per_s": outcomes["ok"] / span,
        "iterations": stats["iterations"],
        "mean_rows_per_forward": sum(a.images * a.steps for a in trace) / max(stats["iterations"], 1),
        "loop_lag_p50_ms": 1000 * percentile(lags, 0.50),
        "loop_lag_p99_ms": 1000 * percentile(lags, 0.99),
        "loop_lag_max_ms": 1000 * max(lags, default=float("nan")),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="model_store/mnist")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals")
    p.add_argument("--grace", type=float, default=60.0, help="seconds after the last arrival to finish the tail")
    p.add_argument("--load", type=float, default=0.7, help="arrival rate as a fraction of measured capacity")
    p.add_argument("--steps", type=parse_mix, default=[10, 20, 50], help="DDIM step counts to draw from")
    p.add_argument("--images", type=parse_mix, default=[1, 2, 4], help="images per request to draw from")
    p.add_argument("--max-batch-rows", type=int, default=32)
    p.add_argument("--max-queue-rows", type=int, default=4096)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--compiled", choices=["auto", "off"], default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--calibration-work", type=int, default=3000, help="image-steps in each capacity burst")
    p.add_argument("--calibration-rounds", type=int, default=3, help="capacity bursts (median taken)")
    p.add_argument("--capacity", type=float, default=None, help="image-steps/s; skip the measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    claim_threads_for_worker(args.threads)  # the engines' workers (one at a time) get them, this thread one
    model = load_model(args.model, args.device)
    capacity = args.capacity or asyncio.run(measure_capacity(model, args))
    mean_work = statistics.fmean(args.steps) * statistics.fmean(args.images)
    rate = args.load * capacity / mean_work
    trace = make_trace(rate, args.duration, args.steps, args.images, args.seed)
    if not trace:
        raise SystemExit(f"no arrivals in {args.duration} s at {rate:.3g}/s: raise --duration or --load")
    print(json.dumps({"capacity_image_steps_per_s": capacity, "mean_image_steps_per_request": mean_work,
                      "arrival_rate_per_s": rate, "requests": len(trace),
                      "offered_images_per_s": rate * statistics.fmean(args.images)}), flush=True)
    results = []
    for batching in ("step", "request"):
        results.append(asyncio.run(replay(model, args, batching, trace)))
        print(json.dumps(results[-1]), flush=True)
    step, req = results
    print("\n| batching | requests ok / rejected / unfinished | p50 s | p95 s | p99 s | images/s | "
          "loop lag p99 ms |\n|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['batching']} | {r['ok']} / {r['rejected']} / {r['unfinished']} | {r['latency_p50_s']:.2f} | "
              f"{r['latency_p95_s']:.2f} | {r['latency_p99_s']:.2f} | {r['throughput_images_per_s']:.2f} | "
              f"{r['loop_lag_p99_ms']:.1f} |")
    print(f"\nstep / request: p50 {step['latency_p50_s'] / req['latency_p50_s']:.2f}×, "
          f"p99 {step['latency_p99_s'] / req['latency_p99_s']:.2f}×, throughput "
          f"{step['throughput_images_per_s'] / req['throughput_images_per_s']:.2f}×")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"},
                                         "capacity": capacity, "rate": rate, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
