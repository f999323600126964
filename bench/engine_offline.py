"""Offline throughput: the engine vs diffusers' DDPMPipeline / DDIMPipeline on the same weights and batch size.

Run from the repository root::

    .venv/bin/python bench/engine_offline.py --model model_store/mnist --images 64 --threads 2 [--batch 16]

For each precision the same ``--images`` images go through, ``--batch`` rows per UNet forward (default: all):

* diffusers: ``UNet2DModel`` loaded with our state dict (same keys), ``DDIMPipeline`` for DDIM-50 and the
  ``DDPMPipeline`` loop (``unet(x, t).sample`` → ``scheduler.step``) for DDPM-1000, under
  ``torch.autocast`` for bf16;
* the engine (``max_batch_rows`` = ``--batch``): requests of ``--batch`` rows (so one UNet forward of that
  many rows per step), eager (``compiled="off"``) and, when the model has a valid compiled UNet for the
  precision (``python -m service compile``), the AOTInductor artifact (``compiled="auto"``, the default).

One configuration runs at a time, each on its own thread with ``--threads`` torch threads (diffusers on a
fresh thread, the engine on its worker, started for the measurement and drained after it), while the main
thread stays at one: see ``on_own_thread``.

DDIM-50 runs to completion once per configuration. DDPM-1000 is timed in ``--rounds`` interleaved rounds
(configurations alternate, so a change in background load hits all of them) of ``--ddpm-steps`` steps of
the 1000-step loop after one untimed step; the median step time is extrapolated to 1000 steps (every step
costs the same forward + update, and the whole loop at 64 images takes minutes per configuration on this
CPU). Rates are image-steps/s; images/s follow.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import TypeVar

import torch

from service.config import Settings
from service.diffusion.checkpoint import DiffusionModel, load_model
from service.engine.batcher import Engine, EngineSettings, claim_threads_for_worker
from service.engine.client import EngineError, GenerationRequest

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ENGINE_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
R = TypeVar("R")



def diffusers_unet(model: DiffusionModel, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import UNet2DModel

    unet = UNet2DModel(**model.spec.unet.to_dict())
    unet.load_state_dict(model.unet.state_dict(), strict=True)
    unet = unet.eval().requires_grad_(False)
    if dtype != torch.float32:  # the same channels_last + autocast recipe as the engine
        unet = unet.to(memory_format=torch.channels_last)
    return unet


def schedulers(model: DiffusionModel):
    from diffusers import DDIMScheduler, DDPMScheduler

    s = model.spec
    common = dict(
        num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start, beta_end=s.beta_end,
        beta_schedule={"linear": "linear", "cosine": "squaredcos_cap_v2"}[s.beta_schedule],
        clip_sample=s.clip_sample, timestep_spacing="trailing",
    )
    return DDPMScheduler(variance_type=s.variance_type, **common), DDIMScheduler(**common)


def autocast(dtype: torch.dtype):
    return torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else nullcontext()


def diffusers_ddim(model: DiffusionModel, dtype: torch.dtype, images: int, batch: int, steps: int) -> float:
    """Seconds for DDIMPipeline to make ``images`` images in ``steps`` steps, ``batch`` at a time."""
    from diffusers import DDIMPipeline

    pipe = DDIMPipeline(unet=diffusers_unet(model, dtype), scheduler=schedulers(model)[1])
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode(), autocast(dtype):
        pipe(batch_size=batch, num_inference_steps=2, output_type="np")  # warm-up
        start = time.perf_counter()
        for _ in range(images // batch):
            pipe(batch_size=batch, num_inference_steps=steps, generator=gen, output_type="np")
        return time.perf_counter() - start


class DiffusersDDPM:
    """The DDPMPipeline loop (1000 steps) over ``images`` rows, advanced a few steps at a time."""

    def __init__(self, model: DiffusionModel, dtype: torch.dtype, images: int) -> None:
        s = model.spec
        self.unet, self.sched, self.dtype = diffusers_unet(model, dtype), schedulers(model)[0], dtype
        self.sched.set_timesteps(s.num_train_timesteps)
        self.gen = torch.Generator().manual_seed(0)
        self.shape = (images, s.channels, s.image_size, s.image_size)
        self.i, self.x = 0, torch.randn(self.shape, generator=self.gen)

    def step_seconds(self, steps: int) -> float:
        """Seconds per step over ``steps`` steps, after one untimed step."""
        with torch.inference_mode(), autocast(self.dtype):
            for k in range(steps + 1):
                if k == 1:
                    start = time.perf_counter()
                if self.i == len(self.sched.timesteps):
                    self.i, self.x = 0, torch.randn(self.shape, generator=self.gen)
                t = self.sched.timesteps[self.i]
                eps = self.unet(self.x, t).sample
                self.x = self.sched.step(eps, t, self.x, generator=self.gen).prev_sample
                self.i += 1
        return (time.perf_counter() - start) / steps


def on_own_thread(fn: Callable[[], R], threads: int) -> R:
    """``fn()`` on a new thread with ``threads`` torch threads; the thread, and its OpenMP team, ends with it.

    Every configuration runs this way (diffusers here, the engine on its worker), one at a time, so the
    process never holds two multi-threaded OpenMP teams: libgomp stops spin-waiting once it has more
    OpenMP threads than CPUs, which slows every forward down (service/engine/batcher.py, "Threads").
    """
    out: dict[str, object] = {}

    def target() -> None:
        torch.set_num_threads(threads)
        try:
            out["value"] = fn()
        except BaseException as exc:  # re-raised on the caller
            out["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["value"]  # type: ignore[return-value]


@contextlib.asynccontextmanager
async def running_engine(model: DiffusionModel, dtype: str, compiled: str, batch: int, images: int, threads: int):
    """A started engine for one measurement (``batch`` rows per forward, room for ``images`` rows), drained after it."""
    engine = Engine(model, EngineSettings(max_batch_rows=batch, max_queue_rows=max(images, batch), dtype=dtype,
                                          threads=threads, compiled=compiled))  # type: ignore[arg-type]
    await engine.start()
    try:
        yield engine
    finally:
        await engine.drain(timeout_s=5)


async def engine_ddpm_step_seconds(engine: Engine, images: int, steps: int) -> float:
    """Seconds per step over ``steps`` steps of a DDPM-1000 request of ``images`` rows (after one step), then cancel."""
    T = engine.model.spec.num_train_timesteps
    handle = engine.submit(GenerationRequest(images, seed=0, sampler="ddpm", steps=T))
    async for event in handle.events():
        if event.step == 1:
            start = time.perf_counter()
        if event.step == steps + 1:
            break
    seconds = (time.perf_counter() - start) / steps
    handle.cancel()
    with contextlib.suppress(EngineError):
        await handle.result()
    return seconds


async def engine_ddim_seconds(engine: Engine, images: int, batch: int, steps: int) -> float:
    """Seconds for ``images`` images as requests of ``batch`` rows (= max_batch_rows: one forward each at a time)."""
    await engine.submit(GenerationRequest(batch, seed=1, sampler="ddim", steps=2)).result()  # warm-up
    start = time.perf_counter()
    requests = [GenerationRequest(batch, seed=i, sampler="ddim", steps=steps) for i in range(images // batch)]
    handles = [engine.submit(r) for r in requests]
    for handle in handles:
        await handle.result()
    return time.perf_counter() - start


GEMM_N = 2048  # the ceiling's matmul size


def gemm_gflops(dtype: torch.dtype, n: int = GEMM_N, reps: int = 10) -> float:
    """GFLOP/s of an n×n matmul in ``dtype`` on the calling thread (best of 3 timings of ``reps``): the ceiling
    that one UNet image-step's FLOPs are measured against."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, (time.perf_counter() - start) / reps)
    return 2 * n**3 / best / 1e9


