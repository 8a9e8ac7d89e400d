"""Each backend's sampler (`make_sampler(params, prompt_ids)`) on hand-built logits."""

import numpy as np
import pytest

import tiny
from fermi.sampling import SamplingParams


def sampler(backend, prompt=(), **params):
    return tiny.backend_module(backend).make_sampler(SamplingParams(**params), list(prompt))


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
