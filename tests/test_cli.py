"""``python -m service import-diffusers`` and ``sample`` against diffusers' own scheduler loops on the same weights."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UNet2DModel,
    UniPCMultistepScheduler,
)
from PIL import Image

from service.__main__ import build_parser, main
from service.diffusion.checkpoint import load_model, sha256_file
from service.diffusion.samplers import SAMPLER_NAMES, SPACINGS
from service.imaging import grid, to_uint8
from tests.conftest import SMALL_DDPM_UNET

REPO = Path(__file__).resolve().parents[1]
# the project's 28×28 config with the DDPM options
SMALL = SMALL_DDPM_UNET
N = 4

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved random diffusers UNet2DModel folder.

    config.json + diffusion_pytorch_model.safetensors + scheduler_config.json
    """
    folder = tmp_path_factory.mktemp("diffusers") / "ddpm-small"
    torch.manual_seed(0)
    UNet2DModel(**SMALL).save_pretrained(folder, safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True).save_pretrained(folder)
    assert {p.name for p in folder.iterdir()} >= {
        "config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"
    }
    return folder


@pytest.fixture(scope="module")
def init_noise(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("noise") / "x_T.npy"
    x = torch.randn(N, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    np.save(path, x.numpy(), allow_pickle=False)
    return path


def diffusers_ddim(folder: Path, x_t: torch.Tensor, steps: int) -> torch.Tensor:
    """diffusers' DDIMPipeline loop (η = 0) on the folder's own weights and scheduler config (leading spacing)."""
    unet = UNet2DModel.from_pretrained(folder).eval()
    sched = DDIMScheduler.from_pretrained(folder)
    assert sched.config.clip_sample and sched.config.timestep_spacing == "leading"
    sched.set_timesteps(steps)
    x = x_t
    with torch.inference_mode():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    return x.clamp(-1, 1)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "service", *args], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.slow
def test_import_diffusers_then_sample_ddim_equals_diffusers(
    diffusers_dir: Path, init_noise: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store" / "small"
    out = tmp_path / "y.npy"
    run_cli("import-diffusers", str(diffusers_dir), str(store))
    cfg = json.loads((store / "config.json").read_text())
    assert cfg["weights"]["sha256"] == sha256_file(store / "model.safetensors")
    assert cfg["name"] == "small" and cfg["clip_sample"] is True
    proc = run_cli(
        "sample", "--model", str(store), "--sampler", "ddim", "--steps", "10", "--num", str(N),
        "--init-noise", str(init_noise), "--device", "cpu", "--dtype", "float32", "--threads", "1", "--out", str(out),
    )
    assert "ddim-10" in proc.stderr  # the progress bar
    images = np.load(out, allow_pickle=False)
    assert images.shape == (N, 1, 28, 28) and images.dtype == np.float32
    assert images.min() >= -1 and images.max() <= 1
    expected = diffusers_ddim(diffusers_dir, torch.from_numpy(np.load(init_noise)), 10)
    diff = np.abs(images - expected.numpy()).max()
    assert diff <= 1e-3, diff


def test_diffusers_folder_loads_directly(diffusers_dir: Path) -> None:
    model = load_model(diffusers_dir)
    assert model.spec.clip_sample and model.spec.variance_type == "fixed_small"
    assert model.spec.beta_end == 0.02 and model.spec.num_train_timesteps == 1000
    assert model.sha256 == sha256_file(diffusers_dir / "diffusion_pytorch_model.safetensors")
    ref = UNet2DModel.from_pretrained(diffusers_dir).eval()
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 800])
    with torch.inference_mode():
        torch.testing.assert_close(model.unet(x, t), ref(x, t).sample, rtol=0, atol=1e-4)


