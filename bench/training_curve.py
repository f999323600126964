"""A training run's curves as a PNG: the loss log, and optionally the sample quality of its EMA snapshots.

Run from the repository root::

    .venv/bin/python bench/training_curve.py --workdir /work/runs/mnist-v2 --out model_store/mnist/training.png \\
        [--snapshots --classifier CLASSIFIER --sampler unipc --steps 20 --num 500 --threads 2]

The left panel is ``WORKDIR/loss.jsonl`` (the mean training loss of every ``--log-every`` steps, with a
moving average) and the learning rate. With ``--snapshots``, every ``WORKDIR/snapshots/step_*`` EMA model
is scored by the project's evaluator (``--num`` samples with ``--sampler``/``--steps``, FLD against the
model's evaluation split and the real-data floor) and plotted against its step on the right; the scores
are also written as JSON next to the PNG (``*.json``), and ``--resume`` reuses the ones already there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.plots import pyplot, save


def read_loss_log(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "loss.jsonl").read_text().splitlines() if line]


def score_snapshots(workdir: Path, args: argparse.Namespace, known: dict[int, dict]) -> dict[int, dict]:
    import torch

    from service.diffusion.checkpoint import load_model
    from service.diffusion.pipeline import sample
    from service.evaluate import Evaluator

    torch.set_num_threads(args.threads)
    scores = dict(known)
    snapshots = sorted((workdir / "snapshots").glob("step_*"))
    for folder in snapshots:
        step = int(folder.name.removeprefix("step_"))
        if step in scores:
            continue
        model = load_model(folder)
        ev = Evaluator.for_model(model, folder, classifier_path=args.classifier)
        images = sample(model, args.num, 0, args.sampler, args.steps, batch=args.batch)
        s, floor = ev.score(images), ev.floor(args.num)
        scores[step] = {"step": step, "fld": s.fld, "floor_fld": floor.fld, "confidence": s.confidence,
                        "novelty": s.novelty, "min_share": s.min_share, "max_share": s.max_share}
        print(f"step {step}: FLD {s.fld:.2f} (floor {floor.fld:.2f})", flush=True)
    return scores


def plot(loss: list[dict], scores: dict[int, dict], path: Path, title: str, quality_label: str) -> None:
    plt = pyplot()

    panels = 2 if scores else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), dpi=120, squeeze=False)
    ax = axes[0][0]
    steps = np.array([r["step"] for r in loss])
    values = np.array([r["loss"] for r in loss])
    ax.plot(steps, values, color="tab:blue", alpha=0.35, linewidth=0.8, label="loss (mean of each log interval)")
    window = max(1, len(values) // 50)
    if len(values) >= window > 1:
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, color="tab:blue", label=f"moving average ({window} points)")
    ax.set_yscale("log")
    ax.set_xlabel("optimisation step")
    ax.set_ylabel("training loss")
    ax.grid(True, which="both", alpha=0.3)
    lr = ax.twinx()
    lr.plot(steps, [r["lr"] for r in loss], color="tab:orange", linewidth=1, label="learning rate")
    lr.set_ylabel("learning rate")
    handles = ax.get_legend_handles_labels()[0] + lr.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=7, loc="upper right")
    ax.set_title(title)
    if scores:
        q = axes[0][1]
        rows = [scores[k] for k in sorted(scores)]
        q.plot([r["step"] for r in rows], [r["fld"] for r in rows], marker="o", label=quality_label)
        q.plot([r["step"] for r in rows], [r["floor_fld"] for r in rows], color="grey", linestyle=":",
               label="real-data floor")
        q.set_yscale("log")
        q.set_xlabel("optimisation step (EMA snapshot)")
        q.set_ylabel("FLD (lower is better)")
        q.grid(True, which="both", alpha=0.3)
        q.legend(fontsize=7)
        q.set_title("sample quality of the EMA weights")
    save(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="the training run's --workdir")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--title", default=None)
    p.add_argument("--snapshots", action="store_true", help="also score every EMA snapshot (slow)")
    p.add_argument("--sampler", default="unipc")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--classifier", default=None, help="the evaluator's classifier (needed with --snapshots)")
    p.add_argument("--resume", action="store_true", help="reuse the snapshot scores already in OUT.json")
    args = p.parse_args()

    if args.snapshots and not args.classifier:
        p.error("--snapshots needs --classifier (one trained on the model's training split)")
    workdir, out = Path(args.workdir), Path(args.out)
    loss = read_loss_log(workdir)
    scores: dict[int, dict] = {}
    if args.snapshots:
        saved = out.with_suffix(".json")
        known = {r["step"]: r for r in json.loads(saved.read_text())} if args.resume and saved.is_file() else {}
        scores = score_snapshots(workdir, args, known)
        saved.write_text(json.dumps([scores[k] for k in sorted(scores)], indent=2) + "\n")
    title = args.title or f"{workdir.name}: {loss[-1]['step']} steps"
    plot(loss, scores, out, title, f"{args.sampler}-{args.steps}, N = {args.num}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
