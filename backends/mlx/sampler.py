"""Sampling on the device, batched: logits [n, vocab] and one request per row, each
with its own `SamplingParams` (after mlx-lm's sample_utils, batched as in vLLM).

Order per row (as in Hugging Face): penalties → token mask (a grammar's bitmask)
→ temperature → top_k → top_p → min_p → draw. Temperature 0 is argmax of the
penalized, masked logits. Logprobs (when asked) are those of the penalized,
masked logits before temperature and filters: the model's own view of the choice.

The RNG is explicit and counter based: the draw is Gumbel-max with the uniforms
hashed from (seed, step, token id), so a request's tokens depend only on its own
seed and step count, never on which rows share the batch; the hash is the one
backends/torch computes. The whole batch is one lazy graph, evaluated once.
"""

from __future__ import annotations

import secrets
from typing import Sequence

import mlx.core as mx
import numpy as np

from fermi.backends import Sample, empty_mask_rows
from fermi.errors import FermiError
from fermi.sampling import SamplingParams

NEG_INF = float("-inf")
M32 = 0xFFFFFFFF


def apply_penalties(x, seen, counts, rows: list["RowState"]):
    """Repetition (HF: divide positive logits, multiply negative ones) over prompt and
    generated tokens; presence/frequency (OpenAI: subtract) over generated ones.
    x, seen, counts [n, vocab], one row per RowState."""
    col = lambda v: mx.array(v, dtype=mx.float32)[:, None]  # noqa: E731
    rep = col([r.params.repetition_penalty for r in rows])
    x = mx.where(seen, mx.where(x < 0, x * rep, x / rep), x)
    presence = col([r.params.presence_penalty for r in rows])
    frequency = col([r.params.frequency_penalty for r in rows])
    return x - presence * (counts > 0) - frequency * counts


def unpack_mask(masks: np.ndarray, vocab: int):
    """int32 bitmask [n, words] (bit j%32 of word j//32 = token j allowed) -> bool
    [n, vocab]. Tokens past the mask's words (a model vocab padded beyond the
    tokenizer's) are not allowed."""
    words = mx.array(np.ascontiguousarray(masks, dtype=np.int32))
    bits = (words[:, :, None] >> mx.arange(32, dtype=mx.int32)) & 1
    bits = bits.reshape(words.shape[0], -1)[:, :vocab]  # [n, words, 32] -> [n, <= vocab]
    if bits.shape[1] < vocab:
        bits = mx.pad(bits, [(0, 0), (0, vocab - bits.shape[1])])
    return bits != 0


def mix32(x):
    """Chris Wellons' lowbias32 on uint32 arrays (which wrap mod 2**32)."""
    x = x ^ (x >> 16)
    x = x * mx.array(0x7FEB352D, dtype=mx.uint32)
    x = x ^ (x >> 15)
    x = x * mx.array(0x846CA68B, dtype=mx.uint32)
    return x ^ (x >> 16)


def uniforms(seeds: Sequence[int], steps: Sequence[int], ids):
    """u in (0, 1), float32, [n, m]: a hash of (row's seed, row's step, token id) for
    ids [n, m] (or [m], the same ids for every row). The same in backends/torch.
    23 bits, so that (h + 0.5) / 2**23 is exact in float32 and never reaches 1."""
    col = lambda v: mx.array(v, dtype=mx.uint32)[:, None]  # noqa: E731
    h = mix32(col([(s & M32) ^ 0x9E3779B9 for s in seeds]))  # a nonzero start: mix32(0) is 0
    h = mix32(h ^ col([(s >> 32) & M32 for s in seeds]))
    h = mix32(h ^ col([t & M32 for t in steps]))
    h = mix32(h ^ ids.astype(mx.uint32))
    return ((h >> 9).astype(mx.float32) + 0.5) * (1.0 / (1 << 23))


def draw(y, ids, rows: list["RowState"]):
    """Gumbel-max over a few candidates: argmax(y + g), g = -log(-log(u)), is an
    exact sample of softmax(y), one uniform per candidate id (so a row's draw does
    not depend on how many candidates other rows made it carry). y, ids [n, K]."""
    u = uniforms([r.seed for r in rows], [r.drawn for r in rows], ids)
    choice = mx.argmax(y - mx.log(-mx.log(u)), axis=-1)
    return mx.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]


