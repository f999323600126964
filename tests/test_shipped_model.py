"""The shipped default entry model_store/mnist: diffusion model, evaluator classifier and example digits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.classifier import load_classifier, predict
from service.data import load_images, load_labels, split_indices, to_model_range
from service.diffusion.checkpoint import load_model, sha256_file
from tests.conftest import REPO

ENTRY = REPO / "model_store" / "mnist"
MNIST = REPO.parent / "shared" / "data" / "mnist"
IMAGES, LABELS = MNIST / "t10k-images-idx3-ubyte.gz", MNIST / "t10k-labels-idx1-ubyte.gz"
needs_mnist = pytest.mark.skipif(not IMAGES.is_file(), reason=f"MNIST digits not found at {MNIST}")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_entry_loads_and_its_hash_verifies() -> None:
    config = json.loads((ENTRY / "config.json").read_text())
    model = load_model(ENTRY)
    assert model.sha256 == config["weights"]["sha256"] == sha256_file(ENTRY / "model.safetensors")
    spec = model.spec
    assert (spec.channels, spec.image_size) == (1, 28)
    assert spec.beta_schedule == "linear" and spec.num_train_timesteps == 1000
    assert (ENTRY / "model.safetensors").stat().st_size <= 25 * 2**20


def test_sample_command_makes_digit_shaped_images(tmp_path: Path) -> None:
    from service.__main__ import main

    out = tmp_path / "x.npy"
    args = ["sample", "--model", str(ENTRY), "--num", "2", "--sampler", "ddim", "--steps", "5", "--device", "cpu"]
    assert main([*args, "--out", str(out)]) == 0
    x = np.load(out)
    assert x.shape == (2, 1, 28, 28) and x.dtype == np.float32
    assert np.isfinite(x).all() and x.min() >= -1.0 and x.max() <= 1.0
    assert x.std() > 0.1  # not a constant image


def test_classifier_is_small_safetensors_with_its_training_record() -> None:
    path = ENTRY / "classifier.safetensors"
    assert path.stat().st_size < 1_000_000
    clf = load_classifier(path)
    info = clf.info
    assert info["holdout"] == 1000 and info["split_seed"] == 0 and info["train_images"] == 9000
    assert info["heldout_accuracy"] >= 0.98
    assert info["parameters"] == sum(p.numel() for p in clf.model.parameters())


@needs_mnist
def test_classifier_accuracy_reproduces_on_the_held_out_digits() -> None:
    clf = load_classifier(ENTRY / "classifier.safetensors")
    images, labels = to_model_range(load_images(IMAGES)), load_labels(LABELS)
    _, held = split_indices(len(images), clf.info["holdout"], clf.info["split_seed"])
    _, probs = predict(clf.model, images[held])
    accuracy = float((probs.argmax(1) == labels[held]).double().mean())
    assert accuracy == pytest.approx(clf.info["heldout_accuracy"], abs=1e-4)


def _examples() -> list[np.ndarray]:
    files = sorted((ENTRY / "examples").glob("*.png"))
    assert [f.name for f in files] == [f"digit{d}.png" for d in range(10)]
    out = []
    for f in files:
        img = Image.open(f)
        assert img.size == (28, 28) and img.mode == "L" and "CC BY-SA 3.0" in img.text["Copyright"]
        out.append(np.asarray(img))
    return out


def test_example_digits_are_classified_as_their_names() -> None:
    x = torch.from_numpy(np.stack(_examples()))[:, None]
    _, probs = predict(load_classifier(ENTRY / "classifier.safetensors").model, to_model_range(x))
    assert probs.argmax(1).tolist() == list(range(10))


@needs_mnist
def test_example_digits_come_from_the_held_out_split() -> None:
    images = load_images(IMAGES)[:, 0].numpy().reshape(len(load_labels(LABELS)), -1)
    _, held = split_indices(len(images), 1000, 0)
    labels = load_labels(LABELS)
    for d, example in enumerate(_examples()):
        matches = np.flatnonzero((images == example.reshape(1, -1)).all(axis=1))
        assert len(matches) >= 1 and set(matches.tolist()) <= set(held.tolist()), (d, matches)
        assert labels[matches[0]] == d


@needs_mnist
def test_guidance_classifier_loads_and_its_accuracy_by_t_reproduces_on_test_digits() -> None:
    """The shipped noise-aware classifier verifies its hash, fits the model, recommends a scale, and on 2,000 test
    digits noised by q(x_t | x_0) its accuracy at t = 0 and 250 is what its record says (±2 points: other draws)."""
    from service.diffusion.guidance import load_guidance_classifier

    model = load_model(ENTRY)
    clf = load_guidance_classifier(ENTRY, spec=model.spec)
    assert clf is not None and model.guidance is not None
    assert clf.recommended_guidance_scale == 5.0 and "training split" in clf.info["training"]["split"]
    images, labels = to_model_range(load_images(IMAGES))[:2000], load_labels(LABELS)[:2000]
    g = torch.Generator().manual_seed(0)
    for t in (0, 250):
        abar = model.schedule.alphas_cumprod[t].double()
        x_t = (abar.sqrt() * images + (1 - abar).sqrt() * torch.randn(images.shape, generator=g)).float()
        with torch.no_grad():
            pred = clf(x_t, torch.full((len(x_t),), t)).argmax(1)
        accuracy = float((pred == labels).double().mean())
        assert accuracy == pytest.approx(clf.info["accuracy_by_t"][str(t)], abs=0.02), t
