"""Two models on one device: how their engines should share it, measured side by side in one run.

Each model has its own engine (queue, admission, rows). Both are kept busy, closed loop: ``--concurrency``
requests of ``--images`` images (DDIM, ``--steps``) outstanding per model for ``--seconds``. Modes:

* ``alone``: one engine by itself (its own worker thread, ``--threads`` torch threads): the device's throughput.
* ``shared``: two engines, one :class:`~service.engine.device.DeviceWorker` (one compute thread with ``--threads``
  threads) running both engines' iterations first in, first out — what the server does with ``DDPM_MODELS``.
* ``separate``: two engines, each computing on its own worker thread with ``--threads`` threads (two OpenMP teams
  on the same cores).
* ``split``: two engines, each on its own worker with ``--threads // 2`` threads (the cores partitioned).

Reported per mode: image-steps/s of each model and in total (rows stepped, ``ddpm_batch_rows``, in the window after
``--warmup``), the
total relative to ``alone``, and the fairness ratio (slower model / faster). Modes run in turn, ``--repeats``
rounds; the median round is reported.

    .venv/bin/python bench/multi_model.py --model model_store/mnist --out docs/multi_model.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.diffusion.checkpoint import load_model  # noqa: E402
from service.engine.batcher import Engine, EngineSettings, claim_threads_for_worker  # noqa: E402
from service.engine.client import GenerationRequest  # noqa: E402
from service.engine.device import DeviceWorker  # noqa: E402

MODES = ("alone", "shared", "separate", "split")


def row_steps(engine: Engine) -> float:
    """Rows stepped so far (the sum of ddpm_batch_rows): image-steps, finished requests or not."""
    m = engine.metrics
    return m.registry.get_sample_value("ddpm_batch_rows_sum", {"model": m.name}) or 0.0


async def flood(engine: Engine, args: argparse.Namespace, stop: float, seed: int) -> None:
    """Keep one request outstanding until ``stop``."""
    while time.monotonic() < stop:
        request = GenerationRequest(args.images, seed=seed, sampler="ddim", steps=args.steps, client=f"c{seed}")
        await engine.submit(request).result()
        seed += 1000


async def run_mode(mode: str, models: list, args: argparse.Namespace) -> dict:
    engines_n = 1 if mode == "alone" else 2
    threads = args.threads // 2 if mode == "split" else args.threads
    worker = DeviceWorker(args.threads) if mode == "shared" else None
    settings = EngineSettings(max_batch_rows=args.max_batch_rows, max_queue_rows=4096, max_rows_per_client=4096,
                              threads=max(threads, 1), compiled=args.compiled, request_timeout_s=3600)
    engines = [Engine(models[i], settings, device_worker=worker) for i in range(engines_n)]
    for engine in engines:
        await engine.start()
    start = time.monotonic()
    stop = start + args.seconds
    tasks = [asyncio.ensure_future(flood(engine, args, stop, seed=i * 100 + k))
             for i, engine in enumerate(engines) for k in range(args.concurrency)]
    await asyncio.sleep(args.warmup)
    first = [row_steps(engine) for engine in engines]
    await asyncio.sleep(args.seconds - args.warmup)
    last = [row_steps(engine) for engine in engines]
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - start
    for engine in engines:
        await engine.drain()
    if worker is not None:
        worker.close()
    rates = [(b - a) / (args.seconds - args.warmup) for a, b in zip(first, last, strict=True)]
    return {"mode": mode, "image_steps_per_s": rates, "total": sum(rates), "elapsed_s": elapsed,
            "fairness": min(rates) / max(rates) if max(rates) > 0 else 0.0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="model_store/mnist")
    p.add_argument("--second-model", default=None, help="default: --model loaded a second time")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--max-batch-rows", type=int, default=32)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=4, help="outstanding requests per model")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before the measured window")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compiled", choices=("auto", "off"), default="off")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    args.threads = claim_threads_for_worker(args.threads)
    models = [load_model(args.model), load_model(args.second_model or args.model)]
    modes = args.modes.split(",")
    rounds: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(args.repeats):
        for mode in modes:
            result = asyncio.run(run_mode(mode, models, args))
            rounds[mode].append(result)
            rates = ", ".join(f"{x:.0f}" for x in result["image_steps_per_s"])
            print(f"round {r + 1} {mode:9s} image-steps/s [{rates}] total {result['total']:.0f} "
                  f"fairness {result['fairness']:.2f}", flush=True)
    summary = {}
    for mode, results in rounds.items():
        median = sorted(results, key=lambda x: x["total"])[len(results) // 2]
        summary[mode] = {**median, "totals": [x["total"] for x in results]}
    if "alone" in summary:
        base = summary["alone"]["total"]
        for mode in summary:
            summary[mode]["vs_alone"] = summary[mode]["total"] / base if base else 0.0
    print("\nmode       model A   model B   total  vs alone  fairness")
    for mode, s in summary.items():
        rates = s["image_steps_per_s"] + [float("nan")] * (2 - len(s["image_steps_per_s"]))
        print(f"{mode:9s} {rates[0]:8.0f} {rates[1]:9.0f} {s['total']:7.0f} {s.get('vs_alone', float('nan')):8.2f}"
              f" {s['fairness']:9.2f}")
    if args.out:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if "model name" in line), "?")
        record = {"command": " ".join(sys.argv), "cpu": cpu, "torch": torch.__version__, "threads": args.threads,
                  "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"out": str(args.out)},
                  "median_spread": {m: statistics.pstdev(s["totals"]) for m, s in summary.items()},
                  "modes": summary}
        args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
