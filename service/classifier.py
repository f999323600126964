"""A small digit classifier whose penultimate features drive the offline evaluator (an FID analogue).

FID (Heusel et al. 2017) compares Inception-v3 pool features; no such network can be downloaded
here, so the project trains its own LeNet-style CNN on the *training* part of the MNIST split
(never on the held-out digits the evaluator compares against) and ships it as safetensors with its
architecture and training record in the file's metadata.

Inputs are (N, 1, 28, 28) floats in [-1, 1], the diffusion models' value range.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from service.diffusion.checkpoint import sha256_file

__all__ = [
    "ClassifierConfig",
    "DigitClassifier",
    "LoadedClassifier",
    "accuracy",
    "fit_and_save",
    "load_classifier",
    "predict",
    "save_classifier",
    "train_classifier",
]

FORMAT = "ddpm-service-classifier/1"


@dataclass
class ClassifierConfig:
    image_size: int = 28  # H = W of the inputs
    channels: tuple[int, ...] = (16, 32, 64)  # conv widths; each level is conv3×3 + ReLU + 2×2 max-pool
    feature_dim: int = 128  # penultimate (feature) width
    num_classes: int = 10  # digits 0-9
    dropout: float = 0.3  # dropout on the features while training

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)


class DigitClassifier(nn.Module):
    """conv-ReLU-pool ×3 → linear-ReLU (features) → linear (logits)."""

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        c_in, size = 1, cfg.image_size
        for c in cfg.channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c_in, size = c, size // 2
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in * size * size, cfg.feature_dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, feature_dim) of images (N, 1, H, W) in [-1, 1]."""
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))


@dataclass
class LoadedClassifier:
    model: DigitClassifier  # eval mode, no gradients
    sha256: str  # of the safetensors file
    info: dict  # training record from the file's metadata


def save_classifier(model: DigitClassifier, path: str | Path, info: dict | None = None) -> Path:
    """Weights as safetensors; the config and ``info`` go into the header metadata as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "config": json.dumps(asdict(model.cfg)), "info": json.dumps(info or {})}
    save_file(state, str(path), metadata=meta)
    return path


def load_classifier(path: str | Path) -> LoadedClassifier:
    """Load a classifier written by :func:`save_classifier` (safetensors only, no pickle)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier {path} not found (train one with `python -m service train-classifier`)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a digit classifier (format {meta.get('format')!r}, expected {FORMAT!r})")
    model = DigitClassifier(ClassifierConfig(**json.loads(meta["config"])))
    model.load_state_dict(load_file(str(path)), strict=True)
    model.eval().requires_grad_(False)
    return LoadedClassifier(model, sha256_file(path), json.loads(meta.get("info", "{}")))


@torch.no_grad()
def predict(model: DigitClassifier, images: torch.Tensor, batch: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float64, class probabilities (N, K) float64) of images in [-1, 1], in eval mode."""
    model.eval()
    feats, probs = [], []
    for chunk in images.float().split(batch):
        f = model.features(chunk)
        feats.append(f.double())
        probs.append(torch.softmax(model.head(f).double(), dim=1))
    return torch.cat(feats), torch.cat(probs)


def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images whose arg-max class equals the label."""
    _, probs = predict(model, images)
    return float((probs.argmax(1) == labels).double().mean())


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (pad with background -1, then crop), per image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, 1, h, w + 2 * max_shift)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, 1, h, w)
    return out.gather(3, cols)


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: ClassifierConfig | None = None,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 2e-3,
    max_shift: int = 2,
    seed: int = 0,
    log=print,
) -> DigitClassifier:
    """Adam with a cosine learning-rate decay and random ±``max_shift`` px translations; seeded."""
    cfg = cfg or ClassifierConfig(image_size=images.shape[-1])
    torch.manual_seed(seed)
    model = DigitClassifier(cfg).train()
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = -(-len(images) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(len(images), generator=gen)
        total, correct = 0.0, 0
        for idx in perm.split(batch_size):
            x = _shift(images[idx].float(), gen, max_shift) if max_shift else images[idx].float()
            logits = model(x)
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            correct += int((logits.argmax(1) == labels[idx]).sum())
        log(
            f"epoch {epoch + 1}/{epochs} loss {total / len(images):.4f} "
            f"train acc {correct / len(images):.4f} ({time.perf_counter() - t0:.0f} s)"
        )
    return model.eval()


def fit_and_save(
    data: str | Path,
    labels: str | Path,
    out: str | Path,
    test_data: str | Path | None = None,
    test_labels: str | Path | None = None,
    holdout: int = 0,
    split_seed: int = 0,
    epochs: int = 20,
    seed: int = 0,
    log=print,
) -> dict:
    """Train on ``data`` (less a seeded ``holdout``, see ``split_indices``), report test accuracy, save.

    The standard protocol: train on a training split (e.g. MNIST's 60,000 digits) and report accuracy on
    the untouched test split (``test_data``/``test_labels``, MNIST's 10,000), which is also what the
    evaluator compares samples against. Without a test split the held-out part of ``data`` is scored.
    Returns the training record stored in the file's metadata.
    """
    from service.data import load_images, load_labels, split_indices, to_model_range

    def load(images_path: str | Path, labels_path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = to_model_range(load_images(images_path, channels=1, size=28)), load_labels(labels_path)
        if len(y) != len(x):
            raise ValueError(f"{labels_path}: {len(y)} labels for {len(x)} images")
        return x, y

    images, y = load(data, labels)
    train_idx, held_idx = split_indices(len(images), holdout, split_seed)
    if test_data is not None:
        if test_labels is None:
            raise ValueError("test_data needs test_labels")
        test_x, test_y = load(test_data, test_labels)
    elif holdout:
        test_x, test_y = images[held_idx], y[held_idx]
    else:
        raise ValueError("no test split: give test_data/test_labels or a holdout")
    t0 = time.perf_counter()
    model = train_classifier(images[train_idx], y[train_idx], epochs=epochs, seed=seed, log=log)
    info = {
        "data": str(data),
        "labels": str(labels),
        "train_images": len(train_idx),
        "holdout": holdout,
        "split_seed": split_seed,
        "test_data": str(test_data) if test_data is not None else f"held-out {holdout} of data",
        "test_images": len(test_x),
        "epochs": epochs,
        "seed": seed,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "train_accuracy": round(accuracy(model, images[train_idx], y[train_idx]), 4),
        "test_accuracy": round(accuracy(model, test_x, test_y), 4),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    save_classifier(model, out, info)
    log(f"test accuracy {info['test_accuracy']:.4f} on {len(test_x)} digits; wrote {out}")
    return info
