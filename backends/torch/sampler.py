"""Sampling on the device: pure functions over a 1-D logits vector, and a factory
that chains them for one `SamplingParams` (after mlx-lm's sample_utils).

Order: penalties → (logprobs taken here) → temperature → top_k → top_p → min_p →
draw with the sequence's own torch.Generator. Temperature 0 is argmax of the
penalized logits.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from fermi.backends import Sample
from fermi.sampling import SamplingParams

NEG_INF = float("-inf")


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF style over every token seen (prompt and generated): a positive logit is
    divided by the penalty, a negative one multiplied, so both become less likely."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def presence_frequency_penalty(logits, counts: torch.Tensor, presence: float, frequency: float):
    """OpenAI style over generated tokens: logit -= presence*(count>0) + frequency*count."""
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


def top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best logits (exactly k, ties cut by index) and their token ids, best first.
    Later steps then work on k candidates instead of the whole vocabulary."""
    values, ids = torch.topk(logits, min(k, logits.shape[-1]))
    return values, ids


def top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of best tokens whose probability sums to >= p
    (always at least the best one); the rest become -inf."""
    probs = torch.softmax(logits, -1)
    sorted_probs, order = torch.sort(probs, descending=True)
    # A token goes when the tokens before it already reach p.
    drop_sorted = (torch.cumsum(sorted_probs, -1) - sorted_probs) >= p
    drop_sorted[0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def min_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Drop tokens whose probability is below p times the best token's."""
    probs = torch.softmax(logits, -1)
    return logits.masked_fill(probs < p * probs.max(), NEG_INF)


def categorical(logits: torch.Tensor, generator: torch.Generator) -> int:
    """Draw one index with probability softmax(logits): argmax(probs / E), E ~ Exp(1),
    is an exact sample and needs no cumulative sum (gpt-fast's trick)."""
    probs = torch.softmax(logits, -1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return int(torch.argmax(probs / noise))


class TorchSampler:
    """Stateful per sequence: the counts of what it generated (penalties) and its RNG.
    The state is made on the first call, when the vocabulary and device are known."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int]):
        self.params = params
        self.prompt_ids = list(prompt_ids)
        self.seed = params.seed if params.seed is not None else random.SystemRandom().getrandbits(63)
        self.generated: list[int] = []
        self.penalized = params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty
        self.seen = self.counts = self.generator = None

    def _start(self, logits: torch.Tensor) -> None:
        vocab, device = logits.shape[-1], logits.device
        self.generator = torch.Generator(device=device).manual_seed(self.seed)
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        ids = [i for i in self.prompt_ids if 0 <= i < vocab]
        if ids:
            self.seen[torch.tensor(ids, device=device)] = True

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor) -> Sample:
        p = self.params
        if self.generator is None:
            self._start(logits)
        logits = logits.float()
        if p.repetition_penalty != 1.0:
            logits = repetition_penalty(logits, self.seen, p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            logits = presence_frequency_penalty(logits, self.counts, p.presence_penalty, p.frequency_penalty)
        token = int(torch.argmax(logits)) if p.greedy else self._draw(logits)
        self._remember(token)
        if p.logprobs is None:
            return Sample(token)
        # Logprobs are of the penalized logits before temperature and truncation:
        # what the model (with penalties) thinks, not the reshaped sampling distribution.
        logprobs = torch.log_softmax(logits, -1)
        top = []
        if p.logprobs > 0:
            values, ids = torch.topk(logprobs, min(p.logprobs, logprobs.shape[-1]))
            top = list(zip(ids.tolist(), values.tolist()))
        return Sample(token, float(logprobs[token]), top)

    def _draw(self, logits: torch.Tensor) -> int:
        p = self.params
        logits = logits / p.temperature
        ids = None
        if p.top_k > 0:
            logits, ids = top_k(logits, p.top_k)
        if p.top_p < 1.0:
            logits = top_p(logits, p.top_p)
        if p.min_p > 0.0:
            logits = min_p(logits, p.min_p)
        choice = categorical(logits, self.generator)
        return choice if ids is None else int(ids[choice])

    def _remember(self, token: int) -> None:
        self.generated.append(token)
        if self.penalized and 0 <= token < self.counts.shape[0]:
            self.seen[token] = True
            self.counts[token] += 1


def make_sampler(params: SamplingParams, prompt_ids: Sequence[int]) -> TorchSampler:
    """A sampler for one sequence; its __call__ takes one row of logits, [vocab]."""
    return TorchSampler(params, prompt_ids)
