"""Command line: ``python -m service serve | train | sample | evaluate | compile | import-diffusers``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.diffusion.checkpoint import DiffusionModel

__all__ = ["main"]


AUTO_DTYPE = ("auto (default): bfloat16 on CUDA and on CPUs with avx512_bf16 or AMX (1.9-3.4x float32's images/s for "
              "4-20 % higher FLD on the default model, docs/benchmarks.md), float32 elsewhere")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def _dtype(name: str, device: str = "cpu"):
    import torch

    if name == "auto":
        from service.hardware import auto_dtype

        name = auto_dtype(device)
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _sampler_settings(model: DiffusionModel, sampler: str, steps: int | None, spacing: str | None) -> tuple[int, str]:
    """(steps, spacing) with the model's defaults filled in; a combination the sampler cannot run exits."""
    from service.diffusion.pipeline import default_steps
    from service.diffusion.samplers import get_sampler

    steps = default_steps(model, sampler) if steps is None else steps
    spacing = spacing or model.spec.default_spacing(sampler)
    try:
        get_sampler(sampler).check(model.spec.num_train_timesteps, steps, spacing)  # type: ignore[arg-type]
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    return steps, spacing


def cmd_train(args: argparse.Namespace) -> int:
    from service.train import TrainConfig, train

    cfg = TrainConfig(
        data=args.data,
        out=args.out,
        workdir=args.workdir,
        name=args.name,
        image_size=args.image_size,
        channels=args.channels,
        block_out_channels=args.block_out_channels,
        attention_levels=args.attention_levels,
        layers_per_block=args.layers_per_block,
        norm_num_groups=args.norm_num_groups,
        dropout=args.dropout,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        lr_schedule=args.lr_schedule,
        min_lr_ratio=args.min_lr_ratio,
        min_snr_gamma=args.min_snr_gamma,
        ema_decay=args.ema_decay,
        extra_ema_decays=args.extra_ema_decays,
        steps=args.steps,
        holdout=args.holdout,
        seed=args.seed,
        dtype=args.dtype,
        device=_device(args.device),
        threads=args.threads,
        sample_every=args.sample_every,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        snapshot_every=args.snapshot_every,
        init_from=args.init_from,
        extra={"command": "python -m service " + " ".join(sys.argv[1:])},
    )
    train(cfg, resume=args.resume)
    return 0


