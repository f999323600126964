"""CUDA graphs for the UNet forward: one graph per batch-size bucket, rows padded up to their bucket.

A UNet this small is bound by kernel launches on a GPU, not by FLOPs: a forward is hundreds of short
kernels. A CUDA graph records them once and replays them with one launch. Graphs have fixed shapes, so
:class:`BucketedForward` keeps one per bucket (powers of two up to the batch bound, and the bound itself)
and pads a batch of ``n`` rows to the smallest bucket ≥ n: the padded rows are zeros at t = 0, every
layer treats rows independently (convolutions, GroupNorm over each row's channels, attention within a row),
and only the first ``n`` rows of the output are returned, so padding never reaches a result. Inputs are
copied into the graph's static buffers and the output is cloned out of its static buffer, all on the GPU:
no host synchronisation.

``graphs=False`` runs the same padding with plain forwards: that is how the CPU tests exercise the
bucketing and the slicing, which are the parts that could leak padded rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["BucketedForward", "bucket_for", "buckets"]

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def buckets(max_rows: int) -> tuple[int, ...]:
    """1, 2, 4, … below ``max_rows``, then ``max_rows``: at most ~2× padding, log₂(max_rows) + 1 graphs."""
    sizes = []
    b = 1
    while b < max_rows:
        sizes.append(b)
        b *= 2
    return (*sizes, max_rows)


def bucket_for(rows: int, sizes: tuple[int, ...]) -> int:
    """The smallest bucket holding ``rows`` rows."""
    for size in sizes:
        if rows <= size:
            return size
    raise ValueError(f"{rows} rows exceed the largest bucket ({sizes[-1]})")


class BucketedForward:
    """``forward`` over rows padded to a bucket; on CUDA (``graphs=True``) each bucket is a captured CUDA graph."""

    def __init__(self, forward: Forward, sample_shape: tuple[int, int, int], max_rows: int,
                 device: torch.device, graphs: bool = True) -> None:
        self.forward = forward
        self.sample_shape = sample_shape
        self.sizes = buckets(max_rows)
        self.device = device
        self.graphs = graphs and device.type == "cuda"
        self._static: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.cuda.CUDAGraph]] = {}

    def capture(self) -> None:
        """Record one graph per bucket (after warm-up forwards on a side stream, as CUDA graph capture requires)."""
        if not self.graphs or self._static:
            return
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        pool = torch.cuda.graph_pool_handle()  # one memory pool shared by every bucket's graph
        for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its pool blocks
            x = torch.zeros((size, *self.sample_shape), device=self.device)
            t = torch.zeros(size, dtype=torch.long, device=self.device)
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.forward(x, t)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.forward(x, t)
            self._static[size] = (x, t, out, graph)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        size = bucket_for(rows, self.sizes)
        if self.graphs:
            if not self._static:
                self.capture()
            sx, st, out, graph = self._static[size]
            sx[:rows].copy_(x)
            sx[rows:].zero_()
            st[:rows].copy_(t)
            st[rows:].zero_()
            graph.replay()
            return out[:rows].clone()  # the static buffer is overwritten by the next replay
        if size == rows:
            return self.forward(x, t)
        pad = size - rows
        xp = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
        tp = torch.cat([t, t.new_zeros(pad)])
        return self.forward(xp, tp)[:rows]
