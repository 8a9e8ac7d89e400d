"""Decode steps replayed as CUDA graphs.

At one token a step, a small model on a GPU spends its time launching kernels
(several hundred a step), not running them. A CUDA graph records a step's kernels
once and replays them with one launch. What a graph reads and writes must stay at
the same addresses and shapes, so the step it records is `static_step`: the
token ids and positions are read from tensors (filled before each replay), and
attention reads the cache's whole capacity, masking the positions past each
row's own, instead of slicing it to the longest row.

Graphs are recorded for padded batch sizes (1, 2, 4, 8, …), so that any number
of active requests, in any slots, replays a recorded graph: the slots are data
too (an index tensor), and the rows that pad a batch to its size write into the
cache's spare row (KVCache(spare=1)), which no sequence reads. Each graph
belongs to one cache (it holds that cache's tensors); the cache drops its graphs
when it grows (new tensors); see KVCache.steps.
"""

from __future__ import annotations

import torch

from .cache import KVCache, Span

KEEP = 8  # graphs kept per cache (batch sizes); the oldest goes first


def bucket(n: int) -> int:
    """The padded batch size a step of n rows replays: the next power of two."""
    return 1 << (n - 1).bit_length()


def static_step(model, cache: KVCache, ids: torch.Tensor, positions: torch.Tensor,
                index: torch.Tensor) -> torch.Tensor:
    """One decode step whose shapes depend only on the batch size and the cache's
    capacity: ids [n, 1], positions [n] and the rows' slots `index` [n] are tensors.
    -> float32 logits [n, vocab]."""
    span = Span(index, 0, 1, cache.capacity, positions, index)
    return model.logits(model(ids, cache, span)[:, 0]).float()


def padded(tokens: list[int], positions: list[int], slots: list[int], size: int, spare: int):
    """The step's inputs padded to `size` rows: the extra rows write token 0 at position 0
    of the spare slot."""
    extra = size - len(slots)
    return tokens + [0] * extra, positions + [0] * extra, slots + [spare] * extra


_streams: dict = {}


def _side_stream(device) -> torch.cuda.Stream:
    """One stream per device for every recording: cuBLAS keeps a workspace (32 MiB on
    recent GPUs) for each stream it runs on, for the life of the process."""
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]


class Step:
    """A recorded step: the input tensors to fill, the graph, its output."""

    def __init__(self, model, cache: KVCache, tokens: list[int], positions: list[int], slots: list[int]):
        device = cache.k[0].device
        self.ids = torch.tensor(tokens, dtype=torch.long, device=device).view(-1, 1)
        self.positions = torch.tensor(positions, dtype=torch.long, device=device)
        self.index = torch.tensor(slots, dtype=torch.long, device=device)
        run = lambda: static_step(model, cache, self.ids, self.positions, self.index)  # noqa: E731
        # Warm up on a side stream first (as PyTorch asks: library handles and
        # workspaces are made outside the capture), then record on that stream. This
        # run is the real step: it writes this token's keys and values, which the
        # replay writes again.
        side = _side_stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=side):
            self.logits = run()
        # The rotary tables the graph reads: kept alive should the model grow them.
        self.tables = [(r.cos, r.sin) for r in model.rotaries.values()]

    def __call__(self, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        self.ids.copy_(torch.tensor(tokens).view(-1, 1), non_blocking=True)
        self.positions.copy_(torch.tensor(positions), non_blocking=True)
        self.index.copy_(torch.tensor(slots), non_blocking=True)
        self.graph.replay()
        return self.logits.clone()  # the next replay overwrites self.logits


def decode(model, cache: KVCache, tokens: list[int], slots: list[int], positions: list[int]) -> torch.Tensor:
    """The step for these slots, through the graph of their padded batch size, recorded
    on first use (cache.reserve has made room). -> logits [len(slots), vocab]."""
    n = len(slots)
    size = min(bucket(n), cache.batch)
    tokens, positions, slots = padded(tokens, positions, slots, size, cache.batch)
    step = cache.steps.pop(size, None)
    if step is None:
        if len(cache.steps) >= KEEP:
            cache.steps.pop(next(iter(cache.steps)))
        # Rotary tables grown to the capacity before recording: growing replaces them.
        for r in model.rotaries.values():
            r.reserve(cache.capacity)
        step = Step(model, cache, tokens, positions, slots)
    cache.steps[size] = step  # most recently used last
    return step(tokens, positions, slots)[:n]
