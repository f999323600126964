"""One bf16 UNet forward on a worker thread, with and without a second OpenMP team in the process.

Run from the repository root::

    .venv/bin/python bench/omp_teams.py --model model_store/mnist --rows 16 --threads 2

Each scenario runs in a fresh interpreter (OpenMP teams live as long as their thread, so they cannot be
undone within a process) and times ``--forwards`` forwards of ``--rows`` rows after a warm-up:

* ``main``: on the main thread, the only thread that ever runs torch;
* ``worker, main ran a multi-threaded op``: on a worker thread, after the main thread ran one op with
  ``--threads`` threads (what loading the model on the main thread did before the engine kept it at one);
* ``worker, main kept at 1 thread``: the engine's setting (service/engine/batcher.py, "Threads");
* ``worker, another thread holds an idle team``: a third thread ran one multi-threaded op and waits.

CPU time / wall time shows whether the OpenMP workers keep both cores busy (≈ threads) or sleep between
the forward's parallel regions (libgomp stops spin-waiting once a process has more OpenMP threads than
CPUs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = {
    "main": "main",
    "after-main-op": "worker, main ran a multi-threaded op",
    "main-single": "worker, main kept at 1 thread",
    "idle-team": "worker, another thread holds an idle team",
}


def run_scenario(args: argparse.Namespace) -> dict[str, float]:
    import torch

    if args.scenario != "main":
        torch.set_num_threads(1 if args.scenario in ("main-single", "idle-team") else args.threads)
    if args.scenario == "after-main-op":
        torch.ones(4096, 4096).add_(1.0)  # large enough for a parallel region on the main thread

    sys.path.insert(0, str(REPO))
    from service.diffusion.checkpoint import load_model
    from service.diffusion.pipeline import prepare_unet
    from service.diffusion.runner import UNetRunner

    model = load_model(args.model)
    prepare_unet(model, torch.bfloat16)
    runner = UNetRunner(model, torch.bfloat16)
    s = model.spec
    x = torch.randn(args.rows, s.channels, s.image_size, s.image_size)
    t = torch.randint(0, s.num_train_timesteps, (args.rows,))
    result: dict[str, float] = {}

    def forwards() -> None:
        torch.set_num_threads(args.threads)
        for _ in range(5):
            runner(x, t)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(args.forwards):
            runner(x, t)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        result.update(ms=wall / args.forwards * 1000, cpu_per_wall=cpu / wall)

    release = threading.Event()
    if args.scenario == "idle-team":

        def hold_team() -> None:
            torch.set_num_threads(args.threads)
            torch.ones(4096, 4096).add_(1.0)
            release.wait()

        holder = threading.Thread(target=hold_team)
        holder.start()
        time.sleep(0.5)
    if args.scenario == "main":
        forwards()
    else:
        worker = threading.Thread(target=forwards)
        worker.start()
        worker.join()
    release.set()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="model_store/mnist")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--forwards", type=int, default=60)
    p.add_argument("--repeats", type=int, default=2, help="fresh interpreters per scenario, interleaved")
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.scenario:
        print(json.dumps(run_scenario(args)))
        return
    results: dict[str, list[dict[str, float]]] = {k: [] for k in SCENARIOS}
    for _ in range(args.repeats):
        for key in SCENARIOS:
            cmd = [sys.executable, __file__, "--scenario", key, "--model", args.model, "--rows", str(args.rows),
                   "--threads", str(args.threads), "--forwards", str(args.forwards)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[key].append(json.loads(out.strip().splitlines()[-1]))
    print(f"| {args.rows}-row bf16 forward, {args.threads} threads | ms | CPU time / wall time |\n|---|---|---|")
    for key, runs in results.items():
        ms = " / ".join(f"{r['ms']:.1f}" for r in runs)
        ratio = " / ".join(f"{r['cpu_per_wall']:.2f}" for r in runs)
        print(f"| {SCENARIOS[key]} | {ms} | {ratio} |")


if __name__ == "__main__":
    main()
