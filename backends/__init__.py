"""The Backend contract, and the choice of backend at startup.

A backend turns token ids into next-token choices; it knows nothing of text.
Each backend package (`fermi.backends.torch`, `fermi.backends.mlx`) exposes:

    available() -> str | None     None when it can run here, else a one-line reason
    default_dtype() -> str        "float32" | "float16" | "bfloat16"
    device_name() -> str          e.g. "cpu", "cuda:0", "metal"
    load(model: ModelFiles, dtype: str | None = None, quantize: int | None = None,
         blocks: bool | None = None) -> Runtime
        quantize: 4 | 8 bits for float weights, 0 for none; blocks: keep a GGUF's
        quantized blocks as they are (True), or dequantize them (False); None is the
        backend's default (MLX keeps them unless quantize is 0; torch dequantizes)

A Runtime (see `Runtime` below) holds the weights on the device and offers
`new_cache`, `prefill`, `decode`, `sampler`, `sample`, `stream` and `to_numpy`.
The serving core (fermi.serving) drives them: a cache of N slots, prefills and
one decode over the active slots a step, one `sample` over the rows.

Cache contract: `cache.lengths[slot]` is the number of positions of sequence
`slot` whose keys and values the cache holds. `prefill`/`decode` write at
positions `lengths[slot]...` and then advance `lengths[slot]`; layers never move
a position. `cache.truncate(slot, n)` forgets everything from position n on,
so a session can reuse a common prefix and prefill only the rest.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

from fermi.errors import ContextOverflow, FermiError
from fermi.sampling import SamplingParams

BACKENDS = ("mlx", "torch")


@dataclass
class Sample:
    token: int
    logprob: float | None = None  # log-probability of `token` (when params.logprobs is set)
    top: list[tuple[int, float]] | None = None  # the top-k (id, logprob), best first


class Cache(Protocol):
    batch: int
    lengths: list[int]

    def truncate(self, slot: int, n: int) -> None: ...

    @property
    def nbytes(self) -> int: ...


class Sampler(Protocol):
    """One request's sampling state (each backend's `sampler.RowState`): its params,
    its seed, how many tokens it has drawn, and under penalties what it has seen.

    Each backend's sampler module also has `sample_batch(logits, rows, masks=None)
    -> list[Sample]`: logits [n, vocab], row i sampled with rows[i]'s params in one
    batched computation on the device; masks, None or an int32 token bitmask per
    row [n, ceil(vocab/32)] (bit j%32 of word j//32 = token j allowed), applied
    after the penalties. The RNG is a counter-based hash of (seed, draws so far,
    token id), the same in every backend, so a seeded request draws the same tokens
    whatever shares its batch."""

    params: SamplingParams
    seed: int
    drawn: int  # tokens drawn so far: the RNG's counter

    def __call__(self, logits: Any) -> Sample:
        """logits: one row, [vocab] (or [1, vocab]), a backend array; the same as
        `sample_batch(logits[None], [self])[0]`. Returns the chosen token."""
        ...


class Runtime(Protocol):
    config: Any  # fermi.config.ModelConfig
    backend: str  # "torch" | "mlx"
    device: str
    dtype: str
    weight_bytes: int  # bytes of weights held in memory

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> Cache: ...

    def prefill(self, ids: Sequence[int], cache: Cache, slot: int = 0, all_logits: bool = False) -> Any:
        """Logits of the last position, [vocab] (all positions, [len(ids), vocab], if all_logits)."""
        ...

    def decode(self, tokens: Sequence[int], cache: Cache, slots: Sequence[int]) -> Any:
        """One new token per slot; logits [len(slots), vocab]."""
        ...

    def sampler(self, params: SamplingParams, prompt_ids: Sequence[int]) -> Sampler: ...

    def sample(self, logits: list, rows: Sequence[Sampler], masks=None) -> list[Sample]:
        """The serving core's one batched sampling call a step: `logits` as prefill and
        decode returned them ([vocab] or [n, vocab] each, concatenated in order), one
        sampler state per row; masks as in `sample_batch`."""
        ...

    def stream(self, ids: Sequence[int], cache: Cache, slot: int, sampler: Sampler) -> Iterator[Sample]:
        """Prefill `ids` (the part of the prompt not yet in the cache), then sample and
        decode forever; the consumer stops by closing the generator. The cache may run
        one step ahead of what was yielded."""
        ...

    def to_numpy(self, x: Any): ...


def empty_mask_rows(masks: np.ndarray, vocab: int) -> list[int]:
    """Rows of a bitmask that allow no token below `vocab`, checked on the host (no
    device sync): the bits of the last word past the vocabulary do not count."""
    words = np.ascontiguousarray(masks, dtype=np.int32).view(np.uint32)[:, : -(-vocab // 32)].copy()
    if vocab % 32 and words.shape[1] == -(-vocab // 32):
        words[:, -1] &= np.uint32((1 << (vocab % 32)) - 1)
    return np.flatnonzero(~words.any(axis=1)).tolist()


GROW_STEP = 256  # KV caches grow in steps of this many positions


def grown_capacity(n: int, capacity: int, max_len: int) -> int | None:
    """The capacity a KV cache needs to hold positions [0, n): None when it already
    has room; ContextOverflow past max_len. Shared by every backend's cache."""
    if n > max_len:
        raise ContextOverflow(n, max_len)
    if n <= capacity:
        return None
    return min(max_len, -(-n // GROW_STEP) * GROW_STEP)


def resolve_name(name: str | None = None) -> str:
    """auto -> mlx where Metal is available, else torch (CUDA or CPU)."""
    name = (name or os.environ.get("FERMI_BACKEND") or "auto").lower()
    if name == "auto":
        mlx = _module("mlx")
        return "mlx" if mlx is not None and mlx.metal_available() else "torch"
    if name not in BACKENDS:
        raise FermiError(f"unknown backend '{name}' (choose auto, {', '.join(BACKENDS)})")
    return name


def get(name: str | None = None):
    """The backend module for `name` (auto/mlx/torch), or a FermiError saying why not."""
    name = resolve_name(name)
    module = _module(name)
    if module is None:
        raise FermiError(f"backend '{name}' is not available here: it is not installed")
    reason = module.available()
    if reason:
        raise FermiError(f"backend '{name}' cannot run here: {reason}")
    return module


def _module(name: str):
    try:
        return importlib.import_module(f"fermi.backends.{name}")
    except ImportError:
        return None
