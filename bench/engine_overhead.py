"""Engine overhead: how much of one iteration is the UNet forward and how much the per-row bookkeeping.

    .venv/bin/python bench/engine_overhead.py --model model_store/mnist --threads 2 --rows 1,16,64

For each batch size and composition (one request of ``rows`` rows, or ``rows`` one-row requests, the worst case
for per-group work) and sampler (DDIM: no noise; DDPM: a noise draw per row per step; UniPC: multistep history),
:func:`~service.diffusion.rows.batched_step` runs repeatedly over fresh groups; the forward inside it is timed
separately. Reported: milliseconds per iteration, of which forward, and the rest as a fraction of the
forward. The forward is the engine's default (the compiled UNet when the model has a valid artifact).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.config import Settings  # noqa: E402
from service.diffusion.checkpoint import load_model  # noqa: E402
from service.diffusion.pipeline import prepare_unet  # noqa: E402
from service.diffusion.rows import RowGroup, batched_step  # noqa: E402
from service.diffusion.runner import UNetRunner  # noqa: E402
from service.engine.batcher import DTYPES  # noqa: E402


def measure(model, runner: UNetRunner, dtype: torch.dtype, rows: int, groups: int, sampler: str, reps: int) -> dict:
    forward_s: list[float] = []

    def timed_forward(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = runner(x, t)
        forward_s.append(time.perf_counter() - start)
        return out

    per = rows // groups
    iteration_s, inner_s = [], []
    for rep in range(reps + 2):  # two warm-ups
        gs = [RowGroup.start(model, per, seed=rep * 1000 + i, sampler=sampler, steps=50, eta=0.0, spacing=None,
                             device="cpu") for i in range(groups)]
        batched_step(model, gs, dtype, runner)  # first step: multistep history starts
        forward_s.clear()
        start = time.perf_counter()
        batched_step(model, gs, dtype, timed_forward)
        if rep >= 2:
            iteration_s.append(time.perf_counter() - start)
            inner_s.append(forward_s[0])
    it, fw = statistics.median(iteration_s), statistics.median(inner_s)
    return {"rows": rows, "requests": groups, "sampler": sampler, "iteration_ms": round(it * 1e3, 3),
            "forward_ms": round(fw * 1e3, 3), "overhead_ms": round((it - fw) * 1e3, 3),
            "overhead_vs_forward": round((it - fw) / fw, 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="model_store/mnist")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="1,16,64")
    p.add_argument("--samplers", default="ddim,ddpm,unipc")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--dtype", default="auto", help="as DDPM_DTYPE (default: the server's default, auto)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    sizes = [int(r) for r in args.rows.split(",")]
    dtype_name = Settings(device="cpu", dtype=args.dtype).resolved_dtype()
    dtype = DTYPES[dtype_name]
    prepare_unet(model, dtype)
    runner = UNetRunner(model, dtype)
    runner.prepare(max(sizes))
    out = []
    print(f"dtype {dtype_name}, compiled UNet: {runner.compiled}\n")
    print("| rows | requests | sampler | iteration ms | forward ms | rest ms | rest / forward |")
    print("|---|---|---|---|---|---|---|")
    for rows in sizes:
        for groups in sorted({1, rows}):
            for sampler in args.samplers.split(","):
                r = measure(model, runner, dtype, rows, groups, sampler, args.reps)
                out.append(r)
                print(f"| {rows} | {groups} | {sampler} | {r['iteration_ms']:.2f} | {r['forward_ms']:.2f} | "
                      f"{r['overhead_ms']:.2f} | {100 * r['overhead_vs_forward']:.1f} % |", flush=True)
    if args.json:
        record = {"command": " ".join(sys.argv), "dtype": dtype_name, "compiled": runner.compiled, "rows": out}
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
