"""Bucketed forwards (the CUDA-graph path's padding, exercised on the CPU): padded rows never reach a result."""

from __future__ import annotations

import pytest
import torch

from service.diffusion.checkpoint import DiffusionModel
from service.diffusion.graphs import BucketedForward, bucket_for, buckets
from service.diffusion.pipeline import sample
from service.diffusion.rows import predict_eps


def test_buckets_are_powers_of_two_up_to_the_bound() -> None:
    assert buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert buckets(1) == (1,)
    assert [bucket_for(n, buckets(48)) for n in (1, 3, 17, 33, 48)] == [1, 4, 32, 48, 48]
    with pytest.raises(ValueError, match="exceed"):
        bucket_for(49, buckets(48))


@pytest.mark.parametrize("rows", [1, 3, 5, 12])
def test_padded_forward_returns_exactly_the_rows_of_an_unpadded_one(tiny_model: DiffusionModel, rows: int) -> None:
    unet = tiny_model.unet
    seen: list[int] = []

    def forward(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return predict_eps(unet, x, t, torch.float32)

    padded = BucketedForward(forward, (1, 8, 8), max_rows=12, device=torch.device("cpu"), graphs=False)
    x, t = torch.randn(rows, 1, 8, 8), torch.randint(0, 1000, (rows,))
    got = padded(x, t)
    assert got.shape == (rows, 1, 8, 8) and seen == [bucket_for(rows, padded.sizes)]
    torch.testing.assert_close(got, predict_eps(unet, x, t, torch.float32), atol=1e-5, rtol=0)


def test_sampling_through_padded_forwards_gives_the_same_images(tiny_model: DiffusionModel) -> None:
    padded = BucketedForward(lambda x, t: predict_eps(tiny_model.unet, x, t, torch.float32), (1, 8, 8), max_rows=8,
                             device=torch.device("cpu"), graphs=False)
    for sampler in ("ddpm", "unipc"):
        got = sample(tiny_model, 3, 2, sampler, 10, forward=padded)
        torch.testing.assert_close(got, sample(tiny_model, 3, 2, sampler, 10), atol=1e-4, rtol=0)  # other kernels


def test_graphs_are_only_used_on_cuda() -> None:
    assert not BucketedForward(lambda x, t: x, (1, 8, 8), 4, torch.device("cpu"), graphs=True).graphs
