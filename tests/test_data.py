"""Image loaders (IDX gz/raw, image folder, .npz), labels and the held-out split."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.data import load_images, load_labels, split_indices, to_model_range


def _idx_bytes(array: np.ndarray) -> bytes:
    """IDX as specified by LeCun: 0x0000, dtype 0x08 (ubyte), ndim, big-endian int32 dims, data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def digits() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)


@pytest.mark.parametrize("compressed", [True, False])
def test_idx_images_and_labels_gz_and_raw(tmp_path: Path, digits: np.ndarray, compressed: bool) -> None:
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    images_path, labels_path = tmp_path / "imgs-idx3-ubyte", tmp_path / "labels-idx1-ubyte"
    for path, arr in ((images_path, digits), (labels_path, labels)):
        data = _idx_bytes(arr)
        if compressed:
            path = path.with_suffix(".gz")
            data = gzip.compress(data)
        path.write_bytes(data)
    suffix = ".gz" if compressed else ""
    x = load_images(str(images_path) + suffix)
    assert x.dtype == torch.uint8 and x.shape == (5, 1, 28, 28)
    np.testing.assert_array_equal(x[:, 0].numpy(), digits)
    y = load_labels(str(labels_path) + suffix)
    assert y.dtype == torch.int64 and y.tolist() == [3, 1, 4, 1, 5]


def test_idx_rejects_wrong_dtype_and_truncation(tmp_path: Path, digits: np.ndarray) -> None:
    bad_dtype = bytearray(_idx_bytes(digits))
    bad_dtype[2] = 0x0D  # float32 code
    (tmp_path / "a").write_bytes(bytes(bad_dtype))
    with pytest.raises(ValueError, match="unsigned-byte"):
        load_images(tmp_path / "a")
    (tmp_path / "b").write_bytes(_idx_bytes(digits)[:-10])
    with pytest.raises(ValueError, match="expected"):
        load_images(tmp_path / "b")


def test_image_folder_sorted_converted_and_resized(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    grey = np.full((28, 28), 200, dtype=np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "b.png")
    rgb = np.zeros((56, 56, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # pure red: L = 0.299 * 255 ≈ 76 (ITU-R 601-2 luma, PIL's convert("L"))
    Image.fromarray(rgb, "RGB").save(tmp_path / "sub" / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    x = load_images(tmp_path, channels=1, size=28)
    assert x.shape == (2, 1, 28, 28)
    # sorted by path: "b.png" < "sub/a.png"
    assert int(x[0].float().mean()) == 200 and abs(float(x[1].float().mean()) - 76) <= 1
    colour = load_images(tmp_path, channels=3, size=14)
    assert colour.shape == (2, 3, 14, 14)
    assert colour[1, 0].min() == 255 and colour[1, 1:].max() == 0


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no images"):
        load_images(tmp_path)


def test_npz_images_key_nhwc_and_first_array(tmp_path: Path, digits: np.ndarray) -> None:
    np.savez(tmp_path / "named.npz", labels=np.arange(5), images=digits)
    np.testing.assert_array_equal(load_images(tmp_path / "named.npz")[:, 0].numpy(), digits)
    np.savez(tmp_path / "first.npz", digits[..., None])  # (N, H, W, 1) under arr_0
    np.testing.assert_array_equal(load_images(tmp_path / "first.npz")[:, 0].numpy(), digits)
    rgb = np.random.default_rng(1).integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", images=rgb)
    x = load_images(tmp_path / "rgb.npz", channels=3, size=8)
    np.testing.assert_array_equal(x.numpy(), rgb.transpose(0, 3, 1, 2))
    assert load_images(tmp_path / "named.npz", size=14).shape == (5, 1, 14, 14)
    np.savez(tmp_path / "float.npz", images=digits.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        load_images(tmp_path / "float.npz")


def test_split_is_disjoint_complete_and_deterministic() -> None:
    train, held = split_indices(100, holdout=10, seed=0)
    assert len(train) == 90 and len(held) == 10
    assert set(train.tolist()).isdisjoint(held.tolist())
    assert sorted(train.tolist() + held.tolist()) == list(range(100))
    again_train, again_held = split_indices(100, holdout=10, seed=0)
    assert torch.equal(train, again_train) and torch.equal(held, again_held)
    assert not torch.equal(held, split_indices(100, holdout=10, seed=1)[1])
    with pytest.raises(ValueError):
        split_indices(10, holdout=10)


def test_to_model_range_endpoints() -> None:
    x = to_model_range(torch.tensor([0, 255], dtype=torch.uint8))
    assert x.dtype == torch.float32 and x.tolist() == [-1.0, 1.0]
