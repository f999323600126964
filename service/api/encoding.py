"""Untrusted bytes → tensors: base64 ``.npy`` arrays and uploaded PNG/JPEG images, validated strictly.

Every failure raises :class:`InputError` with a message meant for the client; the routes turn it
into 422 (arrays, base64) or 400 (undecodable images). Image headers are parsed and the pixel
count checked before any pixel data is decoded (decompression-bomb guard), and only the PNG and
JPEG decoders are enabled.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from service.imaging import npy_bytes, png_bytes

__all__ = [
    "IMAGE_MEDIA_TYPES",
    "InputError",
    "b64_npy",
    "b64_png",
    "decode_b64",
    "decode_image",
    "decode_image_field",
    "decode_mask_field",
    "decode_npy",
    "sniff_image_type",
]

IMAGE_MEDIA_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG"}
_FLOAT_KINDS = ("f",)


class InputError(ValueError):
    """Client input that cannot be used; ``str(err)`` is the message for the response."""


def b64_npy(array: torch.Tensor) -> str:
    """A tensor as base64 of float32 ``.npy`` bytes."""
    return base64.b64encode(npy_bytes(array)).decode("ascii")


def b64_png(image: torch.Tensor, scale: int = 1) -> str:
    """One (C, H, W) image in [-1, 1] as base64 PNG."""
    return base64.b64encode(png_bytes(image, scale)).decode("ascii")


def decode_b64(text: str, field: str) -> bytes:
    """Strict base64 (standard alphabet, padding required); a ``data:...;base64,`` prefix is accepted."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"{field}: not valid base64 ({exc})") from exc


def decode_npy(data: bytes, field: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """``.npy`` bytes of a float array of shape (C, H, W) or (1, C, H, W) → float32 (C, H, W), all finite.

    The header is checked (shape, dtype, no pickled objects) before the data is read.
    """
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            header_shape, _fortran, dtype = np.lib.format.read_array_header_1_0(buf)
        else:
            header_shape, _fortran, dtype = np.lib.format.read_array_header_2_0(buf)
    except (ValueError, OSError, SyntaxError, TypeError) as exc:
        raise InputError(f"{field}: not a valid .npy file ({exc})") from exc
    if dtype.kind not in _FLOAT_KINDS or dtype.itemsize not in (2, 4, 8):
        raise InputError(f"{field}: dtype must be float16, float32 or float64, got {dtype}")
    c, h, w = shape
    if tuple(header_shape) not in ((c, h, w), (1, c, h, w)):
        raise InputError(f"{field}: shape must be {(c, h, w)} or {(1, c, h, w)}, got {tuple(header_shape)}")
    buf.seek(0)
    try:
        arr = np.load(buf, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{field}: truncated or corrupt .npy data ({exc})") from exc
    arr = np.asarray(arr, dtype=np.float32).reshape(c, h, w)
    if not np.isfinite(arr).all():
        raise InputError(f"{field}: contains NaN or Inf")
    return torch.from_numpy(arr.copy())


def sniff_image_type(data: bytes) -> str | None:
    """``image/png`` or ``image/jpeg`` from the file's magic bytes, else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    return None


def decode_image(data: bytes, channels: int, size: int, max_pixels: int) -> torch.Tensor:
    """PNG/JPEG bytes → (C, H, W) float32 in [-1, 1] with the model's channels and size.

    Grey ↔ RGB conversion as Pillow's ``convert`` (ITU-R 601 luma); alpha is composited on black.
    Non-square images are centre-cropped, then resized with a Lanczos filter.
    """
    try:
        with Image.open(io.BytesIO(data), formats=list(IMAGE_MEDIA_TYPES.values())) as im:
            width, height = im.size  # from the header only: nothing decoded yet
            if width * height > max_pixels:
                raise InputError(f"image is {width}×{height} = {width * height} pixels; the limit is {max_pixels}")
            if width < 1 or height < 1:
                raise InputError("image has no pixels")
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                black = Image.new("RGBA", im.size, (0, 0, 0, 255))
                im = Image.alpha_composite(black, im)
            if im.mode.startswith("I;16") or im.mode in ("I", "F"):
                arr = np.asarray(im, dtype=np.float64)
                peak = 65535.0 if im.mode.startswith("I") and arr.max() > 255 else 255.0
                im = Image.fromarray((arr / peak * 255.0).clip(0, 255).astype(np.uint8), "L")
            im = im.convert("L" if channels == 1 else "RGB")
            im = ImageOps.fit(im, (size, size), Image.Resampling.LANCZOS)
            arr = np.asarray(im, dtype=np.float32)
    except InputError:
        raise
    except UnidentifiedImageError as exc:
        raise InputError("cannot decode image: not a PNG or JPEG file") from exc
    except Image.DecompressionBombError as exc:
        raise InputError(f"image rejected by the decompression-bomb guard: {exc}") from exc
    except Exception as exc:  # any decoder failure on untrusted bytes is the client's input, not a 500
        raise InputError(f"cannot decode image: {exc}") from exc
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (C, H, W)
    return torch.from_numpy(arr / 127.5 - 1.0).float()


_NPY_MAGIC = b"\x93NUMPY"


def decode_image_field(text: str, field: str, shape: tuple[int, int, int], max_pixels: int) -> torch.Tensor:
    """A base64 JSON field holding a PNG/JPEG (converted as :func:`decode_image`) or a float ``.npy`` (C, H, W) in
    [-1, 1] (exact shape required) → (C, H, W) float32."""
    data = decode_b64(text, field)
    if data.startswith(_NPY_MAGIC):
        x = decode_npy(data, field, shape)
        if float(x.abs().max()) > 1.0:
            raise InputError(f"{field}: .npy values must be in [-1, 1], got up to {float(x.abs().max()):.3g}")
        return x
    if sniff_image_type(data) is None:
        raise InputError(f"{field}: neither a PNG, a JPEG nor a .npy file")
    try:
        return decode_image(data, shape[0], shape[1], max_pixels)
    except InputError as exc:
        raise InputError(f"{field}: {exc}") from exc


def decode_mask_field(text: str, field: str, shape: tuple[int, int, int], max_pixels: int) -> torch.Tensor:
    """An inpainting mask, 1 = regenerate: a PNG/JPEG (grey, white = regenerate, resized to the model's size and
    thresholded at 50 %) or a ``.npy`` of shape (1, H, W) or (C, H, W) (values ≥ 0.5 regenerate) → {0, 1} float32."""
    c, h, w = shape
    data = decode_b64(text, field)
    if data.startswith(_NPY_MAGIC):
        try:
            m = decode_npy(data, field, (1, h, w))
        except InputError:
            if c == 1:
                raise
            m = decode_npy(data, field, shape)
        return (m >= 0.5).float()
    if sniff_image_type(data) is None:
        raise InputError(f"{field}: neither a PNG, a JPEG nor a .npy file")
    try:
        grey = decode_image(data, 1, h, max_pixels)  # [-1, 1]
    except InputError as exc:
        raise InputError(f"{field}: {exc}") from exc
    return (grey >= 0.0).float()
