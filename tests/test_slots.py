"""Slots on the real embedded model: the prefix a slot keeps, its TTL, and the
settle that lets a follow-up prefill only its new tokens even when the template
re-renders past assistant turns without their thinking. (Slot choice and LRU are
in test_scheduler.py, on a fake runtime.)"""

import dataclasses

import pytest

from fermi.engine import Engine
from fermi.errors import FermiError
from fermi.serving import Scheduler
from fermi.serving.slots import SlotStore
from models import chat, engine
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


def test_idle_slots_forget_their_prefix():
    clock = Clock()
    store = SlotStore(3, ttl_s=1.0, clock=clock)
    old, busy, fresh = store[0], store[1], store[2]
    store.acquire(old)
    store.release(old, [1, 2, 3])
    store.acquire(busy)
    clock.now += 0.5
    store.acquire(fresh)
    store.release(fresh, [7, 8, 9])
    clock.now += 0.7  # old idle 1.2 s, fresh 0.7 s; busy is held
    assert store.expire() == [old]
    assert old.ids == [] and fresh.ids == [7, 8, 9]
    assert SlotStore(1).expire() == []  # no TTL: never


def test_a_core_needs_a_slot(eng):
    with pytest.raises(FermiError):
        Scheduler(eng, 0)


def test_next_turn_ids_predict_the_next_prompt(qwen3_style):
    history = [{"role": "user", "content": "Hi there."}]
    reply = "Hello! How can I help?"
    for thinking in ("on", "off"):
        predicted = qwen3_style.next_turn_ids(history, {"role": "assistant", "content": reply}, thinking)
        # the client sends the reply back (with the reasoning it got, which the template drops)
        following = history + [{"role": "assistant", "content": reply, "reasoning_content": "Let me think."},
                                {"role": "user", "content": "Tell me a joke."}]
        ids = qwen3_style.prompt(following, thinking).ids
        assert ids[: len(predicted)] == predicted
        new = len(qwen3_style.tokenizer.encode("Tell me a joke."))
        # its end of turn and the generation prompt (think tags are 3 tokens each here)
        assert len(ids) - len(predicted) <= new + 16


def test_settle_makes_a_follow_up_prefill_only_its_new_tokens(qwen3_style):
    core = qwen3_style.scheduler(2)
    history = [{"role": "user", "content": "Name three colours."}]
    records = chat(qwen3_style, history, "on", 8, core=core, temperature=0.0)
    reasoning = "".join(r.text for r in records[:-1] if r.kind == "reasoning")
    answer = "".join(r.text for r in records[:-1] if r.kind == "content")
    assert reasoning  # the template opened a think block, so all of it is reasoning...
    settling = [r for r in core.running if r.settle]
    assert len(settling) == 1  # the slot is settled to the next turn in the steps after Done
    slot = core.slots[settling[0].slot]
    core.step()
    assert not core.running and slot.ids == qwen3_style.next_turn_ids(history, {"role": "assistant", "content": answer}, "on")

    # ...which the next turn's rendering of that past turn drops
    follow = history + [{"role": "assistant", "content": answer, "reasoning_content": reasoning},
                        {"role": "user", "content": "And three fruits?"}]
    done = chat(qwen3_style, follow, "on", 4, core=core, temperature=0.0)[-1]
    new = len(qwen3_style.tokenizer.encode("And three fruits?"))
    assert done.prompt_tokens - done.cached_tokens <= new + 16  # the new message and its framing
    assert done.cached_tokens > records[-1].prompt_tokens  # the re-rendered past turn came from the cache

    fresh = chat(qwen3_style, follow, "on", 4, temperature=0.0)[-1]
    assert fresh.cached_tokens == 0 and fresh.tokens == done.tokens  # and the cache changed nothing
