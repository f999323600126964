"""Issue 14's acceptance numbers on a real model: image-to-image, inpainting and classifier guidance.

Run from the repository root when the CPU is free (tens of minutes on 2 cores at the defaults)::

    .venv/bin/python bench/conditioning.py --model model_store/mnist \\
        --classifier /work/runs/classifier-v2/classifier.safetensors --guidance-classifier model_store/mnist \\
        --sampler ddim --steps 50 --num 200 --threads 2 --out docs/conditioning.json

Every image goes through an in-process engine (``max_batch_rows = --batch``; all requests of a part submitted at
once, so rows of different digits share forwards), seeded per request. The evaluator's digit classifier
(``service.classifier``, never trained on the test split) scores the results:

(a) image-to-image: ``--img2img-num`` test digits at each ``--strengths``; mean over digits of the RMS pixel distance
    output ↔ input (values in [-1, 1]) and the share still classified as the input's true label;
(b) inpainting: ``--num`` test digits with the lower half masked (regenerated), with its own sampler settings
    (``--inpaint-sampler/-steps/-eta``, RePaint's resampling ``--jump-length`` / ``--jump-n-sample``; default DDIM-50,
    η = 1, jumps of 5 passed 10 times: 455 steps a digit); the largest error of the known pixels, and the share
    whose completed digit is classified as the true label, against the same share for plain RePaint (no
    resampling), for unconditional samples (chance, ~10 %) and for the input with its lower half blanked;
(c) classifier guidance (with a guidance classifier: the model's, or ``--guidance-classifier FOLDER``): for each
    digit, ``--per-class`` samples guided at ``--guidance-scale`` (default: the classifier's recommendation) with
    ``--guidance-sampler/-steps``, the share classified as that digit, and the FLD of their classifier features
    against that digit's test digits, next to the floor (the FLD of as many real training digits of that class);
(d) guidance_sweep: the share classified as the asked-for digit for each sampler:steps:scale of ``--sweep``
    (``--sweep-per-class`` samples per digit) — how guidance depends on the sampler and the scale.

Parts not run keep their entry in ``--out`` when it is for the same model weights.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.plots import pyplot, save  # noqa: E402
from service.classifier import load_classifier, predict  # noqa: E402
from service.data import load_images, load_labels, to_model_range  # noqa: E402
from service.diffusion.checkpoint import DiffusionModel, load_model  # noqa: E402
from service.diffusion.conditioning import Conditioning, default_guidance_scale  # noqa: E402
from service.diffusion.guidance import load_guidance_classifier  # noqa: E402
from service.engine.batcher import Engine, EngineSettings, claim_threads_for_worker  # noqa: E402
from service.engine.client import GenerationRequest  # noqa: E402
from service.evaluate import feature_stats, frechet_distance  # noqa: E402

MNIST = REPO.parent / "shared" / "data" / "mnist"


class Runner:
    """One engine on its own event loop for the whole run: ``runner(requests)`` submits them all at once and
    returns their images, concatenated in order."""

    def __init__(self, model: DiffusionModel, args: argparse.Namespace) -> None:
        settings = EngineSettings(max_batch_rows=args.batch, max_queue_rows=1 << 20, dtype=args.dtype,
                                  threads=args.threads, request_timeout_s=1e6)
        self.engine = Engine(model, settings)
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.engine.start())

    def __call__(self, requests: list[GenerationRequest]) -> torch.Tensor:
        async def body() -> torch.Tensor:
            handles = [self.engine.submit(r) for r in requests]
            return torch.cat([(await h.result()).images for h in handles])

        return self.loop.run_until_complete(body())

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.drain(timeout_s=5))
        self.loop.close()


def labels_of(classifier, images: torch.Tensor) -> torch.Tensor:
    return predict(classifier, images)[1].argmax(1)


def request(args: argparse.Namespace, seed: int, num: int = 1, inpaint: bool = False,
            sampler: tuple[str, int] | None = None, **conditioning) -> GenerationRequest:
    """The part's request: ``sampler`` (name, steps) overrides ``--sampler/--steps`` (η 0, the model's spacing)."""
    if sampler is not None:
        (name, steps), eta, spacing = sampler, 0.0, None
    elif inpaint:
        name, steps, eta, spacing = args.inpaint_sampler, args.inpaint_steps, args.inpaint_eta, args.timestep_spacing
    else:
        name, steps, eta, spacing = args.sampler, args.steps, args.eta, args.timestep_spacing
    return GenerationRequest(num, seed=seed, sampler=name, steps=steps, eta=eta, timestep_spacing=spacing,
                             timeout_s=1e6, **conditioning)


def image_to_image(args, run, clf, digits, labels) -> dict:
    x0, y = digits[: args.img2img_num], labels[: args.img2img_num]
    points = []
    for strength in args.strengths:
        start = time.perf_counter()
        out = run([request(args, i, init_image=x, strength=strength) for i, x in enumerate(x0)])
        rms = (out - x0).pow(2).flatten(1).mean(1).sqrt()
        points.append({"strength": strength, "rms_distance": float(rms.mean()), "rms_distance_std": float(rms.std()),
                       "same_label_share": float((labels_of(clf, out) == y).double().mean()),
                       "seconds": round(time.perf_counter() - start, 1)})
        print(f"img2img strength {strength}: RMS distance {points[-1]['rms_distance']:.3f}, "
              f"same label {points[-1]['same_label_share']:.1%}", flush=True)
    return {"num": len(x0), "points": points}


def inpainting(args, run, clf, digits, labels) -> dict:
    x0, y = digits[: args.num], labels[: args.num]
    size = x0.shape[-1]
    mask = torch.zeros(1, size, size)
    mask[:, size // 2:] = 1.0  # lower half: regenerate
    known = mask[0] == 0
    start = time.perf_counter()
    resampling = {"jump_length": args.jump_length, "jump_n_sample": args.jump_n_sample}
    out = run([request(args, i, inpaint=True, init_image=x, mask=mask, **resampling) for i, x in enumerate(x0)])
    seconds = time.perf_counter() - start
    plain_repaint = run([request(args, i, inpaint=True, init_image=x, mask=mask) for i, x in enumerate(x0)])
    unconditional = run([request(args, 10_000 + i, inpaint=True) for i in range(len(x0))])
    blanked = torch.where(known, x0, torch.full_like(x0, -1.0))

    def share(images: torch.Tensor) -> float:
        return float((labels_of(clf, images) == y).double().mean())

    result = {
        "num": len(x0), "mask": "lower half regenerated", "sampler": args.inpaint_sampler, "steps": args.inpaint_steps,
        "eta": args.inpaint_eta, **resampling,
        "row_steps": Conditioning(x0[0], 1.0, mask, **resampling).row_steps(args.inpaint_steps),
        "known_max_abs_error": float((out - x0)[..., known].abs().max()),
        "label_recovery": share(out),
        "plain_repaint_label_recovery": share(plain_repaint),
        "unconditional_label_share": share(unconditional),
        "top_half_only_label_share": share(blanked),
        "seconds": round(seconds, 1),
    }
    print(f"inpainting N={len(x0)}: label recovery {result['label_recovery']:.1%} (plain RePaint "
          f"{result['plain_repaint_label_recovery']:.1%}, unconditional {result['unconditional_label_share']:.1%}, "
          f"top half alone {result['top_half_only_label_share']:.1%}), known pixels' max error "
          f"{result['known_max_abs_error']:.2g}", flush=True)
    return result


def guided(args, run, k: int, num: int, scale: float, sampler: tuple[str, int], seed0: int) -> torch.Tensor:
    """``num`` samples guided to class ``k``, in requests of at most half the batch (a guided row weighs 2)."""
    chunk = max(args.batch // 2, 1)
    return run([request(args, seed0 + j, min(chunk, num - j), sampler=sampler, class_label=k, guidance_scale=scale)
                for j in range(0, num, chunk)])


def guidance(args, run, model, clf, test, test_labels, train, train_labels) -> dict:
    scale = args.guidance_scale if args.guidance_scale is not None else default_guidance_scale(model)
    sampler = (args.guidance_sampler, args.guidance_steps)
    per = args.per_class
    classes = []
    for k in range(args.classes):
        start = time.perf_counter()
        out = guided(args, run, k, per, scale, sampler, 1000 * k)
        feats, probs = predict(clf, out)
        ref = feature_stats(predict(clf, test[test_labels == k])[0].numpy())
        real = train[train_labels == k][:per]
        row = {"class": k, "num": per, "share_classified_as_class": float((probs.argmax(1) == k).double().mean()),
               "mean_confidence": float(probs[:, k].mean()),
               "fld": frechet_distance(*feature_stats(feats.numpy()), *ref),
               "floor_fld": frechet_distance(*feature_stats(predict(clf, real)[0].numpy()), *ref),
               "seconds": round(time.perf_counter() - start, 1)}
        classes.append(row)
        print(f"guidance class {k} ({sampler[0]}-{sampler[1]}, s = {scale}): {row['share_classified_as_class']:.1%} "
              f"classified as {k}, FLD {row['fld']:.2f} (floor {row['floor_fld']:.2f})", flush=True)
    shares = [c["share_classified_as_class"] for c in classes]
    return {"sampler": sampler[0], "steps": sampler[1], "guidance_scale": scale, "per_class": per,
            "min_share": min(shares), "mean_share": sum(shares) / len(shares), "classes": classes}


def guidance_sweep(args, run, clf) -> dict:
    """Share classified as the asked-for digit for each (sampler, steps, scale) of ``--sweep``, ``--sweep-per-class``
    samples per digit (the same seeds for every setting)."""
    points = []
    for item in args.sweep.split(","):
        name, steps, scale = item.split(":")
        start = time.perf_counter()
        shares = []
        for k in range(args.classes):
            out = guided(args, run, k, args.sweep_per_class, float(scale), (name, int(steps)), 1000 * k)
            shares.append(float((labels_of(clf, out) == k).double().mean()))
        points.append({"sampler": name, "steps": int(steps), "guidance_scale": float(scale),
                       "mean_share": sum(shares) / len(shares), "min_share": min(shares), "shares": shares,
                       "seconds": round(time.perf_counter() - start, 1)})
        print(f"guidance sweep {name}-{steps} s = {scale}: mean {points[-1]['mean_share']:.1%}, "
              f"worst digit {min(shares):.1%}", flush=True)
    return {"per_class": args.sweep_per_class, "points": points}


def plot_sweep(sweep: dict, path: Path, title: str) -> None:
    """Share classified as the asked-for digit against the guidance scale, one line per sampler-steps."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    lines: dict[str, list[dict]] = {}
    for point in sweep["points"]:
        lines.setdefault(f"{point['sampler']}-{point['steps']}", []).append(point)
    for label, points in lines.items():
        points = sorted(points, key=lambda q: q["guidance_scale"])
        scales = [q["guidance_scale"] for q in points]
        line, = ax.plot(scales, [100 * q["mean_share"] for q in points], marker="o", label=f"{label} mean")
        ax.plot(scales, [100 * q["min_share"] for q in points], marker="v", linestyle=":", color=line.get_color(),
                label=f"{label} worst digit")
    ax.axhline(95, color="grey", linestyle="--", label="95 %")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("guidance scale s")
    ax.set_ylabel(f"% classified as the asked-for digit ({sweep['per_class']} per digit)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="model_store/mnist")
    p.add_argument("--classifier", default=None,
                   help="the evaluator's digit classifier (default: MODEL/classifier.safetensors)")
    p.add_argument("--guidance-classifier", default=None, help="folder with guidance_classifier.{json,safetensors} "
                   "(default: the model's own, if any)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="default: the guidance classifier's recommendation")
    p.add_argument("--data", default=str(MNIST / "t10k-images-idx3-ubyte.gz"), help="test digits (IDX)")
    p.add_argument("--labels", default=str(MNIST / "t10k-labels-idx1-ubyte.gz"))
    p.add_argument("--train-data", default=str(MNIST / "train-images-idx3-ubyte.gz"), help="for the per-class floor")
    p.add_argument("--train-labels", default=str(MNIST / "train-labels-idx1-ubyte.gz"))
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--timestep-spacing", default=None)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--num", type=int, default=200, help="inpainted test digits")
    p.add_argument("--img2img-num", type=int, default=32, help="test digits per strength")
    p.add_argument("--strengths", type=lambda s: [float(v) for v in s.split(",")], default=[0.2, 0.5, 0.8, 1.0])
    p.add_argument("--inpaint-sampler", default="ddim")
    p.add_argument("--inpaint-steps", type=int, default=50)
    p.add_argument("--inpaint-eta", type=float, default=1.0)
    p.add_argument("--jump-length", type=int, default=5, help="inpainting: RePaint resampling jump")
    p.add_argument("--jump-n-sample", type=int, default=10, help="inpainting: RePaint resampling passes (1 = none)")
    p.add_argument("--guidance-sampler", default="unipc", help="guidance: sampler (the model's spacing)")
    p.add_argument("--guidance-steps", type=int, default=20)
    p.add_argument("--per-class", type=int, default=100, help="guided samples per digit")
    p.add_argument("--sweep", default="ddim:25:1,ddim:25:4,unipc:20:1,unipc:20:4,dpmpp_2m_sde:25:1,"
                   "dpmpp_2m_sde:25:2,dpmpp_2m_sde:25:3,dpmpp_2m_sde:25:4,dpmpp_2m_sde:25:6,ddpm:100:2,ddpm:100:4",
                   help="guidance_sweep: sampler:steps:scale,...")
    p.add_argument("--sweep-per-class", type=int, default=20)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--parts", default="img2img,inpainting,guidance,guidance_sweep",
                   help="any of img2img, inpainting, guidance, guidance_sweep; the others keep their entry in --out")
    p.add_argument("--batch", type=int, default=64, help="engine max_batch_rows")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="docs/conditioning.json")
    p.add_argument("--plot", default="docs/guidance_sweep.png", help="guidance_sweep: where its plot goes")
    args = p.parse_args()

    args.threads = claim_threads_for_worker(args.threads)
    model = load_model(args.model)
    if args.guidance_classifier:
        model.guidance = load_guidance_classifier(args.guidance_classifier, spec=model.spec)
        if model.guidance is None:
            raise SystemExit(f"error: no guidance classifier in {args.guidance_classifier}")
    clf = load_classifier(args.classifier or Path(args.model) / "classifier.safetensors").model
    size = model.spec.image_size
    test = to_model_range(load_images(args.data, channels=model.spec.channels, size=size))
    test_labels = load_labels(args.labels)
    parts = set(args.parts.split(","))
    report: dict = {"model": args.model, "model_sha256": model.sha256, "sampler": args.sampler, "steps": args.steps,
                    "timestep_spacing": args.timestep_spacing or model.spec.default_spacing(args.sampler),
                    "eta": args.eta, "dtype": args.dtype, "threads": args.threads, "data": args.data}
    start = time.perf_counter()
    run = Runner(model, args)
    try:
        if "img2img" in parts:
            report["image_to_image"] = image_to_image(args, run, clf, test, test_labels)
        if "inpainting" in parts:
            report["inpainting"] = inpainting(args, run, clf, test, test_labels)
        if parts & {"guidance", "guidance_sweep"} and model.guidance is None:
            print("guidance: skipped (the model has no guidance classifier; pass --guidance-classifier)")
        elif "guidance" in parts:
            train = to_model_range(load_images(args.train_data, channels=model.spec.channels, size=size))
            report["guidance"] = guidance(args, run, model, clf, test, test_labels, train,
                                          load_labels(args.train_labels))
        if "guidance_sweep" in parts and model.guidance is not None:
            report["guidance_sweep"] = guidance_sweep(args, run, clf)
            plot_sweep(report["guidance_sweep"], Path(args.plot),
                       f"classifier guidance on {Path(args.model).name} ({model.sha256[:8]})")
    finally:
        run.close()
    report["seconds"] = round(time.perf_counter() - start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = json.loads(out.read_text()) if out.is_file() else {}  # parts not run this time keep their entry
    same_model = kept.get("model_sha256") == report["model_sha256"]
    out.write_text(json.dumps({**(kept if same_model else {}), **report}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