def unet_gflop(model: DiffusionModel) -> float:
    """GFLOP of one image-step of the UNet (convolutions, matmuls and attention, as torch's FlopCounterMode
    counts them; norms and activations are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    s = model.spec
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model.unet(torch.zeros(1, s.channels, s.image_size, s.image_size), torch.zeros(1, dtype=torch.long))
    return counter.get_total_flops() / 1e9


def has_compiled(model: DiffusionModel, dtype: str, batch: int) -> bool:
    """Whether the model folder holds a compiled UNet valid here for ``dtype`` and ``batch`` rows."""
    from service.diffusion.runner import UNetRunner

    runner = UNetRunner(model, {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])
    runner.prepare(batch)
    return runner.compiled


async def measure(args: argparse.Namespace) -> list[dict]:
    """DDIM-S once per configuration, then DDPM-1000 step times in interleaved rounds (median).

    One configuration runs at a time: diffusers on a fresh thread, the engine started for the measurement and
    drained after it.
    """
    configs = []
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        model = load_model(args.model)  # one per precision: the engines make its UNet channels_last for bf16
        configs.append({"impl": "diffusers", "dtype": name, "ddpm": DiffusersDDPM(model, dtype, args.batch),
                        "torch_dtype": dtype, "model": model})
        configs.append({"impl": "engine", "dtype": name, "compiled": "off", "model": model})
        if has_compiled(model, ENGINE_DTYPES[name], args.batch):
            configs.append({"impl": "engine compiled", "dtype": name, "compiled": "auto", "model": model})
        else:
            print(f"no valid compiled UNet for {name} at {args.batch} rows: skipping 'engine compiled' "
                  f"(python -m service compile --model {args.model} --dtype {ENGINE_DTYPES[name]})", flush=True)

    async def engine_run(c: dict, measurement):
        dtype = ENGINE_DTYPES[c["dtype"]]
        async with running_engine(c["model"], dtype, c["compiled"], args.batch, args.images, args.threads) as engine:
            return await measurement(engine)

    for c in configs:
        if c["impl"] == "diffusers":
            c["ddim_s"] = on_own_thread(
                lambda c=c: diffusers_ddim(c["model"], c["torch_dtype"], args.images, args.batch, args.ddim_steps),
                args.threads,
            )
        else:
            c["ddim_s"] = await engine_run(
                c, lambda e: engine_ddim_seconds(e, args.images, args.batch, args.ddim_steps)
            )
        print(f"{c['impl']} {c['dtype']}: DDIM-{args.ddim_steps} {c['ddim_s']:.1f} s", flush=True)
    for c in configs:
        c["step_s"] = []
    for r in range(args.rounds):
        for c in configs if r % 2 == 0 else configs[::-1]:
            if c["impl"] == "diffusers":
                c["step_s"].append(on_own_thread(lambda c=c: c["ddpm"].step_seconds(args.ddpm_steps), args.threads))
            else:
                c["step_s"].append(
                    await engine_run(c, lambda e: engine_ddpm_step_seconds(e, args.batch, args.ddpm_steps))
                )
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    return configs


def forward_scaling(args: argparse.Namespace) -> None:
    """Milliseconds per engine forward (bf16, eager) against rows per forward: where batching stops paying."""
    from service.diffusion.pipeline import prepare_unet
    from service.diffusion.runner import UNetRunner

    model = load_model(args.model)
    prepare_unet(model, torch.bfloat16)
    runner = UNetRunner(model, torch.bfloat16, compiled="off")
    runner.prepare(max(args.scaling))
    s = model.spec
    times: dict[int, list[float]] = {b: [] for b in args.scaling}
    for _ in range(3):  # interleaved rounds, median reported
        for b in args.scaling:
            x, t = torch.randn(b, s.channels, s.image_size, s.image_size), torch.randint(0, 1000, (b,))
            runner(x, t)
            start = time.perf_counter()
            for _ in range(3):
                runner(x, t)
            times[b].append((time.perf_counter() - start) / 3)
    print("| rows per forward | ms per forward | image-steps/s |\n|---|---|---|")
    for b, v in times.items():
        ms = statistics.median(v) * 1000
        print(f"| {b} | {ms:.0f} | {b / ms * 1000:.0f} |")


def forward_profile(args: argparse.Namespace) -> None:
    """Where one forward of ``--batch`` rows spends its time: diffusers fp32 vs the engine's bf16 forward.

    Per-op self CPU time (torch.profiler, mean over 5 forwards after 3 warm-ups), split into convolutions
    and the rest: bf16 speeds up the convolutions only, which bounds the bf16 / fp32 ratio.
    """
    from torch.profiler import profile

    from service.diffusion.pipeline import prepare_unet
    from service.diffusion.runner import UNetRunner

    model = load_model(args.model)
    s = model.spec
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, s.channels, s.image_size, s.image_size, generator=gen)
    t = torch.randint(0, s.num_train_timesteps, (args.batch,), generator=gen)
    diffusers = diffusers_unet(model, torch.float32)
    prepare_unet(model, torch.bfloat16)
    engine_bf16 = UNetRunner(model, torch.bfloat16, compiled="off")
    variants = {"diffusers fp32": lambda: diffusers(x, t).sample, "engine bf16": lambda: engine_bf16(x, t)}
    print(f"| forward of {args.batch} rows | ms | convolutions ms | other ops ms | top other ops (ms) |")
    print("|---|---|---|---|---|")
    for name, fn in variants.items():
        with torch.inference_mode():
            for _ in range(3):
                fn()
            start = time.perf_counter()
            with profile() as prof:
                for _ in range(5):
                    fn()
            wall = (time.perf_counter() - start) / 5 * 1000
        ops = {e.key: e.self_cpu_time_total / 5 / 1000 for e in prof.key_averages()}
        conv = sum(v for k, v in ops.items() if "convolution" in k)
        other = {k: v for k, v in ops.items() if "convolution" not in k}
        largest = sorted(other.items(), key=lambda kv: -kv[1])[:4]
        top = ", ".join(f"{k.removeprefix('aten::')} {v:.1f}" for k, v in largest)
        print(f"| {name} | {wall:.1f} | {conv:.1f} | {sum(other.values()):.1f} | {top} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="model_store/mnist")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch", type=int, default=None, help="rows per forward (default: --images); divides --images")
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--ddpm-steps", type=int, default=5, help="timed steps of the 1000-step DDPM loop per round")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds of DDPM timing (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for every configuration")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--scaling", type=lambda v: [int(b) for b in v.split(",")], default=None,
                   help="only time the bf16 eager forward at these rows per forward, e.g. 1,2,4,8,16,32")
    p.add_argument("--profile", action="store_true", help="only profile one forward of --batch rows")
    args = p.parse_args()
    args.batch = args.batch or args.images
    if args.images % args.batch:
        raise SystemExit("--batch must divide --images")
    claim_threads_for_worker(args.threads)  # this thread only loads models; each configuration runs on its own
    if args.scaling:
        on_own_thread(lambda: forward_scaling(args), args.threads)
        return
    if args.profile:
        on_own_thread(lambda: forward_profile(args), args.threads)
        return
    configs = asyncio.run(measure(args))
    ceiling = on_own_thread(lambda: gemm_gflops(torch.bfloat16), args.threads)  # same run, same threads
    gflop = unet_gflop(configs[0]["model"])
    defaults = Settings()
    default_dtype, default_compiled = defaults.resolved_dtype(), defaults.compiled
    # what the server runs with no settings: the default dtype, compiled when the artifact is valid, else eager
    engine_rows = [c for c in configs if c["impl"] != "diffusers" and ENGINE_DTYPES[c["dtype"]] == default_dtype]
    defaults_config = max(engine_rows, key=lambda c: c["compiled"] == default_compiled, default=None)
    T = configs[0]["model"].spec.num_train_timesteps
    rows = []
    for c in configs:
        per_step = statistics.median(c["step_s"])
        row = {
            "impl": c["impl"], "dtype": c["dtype"],
            "ddim_images_per_s": args.images / c["ddim_s"],
            "ddim_image_steps_per_s": args.images * args.ddim_steps / c["ddim_s"],
            "ddpm_images_per_s": args.batch / (per_step * T),
            "ddpm_image_steps_per_s": args.batch / per_step,
            "ddpm_step_s_rounds": c["step_s"],
            "ceiling_fraction": args.batch / per_step * gflop / ceiling,
            "project_defaults": c is defaults_config,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next(r for r in rows if r["impl"] == "diffusers" and r["dtype"] == "fp32")
    print(f"\n{args.images} images, batch {args.batch}, {args.threads} thread(s); DDPM-1000 extrapolated from the "
          f"median of {args.rounds} interleaved rounds of {args.ddpm_steps} steps; {gflop:.3f} GFLOP per image-step; "
          f"bf16 {GEMM_N}² matmul ceiling {ceiling:.0f} GFLOP/s; * = the project's defaults "
          f"(dtype {defaults.dtype} → {default_dtype}, compiled {default_compiled})\n")
    print(f"| implementation | dtype | DDIM-{args.ddim_steps} images/s | DDPM-1000 images/s | image-steps/s (DDPM) "
          "| × diffusers fp32 (DDIM / DDPM) | of the bf16 ceiling |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        star = " *" if r["project_defaults"] else ""
        print(f"| {r['impl']}{star} | {r['dtype']} | {r['ddim_images_per_s']:.2f} | {r['ddpm_images_per_s']:.3f} | "
              f"{r['ddpm_image_steps_per_s']:.0f} | {r['ddim_images_per_s'] / base['ddim_images_per_s']:.2f} / "
              f"{r['ddpm_images_per_s'] / base['ddpm_images_per_s']:.2f} | {100 * r['ceiling_fraction']:.0f} % |")
    if args.json:
        args.json.write_text(json.dumps({"gflop_per_image_step": gflop, "bf16_gemm_gflops": ceiling,
                                         "threads": args.threads, "batch": args.batch, "images": args.images,
                                         "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
