"""Sampling on the device: pure functions over one row of logits, and a factory.

Order (as in Hugging Face): penalties → temperature → top_k → top_p → min_p →
draw. Temperature 0 is argmax over the penalized logits. Logprobs (when asked)
are those of the penalized logits before temperature and filters: the model's own
view of the choice, whatever the sampling settings.

The RNG is explicit: a key from the seed, split once per step. The whole step,
state update included, is one `mx.compile`d function that returns lazy arrays, so
the runtime can queue the next decode before the token is read (`step` then `read`).
"""

from __future__ import annotations

import math
import secrets
from typing import Sequence

import mlx.core as mx
import numpy as np

from fermi.backends import Sample
from fermi.sampling import SamplingParams

NEG_INF = float("-inf")


def apply_penalties(x, seen, counts, p: SamplingParams):
    """Repetition (HF: divide positive logits, multiply negative ones) over prompt and
    generated tokens; presence/frequency (OpenAI: subtract) over generated ones."""
    if p.repetition_penalty != 1.0:
        x = mx.where(seen, mx.where(x < 0, x * p.repetition_penalty, x / p.repetition_penalty), x)
    if p.presence_penalty or p.frequency_penalty:
        x = x - p.presence_penalty * (counts > 0) - p.frequency_penalty * counts
    return x


def top_k(y, k: int):
    """The k largest values and their ids (in no order): later steps then sort and
    draw over k candidates instead of the whole vocabulary."""
    ids = mx.argpartition(-y, kth=k - 1)[:k]
    return y[ids], ids


def top_p(y, p: float):
    """Keep the smallest set of best tokens whose probability reaches p."""
    order = mx.argsort(-y)
    sorted_probs = mx.softmax(y)[order]
    above = mx.cumsum(sorted_probs) - sorted_probs  # mass of the tokens better than each
    kept = mx.maximum((above < p).sum(), 1)
    threshold = y[order][kept - 1]
    return mx.where(y < threshold, NEG_INF, y)


def min_p(y, p: float):
    """Keep tokens at least p times as likely as the best one."""
    return mx.where(y < y.max() + math.log(p), NEG_INF, y)


def choose(logits, key, seen, counts, p: SamplingParams, n_top: int):
    """One step. Returns (token, its logprob, top ids, top logprobs, key, seen, counts);
    the logprobs are None unless asked for, the state moves only under penalties."""
    vocab = logits.shape[-1]
    x = apply_penalties(logits.astype(mx.float32), seen, counts, p)
    key, sub = mx.random.split(key)
    if p.greedy:
        token = mx.argmax(x)
    else:
        y, ids = x * (1.0 / p.temperature), None
        if 0 < p.top_k < vocab:
            y, ids = top_k(y, p.top_k)
        if p.top_p < 1.0:
            y = top_p(y, p.top_p)
        if p.min_p > 0.0:
            y = min_p(y, p.min_p)
        token = mx.random.categorical(y, key=sub)
        token = token if ids is None else ids[token]
    if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
        hit = mx.arange(vocab) == token
        seen, counts = seen | hit, counts + hit
    if p.logprobs is None:
        return token, None, None, None, key, seen, counts
    logprobs = x - mx.logsumexp(x)
    top = mx.argpartition(-logprobs, kth=n_top - 1)[:n_top] if n_top else mx.zeros((0,), mx.uint32)
    top = top[mx.argsort(-logprobs[top])]  # best first
    return token, logprobs[token], top, logprobs[top], key, seen, counts


class Sampler:
    """Per sequence: its RNG key and what it has seen (for the penalties)."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int]):
        self.params = params
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.key = mx.random.key(seed)
        self.prompt_ids = list(prompt_ids)
        self.seen = self.counts = None  # sized on the first call, from the logits
        self._fn = None

    def _start(self, vocab: int) -> None:
        seen = np.zeros(vocab, dtype=bool)
        ids = np.asarray([i for i in self.prompt_ids if 0 <= i < vocab], dtype=np.int64)
        seen[ids] = True
        self.seen, self.counts = mx.array(seen), mx.zeros((vocab,), mx.float32)
        n_top = min(self.params.logprobs or 0, vocab)
        params = self.params
        self._fn = mx.compile(lambda lg, k, s, c: choose(lg, k, s, c, params, n_top))

    def step(self, logits: mx.array) -> tuple[mx.array, ...]:
        """Lazy: (token, logprob, top ids, top logprobs); the state moves on at once."""
        logits = logits.reshape(-1)
        if self._fn is None:
            self._start(logits.shape[-1])
        token, lp, top, top_lp, self.key, self.seen, self.counts = self._fn(logits, self.key, self.seen, self.counts)
        return token, lp, top, top_lp

    def read(self, out: tuple[mx.array, ...]) -> Sample:
        token, lp, top, top_lp = out
        if self.params.logprobs is None:
            return Sample(int(token.item()))
        return Sample(int(token.item()), float(lp.item()), list(zip(top.tolist(), top_lp.tolist())))

    def __call__(self, logits: mx.array) -> Sample:
        return self.read(self.step(logits))


def make_sampler(params: SamplingParams, prompt_ids: Sequence[int]) -> Sampler:
    return Sampler(params, prompt_ids)
