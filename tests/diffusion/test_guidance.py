"""The guidance classifier: its gradient against independent oracles, its file format, its training and CLI."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.__main__ import main
from service.diffusion.checkpoint import CheckpointError, ModelSpec, sha256_file
from service.diffusion.guidance import (
    CONFIG_FILE,
    FORMAT,
    WEIGHTS_FILE,
    GuidanceClassifier,
    GuidanceClassifierConfig,
    load_guidance_classifier,
    log_prob_grad,
    save_guidance_classifier,
)
from service.diffusion.schedule import NoiseSchedule
from service.train_guidance import (
    EVAL_TIMESTEPS,
    _shift,
    accuracy_by_t,
    eval_timesteps,
    flops_per_image,
    train_guidance_classifier,
)
from tests.conftest import tiny_unet_config

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = GuidanceClassifierConfig(
    channels=1,
    image_size=6,
    num_classes=3,
    widths=(4, 8),
    blocks=(1, 1),
    norm_groups=2,
    time_freq_dim=8,
    time_embed_dim=16,
    num_train_timesteps=10,
)


def tiny_classifier(seed: int = 0, dtype: torch.dtype = torch.float32) -> GuidanceClassifier:
    """A tiny classifier with every weight random (the zero-initialised output convs too), in eval mode."""
    torch.manual_seed(seed)
    model = GuidanceClassifier(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.4)
    return model.to(dtype).eval().requires_grad_(False)


def tiny_inputs(n: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=gen)
    t = torch.randint(0, 10, (n,), generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    return x, t, y


# --- the architecture ---------------------------------------------------------------------------------------------


def test_default_config_stays_within_the_budget():
    """≲ 0.5 M parameters and ≲ 20 MFLOP per 28×28 image: its gradient must cost far less than a UNet step."""
    cfg = GuidanceClassifierConfig()
    model = GuidanceClassifier(cfg).eval()
    assert model(torch.zeros(2, 1, 28, 28), torch.tensor([0, 999])).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) <= 500_000
    # 21,578,496 is what torch.utils.flop_counter.FlopCounterMode reports for this forward (its import takes ~5 s)
    assert flops_per_image(model) == 21_578_496 <= 22e6
    assert GuidanceClassifierConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_config_rejects_unknown_keys_and_bad_shapes():
    with pytest.raises(ValueError, match="unknown"):
        GuidanceClassifierConfig.from_dict({**TINY.to_dict(), "attention": True})
    with pytest.raises(ValueError, match="norm_groups"):
        GuidanceClassifierConfig(widths=(12, 32), blocks=(1, 1), norm_groups=8)
    with pytest.raises(ValueError, match="equal length"):
        GuidanceClassifierConfig(widths=(16, 32), blocks=(1,))


def test_rows_are_independent():
    """GroupNorm, not BatchNorm: a row's logits do not depend on the rest of the batch."""
    model = tiny_classifier()
    x, t, _ = tiny_inputs(4)
    together = model(x, t)
    alone = torch.cat([model(x[i : i + 1], t[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


# --- log_prob_grad --------------------------------------------------------------------------------------------------


def test_log_prob_grad_matches_central_finite_differences_float64():
    model = tiny_classifier(dtype=torch.float64)
    x, t, y = tiny_inputs(2)
    x = x.double()
    grad = log_prob_grad(model, x, t, y)
    assert grad.shape == x.shape and grad.dtype == torch.float64 and not grad.requires_grad

    def log_p(z: torch.Tensor) -> np.ndarray:  # log p(y_i | z_i, t_i) per row, by logits − logsumexp in numpy
        with torch.no_grad():
            logits = model(z, t).numpy()
        m = logits.max(axis=1, keepdims=True)
        lse = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
        return logits[np.arange(len(y)), y.numpy()] - lse

    h = 1e-5
    fd = torch.zeros_like(x)
    flat = fd.view(len(x), -1)
    for j in range(flat.shape[1]):
        step = torch.zeros_like(x).view(len(x), -1)
        step[:, j] = h
        step = step.view_as(x)
        flat[:, j] = torch.from_numpy((log_p(x + step) - log_p(x - step)) / (2 * h))
    assert float(grad.abs().max()) > 1e-3  # a non-trivial gradient
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)


class LinearSoftmax(nn.Module):
    """f(x, t) = W · vec(x) + b, ignoring t: ∇_x log softmax(f)_y = W_y − Σ_k p_k W_k."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T + self.bias


def test_log_prob_grad_of_a_linear_softmax_is_the_closed_form():
    rng = np.random.default_rng(0)
    k, shape = 4, (5, 2, 3, 3)
    w, b = rng.normal(size=(k, 18)), rng.normal(size=k)
    x, y = rng.normal(size=shape), np.array([0, 3, 1, 2, 3])
    model = LinearSoftmax(torch.from_numpy(w), torch.from_numpy(b))
    grad = log_prob_grad(model, torch.from_numpy(x), torch.zeros(5, dtype=torch.long), torch.from_numpy(y))
    logits = x.reshape(5, -1) @ w.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = (w[y] - p @ w).reshape(shape)  # W_y − Σ_k p_k W_k, row by row
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_log_prob_grad_inside_inference_mode_and_per_row():
    model = tiny_classifier()
    x, t, y = tiny_inputs(4)
    outside = log_prob_grad(model, x, t, y)
    with torch.inference_mode():
        xi, ti, yi = x.clone(), t.clone(), y.clone()  # inference tensors, as in the engine's step
        inside = log_prob_grad(model, xi, ti, yi)
        from_bf16 = log_prob_grad(model, xi.bfloat16(), ti, yi)
    assert inside.dtype == torch.float32 and inside.shape == x.shape and not inside.requires_grad
    torch.testing.assert_close(inside, outside, rtol=0, atol=0)
    assert from_bf16.dtype == torch.float32
    assert all(p.grad is None for p in model.parameters())
    alone = torch.cat([log_prob_grad(model, x[i : i + 1], t[i : i + 1], y[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(outside, alone, rtol=1e-5, atol=1e-6)


# --- the file format ------------------------------------------------------------------------------------------------


def test_save_load_round_trip_gives_identical_logits(tmp_path: Path):
    model = tiny_classifier()
    info = {
        "training": {"steps": 7},
        "accuracy_by_t": {"0": 0.9},
        "test_split": "synthetic",
        "recommended_guidance_scale": 2.5,
    }
    assert save_guidance_classifier(model, tmp_path / "m", info) == tmp_path / "m"
    loaded = load_guidance_classifier(tmp_path / "m")
    assert loaded is not None and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert loaded.config == TINY
    assert loaded.recommended_guidance_scale == 2.5
    record = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    assert record["format"] == FORMAT and record["sha256"] == sha256_file(tmp_path / "m" / WEIGHTS_FILE)
    assert loaded.info == record and record["training"] == {"steps": 7}
    x, t, _ = tiny_inputs(3)
    torch.testing.assert_close(loaded(x, t), model(x, t), rtol=0, atol=0)


def test_recommended_scale_defaults_to_none(tmp_path: Path):
    save_guidance_classifier(tiny_classifier(), tmp_path, {})
    loaded = load_guidance_classifier(tmp_path)
    assert loaded is not None and loaded.recommended_guidance_scale is None
    assert loaded.info["accuracy_by_t"] == {}


def test_absent_classifier_is_none(tmp_path: Path):
    assert load_guidance_classifier(tmp_path) is None
    assert load_guidance_classifier(tmp_path / "missing") is None


def test_tampered_weights_raise(tmp_path: Path):
    save_guidance_classifier(tiny_classifier(), tmp_path, {})
    weights = tmp_path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_guidance_classifier(tmp_path)
    weights.unlink()
    with pytest.raises(CheckpointError, match="not found"):
        load_guidance_classifier(tmp_path)


def test_bad_format_config_or_shapes_raise(tmp_path: Path):
    save_guidance_classifier(tiny_classifier(), tmp_path, {})
    path = tmp_path / CONFIG_FILE
    good = json.loads(path.read_text())
    path.write_text(json.dumps({**good, "format": "ddpm-service-guidance/99"}))
    with pytest.raises(CheckpointError, match="unknown format"):
        load_guidance_classifier(tmp_path)
    path.write_text(json.dumps({**good, "config": {**good["config"], "widths": [4, 8, 16]}}))
    with pytest.raises(CheckpointError, match="guidance classifier config"):  # widths and blocks differ in length
        load_guidance_classifier(tmp_path)
    path.write_text(json.dumps({**good, "config": {**good["config"], "widths": [4, 6]}}))
    with pytest.raises(CheckpointError, match="do not match"):
        load_guidance_classifier(tmp_path)
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_guidance_classifier(tmp_path)


def test_spec_mismatch_raises(tmp_path: Path):
    save_guidance_classifier(tiny_classifier(), tmp_path, {})
    spec = ModelSpec(name="tiny", unet=tiny_unet_config(size=6), num_train_timesteps=10)
    assert load_guidance_classifier(tmp_path, spec=spec) is not None
    with pytest.raises(CheckpointError, match="T\\) = \\(1, 6, 10\\)"):
        load_guidance_classifier(tmp_path, spec=ModelSpec(name="tiny", unet=tiny_unet_config(size=6)))


# --- training -------------------------------------------------------------------------------------------------------


def test_eval_timesteps():
    assert eval_timesteps(1000) == EVAL_TIMESTEPS
    assert eval_timesteps(20) == (0, 19)


def test_shift_is_a_translation_with_background_fill():
    x = torch.rand(16, 2, 5, 5) * 2 - 1
    shifted = _shift(x, torch.Generator().manual_seed(0), 1)
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    for i in range(16):
        crops = [padded[i, :, dy : dy + 5, dx : dx + 5] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(shifted[i], c) for c in crops)


def two_patterns(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: bright top half; class 1: bright left half; plus a little pixel noise, in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen)
    x = -torch.ones(n, 1, size, size)
    x[y == 0, :, : size // 2, :] = 1.0
    x[y == 1, :, :, : size // 2] = 1.0
    return (x + 0.2 * torch.randn(x.shape, generator=gen)).clamp(-1, 1), y


def test_training_on_two_patterns_beats_chance():
    schedule = NoiseSchedule.create("linear", 20)
    train_x, train_y = two_patterns(256, 8, seed=0)
    test_x, test_y = two_patterns(200, 8, seed=1)
    cfg = GuidanceClassifierConfig(
        channels=1,
        image_size=8,
        num_classes=10,
        widths=(8, 16),
        blocks=(0, 1),
        norm_groups=4,
        time_freq_dim=16,
        time_embed_dim=32,
        num_train_timesteps=20,
    )
    steps: list[int] = []
    model = train_guidance_classifier(
        train_x,
        train_y,
        schedule,
        cfg,
        steps=40,
        batch_size=32,
        lr=5e-3,
        warmup_steps=5,
        progress=lambda k, **_: steps.append(k),
    )
    assert len(steps) == 40 and not model.training
    acc = accuracy_by_t(model, test_x, test_y, schedule, eval_timesteps(20))
    assert set(acc) == {"0", "19"}
    assert min(acc.values()) >= 0.9, acc  # chance is 0.5


# --- the CLI --------------------------------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> Path:
    """IDX (LeCun): two zero bytes, dtype 0x08 (uint8), ndim, big-endian dims, then the bytes; gzip if *.gz."""
    payload = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def test_cli_writes_both_files_with_accuracy_by_t(tmp_path: Path, tiny_model_dir: Path):
    rng = np.random.default_rng(0)
    files = {}
    for split, n in (("train", 48), ("t10k", 24)):
        files[split] = (
            write_idx(tmp_path / f"{split}-images.gz", rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)),
            write_idx(tmp_path / f"{split}-labels", rng.integers(0, 10, n, dtype=np.uint8)),
        )
    out = tmp_path / "guidance"
    rc = main(
        [
            "train-guidance-classifier",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(files["train"][0]),
            "--labels",
            str(files["train"][1]),
            "--test-data",
            str(files["t10k"][0]),
            "--test-labels",
            str(files["t10k"][1]),
            "--out",
            str(out),
            "--steps",
            "3",
            "--batch-size",
            "16",
            "--widths",
            "4,8",
            "--blocks",
            "0,1",
        ]
    )
    assert rc == 0
    assert (out / WEIGHTS_FILE).is_file() and (out / CONFIG_FILE).is_file()
    record = json.loads((out / CONFIG_FILE).read_text())
    assert list(record["accuracy_by_t"]) == [str(t) for t in EVAL_TIMESTEPS]
    assert all(0.0 <= a <= 1.0 for a in record["accuracy_by_t"].values())
    training = record["training"]
    assert training["steps"] == 3 and training["images_seen"] == 48 and training["threads"] == 1
    assert "24 images" in record["test_split"] and record["recommended_guidance_scale"] is None
    loaded = load_guidance_classifier(out, spec=ModelSpec(name="tiny", unet=tiny_unet_config()))
    assert loaded is not None and loaded.config.widths == (4, 8) and loaded.config.image_size == 8
