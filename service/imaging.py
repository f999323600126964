"""Tensors in [-1, 1] ↔ PNG bytes, image grids and ``.npy`` bytes."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

__all__ = ["grid", "npy_bytes", "png_bytes", "to_uint8"]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) or (C, H, W) floats in [-1, 1] → uint8 array of the same shape (clipped)."""
    x = images.detach().float().cpu().clamp(-1, 1)
    return ((x + 1.0) * 127.5).round().to(torch.uint8).numpy()


def grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> torch.Tensor:
    """Tile (N, C, H, W) into one (C, H', W') image with ``pad`` pixels of -1 (black) between tiles."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    out = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), -1.0, dtype=torch.float32)
    for i, img in enumerate(images.detach().float().cpu()):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        out[:, y : y + h, x : x + w] = img
    return out


def png_bytes(image: torch.Tensor, scale: int = 1) -> bytes:
    """One (C, H, W) image in [-1, 1] (C = 1 or 3) as PNG bytes, optionally upscaled (nearest)."""
    arr = to_uint8(image)
    pil = Image.fromarray(arr[0], "L") if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0), "RGB")
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def npy_bytes(array: torch.Tensor | np.ndarray) -> bytes:
    """A float32 array as ``.npy`` file bytes."""
    arr = array.detach().cpu().float().numpy() if isinstance(array, torch.Tensor) else np.asarray(array, np.float32)
    buf = io.BytesIO()
    np.save(buf, arr.astype(np.float32), allow_pickle=False)
    return buf.getvalue()
