"""Fair share: a small client's latency while another client floods the server, round-robin vs FIFO, in one run.

A real ``python -m service serve`` with two API keys. The *flood* client keeps ``--flood-concurrency`` requests of
``--flood-images`` images (DDIM, ``--flood-steps``) outstanding, closed loop; the *small* client sends
``--small-requests`` one-image requests one after another (DDIM, ``--small-steps``) and we time each. Phases:

* ``alone``: the small client with no flood: its own compute time.
* ``fair``: the flood with its own key: round-robin admission (engine/admission.py) lets the small client's
  request join at the next free slot.
* ``fifo``: the small client sends with the *flood's* key: one client, so its requests queue behind the flood's in
  FIFO order, which is what the engine did for everyone before fair share.

The per-client cap is set high enough that the flood never hits it, so only the admission order differs.
Reported: median and p90 latency per phase and the ratios to ``alone``.

    .venv/bin/python bench/fair_share.py --model model_store/mnist --out docs/fair_share.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.http_saturation import free_port, metric_total  # noqa: E402

KEYS = {"flood": "bench-flood-key", "small": "bench-small-key"}


def start_server(args: argparse.Namespace, port: int, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "DDPM_MODEL": args.model,
        "DDPM_PORT": str(port),
        "DDPM_HOST": "127.0.0.1",
        "DDPM_DEVICE": "cpu",
        "DDPM_THREADS": str(args.threads),
        "DDPM_API_KEYS": ",".join(KEYS.values()),
        "DDPM_MAX_BATCH_ROWS": str(args.max_batch_rows),
        "DDPM_MAX_QUEUE_ROWS": "4096",
        "DDPM_MAX_ROWS_PER_CLIENT": "4096",
        "DDPM_MAX_IMAGES_PER_REQUEST": str(args.max_batch_rows),
        "DDPM_REQUEST_TIMEOUT_S": "3600",
        "DDPM_LOG_LEVEL": "warning",
    }
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "service", "serve"], cwd=REPO, env=env, stdout=out, stderr=out)


async def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url) as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if (await c.get("/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError("server not ready")


def client(url: str, key: str) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(base_url=url, timeout=3600, limits=limits, headers={"Authorization": f"Bearer {key}"})


async def small_client(url: str, key: str, args: argparse.Namespace) -> list[float]:
    body = {"num_images": 1, "sampler": "ddim", "steps": args.small_steps, "format": "npy"}
    latencies = []
    async with client(url, key) as c:
        for _ in range(args.small_requests):
            start = time.perf_counter()
            r = await c.post("/generate", json=body)
            r.raise_for_status()
            latencies.append(time.perf_counter() - start)
    return latencies


async def flood(url: str, args: argparse.Namespace, stop: asyncio.Event, started: asyncio.Event) -> int:
    body = {"num_images": args.flood_images, "sampler": "ddim", "steps": args.flood_steps, "format": "npy"}
    done = 0
    async with client(url, KEYS["flood"]) as c:

        async def loop() -> None:
            nonlocal done
            while not stop.is_set():
                (await c.post("/generate", json=body)).raise_for_status()
                done += 1

        tasks = [asyncio.create_task(loop()) for _ in range(args.flood_concurrency)]
        while True:  # the flood is queued before the small client starts
            if metric_total((await c.get("/metrics")).text, "ddpm_queue_depth_requests") > 0:
                break
            await asyncio.sleep(0.05)
        started.set()
        await stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return done


async def step_totals(url: str) -> tuple[float, float]:
    """(sum, count) of the server's ddpm_step_duration_seconds: mean iteration time over a phase."""
    async with httpx.AsyncClient(base_url=url) as c:
        text = (await c.get("/metrics")).text
    return metric_total(text, "ddpm_step_duration_seconds_sum"), metric_total(text, "ddpm_step_duration_seconds_count")


async def phase(url: str, args: argparse.Namespace, name: str) -> dict:
    """The small client's latencies in one phase, and its own compute time there (steps × mean iteration)."""
    stop, started = asyncio.Event(), asyncio.Event()
    flooding = asyncio.create_task(flood(url, args, stop, started)) if name != "alone" else None
    if flooding is not None:
        await started.wait()
    s0, n0 = await step_totals(url)
    latencies = await small_client(url, KEYS["flood"] if name == "fifo" else KEYS["small"], args)
    s1, n1 = await step_totals(url)
    out: dict = {"latencies": latencies, "mean_iteration_s": (s1 - s0) / max(n1 - n0, 1)}
    out["own_compute_s"] = args.small_steps * out["mean_iteration_s"]
    if flooding is not None:
        stop.set()
        out["flood_requests_done"] = await flooding
    return out


def summary(latencies: list[float]) -> dict:
    q = statistics.quantiles(latencies, n=10)
    return {"median_s": statistics.median(latencies), "p90_s": q[-1], "n": len(latencies)}


async def main_async(args: argparse.Namespace) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(args.out).with_suffix(".server.log")
    proc = start_server(args, port, log)
    try:
        await wait_ready(url, proc)
        await small_client(url, KEYS["small"], argparse.Namespace(**{**vars(args), "small_requests": 3}))  # warm
        results = {}
        for name in ("alone", "fair", "fifo", "alone"):  # alone twice: drift check
            r = await phase(url, args, name)
            key = name if name not in results else f"{name}_again"
            results[key] = {**summary(r["latencies"]), **{k: v for k, v in r.items() if k != "latencies"},
                            "latencies_s": r["latencies"]}
            row = results[key]
            print(f"{key:12s} median {row['median_s'] * 1e3:8.1f} ms   p90 {row['p90_s'] * 1e3:8.1f} ms   "
                  f"own compute {row['own_compute_s'] * 1e3:8.1f} ms")
    finally:
        proc.terminate()
        proc.wait(60)
        log.unlink(missing_ok=True)
    alone = statistics.median(results["alone"]["latencies_s"] + results["alone_again"]["latencies_s"])
    return {
        "command": " ".join(sys.argv),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "phases": results,
        "ratio_to_alone": {p: results[p]["median_s"] / alone for p in ("fair", "fifo")},
        "ratio_to_own_compute": {p: results[p]["median_s"] / results[p]["own_compute_s"] for p in ("fair", "fifo")},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="model_store/mnist")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-batch-rows", type=int, default=16)
    p.add_argument("--flood-concurrency", type=int, default=16)
    p.add_argument("--flood-images", type=int, default=4)
    p.add_argument("--flood-steps", type=int, default=50)
    p.add_argument("--small-requests", type=int, default=10)
    p.add_argument("--small-steps", type=int, default=10)
    p.add_argument("--out", default="docs/fair_share.json")
    args = p.parse_args()
    report = asyncio.run(main_async(args))
    r, c = report["ratio_to_alone"], report["ratio_to_own_compute"]
    print(f"small client's median latency during the flood: fair {r['fair']:.2f}× alone "
          f"({c['fair']:.2f}× its own compute at the flood's batch size), FIFO {r['fifo']:.2f}× alone "
          f"({c['fifo']:.2f}× own compute)")
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
