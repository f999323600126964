"""The shipped default entry model_store/mnist: diffusion model, evaluator classifier and example digits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.classifier import load_classifier, predict
from service.data import load_images, load_labels, to_model_range
from service.diffusion.checkpoint import load_model, sha256_file
from tests.conftest import REPO

ENTRY = REPO / "model_store" / "mnist"
MNIST = REPO.parent / "shared" / "data" / "mnist"
IMAGES, LABELS = MNIST / "t10k-images-idx3-ubyte.gz", MNIST / "t10k-labels-idx1-ubyte.gz"  # the test split
TRAIN_IMAGES = MNIST / "train-images-idx3-ubyte.gz"
needs_mnist = pytest.mark.skipif(not (IMAGES.is_file() and TRAIN_IMAGES.is_file()),
                                 reason=f"MNIST training and test splits not found at {MNIST}")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_entry_loads_and_its_hash_verifies() -> None:
    config = json.loads((ENTRY / "config.json").read_text())
    model = load_model(ENTRY)
    assert model.sha256 == config["weights"]["sha256"] == sha256_file(ENTRY / "model.safetensors")
    spec = model.spec
    assert (spec.channels, spec.image_size) == (1, 28)
    assert spec.beta_schedule == "linear" and spec.num_train_timesteps == 1000
    assert (ENTRY / "model.safetensors").stat().st_size <= 25 * 2**20


def test_entry_says_which_split_trained_and_which_evaluates() -> None:
    """Trained from scratch on the 60,000 training digits only (nothing held out); evaluated on the test split."""
    extra = json.loads((ENTRY / "config.json").read_text())["extra"]
    assert extra["data"]["source"].endswith("train-images-idx3-ubyte.gz") and extra["data"]["train"] == 60000
    assert extra["training"]["holdout"] == 0 and "init" not in extra["training"]
    assert extra["evaluation"]["reference"].endswith("t10k-images-idx3-ubyte.gz")


@needs_mnist
def test_evaluator_scores_against_the_test_split_and_floors_with_training_digits() -> None:
    """The evaluator's protocol for the shipped entry: reference = the 10,000 test digits, training images (floor,
    novelty) = the 60,000 training digits, which share no image with the reference."""
    from service.evaluate import Evaluator

    ev = Evaluator.for_model(load_model(ENTRY), ENTRY)
    assert "t10k-images" in ev.describe()["reference"] and "train-images" in ev.describe()["train"]
    assert (len(ev.reference_images), len(ev.train_images)) == (10000, 60000)
    np.testing.assert_array_equal(ev.reference_images.numpy(), to_model_range(load_images(IMAGES)).numpy())
    assert ev.floor(200).fld < ev.score(torch.zeros(200, 1, 28, 28)).fld


def test_sample_command_makes_digit_shaped_images(tmp_path: Path) -> None:
    from service.__main__ import main

    out = tmp_path / "x.npy"
    args = ["sample", "--model", str(ENTRY), "--num", "2", "--sampler", "ddim", "--steps", "5", "--device", "cpu"]
    assert main([*args, "--out", str(out)]) == 0
    x = np.load(out)
    assert x.shape == (2, 1, 28, 28) and x.dtype == np.float32
    assert np.isfinite(x).all() and x.min() >= -1.0 and x.max() <= 1.0
    assert x.std() > 0.1  # not a constant image


def test_samples_are_read_as_digits_with_high_confidence(tmp_path: Path) -> None:
    """32 UniPC-10 samples through the CLI: the evaluator's classifier reads them as digits (mean top-class
    probability ≥ 0.9; the model card's N = 2000 figure is ≥ 0.97), and not all as one digit."""
    from service.__main__ import main

    out = tmp_path / "x.npy"
    args = ["sample", "--model", str(ENTRY), "--num", "32", "--sampler", "unipc", "--steps", "10", "--seed", "0"]
    assert main([*args, "--device", "cpu", "--dtype", "float32", "--out", str(out)]) == 0
    _, probs = predict(load_classifier(ENTRY / "classifier.safetensors").model, torch.from_numpy(np.load(out)))
    assert float(probs.max(1).values.mean()) >= 0.9
    assert len(set(probs.argmax(1).tolist())) >= 5


def test_classifier_is_small_safetensors_with_its_training_record() -> None:
    path = ENTRY / "classifier.safetensors"
    assert path.stat().st_size < 1_000_000
    clf = load_classifier(path)
    info = clf.info
    assert info["data"].endswith("train-images-idx3-ubyte.gz") and info["train_images"] == 60000
    assert info["holdout"] == 0 and info["test_data"].endswith("t10k-images-idx3-ubyte.gz")
    assert info["test_accuracy"] >= 0.99
    assert info["parameters"] == sum(p.numel() for p in clf.model.parameters())


@needs_mnist
def test_classifier_accuracy_reproduces_on_the_test_split() -> None:
    clf = load_classifier(ENTRY / "classifier.safetensors")
    _, probs = predict(clf.model, to_model_range(load_images(IMAGES)))
    accuracy = float((probs.argmax(1) == load_labels(LABELS)).double().mean())
    assert accuracy == pytest.approx(clf.info["test_accuracy"], abs=1e-4)


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
def test_example_digits_come_from_the_test_split_and_are_no_training_digit() -> None:
    test = load_images(IMAGES)[:, 0].numpy().reshape(10000, -1)
    train = load_images(TRAIN_IMAGES)[:, 0].numpy().reshape(60000, -1)
    labels = load_labels(LABELS)
    for d, example in enumerate(_examples()):
        matches = np.flatnonzero((test == example.reshape(1, -1)).all(axis=1))
        assert len(matches) >= 1 and labels[matches[0]] == d, (d, matches)
        assert not (train == example.reshape(1, -1)).all(axis=1).any(), d


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
