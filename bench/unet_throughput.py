"""Per-step UNet throughput: ours fp32, ours bf16 (autocast + channels_last), diffusers UNet2DModel fp32.

Run from the repository root::

    .venv/bin/python -m bench.unet_throughput

For each config (the CIFAR-10 DDPM UNet, 35.7M parameters, and the project's 28×28 UNet, 2.7M) a
diffusers ``UNet2DModel`` gets random weights and ours loads the same state dict (``strict=True``).
One forward of a batch of B rows at random timesteps is one "step"; its rate is B / time, in
image-steps per second. The three variants are timed interleaved (v1, v2, v3, v1, v2, v3, …) after
a warm-up forward each, so machine load hits them alike; the median of ``--reps`` forwards is
reported. ``--clock cpu`` times each forward by the process's CPU time instead of the wall clock:
with ``--threads 1`` that is the work a forward costs, unaffected by waiting for a core on a busy
machine (though cache and memory-bandwidth contention from other processes still count).
The table also gives our fp32 output's max abs difference from diffusers (expected ~1e-6) and the
bf16 output's max abs deviation from our fp32 output.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from datetime import UTC, datetime

import torch

from service.diffusion.rows import predict_eps
from service.diffusion.unet import UNet, UNetConfig

__all__ = ["CONFIGS", "main", "measure"]

CONFIGS: dict[str, dict] = {
    "cifar10": {  # google/ddpm-cifar10-32 (Ho et al. 2020, appendix B): 35.7M parameters, one attention head
        "sample_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (128, 256, 256, 256),
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        "layers_per_block": 2,
        "freq_shift": 1,
        "flip_sin_to_cos": False,
        "downsample_padding": 0,
        "norm_eps": 1e-6,
        "attention_head_dim": None,
    },
    "small": {  # model_store/mnist: 28×28, (32, 64, 128), attention at 7×7
        "sample_size": 28,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": (32, 64, 128),
        "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "freq_shift": 1,
        "flip_sin_to_cos": False,
        "downsample_padding": 0,
        "norm_eps": 1e-6,
    },
}
VARIANTS = ("ours fp32", "ours bf16", "diffusers fp32")


def _models(config: dict, seed: int) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    ref = UNet2DModel(**config).eval().requires_grad_(False)
    ours = UNet(UNetConfig.from_dict(dict(ref.config))).eval().requires_grad_(False)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours_bf16 = UNet(ours.config).eval().requires_grad_(False)
    ours_bf16.load_state_dict(ref.state_dict(), strict=True)
    ours_bf16.to(memory_format=torch.channels_last)  # what pipeline.prepare_unet does for bf16

    def diffusers_fp32(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return ref(x, t).sample

    return {
        "ours fp32": lambda x, t: predict_eps(ours, x, t, torch.float32),
        "ours bf16": lambda x, t: predict_eps(ours_bf16, x, t, torch.bfloat16),
        "diffusers fp32": diffusers_fp32,
    }


def measure(name: str, batches: list[int], reps: int, seed: int = 0, clock: str = "wall") -> list[dict]:
    """Rows of {config, batch, <variant> rate, ratio, deviations} for one config."""
    now = time.perf_counter if clock == "wall" else time.process_time
    config = CONFIGS[name]
    models = _models(config, seed)
    size, ch = config["sample_size"], config["in_channels"]
    rows = []
    for batch in batches:
        gen = torch.Generator().manual_seed(seed + batch)
        x = torch.randn(batch, ch, size, size, generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        outs = {v: models[v](x, t) for v in VARIANTS}  # warm-up forwards, and outputs to compare
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(reps):
            for v in VARIANTS:
                start = now()
                models[v](x, t)
                times[v].append(now() - start)
        rate = {v: batch / statistics.median(times[v]) for v in VARIANTS}
        rows.append({
            "config": name,
            "batch": batch,
            "clock": clock,
            **{f"{v} [img-steps/s]": round(rate[v], 2) for v in VARIANTS},
            "bf16 / diffusers fp32": round(rate["ours bf16"] / rate["diffusers fp32"], 2),
            "fp32 / diffusers fp32": round(rate["ours fp32"] / rate["diffusers fp32"], 2),
            "fp32 max |ours - diffusers|": float(f"{(outs['ours fp32'] - outs['diffusers fp32']).abs().max():.2e}"),
            "bf16 max |bf16 - fp32|": float(f"{(outs['ours bf16'] - outs['ours fp32']).abs().max():.2e}"),
            "max |eps| fp32": round(outs["ours fp32"].abs().max().item(), 3),
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    head = ["config", "batch", *(f"{v}" for v in VARIANTS), "bf16 / diffusers", "fp32 / diffusers",
            "fp32 max abs diff vs diffusers", "bf16 max abs dev vs fp32 (max abs ε)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["config"], str(r["batch"]), *(f"{r[f'{v} [img-steps/s]']:.1f}" for v in VARIANTS),
                 f"{r['bf16 / diffusers fp32']:.2f}×", f"{r['fp32 / diffusers fp32']:.2f}×",
                 f"{r['fp32 max |ours - diffusers|']:.1e}",
                 f"{r['bf16 max |bf16 - fp32|']:.1e} ({r['max |eps| fp32']:.2f})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.unet_throughput", description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="cifar10,small", help="comma-separated: " + ",".join(CONFIGS))
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--reps", type=int, default=3, help="timed forwards per variant and batch (median reported)")
    p.add_argument("--small-reps", type=int, default=10, help="--reps for the small config (cheap forwards)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: elapsed time; cpu: process CPU time (use with --threads 1 on a busy machine)")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    started = datetime.now(UTC)
    rows = []
    with nullcontext():
        for name in args.configs.split(","):
            rows += measure(name, batches, args.small_reps if name == "small" else args.reps, clock=args.clock)
    elapsed = (datetime.now(UTC) - started).total_seconds()
    print()
    print(f"{started:%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.clock} clock, {platform.processor() or platform.machine()}, {elapsed:.0f} s")
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"started": started.isoformat(), "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
