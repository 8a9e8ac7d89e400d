"""Sampling on the device, batched: logits [n, vocab] and one request per row, each
with its own `SamplingParams` (after mlx-lm's sample_utils, batched as in vLLM).

Order per row: penalties → token mask (a grammar's bitmask) → (logprobs taken
here) → temperature → top_k → top_p → min_p → draw. Temperature 0 is argmax of
the penalized, masked logits.

The RNG is explicit and counter based: the draw is Gumbel-max with the uniforms
hashed from (seed, step, token id), so a request's tokens depend only on its own
seed and step count, never on which rows share the batch. The state per request
(`RowState`) is its params, seed, draw count and, under penalties, what it has seen.
"""

from __future__ import annotations

import secrets
from typing import Sequence

import numpy as np
import torch

from fermi.backends import Sample, empty_mask_rows
from fermi.errors import FermiError
from fermi.sampling import SamplingParams

NEG_INF = float("-inf")
M32 = 0xFFFFFFFF


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF style over every token seen (prompt and generated): a positive logit is
    divided by the penalty, a negative one multiplied, so both become less likely."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def presence_frequency_penalty(logits, counts: torch.Tensor, presence, frequency):
    """OpenAI style over generated tokens: logit -= presence*(count>0) + frequency*count."""
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


def unpack_mask(masks: np.ndarray, vocab: int, device) -> torch.Tensor:
    """int32 bitmask [n, words] (bit j%32 of word j//32 = token j allowed) -> bool
    [n, vocab]. Tokens past the mask's words (a model vocab padded beyond the
    tokenizer's) are not allowed."""
    words = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.int32)).to(device)
    bits = (words[:, :, None] >> torch.arange(32, dtype=torch.int32, device=device)) & 1
    bits = bits.reshape(words.shape[0], -1)[:, :vocab].bool()  # [n, words, 32] -> [n, <= vocab]
    allowed = torch.zeros(words.shape[0], vocab, dtype=torch.bool, device=device)
    allowed[:, : bits.shape[1]] = bits
    return allowed


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) in int64 without overflow: c in 16-bit halves."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """Chris Wellons' lowbias32 on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniforms(seeds: Sequence[int], steps: Sequence[int], ids: torch.Tensor) -> torch.Tensor:
    """u in (0, 1), float32, [n, m]: a hash of (row's seed, row's step, token id) for
    ids [n, m] (or [m], the same ids for every row). The same in backends/mlx.
    23 bits, so that (h + 0.5) / 2**23 is exact in float32 and never reaches 1."""
    device = ids.device
    col = lambda v: torch.tensor(v, dtype=torch.int64, device=device)[:, None]  # noqa: E731
    h = mix32(col([(s & M32) ^ 0x9E3779B9 for s in seeds]))  # a nonzero start: mix32(0) is 0
    h = mix32(h ^ col([(s >> 32) & M32 for s in seeds]))
    h = mix32(h ^ col([t & M32 for t in steps]))
    h = mix32(h ^ ids.to(torch.int64))
    return ((h >> 9).float() + 0.5) * (1.0 / (1 << 23))


def draw(y: torch.Tensor, ids: torch.Tensor, rows: list["RowState"]) -> torch.Tensor:
    """Gumbel-max over a few candidates: argmax(y + g), g = -log(-log(u)), is an
    exact sample of softmax(y), one uniform per candidate id (so a row's draw does
    not depend on how many candidates other rows made it carry). y, ids [n, K]."""
    u = uniforms([r.seed for r in rows], [r.drawn for r in rows], ids)
    choice = torch.argmax(y - torch.log(-torch.log(u)), -1)
    return ids.gather(-1, choice[:, None])[:, 0]


def draw_all(y: torch.Tensor, rows: list["RowState"]) -> torch.Tensor:
    """An exact sample of softmax(y) over the whole vocabulary, y [n, vocab], with one
    uniform per row: the first token whose cumulative weight reaches u times the
    total (a uniform per token, as Gumbel-max takes, costs more than the model's
    step on a CPU). The weights are not normalized: each row's sums are its own."""
    cdf = torch.cumsum(torch.exp(y - y.max(-1, keepdim=True).values), -1)
    u = uniforms([r.seed for r in rows], [r.drawn for r in rows], torch.zeros(1, dtype=torch.int64, device=y.device))
    return torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_(max=y.shape[-1] - 1)[:, 0]


def needs_sort(p: SamplingParams, vocab: int) -> bool:
    """Whether a row needs sorted candidates (top_k or top_p); the others draw over
    the whole vocabulary, unsorted."""
    return 0 < p.top_k < vocab or p.top_p < 1.0


def pick(x: torch.Tensor, group: list[int]) -> torch.Tensor:
    """The rows `group` of x: x itself when that is all of them (no copy)."""
    return x if len(group) == x.shape[0] else x[torch.tensor(group, device=x.device)]


def rows_index(group: list[int], n: int, device) -> torch.Tensor:
    return torch.arange(n, device=device) if len(group) == n else torch.tensor(group, device=device)


