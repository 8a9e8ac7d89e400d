"""Each backend's sampler (`make_sampler(params, prompt_ids)`, `sample_batch`) on
hand-built logits."""

import importlib

import numpy as np
import pytest

import tiny
from fermi.errors import FermiError
from fermi.sampling import SamplingParams


def sampler(backend, prompt=(), **params):
    return tiny.backend_module(backend).make_sampler(SamplingParams(**params), list(prompt))


def sampler_module(backend):
    tiny.backend_module(backend)  # skips where the backend cannot run
    return importlib.import_module(f"fermi.backends.{backend}.sampler")


def draws(backend, logits, n=300, **params) -> set[int]:
    s = sampler(backend, seed=0, **params)
    x = tiny.to_backend(backend, logits)
    return {s(x).token for _ in range(n)}


def log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


# Probabilities in a shuffled order, so that "the best k" is not "the first k".
PROBS = np.array([0.05, 0.3, 0.15, 0.5])  # best first: 3, 1, 2, 0
LOGITS = np.log(PROBS)


def test_temperature_zero_is_argmax(backend):
    logits = np.random.default_rng(0).normal(size=50)
    s = sampler(backend, temperature=0)
    x = tiny.to_backend(backend, logits)
    assert [s(x).token for _ in range(3)] == [int(np.argmax(logits))] * 3


def test_top_k_keeps_exactly_k(backend):
    logits = np.log([0.08, 0.12, 0.1, 0.2, 0.15, 0.05, 0.18, 0.12])
    assert draws(backend, logits, top_k=3) == {3, 6, 4}
    assert draws(backend, logits, top_k=1) == {3}


