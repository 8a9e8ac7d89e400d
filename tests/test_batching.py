"""Continuous batching on real models, both backends: each request of a batch
of 8 (different prompts and lengths, admitted at different steps, some finishing
early) gets, token for token, what it gets alone; a seeded request samples the
same whatever runs beside it; a token mask constrains its own row only."""

from __future__ import annotations

import numpy as np
import pytest

import tiny
from fermi.sampling import SamplingParams
from fermi.serving import Done, Request, Scheduler
from models import engine

QUESTIONS = ["Name the capital of France.", "Name three colours.", "Write a haiku about rain.",
             "What is 2 + 2?", "Tell me a fact about cats.", "Say hello in Spanish.",
             "Why is the sky blue? Answer in one sentence.", "List the first five prime numbers."]


class IdTokenizer:
    """Text for the tiny models, which have no tokenizer: a token is its id."""

    def decode(self, ids, skip_special=False):
        return "".join(f"<{i}>" for i in ids)


class TinyEngine:
    def __init__(self, runtime, context_length=512):
        self.runtime, self.tokenizer, self.eos_ids, self.context_length = runtime, IdTokenizer(), set(), context_length


def run_batch(core: Scheduler, requests: list[Request], admit_every: int = 1) -> list[Done]:
    """Submit the requests one step apart (admit_every steps), then step until all are done."""
    got = [[] for _ in requests]
    for r, g in zip(requests, got):
        r.sink = g.append
    pending = list(requests)
    while pending or core.busy:
        if pending and core.steps % admit_every == 0:
            core.submit(pending.pop(0))
        core.step()
    for g in got:
        assert isinstance(g[-1], Done), g[-1]
    return [g[-1] for g in got]


def solo(make_core, request: Request) -> Done:
    return run_batch(make_core(1), [request])[0]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-batching")
    return {arch: tiny.build(arch, root) for arch in ("qwen3", "qwen2", "llama")}


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_tiny_models_batched_greedy_equals_solo(backend, tiny_models, arch):
    runtime = tiny.backend_module(backend).load(tiny_models[arch].files, dtype="float32")
    eng = TinyEngine(runtime)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, tiny.VOCAB, int(n)).tolist() for n in rng.integers(3, 40, 8)]
    lengths = [6, 20, 3, 14, 20, 9, 17, 11]  # some finish early

    def requests():
        return [Request(p, SamplingParams(temperature=0), n) for p, n in zip(prompts, lengths)]

    alone = [solo(lambda n: Scheduler(eng, n), r).tokens for r in requests()]
    together = run_batch(Scheduler(eng, 8), requests())
    assert [d.tokens for d in together] == alone
    assert [d.completion_tokens for d in together] == lengths


def test_smollm2_batch_of_8_greedy_equals_solo(backend):
    eng = engine(backend)
    # MLX's CPU build here multiplies with the reference BLAS (about 1.7 GFLOP/s): 3 of
    # the 8 there (the tiny models above batch 8 on both backends); all 8 on Metal.
    questions = QUESTIONS[:3] if backend == "mlx" and eng.runtime.device == "cpu" else QUESTIONS

    def requests():
        return [eng.request([{"role": "user", "content": q}], "auto", 12 + 3 * (i % 4), temperature=0.0)
                for i, q in enumerate(questions)]

    alone = [solo(eng.scheduler, r) for r in requests()]
    together = run_batch(eng.scheduler(8), requests(), admit_every=2)
    assert [d.tokens for d in together] == [d.tokens for d in alone]
    assert [d.finish_reason for d in together] == [d.finish_reason for d in alone]


def test_seeded_sampling_is_the_same_whatever_runs_beside(backend):
    eng = engine(backend)
    ask = [{"role": "user", "content": "Write a short poem about the sea."}]

    def seeded():
        return eng.request(ask, "auto", 16, temperature=0.9, top_k=40, top_p=0.9, seed=1234)

    alone = solo(eng.scheduler, seeded()).tokens
    beside = [eng.request([{"role": "user", "content": q}], "auto", 10, temperature=t, top_k=k, top_p=p, seed=i)
              for i, (q, t, k, p) in enumerate([(QUESTIONS[0], 0.0, 0, 1.0), (QUESTIONS[1], 1.2, 0, 1.0),
                                                (QUESTIONS[2], 0.7, 5, 0.5)])]
    together = run_batch(eng.scheduler(4), beside[:2] + [seeded()] + beside[2:])
    assert together[2].tokens == alone


class OnlyTokens:
    """A TokenMask allowing a fixed set of tokens."""

    def __init__(self, tokens):
        self.tokens, self.chosen = tokens, []

    def fill(self, row):
        row[:] = 0
        for t in self.tokens:
            row[t // 32] |= np.int32(np.uint32(1 << (t % 32)).view(np.int32))

    def accept(self, token):
        self.chosen.append(token)


def test_a_token_mask_constrains_its_own_row(backend):
    eng = engine(backend)
    allowed = eng.tokenizer.encode(" yes no maybe")
    mask = OnlyTokens(allowed)
    masked = eng.request([{"role": "user", "content": QUESTIONS[0]}], "auto", 6, temperature=0.8, seed=3)
    masked.masks = [mask]
    free = eng.request([{"role": "user", "content": QUESTIONS[1]}], "auto", 6, temperature=0.0)
    alone = solo(eng.scheduler, eng.request([{"role": "user", "content": QUESTIONS[1]}], "auto", 6,
                                            temperature=0.0)).tokens
    a, b = run_batch(eng.scheduler(2), [masked, free])
    assert a.completion_tokens == 6 and set(a.tokens) <= set(allowed) and mask.chosen == a.tokens
    assert b.tokens == alone


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_prompts_prefilled_together_match_the_reference(backend, tiny_models, arch):
    """prefill_batch: several slots, each at its own start, chunks of different
    lengths (padded) in one forward give each row the reference's logits, and the
    cache then decodes as if each had been prefilled alone."""
    model = tiny_models[arch]
    rt = tiny.backend_module(backend).load(model.files, dtype="float32")
    rng = np.random.default_rng(5)
    seqs = [rng.integers(0, tiny.VOCAB, n).tolist() for n in (30, 41, 25)]
    cache = rt.new_cache(4, 512)
    starts = [0, 12, 7]
    for seq, slot, start in zip(seqs, (3, 0, 2), starts):
        if start:
            rt.prefill(seq[:start], cache, slot)
    ends = [len(seq) - 1 for seq in seqs]  # the last token of each is decoded below
    logits = rt.to_numpy(rt.prefill_batch([seq[a:b] for seq, a, b in zip(seqs, starts, ends)], cache, [3, 0, 2]))
    assert [cache.lengths[s] for s in (3, 0, 2)] == ends
    step = rt.to_numpy(rt.decode([seq[-1] for seq in seqs], cache, [3, 0, 2]))
    for i, seq in enumerate(seqs):
        ref = model.reference(seq)
        scale = np.abs(ref).max()
        assert np.abs(logits[i] - ref[ends[i] - 1]).max() <= 1e-4 * scale
        assert np.abs(step[i] - ref[-1]).max() <= 1e-4 * scale