def top_candidates(y: torch.Tensor, rows: list["RowState"], inv_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y [n, vocab] -> (y, ids) [n, K], best first, each row cut to its own top_k and
    top_p (the rest -inf): one sort of the K best for all rows, K the largest k any
    row needs (a top_p without top_k needs the whole vocabulary)."""
    vocab, dev = y.shape[-1], y.device
    ks = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in rows]
    y, ids = torch.topk(y, max(ks), -1)
    y = y * inv_t
    y = y.masked_fill(torch.arange(y.shape[-1], device=dev) >= torch.tensor(ks, device=dev)[:, None], NEG_INF)
    # Nucleus: a token goes when the tokens before it already reach p; the best one
    # stays. p 2 for rows without top_p: a cumulative sum may round past 1.
    p = torch.tensor([r.params.top_p if r.params.top_p < 1.0 else 2.0 for r in rows], device=dev)[:, None]
    probs = torch.softmax(y, -1)
    drop = torch.cumsum(probs, -1) - probs >= p
    drop[:, 0] = False
    return y.masked_fill(drop, NEG_INF), ids


def min_p(y: torch.Tensor, rows: list["RowState"]) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the best one's; in logits:
    y < best + log(min_p), and log(0) = -inf drops nothing."""
    if all(r.params.min_p <= 0.0 for r in rows):
        return y
    log_min_p = torch.tensor([r.params.min_p for r in rows], device=y.device).log()[:, None]
    return y.masked_fill(y < y.max(-1, keepdim=True).values + log_min_p, NEG_INF)


@torch.inference_mode()
def sample_batch(logits: torch.Tensor, rows: list["RowState"], masks: np.ndarray | None = None) -> list[Sample]:
    """logits [n, vocab] -> one Sample per row, row i drawn with rows[i]'s params and
    state (which then moves on). masks: None, or an int32 token bitmask per row
    [n, ceil(vocab/32)] (llguidance's and xgrammar's layout); a row that allows no
    token is a FermiError."""
    x = logits.reshape(len(rows), -1).float()
    vocab, dev = x.shape[1], x.device
    pen = [i for i, r in enumerate(rows) if r.penalized]
    if pen:
        for i in pen:
            rows[i].start(vocab, dev)
        col = lambda v: torch.tensor(v, dtype=torch.float32, device=dev)[:, None]  # noqa: E731
        ps = [rows[i].params for i in pen]
        idx = torch.tensor(pen, device=dev)
        seen = torch.stack([rows[i].seen for i in pen])
        y = repetition_penalty(x[idx], seen, col([p.repetition_penalty for p in ps]))
        y = presence_frequency_penalty(y, torch.stack([rows[i].counts for i in pen]),
                                       col([p.presence_penalty for p in ps]), col([p.frequency_penalty for p in ps]))
        x = x.index_copy(0, idx, y)
    if masks is not None:
        empty = empty_mask_rows(masks, vocab)
        if empty:
            raise FermiError(f"the token mask of batch row {empty[0]} allows no token")
        x = x.masked_fill(~unpack_mask(masks, vocab, dev), NEG_INF)

    tokens = torch.zeros(len(rows), dtype=torch.int64, device=dev)
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    if greedy:
        tokens = tokens.index_copy(0, rows_index(greedy, len(rows), dev), torch.argmax(pick(x, greedy), -1))
    hot = [i for i, r in enumerate(rows) if not r.params.greedy]
    for sort in (False, True):  # two batched groups: whole vocabulary, sorted candidates
        group = [i for i in hot if needs_sort(rows[i].params, vocab) == sort]
        if not group:
            continue
        grows = [rows[i] for i in group]
        inv_t = torch.tensor([1.0 / r.params.temperature for r in grows], device=dev)[:, None]
        y = pick(x, group)
        if sort:  # the best k of x / T are the best k of x: scale only the candidates
            y, ids = top_candidates(y, grows, inv_t)
            chosen = draw(min_p(y, grows), ids, grows)
        else:
            chosen = draw_all(min_p((y - y.max(-1, keepdim=True).values) * inv_t, grows), grows)
        tokens = tokens.index_copy(0, rows_index(group, len(rows), dev), chosen)

    # Logprobs are of the penalized (and masked) logits before temperature and
    # truncation: what the model thinks, not the reshaped sampling distribution.
    asked = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    chosen, top_ids, top_lps = [], [], []
    if asked:
        idx = torch.tensor(asked, device=dev)
        logprobs = torch.log_softmax(x[idx], -1)
        chosen = logprobs.gather(-1, tokens[idx][:, None])[:, 0].tolist()
        n_top = min(max(rows[i].params.logprobs for i in asked), vocab)
        if n_top:
            values, ids = torch.topk(logprobs, n_top, -1)
            top_ids, top_lps = ids.tolist(), values.tolist()

    tokens = tokens.tolist()
    samples = [Sample(t) for t in tokens]
    for j, i in enumerate(asked):
        k = min(rows[i].params.logprobs, vocab)
        top = list(zip(top_ids[j][:k], top_lps[j][:k])) if k else []
        samples[i] = Sample(tokens[i], chosen[j], top)
    for row, token in zip(rows, tokens):
        row.advance(token)
    return samples


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

    def start(self, vocab: int, device) -> None:
        if self.seen is not None:
            return
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        ids = [i for i in self.prompt_ids if 0 <= i < vocab]
        if ids:
            self.seen[torch.tensor(ids, device=device)] = True

    def advance(self, token: int) -> None:
        self.drawn += 1
        if self.penalized and 0 <= token < self.counts.shape[0]:
            self.seen[token] = True
            self.counts[token] += 1

    def __call__(self, logits: torch.Tensor) -> Sample:
        """One row, [vocab] or [1, vocab]."""
        return sample_batch(logits.reshape(1, -1), [self])[0]


TorchSampler = RowState  # the name backends/torch/runtime.py imports


def make_sampler(params: SamplingParams, prompt_ids: Sequence[int]) -> RowState:
    """The sampling state of one request; call it on one row of logits, or pass it
    with others to `sample_batch`."""
    return RowState(params, prompt_ids)
