"""The MLX Runtime: a loaded model, its caches, prefill/decode, and the
generation stream with mlx-lm's speed habits (chunked prefill, the vocabulary
projection on the last prompt position only, the next step queued before the
previous token is read)."""

from __future__ import annotations

import itertools
from typing import Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from fermi.backends import Sample
from fermi.config import ModelConfig
from fermi.errors import ContextOverflow, FermiError
from fermi.sampling import SamplingParams

from .cache import KVCache
from .sampler import Sampler, make_sampler, sample_batch

PREFILL_CHUNK = 512  # bounds the attention scores and activations of a long prompt


class MLXRuntime:
    backend = "mlx"

    def __init__(self, net: nn.Module, config: ModelConfig, dtype: str, device: str, weight_bytes: int):
        self.net, self.config = net, config
        self.dtype, self.device, self.weight_bytes = dtype, device, weight_bytes
        self._mx_dtype = getattr(mx, dtype)

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, c.head_dim,
                       max_len or c.max_position_embeddings, self._mx_dtype)

    def prefill(self, ids: Sequence[int], cache: KVCache, slot: int = 0, all_logits: bool = False) -> mx.array:
        """Logits of the last position, [vocab] (all positions, [len(ids), vocab], if all_logits)."""
        ids = list(ids)
        if not ids:
            raise FermiError("prefill needs at least one token (keep one uncached to get logits)")
        cache.reserve(cache.lengths[slot] + len(ids))  # overflow before any work
        outs = []
        for start in range(0, len(ids), PREFILL_CHUNK):
            chunk = ids[start:start + PREFILL_CHUNK]
            h = self.net.hidden(mx.array(chunk)[None], cache.span([slot], len(chunk)))[0]
            cache.advance([slot], len(chunk))
            if all_logits:
                outs.append(self.net.logits(h))
            elif start + PREFILL_CHUNK >= len(ids):
                outs.append(self.net.logits(h[-1]))
            else:
                mx.eval(cache.state)  # run this chunk now: one chunk's graph at a time
        return mx.concatenate(outs) if len(outs) > 1 else outs[0]

    def prefill_batch(self, chunks: list[list[int]], cache: KVCache, slots: list[int]) -> mx.array:
        """Several slots' next prompt tokens in one forward (each chunk at most
        PREFILL_CHUNK long). -> logits of each chunk's last position, [n, vocab]."""
        length = max(len(c) for c in chunks)
        if len(chunks) == 1 or max(cache.lengths[s] for s in slots) + length > cache.max_len:
            return mx.stack([self.prefill(c, cache, s) for c, s in zip(chunks, slots)])
        ids = mx.array([c + [0] * (length - len(c)) for c in chunks])
        # The shorter chunks are padded: what they write past their end is never read.
        h = self.net.hidden(ids, cache.span(list(slots), length))
        for s, c in zip(slots, chunks):
            cache.lengths[s] += len(c)
        return self.net.logits(h[mx.arange(len(chunks)), mx.array([len(c) - 1 for c in chunks])])

    def decode(self, tokens: Sequence[int] | mx.array, cache: KVCache, slots: Sequence[int]) -> mx.array:
        """One new token per slot; logits [len(slots), vocab]. Tokens may be a lazy
        mx.array (the stream feeds back the sampled token before reading it)."""
        slots = list(slots)
        ids = (tokens if isinstance(tokens, mx.array) else mx.array(list(tokens))).reshape(len(slots), 1)
        h = self.net.hidden(ids, cache.span(slots, 1))
        cache.advance(slots, 1)
        return self.net.logits(h[:, 0])

    def sampler(self, params: SamplingParams, prompt_ids: Sequence[int]) -> Sampler:
        return make_sampler(params, prompt_ids)

    def sample(self, logits: list, rows: list, masks=None) -> list[Sample]:
        """One batched sampling call: logits as prefill and decode returned them ([vocab]
        or [n, vocab] each), one sampler state per row in that order."""
        x = mx.concatenate([lg.reshape(-1, lg.shape[-1]) for lg in logits])
        return sample_batch(x, rows, masks)

    def stream(self, ids: Sequence[int], cache: KVCache, slot: int, sampler) -> Iterator[Sample]:
        """Prefill, then sample and decode until the consumer closes the generator.
        Decode n+1 is queued (async_eval) before token n is read with .item(), so the
        device never waits on Python; the cache therefore runs one step ahead."""
        logits = self.prefill(ids, cache, slot)
        if not isinstance(sampler, Sampler):  # a foreign sampler: plain synchronous loop
            while True:
                sample = sampler(logits)
                yield sample
                logits = self.decode([sample.token], cache, [slot])[0]
        out = sampler.step(logits)
        mx.async_eval(out)
        for n in itertools.count(1):
            if cache.lengths[slot] >= cache.max_len:  # no step ahead past the context's end
                yield sampler.read(out)
                raise ContextOverflow(cache.lengths[slot] + 1, cache.max_len)
            nxt = sampler.step(self.decode(out[0], cache, [slot])[0])
            mx.async_eval(nxt)
            yield sampler.read(out)
            out = nxt
            if n % 256 == 0:
                mx.clear_cache()  # the cache's growth leaves freed buffers behind

    def to_numpy(self, x: mx.array) -> np.ndarray:
        return np.array(x.astype(mx.float32))
