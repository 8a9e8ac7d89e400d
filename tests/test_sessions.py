"""The session store: which cached conversation a prompt continues, LRU and TTL
eviction, and the settle that lets a follow-up prefill only its new tokens even
when the template re-renders past assistant turns without their thinking."""

import dataclasses

import pytest

from fermi.engine import Engine
from fermi.errors import FermiError
from fermi.sessions import SessionStore
from models import engine
from server_util import QWEN3_STYLE


@pytest.fixture(scope="module")
def eng():
    return engine("torch")


@pytest.fixture(scope="module")
def qwen3_style(eng):
    """The embedded model with a Qwen3-style template (the same weights)."""
    return Engine(dataclasses.replace(eng.model, chat_template=QWEN3_STYLE), eng.runtime)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def cached(store, ids, held=None):
    """A session that holds `ids` (bookkeeping only: no model runs)."""
    s = store.acquire(ids)
    s.ids = list(held if held is not None else ids)
    store.release(s)
    return s


def test_a_prompt_goes_to_the_conversation_it_continues(eng):
    store = SessionStore(eng, max_sessions=3)
    system = [1, 2, 3]  # a shared system prompt does not make two conversations one
    a = cached(store, system + [4] * 10)
    b = cached(store, system + [5] * 10)
    assert a is not b and len(store) == 2
    assert store.acquire(system + [4] * 12) is a  # extends a
    assert store.acquire(system + [5] * 10 + [6]) is b  # extends b
    store.release(a)
    store.release(b)
    assert store.acquire(system + [4] * 5) is a  # repeats the start of a: regenerating
    store.release(a)
    c = store.acquire(system + [7] * 10)
    assert c not in (a, b) and len(store) == 3  # nothing continued: a new session, room left


def test_a_busy_session_is_never_shared(eng):
    store = SessionStore(eng, max_sessions=2)
    a = cached(store, [1, 2, 3])
    first = store.acquire([1, 2, 3, 4])
    second = store.acquire([1, 2, 3, 4])
    assert first is a and second is not a
    store.release(first)
    store.release(second)


def test_least_recently_used_is_evicted(eng):
    clock = Clock()
    store = SessionStore(eng, max_sessions=2, clock=clock)
    a = cached(store, [1, 1, 1, 1])
    clock.now += 1
    b = cached(store, [2, 2, 2, 2])
    clock.now += 1
    cached(store, [1, 1, 1, 1, 5])  # a is used again: b is now the least recent
    clock.now += 1
    c = cached(store, [3, 3, 3, 3])
    assert c is b and len(store) == 2  # b's cache now holds the new conversation
    assert store.acquire([1, 1, 1, 1, 5, 6]) is a


def test_idle_sessions_expire(eng):
    clock = Clock()
    store = SessionStore(eng, max_sessions=4, ttl_ms=1000, clock=clock)
    old = cached(store, [1, 2, 3])
    busy = store.acquire([4, 5, 6])
    clock.now += 0.5
    fresh = cached(store, [7, 8, 9])
    clock.now += 0.7  # old and busy idle 1.2 s, fresh 0.7 s
    assert store.expire() == 1
    assert old not in store.sessions and busy in store.sessions and fresh in store.sessions
    assert SessionStore(eng, ttl_ms=0).ttl is None
    with pytest.raises(FermiError):
        SessionStore(eng, max_sessions=0)


def test_next_turn_ids_predict_the_next_prompt(qwen3_style):
    history = [{"role": "user", "content": "Hi there."}]
    reply = "Hello! How can I help?"
    for thinking in ("on", "off"):
        predicted = SessionStore(qwen3_style).next_turn_ids(history, reply, thinking)
        # the client sends the reply back (with the reasoning it got, which the template drops)
        following = history + [{"role": "assistant", "content": reply, "reasoning_content": "Let me think."},
                                {"role": "user", "content": "Tell me a joke."}]
        ids = qwen3_style.prompt(following, thinking).ids
        assert ids[: len(predicted)] == predicted
        new = len(qwen3_style.tokenizer.encode("Tell me a joke."))
        # its end of turn and the generation prompt (think tags are 3 tokens each here)
        assert len(ids) - len(predicted) <= new + 16


def test_settle_makes_a_follow_up_prefill_only_its_new_tokens(qwen3_style):
    store = SessionStore(qwen3_style, max_sessions=2)
    history = [{"role": "user", "content": "Name three colours."}]
    prompt = qwen3_style.prompt(history, "on")
    session = store.acquire(prompt.ids)
    records = list(session.generate(prompt, qwen3_style.sampling(prompt, temperature=0.0), max_new_tokens=8))
    reasoning = "".join(r.text for r in records[:-1] if r.kind == "reasoning")
    answer = "".join(r.text for r in records[:-1] if r.kind == "content")
    assert reasoning  # the template opened a think block, so all of it is reasoning...
    assert session.common_prefix(prompt.ids) == len(prompt.ids)
    added = store.settle(session, history, answer, "on")
    assert added > 0
    store.release(session)

    # ...which the next turn's rendering of that past turn drops
    follow = history + [{"role": "assistant", "content": answer, "reasoning_content": reasoning},
                        {"role": "user", "content": "And three fruits?"}]
    prompt2 = qwen3_style.prompt(follow, "on")
    assert store.acquire(prompt2.ids) is session
    records2 = list(session.generate(prompt2, qwen3_style.sampling(prompt2, temperature=0.0), max_new_tokens=4))
    done = records2[-1]
    new = len(qwen3_style.tokenizer.encode("And three fruits?"))
    assert done.prompt_tokens - done.cached_tokens <= new + 16  # the new message and its framing
    assert done.cached_tokens > len(prompt.ids)  # the re-rendered past turn came from the cache
    store.release(session)

    fresh = list(qwen3_style.session().generate(prompt2, qwen3_style.sampling(prompt2, temperature=0.0),
                                                max_new_tokens=4))[-1]
    assert fresh.cached_tokens == 0 and fresh.tokens == done.tokens  # and the cache changed nothing