@pytest.mark.parametrize("top_p, kept", [(0.3, {3}), (0.79, {3, 1}), (0.81, {3, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_smallest_set_reaching_p(backend, top_p, kept):
    assert draws(backend, LOGITS, n=400, top_p=top_p) == kept


def test_min_p_drops_below_fraction_of_best(backend):
    # best is 0.5: min_p 0.25 keeps p >= 0.125, min_p 0.5 keeps p >= 0.25
    assert draws(backend, LOGITS, min_p=0.25) == {3, 1, 2}
    assert draws(backend, LOGITS, min_p=0.5) == {3, 1}


def test_top_k_then_top_p(backend):
    assert draws(backend, LOGITS, top_k=3, top_p=0.79) == {3, 1}


def test_penalties_arithmetic(backend):
    raw = np.array([2.0, -1.0, 0.5, 1.5, 0.0, -0.5])
    s = sampler(backend, prompt=[0, 1], temperature=0, repetition_penalty=2.0,
                presence_penalty=0.5, frequency_penalty=0.25, logprobs=6)
    x = tiny.to_backend(backend, raw)
    # Repetition (over prompt + generated) first, then presence/frequency (generated only).
    expected = [
        (3, [1.0, -2.0, 0.5, 1.5, 0.0, -0.5]),  # prompt tokens 0 and 1 penalized
        (0, [1.0, -2.0, 0.5, 0.75 - 0.5 - 0.25, 0.0, -0.5]),  # 3 generated once
        (2, [1.0 - 0.75, -2.0, 0.5, 0.0, 0.0, -0.5]),  # 0 generated once too
    ]
    for token, penalized in expected:
        sample = s(x)
        assert sample.token == token
        want = log_softmax(penalized)
        assert sample.logprob == pytest.approx(want[token], abs=1e-5)
        assert [i for i, _ in sample.top] == np.argsort(-want, kind="stable").tolist()
        assert [lp for _, lp in sample.top] == pytest.approx(sorted(want, reverse=True), abs=1e-5)


def test_same_seed_same_sequence(backend):
    x = tiny.to_backend(backend, np.zeros(50))

    def run(seed):
        s = sampler(backend, seed=seed)
        return [s(x).token for _ in range(30)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_logprobs_are_of_the_raw_distribution(backend):
    raw = np.random.default_rng(1).normal(size=20) * 2
    want = log_softmax(raw)
    s = sampler(backend, temperature=0.7, top_k=5, seed=1, logprobs=3)
    sample = s(tiny.to_backend(backend, raw))
    assert sample.token in np.argsort(-raw)[:5]
    assert sample.logprob == pytest.approx(want[sample.token], abs=1e-5)  # before temperature
    assert [i for i, _ in sample.top] == np.argsort(-want)[:3].tolist()
    assert [lp for _, lp in sample.top] == pytest.approx(np.sort(want)[::-1][:3], abs=1e-5)


def test_logprobs_off_and_zero(backend):
    x = tiny.to_backend(backend, np.arange(5.0))
    off = sampler(backend, temperature=0)(x)
    assert (off.token, off.logprob, off.top) == (4, None, None)
    zero = sampler(backend, temperature=0, logprobs=0)(x)
    assert zero.top == [] and zero.logprob == pytest.approx(log_softmax(np.arange(5.0))[4], abs=1e-5)


# One of each kind of row, for the batch tests: (params, prompt).
MIXED = [
    (dict(temperature=0), ()),
    (dict(top_k=5, seed=1), ()),
    (dict(top_p=0.9, seed=2), ()),
    (dict(min_p=0.1, temperature=0.9, seed=3), ()),
    (dict(temperature=0.8, seed=4), ()),
    (dict(top_k=10, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2, seed=5), (1, 2, 3)),
    (dict(temperature=0.7, top_k=20, top_p=0.95, seed=6, logprobs=3), ()),
    (dict(temperature=0, repetition_penalty=1.5, logprobs=2), (4, 5)),
    (dict(top_k=3, min_p=0.3, seed=7, logprobs=0, frequency_penalty=0.1), ()),
]


def test_batch_matches_each_row_alone(backend):
    mod = sampler_module(backend)
    batch = [mod.make_sampler(SamplingParams(**p), list(prompt)) for p, prompt in MIXED]
    alone = [mod.make_sampler(SamplingParams(**p), list(prompt)) for p, prompt in MIXED]
    rng = np.random.default_rng(2)
    for _ in range(6):
        logits = rng.normal(size=(len(MIXED), 64)) * 3
        got = mod.sample_batch(tiny.to_backend(backend, logits), batch)
        for row, state, sample in zip(logits, alone, got):
            want = state(tiny.to_backend(backend, row))
            assert sample.token == want.token
            if want.logprob is None:
                assert (sample.logprob, sample.top) == (None, None)
            else:
                assert sample.logprob == pytest.approx(want.logprob, abs=1e-5)
                assert [i for i, _ in sample.top] == [i for i, _ in want.top]
                assert [lp for _, lp in sample.top] == pytest.approx([lp for _, lp in want.top], abs=1e-5)
    assert [s.drawn for s in batch] == [6] * len(MIXED)


def test_seeded_row_ignores_its_neighbours(backend):
    """The counter RNG: a request's tokens depend on its seed and step count only, not
    on which rows share the batch nor on the candidate count K they make."""
    mod = sampler_module(backend)
    logits = np.random.default_rng(3).normal(size=64)
    x = tiny.to_backend(backend, logits)
    for params in (dict(top_k=8, seed=11), dict(seed=12), dict(top_p=0.9, temperature=1.3, seed=13)):
        s = mod.make_sampler(SamplingParams(**params), [])
        want = [s(x).token for _ in range(20)]
        assert len(set(want)) > 3  # it really samples
        row = mod.make_sampler(SamplingParams(**params), [])
        others = [dict(top_k=40, seed=1), dict(top_p=0.5, seed=2), dict(temperature=0), dict(top_k=2, seed=3)]
        rows = [mod.make_sampler(SamplingParams(**p), []) for p in others]
        rows.insert(2, row)
        xs = tiny.to_backend(backend, np.tile(logits, (len(rows), 1)))
        got = [mod.sample_batch(xs, rows)[2].token for _ in range(20)]
        assert got == want


def bitmask(allowed: list[set[int]], vocab: int) -> np.ndarray:
    """Token sets -> int32 [n, ceil(vocab/32)], bit j%32 of word j//32 = token j."""
    words = np.zeros((len(allowed), -(-vocab // 32)), dtype=np.uint32)
    for row, ids in zip(words, allowed):
        for j in ids:
            row[j // 32] |= np.uint32(1 << (j % 32))
    return words.view(np.int32)


def test_mask_restricts_greedy_and_sampled_rows(backend):
    mod = sampler_module(backend)
    vocab, allowed = 70, {5, 31, 33, 63, 69}  # 31 and 63: the int32 sign bit
    logits = np.random.default_rng(4).normal(size=vocab)
    logits[[10, 20]] = 9.0  # the best tokens are not allowed
    masks = bitmask([allowed, allowed, set(range(vocab))], vocab)
    rows = [mod.make_sampler(SamplingParams(**p), []) for p in
            (dict(temperature=0, logprobs=2), dict(temperature=2.0, seed=5), dict(temperature=0))]
    x = tiny.to_backend(backend, np.tile(logits, (3, 1)))
    sampled = set()
    for _ in range(60):
        greedy, drawn, free = mod.sample_batch(x, rows, masks)
        assert greedy.token == max(allowed, key=lambda j: logits[j])
        assert free.token == int(np.argmax(logits))
        sampled.add(drawn.token)
    assert sampled <= allowed and len(sampled) > 1
    # logprobs are of the masked logits: the disallowed tokens have none
    masked = np.where(np.isin(np.arange(vocab), list(allowed)), logits, -np.inf)
    assert greedy.logprob == pytest.approx(log_softmax(masked)[greedy.token], abs=1e-5)
    assert [i for i, _ in greedy.top] == np.argsort(-masked)[:2].tolist()


def test_mask_allowing_nothing_is_an_error(backend):
    mod = sampler_module(backend)
    vocab = 70
    x = tiny.to_backend(backend, np.zeros((2, vocab)))
    rows = [mod.make_sampler(SamplingParams(temperature=0), []) for _ in range(2)]
    with pytest.raises(FermiError):
        mod.sample_batch(x, rows, bitmask([{1}, set()], vocab))
    tail = bitmask([{1}, set()], vocab)
    tail[1, -1] = np.int32(1 << 10)  # token 74: past the vocabulary, does not count
    with pytest.raises(FermiError):
        mod.sample_batch(x, rows, tail)
    assert [r.drawn for r in rows] == [0, 0]  # nothing drawn, nothing moved


def lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_backends_hash_the_same_uniforms():
    torch_sampler = importlib.import_module("fermi.backends.torch.sampler")
    mlx_sampler = pytest.importorskip("fermi.backends.mlx.sampler")
    import mlx.core as mx
    import torch

    seeds = [0, 1, 7, 2**32 - 1, 2**32, 2**62 + 12345, 2**63 - 1]
    steps = [0, 1, 5, 999, 2**31 + 3, 2**32 - 1, 12]
    ids = np.r_[np.arange(300), [2**17 - 1, 151935, 2**31 - 1]]
    u_torch = torch_sampler.uniforms(seeds, steps, torch.from_numpy(ids)).numpy()
    u_mlx = np.array(mlx_sampler.uniforms(seeds, steps, mx.array(ids.astype(np.uint32))))
    assert u_torch.dtype == u_mlx.dtype == np.float32 and u_torch.shape == (len(seeds), len(ids))
    assert np.array_equal(u_torch, u_mlx)
    assert 0 < u_torch.min() and u_torch.max() < 1 and abs(u_torch.mean() - 0.5) < 0.03
    # and both are the chained lowbias32 they say they are
    for r, (seed, step) in enumerate(zip(seeds, steps)):
        h = lowbias32(lowbias32(lowbias32((seed & 0xFFFFFFFF) ^ 0x9E3779B9) ^ (seed >> 32)) ^ step)
        for c in (0, 151, len(ids) - 1):
            assert u_torch[r, c] == np.float32(((lowbias32(h ^ int(ids[c])) >> 9) + 0.5) / 2**23)


def test_draw_frequencies_match_probabilities(backend):
    s = sampler(backend, seed=3)
    x = tiny.to_backend(backend, LOGITS)
    counts = np.bincount([s(x).token for _ in range(4000)], minlength=4)
    assert counts / 4000 == pytest.approx(PROBS, abs=0.03)


def test_penalty_state_only_where_needed(backend):
    plain, penalized = sampler(backend, seed=1), sampler(backend, prompt=[2], seed=1, presence_penalty=0.5)
    x = tiny.to_backend(backend, np.zeros(8))
    plain(x), penalized(x)
    assert plain.seen is None and plain.counts is None
    assert penalized.seen is not None and penalized.counts is not None


def test_mlx_step_then_read_is_a_call():
    """runtime.stream queues the next decode on `step`'s lazy token before `read`."""
    mod = sampler_module("mlx")
    import mlx.core as mx

    params = SamplingParams(top_k=5, seed=9, logprobs=2, repetition_penalty=1.2)
    logits = mx.array(np.random.default_rng(5).normal(size=40).astype(np.float32))
    lazy, called = mod.make_sampler(params, [1]), mod.make_sampler(params, [1])
    assert isinstance(lazy, mod.Sampler)
    for _ in range(5):
        out = lazy.step(logits)
        mx.async_eval(out)
        assert lazy.read(out) == called(logits)
