"""Does bf16 cost quality? The evaluator's FLD of the same sampler in float32, bf16 and compiled bf16, each repeated
over independent seed sets so the difference can be read against the run-to-run spread (issue 12).

Run from the repository root, after ``python -m service compile --model model_store/mnist --dtype bfloat16``::

    .venv/bin/python bench/dtype_quality.py --model model_store/mnist --sampler unipc --steps 20 --num 2000 \\
        --repeats 3 --json docs/dtype_quality.json

Repeat k generates ``--num`` images with request seeds ``k * 100000 + i`` (the same seeds for every
configuration), so fp32 and bf16 start from the same noise within a repeat and the repeats are independent
draws. A configuration named ``+compiled`` must run the compiled UNet; the bench stops if the engine fell back
to eager. bf16 "costs nothing" when the difference of the mean FLDs is within the spread (max - min) of the
float32 repeats.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.sampler_quality import engine_images  # noqa: E402
from service.diffusion.checkpoint import load_model  # noqa: E402
from service.engine.batcher import claim_threads_for_worker  # noqa: E402
from service.evaluate import Evaluator  # noqa: E402

CONFIGS = {"float32": ("float32", "off"), "bfloat16": ("bfloat16", "off"), "bfloat16+compiled": ("bfloat16", "auto")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="model_store/mnist")
    p.add_argument("--sampler", default="unipc")
    p.add_argument("--spacing", default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--num", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--json", default="docs/dtype_quality.json")
    args = p.parse_args()

    args.threads = claim_threads_for_worker(args.threads)
    model = load_model(args.model)
    ev = Evaluator.for_model(model, args.model)
    floor = ev.floor(args.num, seed=0).fld
    rows = []
    for k in range(args.repeats):  # repeats outermost: every configuration sees the same machine load per repeat
        for name in args.configs.split(","):
            dtype, compiled = CONFIGS[name]
            images, seconds, stats = asyncio.run(engine_images(
                model, args.sampler, args.spacing, args.steps, args.num, args.batch, dtype, args.threads,
                seed0=k * 100000, compiled=compiled))
            if (compiled == "auto") != bool(stats["compiled"]):
                raise SystemExit(f"{name}: the engine ran {'compiled' if stats['compiled'] else 'eager'}; "
                                 "build the artifact first (python -m service compile --dtype bfloat16)")
            score = ev.score(images, novelty=False)
            rows.append({"config": name, "repeat": k, "fld": score.fld, "confidence": score.confidence,
                         "images_per_s": args.num / seconds})
            print(f"repeat {k} {name}: FLD {score.fld:.3f} (floor {floor:.3f}), confidence {score.confidence:.4f}, "
                  f"{args.num / seconds:.1f} images/s", flush=True)

    summary = {}
    for name in args.configs.split(","):
        flds = [r["fld"] for r in rows if r["config"] == name]
        speeds = [r["images_per_s"] for r in rows if r["config"] == name]
        summary[name] = {"fld_mean": statistics.fmean(flds), "fld_min": min(flds), "fld_max": max(flds),
                         "images_per_s_median": statistics.median(speeds)}
    spread = summary["float32"]["fld_max"] - summary["float32"]["fld_min"] if "float32" in summary else None
    print("| config | FLD mean | FLD min–max | images/s (median) |\n|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['fld_mean']:.3f} | {s['fld_min']:.3f}–{s['fld_max']:.3f} | "
              f"{s['images_per_s_median']:.1f} |")
    for name, s in summary.items():
        if name != "float32" and spread is not None:
            diff = s["fld_mean"] - summary["float32"]["fld_mean"]
            verdict = "within" if abs(diff) <= spread else "OUTSIDE"
            print(f"{name} - float32: {diff:+.3f} FLD, {verdict} the float32 spread ({spread:.3f})")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "model_sha256": model.sha256, "sampler": args.sampler,
                               "spacing": args.spacing or model.spec.default_spacing(args.sampler),
                               "steps": args.steps, "num": args.num, "batch": args.batch, "threads": args.threads,
                               "floor_fld": floor, "float32_spread": spread, "evaluation": ev.describe(),
                               "summary": summary, "runs": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