def test_diffusers_pipeline_layout_loads(diffusers_dir: Path, tmp_path: Path) -> None:
    """A DDPMPipeline.save_pretrained folder (model_index.json, unet/, scheduler/) loads too."""
    unet = UNet2DModel.from_pretrained(diffusers_dir)
    sched = DDPMScheduler(variance_type="fixed_large", clip_sample=False)
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path / "pipe")
    model = load_model(tmp_path / "pipe")
    assert model.spec.variance_type == "fixed_large" and not model.spec.clip_sample
    x, t = torch.randn(1, 1, 28, 28), torch.tensor([500])
    with torch.inference_mode():
        torch.testing.assert_close(model.unet(x, t), unet.eval()(x, t).sample, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def store(diffusers_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("store") / "small"
    assert main(["import-diffusers", str(diffusers_dir), str(dst)]) == 0
    return dst


def _sample(store: Path, init_noise: Path, out: Path, *extra: str) -> None:
    argv = ["sample", "--model", str(store), "--sampler", "ddim", "--steps", "5", "--num", str(N),
            "--init-noise", str(init_noise), "--device", "cpu", "--dtype", "float32", "--out", str(out), *extra]
    assert main(argv) == 0


def test_sample_writes_npy_and_the_same_images_as_a_png_grid(store: Path, init_noise: Path, tmp_path: Path) -> None:
    _sample(store, init_noise, tmp_path / "a.npy")
    _sample(store, init_noise, tmp_path / "sub" / "a.png")
    images = np.load(tmp_path / "a.npy", allow_pickle=False)
    assert images.shape == (N, 1, 28, 28) and images.dtype == np.float32
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0.05
    png = Image.open(io.BytesIO((tmp_path / "sub" / "a.png").read_bytes()))
    assert png.format == "PNG" and png.mode == "L"
    expected = to_uint8(grid(torch.from_numpy(images)))[0]  # 2×2 tiles of 28 px with 2 px borders
    assert np.asarray(png).shape == expected.shape == (62, 62)
    np.testing.assert_array_equal(np.asarray(png), expected)


def test_sample_ddpm_is_reproducible_from_the_seed(store: Path, tmp_path: Path) -> None:
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        argv = ["sample", "--model", str(store), "--sampler", "ddpm", "--steps", "3", "--num", "2",
                "--seed", seed, "--device", "cpu", "--out", str(tmp_path / f"{name}.npy")]
        assert main(argv) == 0
    a, b, c = (np.load(tmp_path / f"{n}.npy") for n in "abc")
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.1


def test_sample_bfloat16_runs_and_stays_close_to_float32(
    store: Path, init_noise: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _sample(store, init_noise, tmp_path / "f32.npy")
    _sample(store, init_noise, tmp_path / "bf16.npy", "--dtype", "bfloat16")
    a, b = np.load(tmp_path / "f32.npy"), np.load(tmp_path / "bf16.npy")
    assert b.dtype == np.float32 and b.min() >= -1 and b.max() <= 1
    corr = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    with capsys.disabled():
        print(f"\nCLI bf16 vs fp32, DDIM-5 (random weights): max abs {np.abs(a - b).max():.3f}, "
              f"mean abs {np.abs(a - b).mean():.3f}, correlation {corr:.3f}")
    # loose: random weights amplify bf16 rounding through clipped x̂_0 (see tests/diffusion/test_pipeline.py)
    assert corr > 0.75 and np.abs(a - b).mean() < 0.3


def test_sample_rejects_an_unknown_output_format_before_sampling(tmp_path: Path) -> None:
    # checked first: the model path does not even exist
    with pytest.raises(SystemExit, match=r"\.npy or \.png"):
        main(["sample", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x.jpg")])
    assert not (tmp_path / "x.jpg").exists()


def test_sample_takes_num_from_init_noise_and_rejects_a_wrong_shape(store: Path, tmp_path: Path) -> None:
    noise = tmp_path / "x_T.npy"
    np.save(noise, np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32))
    out = tmp_path / "y.npy"
    assert main(["sample", "--model", str(store), "--sampler", "ddim", "--steps", "1", "--device", "cpu",
                 "--init-noise", str(noise), "--out", str(out)]) == 0
    assert np.load(out).shape == (3, 1, 28, 28)
    np.save(noise, np.zeros((2, 1, 14, 14), dtype=np.float32))
    with pytest.raises(SystemExit, match="init noise has shape"):
        main(["sample", "--model", str(store), "--sampler", "ddim", "--steps", "1", "--device", "cpu",
              "--init-noise", str(noise), "--out", str(out)])


# --- sampler options: every registered sampler and spacing, clear errors for what a sampler cannot run --------


def test_sampler_and_spacing_choices_come_from_the_registry() -> None:
    parser = build_parser()
    for command in (["sample", "--out", "x.npy"], ["evaluate"]):
        for name in SAMPLER_NAMES:
            for spacing in SPACINGS:
                args = parser.parse_args([*command, "--sampler", name, "--timestep-spacing", spacing])
                assert (args.sampler, args.timestep_spacing) == (name, spacing)
        args = parser.parse_args(command)
        assert args.steps is None and args.timestep_spacing is None  # filled in from the model and sampler
    with pytest.raises(SystemExit):
        parser.parse_args(["sample", "--out", "x.npy", "--sampler", "euler"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sampler", "ddim", "--timestep-spacing", "karras"],
         r"^error: sampler 'ddim' does not support timestep_spacing 'karras'; supported: leading, trailing, linspace$"),
        (["--sampler", "ddpm", "--timestep-spacing", "logsnr"], r"^error: sampler 'ddpm' does not support"),
        (["--sampler", "ddim", "--steps", "0"], r"^error: steps must be in 1\.\.1000 for sampler 'ddim', got 0$"),
        (["--sampler", "dpmpp_2m", "--steps", "1000"], r"^error: steps must be in 1\.\.999 for sampler 'dpmpp_2m'"),
        (["--sampler", "unipc", "--steps", "-3"], r"^error: steps must be in 1\.\.999 for sampler 'unipc'"),
    ],
)
def test_sample_rejects_what_the_sampler_cannot_run_in_one_line(
    store: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    out = tmp_path / "y.npy"
    with pytest.raises(SystemExit, match=message) as info:
        main(["sample", "--model", str(store), "--num", "1", "--device", "cpu", "--out", str(out), *extra])
    assert "\n" not in str(info.value)
    assert not out.exists()


# --- acceptance: a trained tiny diffusers UNet, our CLI against diffusers' own loops ---------------------------------

TOY = {  # diffusers UNet2DModel kwargs: 8×8 grey, attention at 4×4 (177k parameters)
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (16, 32),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "norm_num_groups": 8,
}
TOY_STEPS = 10  # sampling steps of every comparison


def toy_images(n: int, g: torch.Generator) -> torch.Tensor:
    """(n, 1, 8, 8): a square or a bar (side / width 2–4) of brightness U(0.1, 0.6) at a random place on −0.5.

    Away from ±1, so that the final clamp to [−1, 1] does not hide differences between samplers.
    """
    idx = torch.arange(8)
    side = torch.randint(2, 5, (n,), generator=g)
    top = (torch.rand(n, generator=g) * (9 - side)).long()
    left = (torch.rand(n, generator=g) * (9 - side)).long()
    rows = (idx >= top[:, None]) & (idx < (top + side)[:, None])  # (n, 8)
    cols = (idx >= left[:, None]) & (idx < (left + side)[:, None])  # (n, 8)
    kind = torch.randint(0, 3, (n,), generator=g)  # 0 square, 1 vertical bar, 2 horizontal bar
    rows = rows | (kind == 1)[:, None]
    cols = cols | (kind == 2)[:, None]
    mask = rows[:, :, None] & cols[:, None, :]  # (n, 8, 8)
    bright = 0.1 + 0.5 * torch.rand(n, 1, 1, generator=g)
    return torch.where(mask, bright, -0.5)[:, None]


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers folder: a tiny UNet2DModel trained briefly (ε-MSE, DDPM forward process) on toy shapes.

    Its ``scheduler_config.json`` comes from ``DDPMScheduler.save_config`` without ``timestep_spacing``, so
    each scheduler class (and our sampler) uses its own default spacing. β_T = 0.01 (ᾱ_T ≈ 0.006 instead
    of 4e-5) keeps the 1/√ᾱ_T amplification of ε errors into x̂_0 small: after 300 steps (~25 s on one
    core) the solvers, which do not clip x̂_0, end mostly inside [-1, 1], where the final clamp hides
    little; with β_T = 0.02 they end ~80 % clamped, in diffusers as in ours.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        unet = UNet2DModel(**TOY)
        sched = DDPMScheduler(num_train_timesteps=1000, beta_end=0.01)
        opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
        for _ in range(300):
            x0 = toy_images(16, g)
            noise = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, 1000, (len(x0),), generator=g)
            loss = torch.nn.functional.mse_loss(unet(sched.add_noise(x0, noise, t), t).sample, noise)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < 0.3, loss.item()
        folder = tmp_path_factory.mktemp("trained") / "toy"
        unet.eval().save_pretrained(folder, safe_serialization=True)
        sched.save_config(folder)
    finally:
        torch.set_num_threads(threads)
    path = folder / "scheduler_config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("timestep_spacing", None)
    path.write_text(json.dumps(cfg, indent=2))
    return folder


@pytest.fixture(scope="module")
def trained_entry(trained_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("trained-store") / "toy"
    assert main(["import-diffusers", str(trained_dir), str(dst)]) == 0
    return dst


@pytest.fixture(scope="module")
def toy_noise(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("toy-noise") / "x_T.npy"
    np.save(path, torch.randn(N, 1, 8, 8, generator=torch.Generator().manual_seed(11)).numpy(), allow_pickle=False)
    return path


def diffusers_loop(folder: Path, scheduler: str, x_t: torch.Tensor, steps: int, **overrides: object) -> torch.Tensor:
    """diffusers' pipeline loop for ``scheduler`` from the folder's scheduler_config.json, final images clamped."""
    cls = {"ddim": DDIMScheduler, "dpmsolver": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}
    unet = UNet2DModel.from_pretrained(folder).eval()
    sched = cls[scheduler].from_config(json.loads((folder / "scheduler_config.json").read_text()), **overrides)
    sched.set_timesteps(steps)
    x = x_t
    with torch.inference_mode():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    return x.clamp(-1, 1)


PARITY = [  # (our sampler, --timestep-spacing or None, diffusers scheduler, its overrides)
    # each class's default spacing (the config names none): DDIM leading, DPM-Solver++ / UniPC linspace
    ("ddim", None, "ddim", {}),
    ("dpmpp_2m", None, "dpmsolver", {"solver_order": 2}),
    ("dpmpp_3m", None, "dpmsolver", {"solver_order": 3}),
    ("unipc", None, "unipc", {}),
    # --timestep-spacing
    ("ddim", "trailing", "ddim", {"timestep_spacing": "trailing"}),
    ("dpmpp_3m", "leading", "dpmsolver", {"solver_order": 3, "timestep_spacing": "leading"}),
    ("dpmpp_2m", "karras", "dpmsolver", {"use_karras_sigmas": True}),
    ("dpmpp_2m", "logsnr", "dpmsolver", {"use_lu_lambdas": True}),
    ("unipc", "trailing", "unipc", {"timestep_spacing": "trailing"}),
    ("unipc", "karras", "unipc", {"use_karras_sigmas": True}),  # (diffusers' UniPC has no log-SNR spacing)
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sampler", "spacing", "scheduler", "overrides"), PARITY, ids=[f"{p[0]}-{p[1] or 'default'}" for p in PARITY]
)
def test_cli_sampling_equals_diffusers_on_a_trained_model(
    trained_dir: Path, trained_entry: Path, toy_noise: Path, tmp_path: Path,
    sampler: str, spacing: str | None, scheduler: str, overrides: dict,
) -> None:
    x_t = torch.from_numpy(np.load(toy_noise))
    expected = diffusers_loop(trained_dir, scheduler, x_t, TOY_STEPS, **overrides).numpy()
    assert np.mean(np.abs(expected) < 0.999) > 0.8  # not saturated: the clamp hides little of what is compared
    extra = ["--timestep-spacing", spacing] if spacing else []
    results = {}
    for label, model in (("folder", trained_dir), ("entry", trained_entry)):
        out = tmp_path / f"{label}.npy"
        argv = ["sample", "--model", str(model), "--sampler", sampler, "--steps", str(TOY_STEPS),
                "--init-noise", str(toy_noise), "--device", "cpu", "--dtype", "float32", "--out", str(out), *extra]
        assert main(argv) == 0
        results[label] = np.load(out, allow_pickle=False)
        assert results[label].shape == (N, 1, 8, 8)
        diff = np.abs(results[label] - expected).max()
        assert diff <= 1e-3, f"{sampler} on the {label}: max abs {diff:.2e} from diffusers"
    np.testing.assert_array_equal(results["folder"], results["entry"])


def test_imported_toy_model_keeps_the_class_default_spacings(trained_dir: Path, trained_entry: Path) -> None:
    for folder in (trained_dir, trained_entry):
        spec = load_model(folder).spec
        assert spec.beta_end == 0.01 and spec.clip_sample
        assert "timestep_spacing" not in spec.sampling and spec.sampling.get("steps_offset") == 0
        assert [spec.default_spacing(s) for s in ("ddpm", "ddim", "dpmpp_2m", "unipc")] == [
            "leading", "leading", "linspace", "linspace"
        ]


def test_train_cli_defaults_are_the_training_configs() -> None:
    """``python -m service train --data X`` runs TrainConfig's recipe (the shipped model's), flag for field."""
    import dataclasses

    from service.train import TrainConfig

    args = vars(build_parser().parse_args(["train", "--data", "x.npz"]))
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    shared = {name for name in fields if name in args and name not in ("device",)}
    assert {"lr", "warmup_steps", "lr_schedule", "min_snr_gamma", "ema_decay", "batch_size", "steps"} <= shared
    assert {name: args[name] for name in shared} == {name: fields[name] for name in shared}


def test_sample_cli_defaults_to_the_servers_sampler() -> None:
    """``python -m service sample`` with no --sampler runs what a bare POST /generate runs."""
    from service.api.schemas import GenerateRequest

    args = build_parser().parse_args(["sample", "--out", "x.png"])
    assert args.sampler == GenerateRequest().sampler == "dpmpp_2m_sde"
