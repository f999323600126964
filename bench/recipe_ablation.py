"""Training-recipe ablations: short runs from scratch that change one thing each, scored by the evaluator.

Run from the repository root (about 25 CPU-minutes per arm at the defaults on one core; resumable)::

    .venv/bin/python bench/recipe_ablation.py --data ../shared/data/mnist/train-images-idx3-ubyte.gz \\
        --classifier model_store/mnist/classifier.safetensors --workdir /work/runs/ablation --threads 1 \\
        --json docs/recipe_ablation.json --plot docs/recipe_ablation.png

Every arm is the base recipe (the default model's: AdamW, warm-up then cosine decay to 0, min-SNR-γ 5,
bf16 autocast) at a small budget (``--steps`` × ``--batch-size``) with one change:

- ``plain-mse``: unweighted ε-MSE (Ho et al. 2020, Eq. 14) instead of min-SNR-γ 5 (Hang et al. 2023);
- ``lr-half`` / ``lr-double``: half / twice the peak learning rate;
- ``batch-double``: twice the batch for half the steps (the same images seen, about the same compute);
- ``constant-lr``: no cosine decay after the warm-up;
- ``seed-1``: the base recipe with another seed (initialisation, batches, noise): the run-to-run spread
  that every other difference is read against.

All arms but ``seed-1`` share the seed, hence the initialisation and (at the same batch) the batches and
noise: the comparisons are paired. Each arm's EMA is scored with ``--num`` images per sampler
(SDE-DPM-Solver++(2M)-20 and DDIM-50 trailing, bf16, seeds as in ``bench/sampler_quality.py``) against the
test split, beside the real-data floor at the same N, and by its plain ε-MSE on 1,000 test digits at fixed
timesteps and noise (comparable across loss weightings). An arm's training resumes from its checkpoint, and
arms already in ``--json`` are kept (``--fresh`` to start over). Short runs rank recipes early in training;
they do not prove the ranking holds at the full budget.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.plots import pyplot, save  # noqa: E402
from bench.sampler_quality import measure_point  # noqa: E402
from service.diffusion.checkpoint import DiffusionModel, load_model  # noqa: E402
from service.engine.batcher import claim_threads_for_worker  # noqa: E402
from service.evaluate import Evaluator  # noqa: E402
from service.train import TrainConfig, train  # noqa: E402

SAMPLERS = (("dpmpp_2m_sde", "linspace", 20), ("ddim", "trailing", 50))


def arms(base: TrainConfig) -> dict[str, dict]:
    """Each arm's changes to the base recipe."""
    return {
        "base": {},
        "plain-mse": {"min_snr_gamma": 0.0},
        "lr-half": {"lr": base.lr / 2},
        "lr-double": {"lr": base.lr * 2},
        "batch-double": {"batch_size": base.batch_size * 2, "steps": base.steps // 2,
                         "warmup_steps": base.warmup_steps // 2},
        "constant-lr": {"lr_schedule": "constant"},
        "seed-1": {"seed": base.seed + 1},
    }


@torch.no_grad()
def test_eps_mse(model: DiffusionModel, test_images: torch.Tensor, seed: int = 0) -> float:
    """Plain ε-MSE E‖ε − ε_θ(√ᾱ_t x₀ + √(1−ᾱ_t) ε, t)‖² on test digits, t and ε fixed by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    schedule = model.schedule
    t = torch.randint(0, model.spec.num_train_timesteps, (len(test_images),), generator=g)
    eps = torch.randn(test_images.shape, generator=g)
    x_t = schedule.q_sample(test_images, t, eps)
    losses = [torch.nn.functional.mse_loss(model.unet(x, tt), e) for x, tt, e in
              zip(x_t.split(250), t.split(250), eps.split(250), strict=True)]
    return float(torch.stack(losses).mean())


def recipe(cfg: TrainConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k != "extra"}


def run_arm(name: str, changes: dict, cfg: TrainConfig, args: argparse.Namespace) -> dict:
    """Train (or resume) one arm, then score its EMA; ``train`` sets ``cfg.threads``, the engine samples on its own."""
    out = train(cfg, resume=True)
    losses = [json.loads(line)["loss"] for line in (Path(cfg.workdir) / "loss.jsonl").read_text().splitlines()]
    model = load_model(out)
    torch.set_num_threads(1)
    ev = Evaluator.for_model(model, out, classifier_path=args.classifier)
    points = [measure_point(args, model, ev, s, spacing, steps, args.num) for s, spacing, steps in SAMPLERS]
    training = model.spec.extra["training"]
    return {
        "arm": name, "changes": changes, "config": recipe(cfg),
        "images_seen": cfg.steps * cfg.batch_size, "train_seconds": training["train_seconds"],
        "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "test_eps_mse": test_eps_mse(model, ev.reference_images[:1000]),
        "points": points,
    }


def table(results: list[dict]) -> str:
    head = " | ".join(f"{s}-{n} FLD (× floor)" for s, _, n in SAMPLERS)
    out = [f"| arm | change | steps × batch | test ε-MSE | {head} | confidence | train s |",
           "|---|---|---|---|" + "---|" * len(SAMPLERS) + "---|---|"]
    for r in results:
        cells = " | ".join(f"{p['fld']:.2f} ({p['fld_ratio']:.2f}×)" for p in r["points"])
        conf = "/".join(f"{p['confidence']:.3f}" for p in r["points"])
        change = ", ".join(f"{k}={v}" for k, v in r["changes"].items()) or "—"
        out.append(f"| {r['arm']} | {change} | {r['config']['steps']} × {r['config']['batch_size']} | "
                   f"{r['test_eps_mse']:.4f} | {cells} | {conf} | {r['train_seconds']:.0f} |")
    return "\n".join(out)


def plot(results: list[dict], path: Path, title: str) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, len(SAMPLERS) + 1, figsize=(4.2 * (len(SAMPLERS) + 1), 3.8), dpi=120, sharey=True)
    names = [r["arm"] for r in results]
    base = next((r for r in results if r["arm"] == "base"), None)
    seed = next((r for r in results if r["arm"] == "seed-1"), None)
    panels = [(f"{s}-{n}: FLD (lower is better)", [r["points"][i]["fld"] for r in results], i)
              for i, (s, _, n) in enumerate(SAMPLERS)]
    panels.append(("test-split ε-MSE", [r["test_eps_mse"] for r in results], None))
    for ax, (label, values, i) in zip(axes, panels, strict=True):
        ax.barh(names, values, color=["tab:blue" if n in ("base", "seed-1") else "tab:orange" for n in names])
        if base and seed:  # the run-to-run spread around the base arm
            pair = [r["points"][i]["fld"] if i is not None else r["test_eps_mse"] for r in (base, seed)]
            ax.axvspan(min(pair), max(pair), color="grey", alpha=0.25, label="seed spread")
            ax.legend(fontsize=7, loc="lower right")
        if i is not None:
            ax.axvline(results[0]["points"][i]["floor_fld"], color="black", linestyle=":")  # the same N for all
        ax.set_title(label, fontsize=9)
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    save(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="the MNIST training split (train-images-idx3-ubyte.gz)")
    p.add_argument("--classifier", required=True, help="the evaluator's digit classifier (trained on that split)")
    p.add_argument("--workdir", default="runs/ablation", help="one training folder per arm")
    p.add_argument("--arms", default=None, help="comma list of arms to run (default: all)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--num", type=int, default=500, help="images per sampler and for the floor")
    p.add_argument("--batch", type=int, default=100, help="rows per UNet forward when sampling")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="docs/recipe_ablation.json")
    p.add_argument("--plot", default="docs/recipe_ablation.png")
    p.add_argument("--fresh", action="store_true", help="ignore arms already in --json")
    args = p.parse_args()

    args.threads = claim_threads_for_worker(args.threads)
    base = TrainConfig(data=args.data, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                       warmup_steps=args.warmup_steps, lr_schedule="cosine", min_snr_gamma=5.0,
                       ema_decay=args.ema_decay, dtype=args.dtype, threads=args.threads, sample_every=0,
                       checkpoint_every=100, log_every=10)
    out = Path(args.json)
    known = {} if args.fresh or not out.is_file() else {r["arm"]: r for r in json.loads(out.read_text())["arms"]}
    every = arms(base)
    chosen = {k: every[k] for k in args.arms.split(",")} if args.arms else every
    for name, changes in chosen.items():
        if name in known:
            continue
        workdir = Path(args.workdir) / name
        cfg = replace(base, **changes, workdir=str(workdir), out=str(workdir / "model"))
        result = known[name] = run_arm(name, changes, cfg, args)
        print(f"{name}: " + ", ".join(f"{q['sampler']}-{q['steps']} FLD {q['fld']:.2f} (floor {q['floor_fld']:.2f})"
                                      for q in result["points"]) + f", test ε-MSE {result['test_eps_mse']:.4f}",
              flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"base": recipe(base), "num": args.num, "samplers": [list(s) for s in SAMPLERS],
                                   "arms": [known[a] for a in every if a in known]}, indent=2) + "\n")
    results = [known[a] for a in every if a in known]
    print(table(results))
    plot(results, Path(args.plot), f"Recipe ablations: {args.steps} steps × batch {args.batch_size}, "
                                   f"N = {args.num} per sampler")
    print(f"wrote {out} and {args.plot}")


if __name__ == "__main__":
    main()
