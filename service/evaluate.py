"""Offline sample-quality evaluation with the project's own digit classifier (no download needed).

For N generated images and for the held-out real digits (which neither the diffusion model nor the
classifier was trained on) it computes

* FLD — the Fréchet distance between Gaussians fitted to the classifier's penultimate features,
  d² = ‖μ_g − μ_r‖² + Tr(Σ_g + Σ_r − 2(Σ_g Σ_r)^{1/2}) (Dowson & Landau 1982; FID, Heusel et al.
  2017, eq. 6, with our classifier in place of Inception-v3);
* the mean classifier confidence, mean over images of max_k softmax_k (sharp digits → near 1);
* the share of each predicted digit (mode dropping shows as a small minimum share).

The *floor* is the same numbers for N real training digits against the held-out digits: what a
perfect generator would score with the same N (FLD is biased upwards at small N, so compare
generated and floor at equal N).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from service.classifier import DigitClassifier, load_classifier, predict
from service.data import load_images, load_labels, split_indices, to_model_range

__all__ = [
    "SetScore",
    "evaluate",
    "feature_stats",
    "format_table",
    "frechet_distance",
    "score_images",
    "write_json",
]

CLASSIFIER_FILE = "classifier.safetensors"


def feature_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) in float64 of features (N, D), N ≥ 2."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Principal square root of a symmetric positive semi-definite matrix by eigendecomposition."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(μ₁, Σ₁) and N(μ₂, Σ₂), in float64.

    Tr((Σ₁Σ₂)^{1/2}) = Tr((Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2}): the right-hand matrix is symmetric PSD, so
    both roots come from ``eigh`` (no scipy, no complex parts from round-off).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: μ {mu1.shape} vs {mu2.shape}, Σ {cov1.shape} vs {cov2.shape}")
    root1 = _sqrtm_psd(cov1)
    middle = root1 @ cov2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    d2 = float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_covmean)
    return max(d2, 0.0)  # ≥ 0 mathematically; round-off can leave -1e-12


@dataclass
class SetScore:
    """Scores of one image set against the held-out reference statistics."""

    n: int  # images in the set
    fld: float  # Fréchet distance of its classifier features to the held-out digits'
    confidence: float  # mean max-softmax probability
    shares: list[float]  # share of images predicted as each digit 0-9
    accuracy: float | None = None  # classifier accuracy, for real sets with labels

    @property
    def min_share(self) -> float:
        return min(self.shares)

    @property
    def max_share(self) -> float:
        return max(self.shares)

    def to_dict(self) -> dict:
        return {**asdict(self), "min_share": self.min_share, "max_share": self.max_share}


def score_images(
    classifier: DigitClassifier,
    images: torch.Tensor,
    reference: tuple[np.ndarray, np.ndarray],
    labels: torch.Tensor | None = None,
) -> SetScore:
    """FLD against ``reference`` (μ, Σ), mean confidence and predicted-digit shares of images in [-1, 1]."""
    feats, probs = predict(classifier, images)
    pred = probs.argmax(1)
    shares = torch.bincount(pred, minlength=probs.shape[1]).double() / len(pred)
    return SetScore(
        n=len(images),
        fld=frechet_distance(*feature_stats(feats.numpy()), *reference),
        confidence=float(probs.max(1).values.mean()),
        shares=[round(float(s), 6) for s in shares],
        accuracy=None if labels is None else float((pred == labels).double().mean()),
    )


def _default_labels(data: Path) -> Path | None:
    """MNIST naming: ``*-images-idx3-ubyte[.gz]`` sits beside ``*-labels-idx1-ubyte[.gz]``."""
    candidate = data.with_name(data.name.replace("images-idx3", "labels-idx1"))
    return candidate if candidate != data and candidate.is_file() else None


def evaluate(
    model_path: str | Path,
    sampler: str = "ddim",
    steps: int | None = None,
    num: int = 1000,
    eta: float = 0.0,
    batch: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    data: str | Path | None = None,
    labels: str | Path | None = None,
    classifier_path: str | Path | None = None,
    holdout: int | None = None,
    split_seed: int | None = None,
    device: str = "cpu",
    progress: Callable[[int, str], Callable[[int], None]] | None = None,
) -> dict:
    """Generate ``num`` samples from the model at ``model_path`` and score them and the real-data floor.

    ``data`` defaults to the training source recorded in the model's config, the held-out split to
    the one its training used (``holdout``, ``split_seed``), the classifier to
    ``<model>/classifier.safetensors``. ``progress(total_steps, description)``, if given, is called
    once before sampling and returns the per-step callback. Returns a JSON-ready report.
    """
    from service.diffusion.checkpoint import load_model
    from service.diffusion.pipeline import prepare_unet, sample

    model = load_model(model_path, device)
    clf = load_classifier(classifier_path or Path(model_path) / CLASSIFIER_FILE)
    size = clf.model.cfg.image_size
    if (model.spec.channels, model.spec.image_size) != (1, size):
        raise ValueError(
            f"the digit classifier scores 1×{size}×{size} images; this model makes "
            f"{model.spec.channels}×{model.spec.image_size}×{model.spec.image_size}"
        )
    training = model.spec.extra.get("training", {})
    if data is None:
        data = model.spec.extra.get("data", {}).get("source")
        if data is None:
            raise ValueError("no --data given and the model config records no training data source")
    data = Path(data)
    holdout = holdout if holdout is not None else int(training.get("holdout", 1000))
    split_seed = split_seed if split_seed is not None else int(training.get("split_seed", 0))
    labels = Path(labels) if labels is not None else _default_labels(data)

    real = to_model_range(load_images(data, channels=1, size=size))
    y = load_labels(labels) if labels is not None else None
    if y is not None and len(y) != len(real):
        raise ValueError(f"{labels}: {len(y)} labels for {len(real)} images")
    train_idx, held_idx = split_indices(len(real), holdout, split_seed)
    held_feats, held_probs = predict(clf.model, real[held_idx])
    reference = feature_stats(held_feats.numpy())

    # floor: N real training digits (seeded choice) against the held-out digits
    pick = train_idx[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed))[:num]]
    floor = score_images(clf.model, real[pick], reference, None if y is None else y[pick])

    steps = steps or (model.spec.num_train_timesteps if sampler == "ddpm" else 50)
    prepare_unet(model, dtype)
    t0 = time.perf_counter()
    batch = batch or num
    step_done = progress(steps * -(-num // batch), f"{sampler}-{steps}") if progress else None
    images = sample(model, num, seed, sampler, steps, eta, None, batch, dtype, device, step_done)  # type: ignore[arg-type]
    seconds = time.perf_counter() - t0
    generated = score_images(clf.model, images, reference)

    return {
        "model": str(model_path),
        "model_sha256": model.sha256,
        "classifier": str(classifier_path or Path(model_path) / CLASSIFIER_FILE),
        "classifier_sha256": clf.sha256,
        "sampler": sampler,
        "steps": steps,
        "eta": eta,
        "dtype": str(dtype).removeprefix("torch."),
        "seed": seed,
        "num": num,
        "data": str(data),
        "labels": None if labels is None else str(labels),
        "holdout": holdout,
        "split_seed": split_seed,
        "reference": {
            "n": len(held_idx),
            "accuracy": None if y is None else float((held_probs.argmax(1) == y[held_idx]).double().mean()),
        },
        "floor": floor.to_dict(),
        "generated": generated.to_dict(),
        "fld_ratio": generated.fld / floor.fld if floor.fld > 0 else float("inf"),
        "sample_seconds": round(seconds, 2),
        "images_per_second": round(num / seconds, 3),
    }


def format_table(report: dict) -> str:
    """A plain-text table of the floor and generated rows of an :func:`evaluate` report."""
    name = f"{report['sampler']}-{report['steps']}" + (f" eta={report['eta']:g}" if report["eta"] else "")
    head = f"{'set':<28}{'N':>6}{'FLD':>9}{'conf':>7}{'min%':>7}{'max%':>7}   share of each digit 0-9 (%)"
    lines = [head, "-" * len(head)]
    for label, row in (("floor: real training digits", report["floor"]), (f"generated: {name}", report["generated"])):
        shares = " ".join(f"{100 * s:4.1f}" for s in row["shares"])
        lines.append(
            f"{label:<28}{row['n']:>6}{row['fld']:>9.3f}{row['confidence']:>7.3f}"
            f"{100 * row['min_share']:>7.1f}{100 * row['max_share']:>7.1f}   {shares}"
        )
    ref = report["reference"]
    acc = "" if ref["accuracy"] is None else f"; classifier accuracy on them {ref['accuracy']:.4f}"
    lines.append(f"reference: {ref['n']} held-out digits (split seed {report['split_seed']}){acc}")
    lines.append(
        f"FLD ratio generated/floor {report['fld_ratio']:.2f}; sampling {report['sample_seconds']:.1f} s "
        f"({report['images_per_second']:.2f} images/s, {report['dtype']})"
    )
    return "\n".join(lines)


def write_json(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
