"""Offline evaluator: Fréchet distance against closed forms, and FLD behaviour on real corrupted digits."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from service.__main__ import main
from service.classifier import load_classifier, predict
from service.data import load_images, load_labels, split_indices, to_model_range
from service.diffusion.checkpoint import ModelSpec, load_model, save_model
from service.diffusion.unet import UNet
from service.evaluate import (
    Evaluator,
    evaluate,
    feature_stats,
    format_table,
    frechet_distance,
    nearest_neighbour_distances,
    score_images,
)
from tests.conftest import REPO, tiny_unet_config

MNIST = REPO.parent / "shared" / "data" / "mnist"
IMAGES, LABELS = MNIST / "t10k-images-idx3-ubyte.gz", MNIST / "t10k-labels-idx1-ubyte.gz"
TRAIN_IMAGES = MNIST / "train-images-idx3-ubyte.gz"
CLASSIFIER = REPO / "model_store" / "mnist" / "classifier.safetensors"
needs_mnist = pytest.mark.skipif(not IMAGES.is_file(), reason=f"MNIST digits not found at {MNIST}")


# --- Fréchet distance against closed forms -------------------------------------------------------


def test_one_dimensional_gaussians() -> None:
    # W2²(N(m1, s1²), N(m2, s2²)) = (m1 - m2)² + (s1 - s2)²
    d = frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]]))
    assert d == pytest.approx(9.0 + 1.0, rel=1e-12)


def test_commuting_covariances() -> None:
    # Σ1 = Q diag(a) Qᵀ, Σ2 = Q diag(b) Qᵀ share eigenvectors: d² = ‖Δμ‖² + Σ (√a_i - √b_i)²
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a, b = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    d = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert d == pytest.approx(expected, rel=1e-10)


def test_non_commuting_two_by_two() -> None:
    # for 2×2 M with eigenvalues λ1, λ2 ≥ 0: Tr √M = √λ1 + √λ2 = √(Tr M + 2√det M), M = Σ1Σ2
    s1 = np.array([[2.0, 0.8], [0.8, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 1.5]])
    m = s1 @ s2
    tr_sqrt = math.sqrt(np.trace(m) + 2 * math.sqrt(np.linalg.det(m)))
    mu1, mu2 = np.array([0.3, -1.0]), np.array([1.0, 0.5])
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-10)  # symmetric


def test_identical_rank_deficient_gaussians_are_at_zero() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 3)) @ rng.normal(size=(3, 20))  # rank 3 covariance in 20 dimensions
    mu, cov = feature_stats(x)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-9 * np.trace(cov))


def test_feature_stats_and_sampled_gaussians() -> None:
    rng = np.random.default_rng(2)
    s1, s2 = np.array([[2.0, 0.8], [0.8, 1.0]]), np.array([[0.5, -0.3], [-0.3, 1.5]])
    x = rng.multivariate_normal([0.0, 0.0], s1, size=200_000)
    y = rng.multivariate_normal([1.0, 0.0], s2, size=200_000)
    mu, cov = feature_stats(x)
    np.testing.assert_allclose(cov, (x - x.mean(0)).T @ (x - x.mean(0)) / (len(x) - 1), rtol=1e-12)
    exact = frechet_distance(np.zeros(2), s1, np.array([1.0, 0.0]), s2)
    assert frechet_distance(mu, cov, *feature_stats(y)) == pytest.approx(exact, rel=0.02)


def test_shape_errors() -> None:
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError):
        feature_stats(np.zeros((1, 4)))


pytestmark = pytest.mark.usefixtures("one_thread")


# --- FLD on real digits ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> dict:
    if not IMAGES.is_file():
        pytest.skip(f"MNIST digits not found at {MNIST}")
    images = to_model_range(load_images(IMAGES))
    labels = load_labels(LABELS)
    train, held = split_indices(len(images), 1000, 0)
    clf = load_classifier(CLASSIFIER).model
    reference = feature_stats(predict(clf, images[held])[0].numpy())
    return {"images": images, "labels": labels, "train": train, "held": held, "clf": clf, "ref": reference}


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-(r**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.pad(x, (3, 3, 3, 3), value=-1.0)  # background is -1
    x = F.conv2d(x, k.view(1, 1, 1, 7))
    return F.conv2d(x, k.view(1, 1, 7, 1))


@needs_mnist
def test_a_set_against_itself_scores_zero(digits: dict) -> None:
    ref = digits["ref"]
    score = score_images(digits["clf"], digits["images"][digits["held"]], ref, digits["labels"][digits["held"]])
    assert score.fld == pytest.approx(0.0, abs=1e-9 * np.trace(ref[1]))
    assert score.accuracy is not None and score.accuracy > 0.98
    assert score.confidence > 0.97
    assert sum(score.shares) == pytest.approx(1.0) and 0.05 < score.min_share < score.max_share < 0.15


@needs_mnist
@pytest.mark.parametrize("corrupt", ["noise", "blur"])
def test_stronger_corruption_scores_monotonically_worse(digits: dict, corrupt: str) -> None:
    ref = digits["ref"]
    pick = digits["train"][:500]
    clean = digits["images"][pick]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(clean.shape, generator=g)
    levels = [0.0, 0.25, 0.5, 1.0] if corrupt == "noise" else [0.0, 0.6, 1.0, 1.5]
    flds = []
    for level in levels:
        if level == 0:
            x = clean
        elif corrupt == "noise":
            x = (clean + level * noise).clamp(-1, 1)
        else:
            x = _blur(clean, level)
        flds.append(score_images(digits["clf"], x, ref).fld)
    assert all(a < b for a, b in itertools.pairwise(flds)), flds
    assert flds[-1] > 5 * flds[0], flds  # the real-vs-real floor is far below a badly corrupted set


@needs_mnist
def test_a_single_digit_set_shows_as_mode_collapse(digits: dict) -> None:
    ref = digits["ref"]
    held = digits["held"]
    ones = held[digits["labels"][held] == 1]
    score = score_images(digits["clf"], digits["images"][ones], ref)
    assert score.shares[1] > 0.97 and score.min_share == 0.0 and score.max_share == score.shares[1]
    everyone = score_images(digits["clf"], digits["images"][digits["train"][: len(ones)]], ref)
    assert score.fld > 5 * everyone.fld


# --- the whole evaluator on a tiny random 28×28 model --------------------------------------------


@pytest.fixture
def random_digit_model(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    spec = ModelSpec(name="random28", unet=tiny_unet_config(size=28))
    spec.extra = {"training": {"holdout": 1000, "split_seed": 0}, "data": {"source": str(IMAGES)}}
    folder = save_model(spec, UNet(spec.unet), tmp_path / "random28")
    (folder / "classifier.safetensors").write_bytes(CLASSIFIER.read_bytes())
    return folder


@needs_mnist
def test_evaluate_reports_floor_and_samples(random_digit_model: Path, tmp_path: Path) -> None:
    calls: list[tuple[int, str]] = []
    steps_done: list[int] = []

    def progress(total: int, desc: str):
        calls.append((total, desc))
        return steps_done.append

    report = evaluate(random_digit_model, "ddim", steps=3, num=24, batch=8, seed=1, progress=progress)
    assert calls == [(9, "ddim-3")] and sum(steps_done) == 9
    ev = report["evaluation"]  # defaults from the model config: its training hold-out is the reference
    assert ev["reference"] == f"{IMAGES}: 1000 held out by training (split seed 0)" and ev["reference_n"] == 1000
    assert ev["train"] == f"{IMAGES} (9000 images)" and ev["classifier_accuracy"] > 0.98
    assert report["generated"]["novelty"] > 0 and report["floor"]["novelty"] is None
    for row in ("floor", "generated"):
        assert report[row]["n"] == 24 and sum(report[row]["shares"]) == pytest.approx(1.0)
    assert report["floor"]["accuracy"] > 0.9 and report["generated"]["accuracy"] is None
    assert report["generated"]["fld"] > 3 * report["floor"]["fld"]  # random weights make noise, not digits
    assert report["spacing"] == "leading"  # no sampling settings in the config: DDIMScheduler's default
    table = format_table(report)
    assert "floor: real training digits" in table and "generated: ddim-3" in table
    assert "leading timesteps" in table

    out = tmp_path / "report.json"
    args = ["evaluate", "--model", str(random_digit_model), "--steps", "3", "--num", "24", "--batch", "8"]
    assert main([*args, "--seed", "1", "--device", "cpu", "--dtype", "float32", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["generated"]["fld"] == pytest.approx(report["generated"]["fld"], rel=1e-6)
    assert saved["floor"] == report["floor"] and saved["spacing"] == "leading"


@needs_mnist
def test_evaluate_takes_steps_and_spacing_from_the_sampler_and_passes_a_spacing_on(random_digit_model: Path) -> None:
    descriptions: list[str] = []

    def progress(total: int, desc: str):
        descriptions.append(desc)
        return lambda k: None

    default = evaluate(random_digit_model, "dpmpp_2m", num=16, batch=16, seed=1, progress=progress)
    assert descriptions == ["dpmpp_2m-20"]  # DPM-Solver++ defaults: 20 steps, linspace
    assert (default["sampler"], default["steps"], default["spacing"]) == ("dpmpp_2m", 20, "linspace")
    trailing = evaluate(random_digit_model, "dpmpp_2m", num=16, batch=16, seed=1, spacing="trailing")
    assert trailing["spacing"] == "trailing" and trailing["floor"] == default["floor"]
    # other timesteps, other samples: the same seeds give bit-identical scores for identical samples, so any
    # difference shows the spacing reached the sampler (a random UNet's saturated samples move the FLD only ~1e-6)
    assert trailing["generated"]["fld"] != default["generated"]["fld"]
    assert "trailing timesteps" in format_table(trailing)


@pytest.mark.slow
@pytest.mark.skipif(not TRAIN_IMAGES.is_file(), reason=f"MNIST training split not found at {MNIST}")
def test_protocol_a_model_trained_on_the_training_split_is_scored_against_the_test_split(tmp_path: Path) -> None:
    torch.manual_seed(0)
    spec = ModelSpec(name="random28", unet=tiny_unet_config(size=28))
    spec.extra = {"training": {"holdout": 0, "split_seed": 0}, "data": {"source": str(TRAIN_IMAGES)}}
    folder = save_model(spec, UNet(spec.unet), tmp_path / "random28")
    ev = Evaluator.for_model(load_model(folder), folder, classifier_path=CLASSIFIER)
    assert ev.info["reference"] == str(IMAGES) and len(ev.reference_images) == 10_000  # the untouched test split
    assert len(ev.train_images) == 60_000 and ev.info["classifier_accuracy"] > 0.98
    floor = ev.floor(500, seed=0)  # N training digits against the test split
    assert floor.accuracy > 0.97 and floor.fld < 20
    # novelty: unseen test digits are ≈ 1 (as novel as unseen digits), copies of training digits 0
    assert ev.novelty(ev.reference_images[-500:]) == pytest.approx(1.0, abs=0.1)
    assert ev.novelty(ev.train_images[:500]) < 1e-5  # float64 round-off of ‖a‖² + ‖b‖² − 2ab
    noisy = (ev.train_images[:500] + 0.3 * torch.randn(500, 1, 28, 28, generator=torch.Generator().manual_seed(1)))
    assert 0 < ev.novelty(noisy.clamp(-1, 1)) < ev.novelty(ev.reference_images[-500:])


def test_nearest_neighbour_distances_equal_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 1, 4, 4, generator=gen), torch.randn(30, 1, 4, 4, generator=gen)
    expected = torch.cdist(a.flatten(1).double(), b.flatten(1).double()).min(1).values
    torch.testing.assert_close(nearest_neighbour_distances(a, b, chunk=3), expected)


@pytest.mark.parametrize(
    ("sampler", "extra", "message"),
    [
        ("ddim", ["--timestep-spacing", "karras"], r"^error: sampler 'ddim' does not support .* 'karras'"),
        ("dpmpp_3m", ["--steps", "1000"], r"^error: steps must be in 1\.\.999 for sampler 'dpmpp_3m', got 1000$"),
        ("unipc", ["--steps", "0"], r"^error: steps must be in 1\.\.999 for sampler 'unipc', got 0$"),
    ],
)
def test_evaluate_rejects_what_the_sampler_cannot_run_before_any_work(
    tiny_model_dir: Path, sampler: str, extra: list[str], message: str
) -> None:
    # checked first: tiny_model_dir has no classifier and no data source, which would fail later
    argv = ["evaluate", "--model", str(tiny_model_dir), "--sampler", sampler, "--device", "cpu", *extra]
    with pytest.raises(SystemExit, match=message) as info:
        main(argv)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=message.removeprefix("^error: ")):
        evaluate(tiny_model_dir, sampler, steps=int(extra[1]) if extra[0] == "--steps" else None,
                 spacing=extra[1] if extra[0] == "--timestep-spacing" else None)


def test_evaluate_refuses_models_the_classifier_cannot_score(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="1×28×28"):
        evaluate(tiny_model_dir, classifier_path=CLASSIFIER, train=IMAGES)