def draw_all(y, rows: list["RowState"]):
    """An exact sample of softmax(y) over the whole vocabulary, y [n, vocab], with one
    uniform per row: the first token whose cumulative weight reaches u times the
    total (a uniform per token, as Gumbel-max takes, costs more than the model's
    step on a CPU). The weights are not normalized: each row's sums are its own."""
    cdf = mx.cumsum(mx.exp(y - y.max(axis=-1, keepdims=True)), axis=-1)
    u = uniforms([r.seed for r in rows], [r.drawn for r in rows], mx.zeros((1,), mx.uint32))
    below = cdf < u * cdf[:, -1:]  # the tokens before the one drawn
    return mx.minimum(below.astype(mx.int32).sum(axis=-1), y.shape[-1] - 1)


def needs_sort(p: SamplingParams, vocab: int) -> bool:
    """Whether a row needs sorted candidates (top_k or top_p); the others draw over
    the whole vocabulary, unsorted."""
    return 0 < p.top_k < vocab or p.top_p < 1.0


def top_candidates(y, rows: list["RowState"]):
    """y [n, vocab] -> (y, ids) [n, K], best first, each row cut to its own top_k and
    top_p (the rest -inf): one sort of the K best for all rows, K the largest k any
    row needs (a top_p without top_k needs the whole vocabulary)."""
    vocab = y.shape[-1]
    ks = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in rows]
    k = max(ks)
    if k < vocab:  # the k best in no order, then sorted: cheaper than sorting them all
        ids = mx.argpartition(-y, kth=k - 1, axis=-1)[:, :k]
        ids = mx.take_along_axis(ids, mx.argsort(-mx.take_along_axis(y, ids, axis=-1), axis=-1), axis=-1)
    else:
        ids = mx.argsort(-y, axis=-1)
    y = mx.take_along_axis(y, ids, axis=-1)  # [n, K], best first
    y = mx.where(mx.arange(k) >= mx.array(ks)[:, None], NEG_INF, y)
    # Nucleus: a token goes when the tokens before it already reach p; the best one
    # stays. p 2 for rows without top_p: a cumulative sum may round past 1.
    p = mx.array([r.params.top_p if r.params.top_p < 1.0 else 2.0 for r in rows])[:, None]
    probs = mx.softmax(y, axis=-1)
    drop = (mx.cumsum(probs, axis=-1) - probs >= p) & (mx.arange(k) > 0)
    return mx.where(drop, NEG_INF, y), ids


def min_p(y, rows: list["RowState"]):
    """Drop tokens whose probability is below min_p times the best one's; in logits:
    y < best + log(min_p), and log(0) = -inf drops nothing."""
    if all(r.params.min_p <= 0.0 for r in rows):
        return y
    log_min_p = mx.log(mx.array([r.params.min_p for r in rows]))[:, None]
    return mx.where(y < y.max(axis=-1, keepdims=True) + log_min_p, NEG_INF, y)


def sample_lazy(logits, rows: list["RowState"], masks: np.ndarray | None = None):
    """The batch as lazy arrays: (tokens [n], and for the rows that ask for logprobs,
    in order: the chosen token's logprob [m], top ids [m, n_top], top logprobs
    [m, n_top]; None when no row asks). The rows' state moves on at once (their
    penalty state lazily, from the lazy tokens)."""
    x = logits.reshape(len(rows), -1).astype(mx.float32)
    vocab = x.shape[1]
    pen = [i for i, r in enumerate(rows) if r.penalized]
    if pen:
        for i in pen:
            rows[i].start(vocab)
        idx = mx.array(pen)
        x[idx] = apply_penalties(x[idx], mx.stack([rows[i].seen for i in pen]),
                                 mx.stack([rows[i].counts for i in pen]), [rows[i] for i in pen])
    if masks is not None:
        empty = empty_mask_rows(masks, vocab)
        if empty:
            raise FermiError(f"the token mask of batch row {empty[0]} allows no token")
        x = mx.where(unpack_mask(masks, vocab), x, NEG_INF)

    tokens = mx.argmax(x, axis=-1)  # the greedy rows' choice; sampled rows overwrite theirs
    hot = [i for i, r in enumerate(rows) if not r.params.greedy]
    for sort in (False, True):  # two batched groups: whole vocabulary, sorted candidates
        group = [i for i in hot if needs_sort(rows[i].params, vocab) == sort]
        if not group:
            continue
        idx, grows = mx.array(group), [rows[i] for i in group]
        y = x[idx] / mx.array([r.params.temperature for r in grows])[:, None]
        if sort:
            y, ids = top_candidates(y, grows)
            chosen = draw(min_p(y, grows), ids, grows)
        else:
            chosen = draw_all(min_p(y, grows), grows)
        tokens[idx] = chosen.astype(tokens.dtype)

    out = (tokens, None, None, None)
    asked = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if asked:
        idx = mx.array(asked)
        logprobs = x[idx] - mx.logsumexp(x[idx], axis=-1, keepdims=True)
        chosen = mx.take_along_axis(logprobs, tokens[idx][:, None], axis=-1)[:, 0]
        n_top = min(max(rows[i].params.logprobs for i in asked), vocab)
        top = mx.zeros((len(asked), 0), mx.uint32)
        if n_top:  # the n_top best in no order, then best first
            top = mx.argpartition(-logprobs, kth=n_top - 1, axis=-1)[:, :n_top]
            top = mx.take_along_axis(top, mx.argsort(-mx.take_along_axis(logprobs, top, axis=-1), axis=-1), axis=-1)
        out = (tokens, chosen, top, mx.take_along_axis(logprobs, top, axis=-1))
    for i, row in enumerate(rows):
        row.advance(tokens[i])
    return out


