"""Cold start: ``python -m service serve`` process start → ``/readyz`` 200, with and without the compiled UNet.

    .venv/bin/python bench/cold_start.py --model model_store/mnist --runs 3

Runs alternate between ``DDPM_COMPILED=auto`` (the artifact in ``<model>/compiled`` is loaded and checked
against eager) and ``off``; the median of each is reported.
"""

from __future__ import annotations

import argparse
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

from bench.http_saturation import free_port  # noqa: E402


def seconds_to_ready(model: str, compiled: str, threads: int) -> tuple[float, bool]:
    port = free_port()
    env = {**os.environ, "DDPM_MODEL": model, "DDPM_PORT": str(port), "DDPM_COMPILED": compiled,
           "DDPM_THREADS": str(threads), "DDPM_LOG_LEVEL": "warning"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "service", "serve"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=2) as c:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}")
                try:
                    if c.get("/readyz").status_code == 200:
                        elapsed = time.perf_counter() - start
                        return elapsed, c.get("/v1/model").json()["compiled"]
                except httpx.TransportError:
                    pass
                time.sleep(0.02)
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="model_store/mnist")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    times: dict[str, list[float]] = {"auto": [], "off": []}
    for _ in range(args.runs):
        for mode in times:
            seconds, compiled = seconds_to_ready(args.model, mode, args.threads)
            times[mode].append(seconds)
            print(f"DDPM_COMPILED={mode}: ready in {seconds:.2f} s (compiled UNet in use: {compiled})", flush=True)
    report = {mode: {"median_s": statistics.median(v), "runs_s": v} for mode, v in times.items()}
    print(json.dumps(report))
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), **report}, indent=2) + "\n")


if __name__ == "__main__":
    main()
