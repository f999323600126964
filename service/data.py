"""Training images: MNIST IDX files (gz or raw), a folder of images, or an .npz, as uint8 (N, C, H, W).

The held-out split is a seeded permutation shared by training and evaluation, so the evaluator's
"real" reference set is never seen by the model.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["load_images", "load_labels", "split_indices", "to_model_range"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_idx(path: Path) -> np.ndarray:
    """IDX format (LeCun): big-endian magic (dtype code, ndim), dims, then row-major data."""
    with _open(path) as f:
        zero, dtype_code, ndim = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"{path}: not an unsigned-byte IDX file")
        dims = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {np.prod(dims)} values, found {data.size}")
    return data.reshape(dims)


def _fit(img: Image.Image, channels: int, size: int) -> np.ndarray:
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def load_images(path: str | Path, channels: int = 1, size: int = 28) -> torch.Tensor:
    """uint8 tensor (N, C, size, size) from an IDX file, an image folder or an .npz (first array)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"no images found under {path}")
        arrays = [_fit(Image.open(p), channels, size) for p in files]
        return torch.from_numpy(np.stack(arrays))
    if path.suffix == ".npz":
        with np.load(path) as npz:
            key = "images" if "images" in npz.files else npz.files[0]
            raw = npz[key]
    else:
        raw = _read_idx(path)
    if raw.ndim == 3:  # (N, H, W) grey
        raw = raw[:, None]
    elif raw.ndim == 4 and raw.shape[-1] in (1, 3):  # (N, H, W, C)
        raw = raw.transpose(0, 3, 1, 2)
    if raw.dtype != np.uint8:
        raise ValueError(f"{path}: expected uint8 pixels, got {raw.dtype}")
    if raw.shape[1] != channels or raw.shape[2:] != (size, size):
        mode = "L" if raw.shape[1] == 1 else "RGB"
        arrays = [_fit(Image.fromarray(a[0] if mode == "L" else a.transpose(1, 2, 0)), channels, size) for a in raw]
        raw = np.stack(arrays)
    return torch.from_numpy(np.array(raw, dtype=np.uint8, copy=True))


def load_labels(path: str | Path) -> torch.Tensor:
    """int64 labels (N,) from an IDX label file."""
    return torch.from_numpy(_read_idx(Path(path)).astype(np.int64))


def split_indices(n: int, holdout: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held_out) index tensors from a seeded permutation of range(n)."""
    if not 0 <= holdout < n:
        raise ValueError(f"holdout must be in 0..{n - 1}, got {holdout}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[holdout:].sort().values, perm[:holdout].sort().values


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float32 [-1, 1]."""
    return images.float() / 127.5 - 1.0
