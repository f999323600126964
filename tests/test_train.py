"""Training loop: it learns (an overfitting check), resumes exactly, and exports a loadable entry."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from service.diffusion.checkpoint import load_model
from service.diffusion.schedule import NoiseSchedule
from service.diffusion.unet import UNet
from service.train import STATE_FILE, TrainConfig, train


def _patterns() -> np.ndarray:
    """Four fixed 8×8 uint8 patterns: horizontal bar, vertical bar, diagonal, checkerboard."""
    p = np.zeros((4, 8, 8), dtype=np.uint8)
    p[0, 3:5, :] = 255
    p[1, :, 3:5] = 255
    p[2][np.eye(8, dtype=bool)] = 255
    p[3] = (np.indices((8, 8)).sum(0) % 2) * 255
    return p


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def npz(tmp_path: Path) -> Path:
    path = tmp_path / "patterns.npz"
    np.savez(path, images=np.repeat(_patterns(), 16, axis=0))  # 64 images (N, H, W)
    return path


def _config(npz: Path, root: Path, steps: int, **kw) -> TrainConfig:
    base = dict(
        data=str(npz),
        out=str(root / "entry"),
        workdir=str(root / "work"),
        name="tiny",
        image_size=8,
        block_out_channels=(8, 16),
        attention_levels=(1,),
        norm_num_groups=4,
        batch_size=32,
        lr=3e-3,
        warmup_steps=20,
        lr_schedule="constant",  # a cosine's rate depends on `steps`: runs of different lengths would differ
        min_snr_gamma=0.0,
        steps=steps,
        holdout=4,
        sample_every=0,
        checkpoint_every=1000,
    )
    return TrainConfig(**{**base, **kw})


def _eval_loss(unet: torch.nn.Module) -> float:
    """‖ε − ε_θ(x_t, t)‖² on a fixed batch: every pattern at 64 fixed (t, ε) draws (DDPM eq. 14)."""
    g = torch.Generator().manual_seed(123)
    x0 = torch.from_numpy(np.repeat(_patterns(), 64, axis=0)).float()[:, None] / 127.5 - 1
    t = torch.randint(0, 1000, (len(x0),), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    x_t = NoiseSchedule.create("linear", 1000).q_sample(x0, t, eps)
    with torch.no_grad():
        return F.mse_loss(unet.eval()(x_t, t), eps).item()


@pytest.mark.slow
def test_a_few_hundred_steps_fit_a_tiny_pattern_set(npz: Path, tmp_path: Path) -> None:
    cfg = _config(npz, tmp_path, steps=200, ema_decay=0.99)
    torch.manual_seed(cfg.seed)  # train() initialises the UNet right after this same seeding
    before = _eval_loss(UNet(cfg.unet_config()))
    out = train(cfg, log=lambda *_: None)
    after = _eval_loss(load_model(out).unet)  # the exported EMA weights
    # untrained ≈ 1.1 (predicting ε = 0 scores 1.0); measured after 200 steps ≈ 0.08
    assert before > 0.5
    assert after < 0.15 * before, (before, after)


def _state(workdir: Path) -> dict:
    return torch.load(workdir / STATE_FILE, weights_only=True)


def test_resume_continues_exactly(npz: Path, tmp_path: Path) -> None:
    # dropout draws from the global torch RNG, so that too must be restored on resume
    straight = _config(npz, tmp_path / "a", steps=20, batch_size=8, dropout=0.1)
    train(straight, log=lambda *_: None)
    half = _config(npz, tmp_path / "b", steps=10, batch_size=8, dropout=0.1)
    train(half, log=lambda *_: None)
    logs: list[str] = []
    # seed=1 on resume: only a restored state (weights, optimizer, EMA, every RNG) can still match seed 0
    train(_config(npz, tmp_path / "b", steps=20, batch_size=8, dropout=0.1, seed=1), resume=True, log=logs.append)
    assert any("resumed" in line and "step 10" in line for line in logs)

    a, b = _state(tmp_path / "a" / "work"), _state(tmp_path / "b" / "work")
    assert a["step"] == b["step"] == 20
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], rtol=0, atol=1e-6, msg=f"{part}.{key}")
    exp_a, exp_b = a["optimizer"]["state"], b["optimizer"]["state"]
    for i in exp_a:
        torch.testing.assert_close(exp_a[i]["exp_avg_sq"], exp_b[i]["exp_avg_sq"], rtol=0, atol=1e-9)



def test_extra_emas_track_the_same_run_and_survive_a_resume(npz: Path, tmp_path: Path) -> None:
    def assert_same(a: dict, b: dict, same: bool = True) -> None:
        diffs = [float((a[k] - b[k]).abs().max()) for k in a]
        assert (max(diffs) <= 1e-6) is same, max(diffs)

    # (1+n)/(10+n) governs 0.99 and 0.999 for all 60 steps (they are the same average); 0.8 takes over at n = 35
    decays = (0.999, 0.8)
    straight = _config(npz, tmp_path / "a", steps=60, batch_size=8, ema_decay=0.99, extra_ema_decays=decays)
    train(straight, log=lambda *_: None)
    # the other run adds its extra EMAs only on resume, at step 30 (still inside the warm-up of both)
    train(_config(npz, tmp_path / "b", steps=30, batch_size=8, ema_decay=0.99), log=lambda *_: None)
    train(_config(npz, tmp_path / "b", steps=60, batch_size=8, ema_decay=0.99, extra_ema_decays=decays),
          resume=True, log=lambda *_: None)

    a, b = _state(tmp_path / "a" / "work"), _state(tmp_path / "b" / "work")
    for d in ("0.999", "0.8"):
        assert_same(a["extra_emas"][d], b["extra_emas"][d])
    assert_same(a["extra_emas"]["0.999"], a["ema"])
    assert_same(a["extra_emas"]["0.8"], a["ema"], same=False)  # a shorter average once past its warm-up
    assert_same(a["extra_emas"]["0.8"], a["model"], same=False)
    entry = load_model(tmp_path / "a" / "work" / "ema_0.8")
    assert entry.spec.extra["training"]["ema_decay"] == 0.8
    assert_same(a["extra_emas"]["0.8"], entry.unet.state_dict())


def test_exported_entry_loads_and_records_training(npz: Path, tmp_path: Path) -> None:
    cfg = _config(npz, tmp_path, steps=3, extra={"command": "pytest"})
    out = train(cfg, log=lambda *_: None)
    model = load_model(out)
    assert model.spec.name == "tiny" and model.spec.image_size == 8 and model.spec.channels == 1
    config = json.loads((out / "config.json").read_text())
    assert config["weights"]["sha256"] == model.sha256
    training = config["extra"]["training"]
    assert training["steps_done"] == 3 and training["holdout"] == 4
    assert config["extra"]["data"] == {"source": str(npz), "images": 64, "train": 60}
    assert config["extra"]["command"] == "pytest"
    x = model.unet(torch.randn(2, 1, 8, 8), torch.tensor([0, 999]))
    assert x.shape == (2, 1, 8, 8)
    # the exported weights are the EMA copy, not the raw model
    state = _state(Path(cfg.workdir))
    ema = state["ema"]
    for key, value in model.unet.state_dict().items():
        torch.testing.assert_close(value, ema[key], rtol=0, atol=0)
    assert any(not torch.equal(state["model"][k], ema[k]) for k in ema)


def test_cosine_schedule_warms_up_then_decays_to_its_floor(npz: Path, tmp_path: Path) -> None:
    from service.train import _lr_at

    cfg = _config(npz, tmp_path, steps=1100, lr=1e-3, warmup_steps=100, lr_schedule="cosine", min_lr_ratio=0.1)
    assert _lr_at(cfg, 0) == pytest.approx(1e-5)  # (0 + 1) / 100 of the peak
    assert _lr_at(cfg, 99) == pytest.approx(1e-3)
    assert _lr_at(cfg, 600) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half-way: cos(π/2) = 0
    assert _lr_at(cfg, 1100) == pytest.approx(1e-4)
    lrs = [_lr_at(cfg, s) for s in range(100, 1101)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_min_snr_weights_match_the_closed_form() -> None:
    from service.train import loss_weights

    abar = NoiseSchedule.create("linear", 1000).alphas_cumprod.double()
    t = torch.tensor([0, 50, 200, 500, 999])
    w = loss_weights(abar, t, gamma=5.0)
    for ti, wi in zip(t.tolist(), w.tolist(), strict=True):
        snr = abar[ti].item() / (1 - abar[ti].item())  # SNR_t = ᾱ_t / (1 − ᾱ_t)
        assert wi == pytest.approx(min(snr, 5.0) / snr, rel=1e-6)
    assert w[0] < 0.01 and w[-1] == 1.0  # low noise is down-weighted, high noise keeps weight 1
    assert torch.equal(loss_weights(abar, t, gamma=0.0), torch.ones(5))


def test_loss_log_is_trimmed_on_resume(npz: Path, tmp_path: Path) -> None:
    train(_config(npz, tmp_path, steps=6, batch_size=4, log_every=2, checkpoint_every=4), log=lambda *_: None)
    log = tmp_path / "work" / "loss.jsonl"
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == [2, 4, 6]
    with log.open("a") as f:  # as if the run had logged step 7 and died before its next checkpoint
        f.write(json.dumps({"step": 7, "loss": 9.0, "lr": 0.0, "seconds": 0.0}) + "\n")
    train(_config(npz, tmp_path, steps=8, batch_size=4, log_every=2, checkpoint_every=4), resume=True,
          log=lambda *_: None)
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == [2, 4, 6, 8]


def test_warm_start_begins_from_the_entry_and_records_it(npz: Path, tmp_path: Path) -> None:
    train(_config(npz, tmp_path / "src", steps=20, batch_size=8), log=lambda *_: None)
    source = load_model(tmp_path / "src" / "entry")
    # lr 0: AdamW leaves the weights as they start, so the export is the start itself
    logs: list[str] = []
    tune = _config(npz, tmp_path / "tune", steps=4, batch_size=8, lr=0.0, extra_ema_decays=(0.9,),
                   init_from=str(tmp_path / "src" / "entry"), checkpoint_every=2)
    train(tune, log=logs.append)
    assert any("warm start" in line for line in logs)
    tuned = load_model(tmp_path / "tune" / "entry")
    for k, v in source.unet.state_dict().items():
        assert torch.equal(tuned.unet.state_dict()[k], v), k
    assert torch.equal(load_model(tmp_path / "tune" / "work" / "ema_0.9").unet.state_dict()["conv_out.weight"],
                       source.unet.state_dict()["conv_out.weight"])
    scratch = _config(npz, tmp_path / "scratch", steps=4, batch_size=8, lr=0.0)
    train(scratch, log=lambda *_: None)
    assert not torch.equal(load_model(tmp_path / "scratch" / "entry").unet.state_dict()["conv_out.weight"],
                           source.unet.state_dict()["conv_out.weight"])

    # the source is recorded, and still is after a resume of the fine-tune
    train(_config(npz, tmp_path / "tune", steps=6, batch_size=8, lr=0.0, init_from=str(tmp_path / "src" / "entry"),
                  checkpoint_every=2), resume=True, log=lambda *_: None)
    record = load_model(tmp_path / "tune" / "entry").spec.extra
    assert record["training"]["steps_done"] == 6
    assert record["init_from"]["sha256"] == source.sha256
    assert record["init_from"]["steps_done"] == 20


def test_warm_start_refuses_another_architecture(npz: Path, tmp_path: Path) -> None:
    train(_config(npz, tmp_path / "src", steps=2, batch_size=8), log=lambda *_: None)
    wider = _config(npz, tmp_path / "wide", steps=2, batch_size=8, block_out_channels=(16, 32),
                    init_from=str(tmp_path / "src" / "entry"))
    with pytest.raises(ValueError, match="does not match"):
        train(wider, log=lambda *_: None)
