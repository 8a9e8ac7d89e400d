"""The pieces between token ids and deltas: thinking splitter, stop strings,
incremental detokenizer, chat template, sampling defaults."""

import itertools

import pytest

from fermi.errors import FermiError
from fermi.sampling import resolve
from fermi.stops import StopStrings
from fermi.template import EMPTY_THINK, ChatTemplate
from fermi.thinking import ThinkingSplitter, opens_in_thinking


def split_all(splitter, pieces):
    out = []
    for p in pieces:
        out += splitter.feed(p)
    out += splitter.flush()
    joined = {"reasoning": "", "content": ""}
    for kind, text in out:
        joined[kind] += text
    return joined


def cuts(text, n):
    """Every way to cut `text` into n+1 pieces (n cut points)."""
    for points in itertools.combinations(range(1, len(text)), n):
        bounds = (0, *points, len(text))
        yield [text[a:b] for a, b in zip(bounds, bounds[1:])]


TEXT = "<think>\nLet me see: 2+2.\n</think>\n\nIt is 4."


@pytest.mark.parametrize("n", [1, 2])
def test_thinking_split_at_every_point(n):
    for pieces in cuts(TEXT, n):
        got = split_all(ThinkingSplitter(), pieces)
        assert got == {"reasoning": "Let me see: 2+2.\n", "content": "It is 4."}, pieces


def test_thinking_open_in_prompt_and_unclosed():
    # the template opened the block; no </think> before the end: all reasoning so far
    got = split_all(ThinkingSplitter(in_reasoning=True), ["still ", "thinking <", "/thi"])
    assert got == {"reasoning": "still thinking </thi", "content": ""}


def test_thinking_off_strips_emitted_block():
    for pieces in cuts(TEXT, 1):
        got = split_all(ThinkingSplitter(keep_reasoning=False), pieces)
        assert got == {"reasoning": "", "content": "It is 4."}


def test_no_think_tags_is_all_content():
    got = split_all(ThinkingSplitter(), ["a < b and ", "<thin", "g>"])
    assert got == {"reasoning": "", "content": "a < b and <thing>"}


def test_opens_in_thinking():
    assert opens_in_thinking("<|im_start|>assistant\n<think>\n")
    assert not opens_in_thinking("<|im_start|>assistant\n" + EMPTY_THINK)
    assert not opens_in_thinking("<|im_start|>assistant\n")


@pytest.mark.parametrize("n", [1, 2, 3])
def test_stop_string_found_across_every_cut(n):
    text = "Hello there. STOP here, and more"
    for pieces in cuts(text, n):
        s = StopStrings(["STOP", "zzz"])
        emitted, hit = "", False
        for p in pieces:
            t, hit = s.feed(p)
            emitted += t
            if hit:
                break
        assert hit and emitted == "Hello there. ", pieces


def test_stop_prefix_released_when_not_a_stop():
    s = StopStrings(["STOP"])
    assert s.feed("ST") == ("", False)
    assert s.feed("ay") == ("STay", False)
    assert s.feed("ST") == ("", False)
    assert s.flush() == "ST"


def test_first_of_several_stops_wins():
    assert StopStrings(["b", "a"]).feed("xxaxb") == ("xx", True)


QWEN3_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def test_template_thinking_switch():
    t = ChatTemplate(QWEN3_LIKE)
    msgs = [{"role": "user", "content": "hi"}]
    assert t.render(msgs, "off").endswith("assistant\n<think>\n\n</think>\n\n")
    assert t.render(msgs, "on").endswith("assistant\n")
    assert t.render(msgs, "auto") == t.render(msgs, "on")


def test_template_without_switch_gets_empty_block_when_off():
    t = ChatTemplate(QWEN3_LIKE.replace("enable_thinking", "other_flag"))
    msgs = [{"role": "user", "content": "hi"}]
    assert t.render(msgs, "off") == t.render(msgs, "on") + EMPTY_THINK


def test_template_is_sandboxed():
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(FermiError, match="chat template"):
        ChatTemplate(evil).render([], "auto")


def test_template_raise_exception_is_readable():
    with pytest.raises(FermiError, match="roles must alternate"):
        ChatTemplate("{{ raise_exception('roles must alternate') }}").render([])


def test_sampling_defaults_by_thinking_mode_and_generation_config():
    assert resolve({}, thinking=True).temperature == 0.6
    p = resolve({}, thinking=False)
    assert (p.temperature, p.top_p, p.top_k) == (0.7, 0.8, 20)
    assert resolve({}, True, {"temperature": 0.3}).temperature == 0.3
    assert resolve({"temperature": 0.0}, True, {"temperature": 0.3}).greedy
    assert resolve({"top_k": None}, True).top_k == 20


def test_a_template_whose_own_code_fails_is_a_template_error():
    for source in ("{% for i in range(10**9) %}{% endfor %}", "{{ 1 // 0 }}", "{{ messages[0].content + 1 }}"):
        with pytest.raises(FermiError, match="chat template error"):
            ChatTemplate(source).render([{"role": "user", "content": "hi"}], "auto")