def _read_image(path: str, channels: int, size: int, mask: bool = False):
    """``--init-image`` / ``--mask``: (C, H, W) float32, from a PNG/JPEG or a .npy.

    Images are converted to the model's channels and size as training data are (grey/RGB, bicubic resize) and
    mapped to [-1, 1]; a mask PNG is read as grey, resized with nearest neighbour and thresholded (white = 1 =
    regenerate). A .npy is taken as it is ((H, W), (C, H, W) or (1, C, H, W); init images in [-1, 1], masks
    thresholded at 0.5).
    """
    import numpy as np
    import torch
    from PIL import Image

    p = Path(path)
    try:
        if p.suffix.lower() == ".npy":
            arr = np.load(p, allow_pickle=False).astype(np.float32)
            arr = arr[0] if arr.ndim == 4 and arr.shape[0] == 1 else arr
            arr = arr[None] if arr.ndim == 2 else arr
            if mask:
                arr = (arr >= 0.5).astype(np.float32)
            return torch.from_numpy(np.ascontiguousarray(arr))
        with Image.open(p) as im:
            if mask:
                grey = im.convert("L").resize((size, size), Image.Resampling.NEAREST)
                return torch.from_numpy((np.asarray(grey) >= 128).astype(np.float32))[None]
            im = im.convert("L" if channels == 1 else "RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BICUBIC)
            arr = np.asarray(im, dtype=np.float32)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: cannot read {path}: {exc}") from exc
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr / 127.5 - 1.0)


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from service.diffusion.checkpoint import load_model
    from service.diffusion.conditioning import DEFAULT_GUIDANCE_SCALE, Conditioning, default_guidance_scale
    from service.diffusion.pipeline import prepare_unet, sample
    from service.diffusion.runner import UNetRunner
    from service.imaging import grid, png_bytes
    from service.progress import Progress

    out = Path(args.out)
    if out.suffix not in (".npy", ".png"):
        raise SystemExit(f"--out must end in .npy or .png, got {out}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, _device(args.device))
    dtype = _dtype(args.dtype, _device(args.device))
    prepare_unet(model, dtype)
    init = None
    if args.init_noise:
        init = torch.from_numpy(np.load(args.init_noise, allow_pickle=False)).float()
    num = args.num or (init.shape[0] if init is not None else 16)
    steps, spacing = _sampler_settings(model, args.sampler, args.steps, args.timestep_spacing)
    spec = model.spec
    conditioning = None
    try:
        asked = (args.init_image, args.mask, args.class_label, args.guidance_scale)
        if any(a is not None for a in asked) or args.strength != 1.0 or args.jump_n_sample != 1:
            scale = args.guidance_scale
            if scale is None and args.class_label is not None:
                recommended = default_guidance_scale(model)
                scale = DEFAULT_GUIDANCE_SCALE if recommended is None else recommended
            conditioning = Conditioning(
                _read_image(args.init_image, spec.channels, spec.image_size) if args.init_image else None,
                args.strength,
                _read_image(args.mask, spec.channels, spec.image_size, mask=True) if args.mask else None,
                args.class_label, scale or 0.0, args.jump_length, args.jump_n_sample,
            )
            conditioning.check(model, args.sampler, steps)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    batch = args.batch or num
    forward = UNetRunner(model, dtype, args.compiled)
    forward.prepare(batch)
    row_steps = conditioning.row_steps(steps) if conditioning is not None else steps
    bar = Progress(row_steps * -(-num // batch), desc=f"{args.sampler}-{steps}")
    try:
        images = sample(model, num, args.seed, args.sampler, steps, args.eta, init, batch, dtype,
                        progress=bar.update, spacing=spacing, forward=forward, conditioning=conditioning)
    except ValueError as exc:  # e.g. --init-noise of the wrong shape
        raise SystemExit(f"error: {exc}") from exc
    bar.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, images.numpy().astype(np.float32), allow_pickle=False)
    else:
        out.write_bytes(png_bytes(grid(images)))
    print(f"wrote {tuple(images.shape)} to {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from service.evaluate import evaluate, format_table, write_json
    from service.progress import Progress

    if args.threads:
        torch.set_num_threads(args.threads)
    bars: list[Progress] = []

    def progress(total: int, desc: str):
        bars.append(Progress(total, desc=desc))
        return bars[-1].update

    try:
        report = evaluate(
            args.model, args.sampler, args.steps, args.num, args.eta, args.batch,
            _dtype(args.dtype, _device(args.device)), args.seed,
            args.reference, args.reference_labels, args.classifier, args.train, args.train_labels,
            _device(args.device), progress, spacing=args.timestep_spacing, compiled=args.compiled,
        )
    except ValueError as exc:  # a step count or spacing the sampler cannot run, a model the classifier cannot score
        raise SystemExit(f"error: {exc}") from exc
    for bar in bars:
        bar.close()
    print(format_table(report))
    if args.json:
        print(f"wrote {write_json(report, args.json)}")
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    import torch

    from service.classifier import fit_and_save

    torch.set_num_threads(args.threads)
    fit_and_save(args.data, args.labels, args.out, args.test_data, args.test_labels, args.holdout, args.split_seed,
                 args.epochs, args.seed)
    return 0


def cmd_train_guidance_classifier(args: argparse.Namespace) -> int:
    import torch

    from service.train_guidance import fit_and_save

    torch.set_num_threads(args.threads)
    try:
        fit_and_save(args.model, args.data, args.labels, args.test_data, args.test_labels, args.out, args.steps,
                     args.batch_size, args.lr, args.widths, args.blocks, args.max_shift, args.seed)
    except ValueError as exc:  # labels that do not fit the images, a config the widths cannot build
        raise SystemExit(f"error: {exc}") from exc
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    import time

    import torch

    from service.diffusion.checkpoint import load_model
    from service.diffusion.compiled import compile_unet
    from service.diffusion.runner import UNetRunner

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, _device(args.device))
    dtype = _dtype(args.dtype, _device(args.device))
    start = time.perf_counter()
    package = compile_unet(model, Path(args.out or args.model), dtype, args.max_batch_rows)
    print(f"compiled {args.model} ({dtype}, 1..{args.max_batch_rows} rows) in {time.perf_counter() - start:.0f} s"
          f" -> {package}")
    runner = UNetRunner(model, dtype)
    if args.out is None:  # check what the server will load
        runner.prepare(args.max_batch_rows)
        if not runner.compiled:
            print("error: the compiled UNet does not load or disagrees with eager (see the log above)")
            return 1
        print("checked against the eager UNet: OK")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from service.api.server import serve
    from service.config import Settings

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port), ("model", args.model)) if v is not None}
    return serve(Settings(**overrides))


