"""Quality against cost for every sampler: the evaluator's FLD at each step count, and the engine's images/s.

Run from the repository root (minutes per point on a 2-core CPU; see docs/benchmarks.md for the command used)::

    .venv/bin/python bench/sampler_quality.py --model model_store/mnist \\
        --configs ddim:trailing,dpmpp_2m:linspace,dpmpp_2m:karras,dpmpp_3m:linspace,unipc:linspace \\
        --steps 5,10,15,20,50,100 --num 2000 --num-many-steps 1000 --batch 100 --threads 2 \\
        --json docs/sampler_quality.json --plot docs/sampler_quality.png

For each ``sampler:spacing`` and step count, ``--num`` images (``--num-many-steps`` above 20 steps) go through an
in-process engine (``max_batch_rows = --batch``, requests of ``--batch`` images submitted at once, seed i for
request i, the same for every point), timed from submission to the last result: that is the point's images/s.
The images are scored by the project's evaluator (``service.evaluate.Evaluator``: FLD of digit-classifier
features against the model's evaluation split, mean confidence, digit shares, novelty), next to the real-data
floor at the same N. ``--ddpm-num`` adds a measured DDPM-1000 line; ``--ddpm-from FILE`` reuses the DDPM-1000
row of an earlier run's JSON instead (it takes hours on a CPU). ``--resume`` skips points already in ``--json``.
``--eps-scales 0.98,1,0.97:0.99`` measures every point at each Epsilon Scaling setting (the sampler steps with
ε_θ/λ_t, Ning et al. 2023; the model's own otherwise): one λ, or ``a:b`` for λ_t linear from a at t = 0 to b at
t = T-1. ``--eps-plot`` draws FLD against λ (a linear λ_t as a point at its mean).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.plots import pyplot, save
from service.diffusion.checkpoint import DiffusionModel, EpsScale, load_model
from service.diffusion.samplers import SAMPLERS
from service.engine.batcher import Engine, EngineSettings, claim_threads_for_worker
from service.engine.client import GenerationRequest
from service.evaluate import Evaluator


async def engine_images(model: DiffusionModel, sampler: str, spacing: str | None, steps: int, num: int, batch: int,
                        dtype: str, threads: int, seed0: int = 0,
                        compiled: str = "auto") -> tuple[torch.Tensor, float, dict]:
    """(images (num, C, H, W), seconds from the first submission to the last result, engine stats) through a fresh
    engine; request i (of ``batch`` images) has seed ``seed0 + i``."""
    settings = EngineSettings(max_batch_rows=batch, max_queue_rows=max(num, batch), dtype=dtype, threads=threads,
                              request_timeout_s=1e6, compiled=compiled)
    engine = Engine(model, settings)
    await engine.start()
    try:
        sizes = [min(batch, num - start) for start in range(0, num, batch)]
        start = time.perf_counter()
        handles = [engine.submit(GenerationRequest(n, seed=seed0 + i, sampler=sampler, steps=steps,
                                                   timestep_spacing=spacing, timeout_s=1e6))
                   for i, n in enumerate(sizes)]
        results = [await h.result() for h in handles]
        seconds = time.perf_counter() - start
        return torch.cat([r.images for r in results]), seconds, engine.stats()
    finally:
        await engine.drain(timeout_s=5)


def with_eps_scale(model: DiffusionModel, sampler: str, scale: EpsScale | None) -> DiffusionModel:
    """``model`` whose ``sampler`` steps with ε_θ/λ_t of ``scale`` (None: the model as it is)."""
    if scale is None:
        return model
    per_sampler = {name: model.spec.eps_scale(name) for name in SAMPLERS} | {sampler: scale}
    spec = replace(model.spec, sampling={**model.spec.sampling, "eps_scale": per_sampler})
    return replace(model, spec=spec)


def parse_eps_scale(text: str) -> EpsScale:
    """"0.98" → 0.98; "0.97:0.99" → (0.97, 0.99), λ at t = 0 and at t = T-1."""
    first, _, last = text.partition(":")
    return (float(first), float(last)) if last else float(first)


def measure_point(args: argparse.Namespace, model: DiffusionModel, ev: Evaluator, sampler: str, spacing: str | None,
                  steps: int, num: int) -> dict:
    images, seconds, _ = asyncio.run(engine_images(model, sampler, spacing, steps, num, args.batch, args.dtype,
                                                   args.threads))
    score = ev.score(images)
    floor = ev.floor(num, seed=0)
    return {
        "sampler": sampler, "spacing": spacing or model.spec.default_spacing(sampler), "steps": steps, "num": num,
        "eps_scale": model.spec.eps_scale(sampler),
        "nfe": steps, "fld": score.fld, "floor_fld": floor.fld, "fld_ratio": score.fld / floor.fld,
        "confidence": score.confidence, "min_share": score.min_share, "max_share": score.max_share,
        "novelty": score.novelty, "seconds": seconds, "images_per_s": num / seconds,
    }


def plot(rows: list[dict], path: Path, title: str, hlines: list[str]) -> None:
    plt = pyplot()
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    lines: dict[str, list[dict]] = {}
    for r in rows:
        if r["sampler"] != "ddpm" or r["steps"] < 1000:
            scale = "" if r.get("eps_scale", 1.0) == 1 else f", λ={lam_label(r)}"
            lines.setdefault(f"{r['sampler']} ({r['spacing']}{scale})", []).append(r)
    # FLD falls with N, so a curve joins only the points of the most common N; others are hollow markers
    sizes = [p["num"] for pts in lines.values() for p in pts]
    main_n = max(set(sizes), key=sizes.count, default=0)
    for label, pts in sorted(lines.items()):
        pts = sorted(pts, key=lambda r: r["nfe"])
        main, other = [p for p in pts if p["num"] == main_n], [p for p in pts if p["num"] != main_n]
        (line,) = ax.plot([p["nfe"] for p in main], [p["fld"] for p in main], marker="o", label=label)
        ax.plot([p["nfe"] for p in other], [p["fld"] for p in other], marker="o", mfc="none", linestyle="none",
                color=line.get_color())
    if other_ns := sorted(set(sizes) - {main_n}):
        ax.plot([], [], marker="o", mfc="none", linestyle="none", color="grey",
                label=f"hollow: N={', '.join(map(str, other_ns))} (others N={main_n})")
    ddpm = [r for r in rows if r["sampler"] == "ddpm" and r["steps"] >= 1000]
    if ddpm:
        ax.axhline(ddpm[0]["fld"], color="black", linestyle="--", label=f"DDPM-1000 (N={ddpm[0]['num']})")
    for spec in hlines:  # "label=value": a figure measured elsewhere, e.g. the model card's DDPM-1000
        label, value = spec.rsplit("=", 1)
        ax.axhline(float(value), color="black", linestyle="-.", label=label)
    floors = sorted({(r["num"], r["floor_fld"]) for r in rows})
    for n, f in floors:
        ax.axhline(f, color="grey", linestyle=":", label=f"real-data floor (N={n})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = sorted({r["nfe"] for r in rows if r["nfe"] < 1000})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("network evaluations per image (steps)")
    ax.set_ylabel("FLD (lower is better)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save(fig, path)


def plot_eps_scales(rows: list[dict], path: Path, title: str) -> None:
    """FLD against the Epsilon Scaling λ, one line per sampler, spacing, steps and N."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    lines: dict[str, list[dict]] = {}
    for r in rows:
        lines.setdefault(f"{r['sampler']}-{r['steps']} ({r['spacing']}, N={r['num']})", []).append(r)
    for label, pts in sorted(lines.items()):
        uniform = sorted((p for p in pts if not isinstance(p.get("eps_scale", 1.0), list | tuple)),
                         key=lambda r: r.get("eps_scale", 1.0))
        if len(uniform) > 1:
            ax.plot([p.get("eps_scale", 1.0) for p in uniform], [p["fld"] for p in uniform], marker="o",
                    label=label)
        for p in pts:
            if isinstance(p.get("eps_scale"), list | tuple):
                ax.plot(sum(p["eps_scale"]) / 2, p["fld"], marker="*", markersize=10, linestyle="none",
                        label=f"{label}, λ_t {lam_label(p)}")
    for n, f in sorted({(r["num"], r["floor_fld"]) for r in rows}):
        ax.axhline(f, color="grey", linestyle=":", label=f"real-data floor (N={n})")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("λ (the sampler steps with ε_θ / λ; 1 = the network's ε)")
    ax.set_ylabel("FLD (lower is better)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, path)


def lam_label(row: dict) -> str:
    """A point's Epsilon Scaling: "0.98", or "0.97→0.99" (λ at t = 0 → at t = T-1)."""
    scale = row.get("eps_scale", 1.0)
    return f"{scale[0]:g}→{scale[1]:g}" if isinstance(scale, list | tuple) else f"{scale:g}"


def table(rows: list[dict]) -> str:
    head = ("| sampler | spacing | steps | N | λ | FLD | floor | ratio | confidence | digit shares | novelty "
            "| images/s |")
    out = [head, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["sampler"], r["spacing"], r["steps"], lam_label(r))):
        novelty = "" if r.get("novelty") is None else f"{r['novelty']:.2f}"
        out.append(f"| {r['sampler']} | {r['spacing']} | {r['steps']} | {r['num']} | {lam_label(r)} | "
                   f"{r['fld']:.2f} | "
                   f"{r['floor_fld']:.2f} | {r['fld_ratio']:.2f} | {r['confidence']:.3f} | "
                   f"{100 * r['min_share']:.1f}–{100 * r['max_share']:.1f}% | {novelty} | {r['images_per_s']:.2f} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="model_store/mnist")
    p.add_argument("--configs", default="ddim:trailing,dpmpp_2m:linspace,dpmpp_2m:karras,unipc:linspace",
                   help="comma list of sampler[:spacing]; no spacing = the model's default")
    p.add_argument("--steps", default="5,10,15,20,50,100")
    p.add_argument("--num", type=int, default=2000, help="images per point up to 20 steps")
    p.add_argument("--num-many-steps", type=int, default=1000, help="images per point above 20 steps")
    p.add_argument("--ddpm-num", type=int, default=0, help="measure DDPM-1000 with this many images (0 = no)")
    p.add_argument("--ddpm-from", default=None, help="JSON of an earlier run whose DDPM-1000 row to reuse")
    p.add_argument("--batch", type=int, default=100, help="rows per UNet forward (engine max_batch_rows)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda: where the engine runs the UNet")
    p.add_argument("--classifier", default=None, help="the evaluator's classifier (default: the model's own)")
    p.add_argument("--json", default="docs/sampler_quality.json")
    p.add_argument("--plot", default=None, help="also plot FLD against network evaluations here")
    p.add_argument("--resume", action="store_true", help="keep the points already in --json")
    p.add_argument("--hline", action="append", default=[], help="LABEL=FLD: a reference line measured elsewhere")
    p.add_argument("--eps-scales", default="",
                   help="comma list of Epsilon Scaling λ to measure every point at (default: the model's own)")
    p.add_argument("--eps-plot", default=None, help="also plot FLD against λ here")
    args = p.parse_args()

    args.threads = claim_threads_for_worker(args.threads)
    model = load_model(args.model, device=args.device)
    ev = Evaluator.for_model(model, args.model, classifier_path=args.classifier)
    out = Path(args.json)
    rows: list[dict] = json.loads(out.read_text())["points"] if args.resume and out.is_file() else []
    done = {(r["sampler"], r["spacing"], r["steps"], r["num"], lam_label(r)) for r in rows}
    if args.ddpm_from and not any(r["sampler"] == "ddpm" and r["steps"] >= 1000 for r in rows):
        rows += [r for r in json.loads(Path(args.ddpm_from).read_text())["points"]
                 if r["sampler"] == "ddpm" and r["steps"] >= 1000]
    plan = [(c.split(":")[0], c.split(":")[1] if ":" in c else None, int(s))
            for c in args.configs.split(",") for s in args.steps.split(",")]
    if args.ddpm_num:
        plan.append(("ddpm", "trailing", model.spec.num_train_timesteps))
    scales = [parse_eps_scale(v) for v in args.eps_scales.split(",")] if args.eps_scales else [None]
    for (sampler, spacing, steps), scale in itertools.product(plan, scales):
        num = args.ddpm_num if sampler == "ddpm" and steps >= 1000 else args.num if steps <= 20 else args.num_many_steps
        scaled = with_eps_scale(model, sampler, scale)
        key = (sampler, spacing or model.spec.default_spacing(sampler), steps, num,
               lam_label({"eps_scale": scaled.spec.eps_scale(sampler)}))
        if key in done:
            continue
        row = measure_point(args, scaled, ev, sampler, spacing, steps, num)
        rows.append(row)
        print(f"{sampler}:{row['spacing']}-{steps} N={num} λ={lam_label(row)}: FLD {row['fld']:.2f} "
              f"(floor {row['floor_fld']:.2f}), {row['images_per_s']:.2f} images/s", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"model": args.model, "model_sha256": model.sha256, "device": args.device,
                                   "dtype": args.dtype,
                                   "batch": args.batch, "threads": args.threads, "evaluation": ev.describe(),
                                   "points": rows}, indent=2) + "\n")
    print(table(rows))
    if args.plot:
        plot(rows, Path(args.plot), f"{model.name}: FLD vs network evaluations ({args.dtype}, batch {args.batch})",
             args.hline)
    if args.eps_plot:
        plot_eps_scales(rows, Path(args.eps_plot), f"{model.name}: Epsilon Scaling ({args.dtype})")
    print("wrote", ", ".join(str(path) for path in (out, args.plot, args.eps_plot) if path))


if __name__ == "__main__":
    main()
