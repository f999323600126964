"""HTTP at saturation vs the engine offline, on the same work, in one run (issue 5's benchmark).

Work: ``--requests`` generations of one image each, DDIM with ``--steps`` steps, issued by
``--clients`` closed-loop clients (each sends its next request when the previous one returned).

* offline: the same Engine class in this process, the clients being asyncio tasks calling
  ``engine.submit(...)`` / ``await handle.result()`` — no HTTP, no encoding.
* http: ``python -m service serve`` in a subprocess with the same engine settings, the clients being
  httpx connections posting ``/generate`` (``format=npy``, the cheapest encoding).

Rounds alternate offline / http (``--rounds``) so that drift in machine load hits both alike; the
ratio of the summed throughputs is reported. Goal: http ≥ 90 % of offline.

    .venv/bin/python bench/http_saturation.py --model model_store/mnist --clients 64 --requests 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.config import Settings  # noqa: E402
from service.diffusion.checkpoint import load_model  # noqa: E402
from service.engine.batcher import Engine, EngineSettings, claim_threads_for_worker  # noqa: E402
from service.engine.client import GenerationRequest  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def closed_loop(clients: int, total: int, one) -> float:
    """Run ``total`` calls of ``one(i)`` from ``clients`` concurrent loops; return the wall time."""
    counter = iter(range(total))

    async def client() -> None:
        for i in counter:
            await one(i)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - start


def own_cpu() -> float:
    """CPU seconds (user + system) used by this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) used by process ``pid`` so far (/proc/PID/stat fields 14, 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric_total(text: str, name: str) -> float:
    """The sum of every sample called ``name`` in a /metrics text (over all label values, e.g. every model)."""
    from prometheus_client.parser import text_string_to_metric_families

    values = [s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]
    if not values:
        raise RuntimeError(f"no {name} in /metrics")
    return sum(values)


def server_iterations(url: str) -> float:
    """ddpm_engine_iterations_total of the server (UNet forwards so far)."""
    return metric_total(httpx.get(f"{url}/metrics").text, "ddpm_engine_iterations_total")


async def offline(args: argparse.Namespace, engine: Engine) -> float:
    async def one(i: int) -> None:
        req = GenerationRequest(num_images=1, seed=i, sampler="ddim", steps=args.steps, timeout_s=3600)
        await engine.submit(req).result()

    return await closed_loop(args.clients, args.requests, one)


async def over_http(args: argparse.Namespace, url: str) -> float:
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:

        async def one(i: int) -> None:
            body = {"num_images": 1, "seed": i, "sampler": "ddim", "steps": args.steps, "format": "npy"}
            r = await client.post("/generate", json=body)
            r.raise_for_status()

        return await closed_loop(args.clients, args.requests, one)


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "DDPM_MODEL": args.model,
        "DDPM_PORT": str(port),
        "DDPM_DEVICE": args.device,
        "DDPM_DTYPE": args.dtype,
        "DDPM_MAX_BATCH_ROWS": str(args.max_batch_rows),
        "DDPM_MAX_QUEUE_ROWS": str(max(512, args.clients)),
        "DDPM_REQUEST_TIMEOUT_S": "3600",
        "DDPM_THREADS": str(args.threads),
        "DDPM_COMPILED": args.compiled,
        "DDPM_LOG_LEVEL": "warning",
    }
    proc = subprocess.Popen([sys.executable, "-m", "service", "serve"], cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server not ready")


async def run(args: argparse.Namespace) -> dict:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model, device)
    settings = EngineSettings(
        max_batch_rows=args.max_batch_rows, max_queue_rows=max(512, args.clients), request_timeout_s=3600,
        dtype=args.dtype, threads=args.threads, compiled=args.compiled,
    )
    proc, url = start_server(args)
    results: dict[str, list[float]] = {"offline": [], "http": []}
    forwards: dict[str, float] = {"offline": 0.0, "http": 0.0}
    cpu: dict[str, float] = {"offline": 0.0, "http_server": 0.0, "http_client": 0.0}
    try:
        # warm both paths once (first forwards at new batch sizes, connection setup)
        warm = argparse.Namespace(**{**vars(args), "requests": args.clients})
        engine = Engine(model, settings)
        await engine.start()
        await offline(warm, engine)
        await engine.drain()  # stop the in-process engine while the server runs: they share the CPU
        await over_http(warm, url)
        for r in range(args.rounds):
            engine = Engine(model, settings)
            await engine.start()
            c0 = own_cpu()
            results["offline"].append(await offline(args, engine))
            cpu["offline"] += own_cpu() - c0
            forwards["offline"] += engine.stats()["iterations"]
            await engine.drain()
            before = server_iterations(url)
            c0, s0 = own_cpu(), process_cpu(proc.pid)
            results["http"].append(await over_http(args, url))
            cpu["http_client"] += own_cpu() - c0
            cpu["http_server"] += process_cpu(proc.pid) - s0
            forwards["http"] += server_iterations(url) - before
            print(f"round {r + 1}: offline {args.requests / results['offline'][-1]:.2f} img/s, "
                  f"http {args.requests / results['http'][-1]:.2f} img/s", flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    n = args.requests * args.rounds
    off, web = n / sum(results["offline"]), n / sum(results["http"])
    per_round = sorted(o / h for o, h in zip(results["offline"], results["http"], strict=True))
    return {
        "model": args.model, "device": device, "dtype": args.dtype, "clients": args.clients,
        "requests_per_round": args.requests, "rounds": args.rounds, "sampler": f"ddim-{args.steps}",
        "max_batch_rows": args.max_batch_rows,
        "threads": args.threads, "compiled": args.compiled,
        "offline_images_per_s": round(off, 3), "http_images_per_s": round(web, 3), "ratio": round(web / off, 4),
        "median_round_ratio": round(per_round[len(per_round) // 2] if len(per_round) % 2 else
                                    (per_round[len(per_round) // 2 - 1] + per_round[len(per_round) // 2]) / 2, 4),
        # mean rows per UNet forward: how full the batches were
        "offline_rows_per_forward": round(n * args.steps / forwards["offline"], 2),
        "http_rows_per_forward": round(n * args.steps / forwards["http"], 2),
        # CPU per image: offline = engine + in-process clients; http = server process, and the httpx clients
        "offline_cpu_ms_per_image": round(1000 * cpu["offline"] / n, 1),
        "http_server_cpu_ms_per_image": round(1000 * cpu["http_server"] / n, 1),
        "http_client_cpu_ms_per_image": round(1000 * cpu["http_client"] / n, 1),
        "offline_seconds": [round(s, 3) for s in results["offline"]],
        "http_seconds": [round(s, 3) for s in results["http"]],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="model_store/mnist")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=256, help="requests per round and path")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-batch-rows", type=int, default=64)
    p.add_argument("--dtype", default="auto", help="as DDPM_DTYPE (default: the server's default, auto)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--compiled", choices=["auto", "off"], default="auto",
                   help="the model's compiled UNet when valid (EngineSettings.compiled), on both paths")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args()
    args.threads = claim_threads_for_worker(args.threads)  # as the server does (service/api/app.py)
    args.dtype = Settings(device=args.device, dtype=args.dtype).resolved_dtype()  # both paths run the same dtype
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