def cmd_import(args: argparse.Namespace) -> int:
    from service.diffusion.checkpoint import import_diffusers

    dst = import_diffusers(args.src, args.dst, args.name)
    print(f"imported {args.src} -> {dst}")
    return 0


def _by_value(pairs: list[tuple[str, str]]) -> str:
    """``[("50", "ddim"), ("20", "unipc"), ("20", "dpmpp_2m")]`` → ``"50 for ddim, 20 for unipc/dpmpp_2m"``."""
    groups: dict[str, list[str]] = {}
    for value, name in pairs:
        groups.setdefault(value, []).append(name)
    return ", ".join(f"{value} for {'/'.join(names)}" for value, names in groups.items())


def _sampler_arguments(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """--sampler (default: the server's, DEFAULT_SAMPLER), --steps, --timestep-spacing and --eta (shared by
    ``sample`` and ``evaluate``), from the registry."""
    from service.diffusion.samplers import DEFAULT_SAMPLER, SAMPLERS, SPACINGS

    steps = _by_value([(str(s.default_steps or "T"), n) for n, s in SAMPLERS.items()])
    spacing = _by_value([(s.default_spacing, n) for n, s in SAMPLERS.items()])
    groups: dict[str, list[str]] = {}
    for n, s in SAMPLERS.items():
        if set(s.spacings) != set(SPACINGS):
            groups.setdefault("/".join(s.spacings), []).append(n)
    only = "".join(f"; {'/'.join(names)} take only {sp}" for sp, names in groups.items())
    parser.add_argument("--sampler", choices=tuple(SAMPLERS), default=default or DEFAULT_SAMPLER)
    parser.add_argument("--steps", type=int, default=None, help=f"default: the sampler's ({steps})")
    parser.add_argument(
        "--timestep-spacing", choices=SPACINGS, default=None,
        help=f"default: the model's sampling.timestep_spacing, else diffusers' default ({spacing}){only}",
    )
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity η (0 = deterministic)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a DDPM on images; writes a model-store entry")
    t.add_argument("--data", required=True, help="MNIST IDX file (.gz or raw), image folder or .npz")
    t.add_argument("--out", default="model_store/mnist")
    t.add_argument("--workdir", default="runs/mnist", help="training checkpoints and sample grids")
    t.add_argument("--name", default="mnist")
    t.add_argument("--image-size", type=int, default=28)
    t.add_argument("--channels", type=int, default=1)
    t.add_argument("--block-out-channels", type=_ints, default=(32, 64, 128))
    t.add_argument("--attention-levels", type=_ints, default=(2,), help="e.g. 2 or 1,2 (0 = full res)")
    t.add_argument("--layers-per-block", type=int, default=1)
    t.add_argument("--norm-num-groups", type=int, default=8)
    t.add_argument("--dropout", type=float, default=0.0)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=8e-4)
    t.add_argument("--warmup-steps", type=int, default=500)
    t.add_argument("--lr-schedule", choices=["constant", "cosine"], default="cosine",
                   help="after warm-up: cosine decay to --min-lr-ratio at --steps, or constant")
    t.add_argument("--min-lr-ratio", type=float, default=0.0, help="floor of the cosine decay (fraction of --lr)")
    t.add_argument("--min-snr-gamma", type=float, default=5.0,
                   help="min-SNR-γ loss weighting (Hang et al. 2023); 0 = plain ε-MSE")
    t.add_argument("--ema-decay", type=float, default=0.9995, help="decay of the exported EMA")
    t.add_argument("--extra-ema-decays", type=_floats, default=(),
                   help="e.g. 0.995,0.998: more EMAs of the same run, exported to WORKDIR/ema_<d> (and snapshots)")
    t.add_argument("--steps", type=int, default=10_000)
    t.add_argument("--holdout", type=int, default=0,
                   help="images of --data never trained on, the evaluator's reference when there is no test split "
                        "(0: train on all of it; MNIST's test split beside --data is the reference)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda (auto: cuda when available)")
    t.add_argument("--threads", type=int, default=0)
    t.add_argument("--sample-every", type=int, default=500)
    t.add_argument("--checkpoint-every", type=int, default=250)
    t.add_argument("--snapshot-every", type=int, default=0, help="keep the EMA model every N steps (WORKDIR/snapshots)")
    t.add_argument("--log-every", type=int, default=10, help="steps per line of WORKDIR/loss.jsonl")
    t.add_argument("--resume", action="store_true", help="continue from WORKDIR/train_state.pt")
    t.add_argument("--init-from", default="",
                   help="model-store entry whose weights start the model and its EMAs: a fine-tune with a fresh "
                        "optimizer (same architecture); ignored when --resume finds a state")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="generate images offline")
    s.add_argument("--model", default="model_store/mnist")
    s.add_argument("--num", type=int, default=None, help="default: the rows of --init-noise, else 16")
    s.add_argument("--seed", type=int, default=0)
    _sampler_arguments(s)
    s.add_argument("--init-noise", default=None, help=".npy x_T of shape (N, C, H, W)")
    s.add_argument("--init-image", default=None,
                   help="image-to-image / inpainting input: PNG/JPEG (converted to the model's channels and size) "
                   "or .npy (C, H, W) in [-1, 1]")
    s.add_argument("--strength", type=float, default=1.0,
                   help="image-to-image: share of the sampler's steps run from the noised --init-image, in (0, 1]; "
                   "1 = plain generation")
    s.add_argument("--mask", default=None,
                   help="inpainting: PNG (white = regenerate) or .npy in {0, 1} (1 = regenerate)")
    s.add_argument("--jump-length", type=int, default=1, help="inpainting: RePaint resampling jump (ddpm/ddim)")
    s.add_argument("--jump-n-sample", type=int, default=1,
                   help="inpainting: RePaint resampling passes, 1..10 (1 = none)")
    s.add_argument("--class-label", type=int, default=None, help="classifier guidance towards this class "
                   "(models with a guidance classifier)")
    s.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier guidance scale s >= 0; default: the classifier's recommended scale, else 1")
    s.add_argument("--batch", type=int, default=None)
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"], default="auto", help=AUTO_DTYPE)
    s.add_argument("--device", default="auto", help="auto | cpu | cuda")
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--compiled", choices=["auto", "off"], default="auto", help="auto: the model's compiled UNet")
    s.add_argument("--out", required=True, help="FILE.npy (float32 (N,C,H,W) in [-1,1]) or FILE.png (grid)")
    s.set_defaults(func=cmd_sample)

    i = sub.add_parser("import-diffusers", help="convert a diffusers UNet2DModel folder to a model-store entry")
    i.add_argument("src")
    i.add_argument("dst")
    i.add_argument("--name", default=None)
    i.set_defaults(func=cmd_import)

    v = sub.add_parser("serve", help="run the HTTP API (settings from DDPM_* environment variables)")
    v.add_argument("--host", default=None, help="overrides DDPM_HOST (default 127.0.0.1)")
    v.add_argument("--port", type=int, default=None, help="overrides DDPM_PORT (default 8000)")
    v.add_argument("--model", default=None, help="overrides DDPM_MODEL (default model_store/mnist)")
    v.set_defaults(func=cmd_serve)
    e = sub.add_parser("evaluate", help="score generated samples with the digit classifier (FLD, confidence, shares)")
    e.add_argument("--model", default="model_store/mnist")
    _sampler_arguments(e, default="ddim")
    e.add_argument("--num", type=int, default=1000, help="generated images (and real training digits for the floor)")
    e.add_argument("--batch", type=int, default=250)
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"], default="auto", help=AUTO_DTYPE)
    e.add_argument("--device", default="auto", help="auto | cpu | cuda")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threads", type=int, default=0)
    e.add_argument("--reference", default=None, help="the evaluation split (IDX/folder/.npz), never trained on; "
                   "default: the model's recorded one, its training hold-out, or the MNIST test split beside its data")
    e.add_argument("--reference-labels", default=None, help="IDX labels of --reference (reports classifier accuracy)")
    e.add_argument("--train", default=None, help="training images for the floor and novelty; default: the model's")
    e.add_argument("--train-labels", default=None)
    e.add_argument("--classifier", default=None, help="default: MODEL/classifier.safetensors")
    e.add_argument("--json", default=None, help="also write the report as JSON here")
    e.add_argument("--compiled", choices=["auto", "off"], default="auto", help="auto: the model's compiled UNet")
    e.set_defaults(func=cmd_evaluate)

    k = sub.add_parser("compile", help="AOT-compile the model's UNet for this machine (needs a C++ compiler)")
    k.add_argument("--model", default="model_store/mnist")
    k.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"], default="auto", help=AUTO_DTYPE)
    k.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    k.add_argument("--max-batch-rows", type=int, default=64, help="largest batch served (DDPM_MAX_BATCH_ROWS)")
    k.add_argument("--threads", type=int, default=0)
    k.add_argument("--out", default=None, help="model folder to write compiled/ into (default: --model)")
    k.set_defaults(func=cmd_compile)

    c = sub.add_parser("train-classifier", help="train the evaluator's digit classifier on the training split")
    c.add_argument("--data", required=True, help="digit images (MNIST IDX .gz/raw, folder or .npz), 28x28")
    c.add_argument("--labels", required=True, help="IDX label file, one label per image")
    c.add_argument("--out", default="model_store/mnist/classifier.safetensors")
    c.add_argument("--test-data", default=None, help="the test split its accuracy is reported on (e.g. MNIST t10k)")
    c.add_argument("--test-labels", default=None)
    c.add_argument("--holdout", type=int, default=0, help="digits of --data held out (scored when no --test-data)")
    c.add_argument("--split-seed", type=int, default=0)
    c.add_argument("--epochs", type=int, default=20)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int, default=1)
    c.set_defaults(func=cmd_train_classifier)
    g = sub.add_parser("train-guidance-classifier",
                       help="train the noise-aware classifier p(y | x_t, t) for classifier guidance")
    g.add_argument("--model", default="model_store/mnist", help="model-store entry whose noise schedule is used")
    g.add_argument("--data", required=True, help="training images (MNIST IDX .gz/raw, folder or .npz)")
    g.add_argument("--labels", required=True, help="IDX label file of --data")
    g.add_argument("--test-data", required=True, help="the test split it is scored on (e.g. MNIST t10k)")
    g.add_argument("--test-labels", required=True)
    g.add_argument("--out", default=None, help="folder for guidance_classifier.{safetensors,json} (default: --model)")
    g.add_argument("--steps", type=int, default=4000)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=4e-3)
    g.add_argument("--widths", type=_ints, default=(16, 24, 64), help="channels per resolution level")
    g.add_argument("--blocks", type=_ints, default=(0, 1, 2), help="residual blocks per level")
    g.add_argument("--max-shift", type=int, default=1, help="random translation of x_0 in pixels (0 = off)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=1)
    g.set_defaults(func=cmd_train_guidance_classifier)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