def read(out, rows: list["RowState"]) -> list[Sample]:
    """Evaluated outputs of `sample_lazy` -> one Sample per row."""
    tokens, chosen, top_ids, top_lps = out
    tokens = tokens.tolist()
    samples = [Sample(t) for t in tokens]
    asked = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if asked:
        chosen, top_ids, top_lps = chosen.tolist(), top_ids.tolist(), top_lps.tolist()
    for j, i in enumerate(asked):
        k = rows[i].params.logprobs
        samples[i] = Sample(tokens[i], chosen[j], list(zip(top_ids[j][:k], top_lps[j][:k])))
    return samples


def sample_batch(logits, rows: list["RowState"], masks: np.ndarray | None = None) -> list[Sample]:
    """logits [n, vocab] -> one Sample per row, row i drawn with rows[i]'s params and
    state (which then moves on). masks: None, or an int32 token bitmask per row
    [n, ceil(vocab/32)] (llguidance's and xgrammar's layout); a row that allows no
    token is a FermiError. One evaluation for the whole batch."""
    out = sample_lazy(logits, rows, masks)
    mx.eval([a for a in out if a is not None], [(r.seen, r.counts) for r in rows if r.penalized])
    return read(out, rows)


class RowState:
    """One request's sampling state: its params, its seed, how many tokens it has
    drawn (`drawn`, the RNG's counter) and, only under penalties, `seen` (bool
    [vocab]: prompt and generated tokens, for repetition_penalty) and `counts`
    (float32 [vocab]: generated tokens, for presence/frequency), made on first use,
    when the vocabulary is known."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int]):
        self.params = params
        self.prompt_ids = list(prompt_ids)
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.drawn = 0  # not `step`: that is the MLX runtime's name for a lazy draw
        self.penalized = bool(params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty)
        self.seen = self.counts = None

    def start(self, vocab: int) -> None:
        if self.seen is not None:
            return
        seen = np.zeros(vocab, dtype=bool)
        seen[np.asarray([i for i in self.prompt_ids if 0 <= i < vocab], dtype=np.int64)] = True
        self.seen, self.counts = mx.array(seen), mx.zeros((vocab,), mx.float32)

    def advance(self, token) -> None:
        """After a draw; `token` may be a lazy mx scalar (ids past the vocab hit nothing)."""
        self.drawn += 1
        if self.penalized:
            hit = mx.arange(self.seen.shape[0]) == token
            self.seen, self.counts = self.seen | hit, self.counts + hit

    def step(self, logits):
        """Lazy outputs for one row, [vocab] or [1, vocab]; the state moves on at once.
        With `read`, lets the runtime queue the next decode before reading a token."""
        return sample_lazy(logits.reshape(1, -1), [self])

    def read(self, out) -> Sample:
        return read(out, [self])[0]

    def __call__(self, logits) -> Sample:
        """One row, [vocab] or [1, vocab]."""
        return sample_batch(logits.reshape(1, -1), [self])[0]


Sampler = RowState  # the name backends/mlx/runtime.py imports (and tests with isinstance)


def make_sampler(params: SamplingParams, prompt_ids: Sequence[int]) -> RowState:
    """The sampling state of one request; call it on one row of logits, or pass it
    with others to `sample_batch`."""
    return RowState(params, prompt_ids)
