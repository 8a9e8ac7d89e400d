"""The engine on the real embedded model (SmolLM2-135M-Instruct), on every backend."""

import pytest

from fermi.errors import ContextOverflow
from fermi.tokenizer import Detokenizer

from models import chat, engine, greedy_text

HELLO = [{"role": "user", "content": "Write a short poem about the sea."}]


@pytest.fixture
def eng(backend):
    return engine(backend)


GREEDY: dict = {}


def hello_40(eng):
    """The greedy 40-token answer to HELLO, generated once per backend (two tests read it)."""
    key = eng.runtime.__class__.__module__
    if key not in GREEDY:
        GREEDY[key] = greedy_text(eng, HELLO, 40)
    return GREEDY[key]


def test_deltas_concatenate_to_the_full_decode(eng):
    text, done = hello_40(eng)
    assert done.finish_reason == "length" and done.completion_tokens == 40
    assert text == eng.tokenizer.decode(done.tokens)
    assert done.prompt_tokens == len(eng.prompt(HELLO).ids) and done.cached_tokens == 0


def test_detokenizer_never_emits_a_broken_character(eng):
    text = "Emoji 🎉🧪 and CJK 漢字かな, accents éü — and code: `x = {'a': 1}`  \n\n end"
    ids = eng.tokenizer.encode(text)
    d = Detokenizer(eng.tokenizer)
    pieces = [d.add(i) for i in ids] + [d.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == eng.tokenizer.decode(ids) == text


def test_stop_string_across_tokens_is_found_and_not_emitted(eng):
    full, _ = hello_40(eng)
    # a stop string that starts inside one token and ends inside another
    start = len(full) // 2
    stop = full[start : start + 5]
    assert stop.strip()
    text, done = greedy_text(eng, HELLO, 40, stop=[stop])
    assert done.finish_reason == "stop"
    assert text == full[: full.index(stop)]


def test_eos_ends_with_stop(eng):
    text, done = greedy_text(eng, [{"role": "user", "content": "Say just: yes"}], 64)
    assert done.finish_reason == "stop" and done.completion_tokens < 64 and text


def test_same_seed_same_output(eng):
    def sample(seed):
        recs = chat(eng, HELLO, max_new_tokens=24, temperature=1.0, top_k=0, top_p=1.0, seed=seed)
        return recs[-1].tokens

    a, b, c = sample(7), sample(7), sample(8)
    assert a == b
    assert a != c


def test_second_turn_prefills_only_new_tokens(eng):
    core = eng.scheduler()
    first = chat(eng, HELLO, max_new_tokens=24, temperature=0.0, core=core)
    answer = "".join(r.text for r in first[:-1])
    turn2 = HELLO + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Now make it rhyme."}]
    recs = chat(eng, turn2, max_new_tokens=16, temperature=0.0, core=core)
    done = recs[-1]
    assert done.cached_tokens >= first[-1].prompt_tokens
    assert done.prompt_tokens - done.cached_tokens < 20  # only the new message and its framing
    # and the cache reuse changes nothing: a fresh core says the same
    _, fresh = greedy_text(eng, turn2, 16)
    assert fresh.tokens == done.tokens and fresh.cached_tokens == 0


def test_prompt_longer_than_context_is_refused(eng):
    long = [{"role": "user", "content": "word " * (eng.context_length + 10)}]
    with pytest.raises(ContextOverflow, match="context"):
        chat(eng, long, max_new_tokens=4)
