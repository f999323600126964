"""Offline sample-quality evaluation with the project's own digit classifier (no download needed).

For N generated images and for the reference digits — a split neither the diffusion model nor the classifier
was trained on (MNIST's test split for a model trained on the training split) — it computes

* FLD — the Fréchet distance between Gaussians fitted to the classifier's penultimate features,
  d² = ‖μ_g − μ_r‖² + Tr(Σ_g + Σ_r − 2(Σ_g Σ_r)^{1/2}) (Dowson & Landau 1982; FID, Heusel et al.
  2017, eq. 6, with our classifier in place of Inception-v3);
* the mean classifier confidence, mean over images of max_k softmax_k (sharp digits → near 1);
* the share of each predicted digit (mode dropping shows as a small minimum share).

The *floor* is the same numbers for N real training digits against the reference: what a
perfect generator would score with the same N (FLD is biased upwards at small N, so compare
generated and floor at equal N).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from service.classifier import DigitClassifier, LoadedClassifier, load_classifier, predict
from service.data import load_images, load_labels, split_indices, to_model_range

if TYPE_CHECKING:
    from service.diffusion.checkpoint import DiffusionModel
    from service.diffusion.samplers import Spacing

__all__ = [
    "Evaluator",
    "SetScore",
    "evaluate",
    "feature_stats",
    "format_table",
    "frechet_distance",
    "nearest_neighbour_distances",
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
    """Scores of one image set against the reference statistics."""

    n: int  # images in the set
    fld: float  # Fréchet distance of its classifier features to the reference digits'
    confidence: float  # mean max-softmax probability
    shares: list[float]  # share of images predicted as each digit 0-9
    accuracy: float | None = None  # classifier accuracy, for real sets with labels
    novelty: float | None = None  # NN distance to the training set, relative to that of unseen real digits

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


def _mnist_test_split(train: Path) -> Path | None:
    """MNIST naming: ``train-images-idx3-ubyte[.gz]`` sits beside the test split ``t10k-images-idx3-ubyte[.gz]``."""
    candidate = train.with_name(train.name.replace("train-images", "t10k-images"))
    return candidate if candidate != train and candidate.is_file() else None


def nearest_neighbour_distances(images: torch.Tensor, pool: torch.Tensor, chunk: int = 500) -> torch.Tensor:
    """Euclidean pixel distance of each image (N, …) to its nearest neighbour in ``pool`` (M, …), float64 (N,)."""
    a, b = images.flatten(1).double(), pool.flatten(1).double()
    b2 = (b * b).sum(1)
    out = []
    for part in a.split(chunk):
        d2 = (part * part).sum(1, keepdim=True) + b2[None] - 2 * part @ b.T  # ‖a − b‖² = ‖a‖² + ‖b‖² − 2 a·b
        out.append(d2.min(1).values.clamp(min=0).sqrt())
    return torch.cat(out)


@dataclass
class Evaluator:
    """The classifier, the evaluation set's feature statistics, and the training images (floor and novelty).

    The protocol: the reference is a split the diffusion model never saw (MNIST's 10,000 test digits for
    models trained on the 60,000 training digits); the floor is N real *training* digits scored against it;
    novelty is the median nearest-neighbour distance of samples to the training images over that of N
    reference digits to the training images (≈ 1: as novel as unseen digits; well below 1: copying).
    """

    classifier: LoadedClassifier
    reference_images: torch.Tensor  # (R, 1, H, W) in [-1, 1]
    reference_labels: torch.Tensor | None
    train_images: torch.Tensor  # (M, 1, H, W) in [-1, 1]: what the model was trained on
    train_labels: torch.Tensor | None
    info: dict  # sources and splits, for the report
    reference: tuple[np.ndarray, np.ndarray] = field(init=False)
    _reference_nn: dict = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        feats, probs = predict(self.classifier.model, self.reference_images)
        self.reference = feature_stats(feats.numpy())
        acc = None
        if self.reference_labels is not None:
            acc = float((probs.argmax(1) == self.reference_labels).double().mean())
        self.info = {**self.info, "reference_n": len(self.reference_images), "classifier_accuracy": acc}

    @classmethod
    def for_model(
        cls,
        model: DiffusionModel,
        model_path: str | Path,
        classifier_path: str | Path | None = None,
        reference: str | Path | None = None,
        reference_labels: str | Path | None = None,
        train: str | Path | None = None,
        train_labels: str | Path | None = None,
    ) -> Evaluator:
        """The model's evaluation protocol, from its config (overridable).

        Training images: ``train`` or the source recorded in the model's config, less its held-out split.
        Reference: ``reference``, else ``extra.evaluation.reference`` of the config, else the held-out split of
        the training source when training kept one (the protocol of models trained on part of a split), else
        the MNIST test split beside an MNIST training file.
        """
        clf = load_classifier(classifier_path or Path(model_path) / CLASSIFIER_FILE)
        size = clf.model.cfg.image_size
        if (model.spec.channels, model.spec.image_size) != (1, size):
            raise ValueError(
                f"the digit classifier scores 1×{size}×{size} images; this model makes "
                f"{model.spec.channels}×{model.spec.image_size}×{model.spec.image_size}"
            )
        extra = model.spec.extra
        training = extra.get("training", {})
        source = train if train is not None else extra.get("data", {}).get("source")
        if source is None:
            raise ValueError("no training data given and the model config records no training data source")
        source = Path(source)
        holdout = int(training.get("holdout", 0)) if train is None else 0
        split_seed = int(training.get("split_seed", 0))

        def load(images: Path, labels: Path | None) -> tuple[torch.Tensor, torch.Tensor | None]:
            x = to_model_range(load_images(images, channels=1, size=size))
            y = load_labels(labels) if labels is not None else None
            if y is not None and len(y) != len(x):
                raise ValueError(f"{labels}: {len(y)} labels for {len(x)} images")
            return x, y

        x, y = load(source, Path(train_labels) if train_labels else _default_labels(source))
        train_idx, held_idx = split_indices(len(x), holdout, split_seed)
        ref_path = reference or extra.get("evaluation", {}).get("reference")
        if ref_path is None and holdout == 0:
            ref_path = _mnist_test_split(source)
        if ref_path is not None:
            ref_path = Path(ref_path)
            labels = reference_labels or extra.get("evaluation", {}).get("reference_labels")
            ref_x, ref_y = load(ref_path, Path(labels) if labels else _default_labels(ref_path))
            ref_desc = str(ref_path)
        elif holdout > 0:
            ref_x, ref_y = x[held_idx], None if y is None else y[held_idx]
            ref_desc = f"{source}: {holdout} held out by training (split seed {split_seed})"
        else:
            raise ValueError("no reference set: pass one, or record extra.evaluation.reference in the config")
        info = {"classifier": str(classifier_path or Path(model_path) / CLASSIFIER_FILE),
                "classifier_sha256": clf.sha256, "train": f"{source} ({len(train_idx)} images)", "reference": ref_desc}
        return cls(clf, ref_x, ref_y, x[train_idx], None if y is None else y[train_idx], info)

    def score(self, images: torch.Tensor, labels: torch.Tensor | None = None, novelty: bool = True) -> SetScore:
        """FLD, confidence and digit shares of ``images`` (N, 1, H, W) in [-1, 1] against the reference, and novelty."""
        result = score_images(self.classifier.model, images, self.reference, labels)
        if novelty:
            result.novelty = self.novelty(images)
        return result

    def floor(self, n: int, seed: int = 0) -> SetScore:
        """The same scores for ``n`` real training digits (seeded choice): what a perfect generator would get."""
        pick = torch.randperm(len(self.train_images), generator=torch.Generator().manual_seed(seed))[:n]
        labels = None if self.train_labels is None else self.train_labels[pick]
        return self.score(self.train_images[pick], labels, novelty=False)

    def novelty(self, images: torch.Tensor) -> float:
        """median NN distance(samples → training images) / median NN distance(N reference digits → training images)."""
        n = min(len(images), len(self.reference_images))
        if n not in self._reference_nn:
            pick = torch.randperm(len(self.reference_images), generator=torch.Generator().manual_seed(0))[:n]
            self._reference_nn[n] = nearest_neighbour_distances(self.reference_images[pick], self.train_images)
        generated = nearest_neighbour_distances(images, self.train_images)
        return float(generated.median() / self._reference_nn[n].median())

    def describe(self) -> dict:
        return dict(self.info)


def evaluate(
    model_path: str | Path,
    sampler: str = "ddim",
    steps: int | None = None,
    num: int = 1000,
    eta: float = 0.0,
    batch: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    reference: str | Path | None = None,
    reference_labels: str | Path | None = None,
    classifier_path: str | Path | None = None,
    train: str | Path | None = None,
    train_labels: str | Path | None = None,
    device: str = "cpu",
    progress: Callable[[int, str], Callable[[int], None]] | None = None,
    spacing: Spacing | None = None,
    compiled: str = "auto",
) -> dict:
    """Generate ``num`` samples from the model at ``model_path``; score them and the real-data floor.

    ``steps`` defaults to the sampler's default for the model, ``spacing`` to the model's spacing for
    the sampler; a combination the sampler cannot run raises ValueError before anything is computed.
    The evaluation set, training images and classifier follow :meth:`Evaluator.for_model`.
    ``progress(total_steps, description)``, if given, is called once before sampling and returns the
    per-step callback. ``compiled``: ``auto`` uses the model's compiled UNet when valid. Returns a JSON-ready report.
    """
    from service.diffusion.checkpoint import load_model
    from service.diffusion.pipeline import default_steps, prepare_unet, sample
    from service.diffusion.runner import UNetRunner
    from service.diffusion.samplers import get_sampler

    model = load_model(model_path, device)
    steps = default_steps(model, sampler) if steps is None else steps
    spacing = spacing or model.spec.default_spacing(sampler)
    get_sampler(sampler).check(model.spec.num_train_timesteps, steps, spacing)
    ev = Evaluator.for_model(model, model_path, classifier_path, reference, reference_labels, train, train_labels)
    floor = ev.floor(num, seed)

    prepare_unet(model, dtype)
    batch = batch or num
    forward = UNetRunner(model, dtype, compiled)  # type: ignore[arg-type]
    forward.prepare(batch)
    t0 = time.perf_counter()
    step_done = progress(steps * -(-num // batch), f"{sampler}-{steps}") if progress else None
    images = sample(model, num, seed, sampler, steps, eta, None, batch, dtype, device, step_done, spacing,  # type: ignore[arg-type]
                    forward)
    seconds = time.perf_counter() - t0
    generated = ev.score(images)

    return {
        "model": str(model_path),
        "model_sha256": model.sha256,
        "sampler": sampler,
        "steps": steps,
        "spacing": spacing,
        "eta": eta,
        "dtype": str(dtype).removeprefix("torch."),
        "compiled": forward.compiled,
        "seed": seed,
        "num": num,
        "evaluation": ev.describe(),
        "floor": floor.to_dict(),
        "generated": generated.to_dict(),
        "fld_ratio": generated.fld / floor.fld if floor.fld > 0 else float("inf"),
        "sample_seconds": round(seconds, 2),
        "images_per_second": round(num / seconds, 3),
    }


def format_table(report: dict) -> str:
    """A plain-text table of the floor and generated rows of an :func:`evaluate` report."""
    name = f"{report['sampler']}-{report['steps']}" + (f" eta={report['eta']:g}" if report["eta"] else "")
    head = f"{'set':<28}{'N':>6}{'FLD':>9}{'conf':>7}{'min%':>7}{'max%':>7}{'novel':>7}   share of each digit 0-9 (%)"
    lines = [head, "-" * len(head)]
    for label, row in (("floor: real training digits", report["floor"]), (f"generated: {name}", report["generated"])):
        shares = " ".join(f"{100 * s:4.1f}" for s in row["shares"])
        novelty = "" if row.get("novelty") is None else f"{row['novelty']:.2f}"
        lines.append(
            f"{label:<28}{row['n']:>6}{row['fld']:>9.3f}{row['confidence']:>7.3f}"
            f"{100 * row['min_share']:>7.1f}{100 * row['max_share']:>7.1f}{novelty:>7}   {shares}"
        )
    ev = report["evaluation"]
    acc = "" if ev["classifier_accuracy"] is None else f"; classifier accuracy on it {ev['classifier_accuracy']:.4f}"
    lines.append(f"reference: {ev['reference']} ({ev['reference_n']} digits){acc}")
    lines.append(f"training images (floor, novelty): {ev['train']}")
    lines.append(
        f"FLD ratio generated/floor {report['fld_ratio']:.2f}; sampling {report['sample_seconds']:.1f} s "
        f"({report['images_per_second']:.2f} images/s, {report['dtype']}, {report['spacing']} timesteps)"
    )
    return "\n".join(lines)


def write_json(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
