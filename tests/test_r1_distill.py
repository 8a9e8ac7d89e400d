"""DeepSeek-R1-Distill-Qwen: qwen2 weights and a template whose generation prompt opens
`<think>`. A tiny random qwen2 directory with R1's real template (tests/data) and a
byte-level tokenizer with R1's special tokens, read by fermi and by transformers: the
prompt for thinking on/off/auto equals transformers' apply_chat_template (off: with the
think block closed empty, as DESIGN.md says), replies split into reasoning and answer
as specified (one that never closes `</think>` is all reasoning), and past turns
render as transformers renders them (R1's template drops their reasoning)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from fermi import backends, sources
from fermi.engine import Engine
from fermi.serving.output import Output
from tiny import build

R1 = json.loads((Path(__file__).parent / "data" / "deepseek-r1-distill-qwen-1.5b.json").read_text(encoding="utf-8"))
SPECIAL = [R1["bos_token"], R1["eos_token"], "<｜User｜>", "<｜Assistant｜>"]
OPEN_PROMPT = "<｜Assistant｜><think>\n"  # how R1's generation prompt ends
EMPTY_THINK = "<think>\n\n</think>\n\n"  # DESIGN.md's empty think block

ASK = [{"role": "user", "content": "What is 2+2?"}]
SYSTEM = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"}]
# R1's template keeps only what follows a past turn's </think>
PAST_REASONING = ASK + [{"role": "assistant", "content": "<think>\nsome reasoning\n</think>\n\nIt is 4."},
                        {"role": "user", "content": "And 3+3?"}]
PAST_ANSWER = ASK + [{"role": "assistant", "content": "It is 4."}, {"role": "user", "content": "And 3+3?"}]
CONVERSATIONS = {"ask": ASK, "system": SYSTEM, "past-reasoning": PAST_REASONING, "past-answer": PAST_ANSWER}


def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE without merges (one token a byte) plus R1's added tokens; <think>
    and </think> are ordinary added tokens, as in the real tokenizer.json."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    return tok


@pytest.fixture(scope="module")
def r1(tmp_path_factory):
    """(fermi's Engine on torch, transformers' tokenizer) over one tiny R1 directory."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = build("qwen2", tmp_path_factory.mktemp("r1")).path
    hf = PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer(), bos_token=R1["bos_token"],
                                 eos_token=R1["eos_token"])
    hf.chat_template = R1["chat_template"]
    hf.save_pretrained(path)
    files = sources.from_dir(path)
    assert files.chat_template == R1["chat_template"]
    return Engine(files, backends.get("torch").load(files, dtype="float32")), AutoTokenizer.from_pretrained(path)


def reference(hf, messages) -> str:
    return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("thinking", ["on", "auto", "off"])
def test_prompt_is_transformers_and_off_closes_the_open_block(r1, thinking, conversation):
    eng, hf = r1
    messages = CONVERSATIONS[conversation]
    want = reference(hf, messages)
    assert want.startswith(R1["bos_token"]) and want.endswith(OPEN_PROMPT)
    if thinking == "off":  # the template's open <think> closed empty: one block, not a second <think>
        want = want.removesuffix("<think>\n") + EMPTY_THINK
    p = eng.prompt(messages, thinking)
    assert p.text == want
    assert p.ids == hf(want, add_special_tokens=False).input_ids
    # auto is the model's own default: R1 thinks
    assert (p.thinking, p.in_reasoning, p.keep_reasoning) == ((False,) * 3 if thinking == "off" else (True,) * 3)


def split(eng, messages, thinking, reply: str) -> tuple[str, str]:
    """(reasoning, content) of `reply` written by the model after the prompt, through the
    request's own output processor."""
    req = eng.request(messages, thinking, 200)
    out = Output(eng.tokenizer, eng.eos_ids, 200, None, req.in_reasoning, req.keep_reasoning, False, raw=req.raw)
    records = []
    for t in eng.tokenizer.encode(reply) + [eng.tokenizer.token_id(R1["eos_token"])]:
        recs, finish = out.feed(SimpleNamespace(token=t))
        records += recs
        if finish:
            break
    assert finish == "stop"  # R1's <｜end▁of▁sentence｜> ends the reply
    records += out.close(finish)[0]
    return tuple("".join(r.text for r in records if r.kind == kind) for kind in ("reasoning", "content"))


@pytest.mark.parametrize("thinking", ["on", "auto"])
def test_thinking_reply_splits_at_the_close(r1, thinking):
    eng, _ = r1
    reasoning, content = split(eng, ASK, thinking, "\nTwo and two make four.\n</think>\n\nIt is 4.")
    assert (reasoning.strip(), content) == ("Two and two make four.", "It is 4.")
    # never closed before the end: all of it is reasoning
    assert split(eng, ASK, thinking, "\nTwo and two, hmm, carry the") == ("Two and two, hmm, carry the", "")


def test_off_reply_is_all_answer_and_a_think_block_is_stripped(r1):
    eng, _ = r1
    assert split(eng, ASK, "off", "It is 4.") == ("", "It is 4.")
    assert split(eng, ASK, "off", "<think>\nstill thinking\n</think>\n\nIt is 4.") == ("", "It is 4.")


def test_generated_reply_of_the_tiny_model(r1):
    """The random model never writes </think>: thinking on, its whole reply is reasoning;
    off, all answer."""
    eng, _ = r1
    close = eng.tokenizer.token_id("</think>")
    for thinking, kind in (("auto", "reasoning"), ("off", "content")):
        records = list(eng.scheduler().run(eng.request(ASK, thinking, 16, temperature=0.0)))
        done, deltas = records[-1], records[:-1]
        assert close not in done.tokens and len(done.tokens) > 0
        assert deltas and {d.kind for d in deltas} == {kind}
        assert "".join(d.text for d in deltas) == eng.tokenizer.decode(done.tokens).lstrip()


def test_next_turn_drops_the_reasoning_as_the_template_does(r1):
    """The slot's settle: the reply re-rendered as a past turn is exactly the start of
    the next request, as transformers renders it (the past reasoning gone)."""
    eng, hf = r1
    settled = eng.next_turn_ids(ASK, {"role": "assistant", "content": "It is 4."}, "auto")
    for history in (PAST_REASONING, PAST_ANSWER):
        text = reference(hf, history)
        assert "some reasoning" not in text
        ids = hf(text, add_special_tokens=False).input_ids
        if history is PAST_ANSWER:  # the reasoning's blank line stays in the other (the template keeps it)
            assert ids[: len(settled)] == settled
            assert hf.decode(ids[len(settled):]) == "And 3+3?" + OPEN_PROMPT
        assert eng.prompt(history, "auto").ids == ids
