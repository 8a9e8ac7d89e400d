"""The tool-call parsers on hand-written model outputs of each format, fed whole
and split at every character: the same content, the same calls."""

import json

import pytest

from fermi.serving import ToolCall
from fermi.toolcalls import CallParser
from fermi.tools import ToolSet, call_format

TOOLS = {"get_weather": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}


def parse(fmt: str, pieces: list[str]):
    """(content, [(id, name, arguments)], number of argument pieces) of the records."""
    p = CallParser(fmt, TOOLS)
    records = [r for piece in pieces for r in p.feed(piece)] + p.flush()
    content = "".join(r[1] for r in records if isinstance(r, tuple))
    calls, pieces_seen = [], 0
    for r in records:
        if isinstance(r, ToolCall):
            if r.name is not None:
                assert r.index == len(calls) and r.id.startswith("call_")
                calls.append([r.name, ""])
            calls[r.index][1] += r.arguments
            pieces_seen += bool(r.arguments)
    return content, [tuple(c) for c in calls], pieces_seen


CASES = [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Let me check.\n", [("get_weather", '{"city": "Paris"}')]),
    # small models drop the tags: a bare object naming a known tool is a call...
    ("hermes", '{"name": "get_weather", "arguments": {"city": "Pa\\"ris}", "days": 2}}',
     "", [("get_weather", '{"city": "Pa\\"ris}", "days": 2}')]),
    # ...an object that names none is an answer
    ("hermes", '{"name": "Alice", "arguments": []}', '{"name": "Alice", "arguments": []}', []),
    ("hermes", '{"answer": 42}', '{"answer": 42}', []),
    # keys in another order: read whole at the closing tag
    ("hermes", '<tool_call>\n{"arguments": {"city": "Oslo"}, "name": "get_weather"}\n</tool_call> Done.',
     " Done.", [("get_weather", '{"city": "Oslo"}')]),
    ("hermes", '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n'
               '{"name": "b", "arguments": {"x": [1, {"y": "}"}]}}\n</tool_call>',
     "", [("a", "{}"), ("b", '{"x": [1, {"y": "}"}]}')]),
    ("hermes", "a < b and <tool", "a < b and <tool", []),
    ("hermes", "<tool_call>\nnot json\n</tool_call>", "<tool_call>\nnot json\n</tool_call>", []),
    ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}',
     "", [("get_weather", '{"city": "Rome"}')]),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Rome"}}', "", [("get_weather", '{"city": "Rome"}')]),
    ("qwen3_coder", 'Sure. <tool_call>\n<function=get_weather>\n<parameter=city>\nNew\nYork\n</parameter>\n'
                    '<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>',
     "Sure. ", [("get_weather", '{"city": "New\\nYork", "days": 3}')]),
]


@pytest.mark.parametrize("fmt,text,content,calls", CASES)
def test_parsers_split_at_every_character(fmt, text, content, calls):
    whole = parse(fmt, [text])
    assert whole[:2] == (content, calls)
    for cut in range(1, len(text)):
        assert parse(fmt, [text[:cut], text[cut:]])[:2] == whole[:2], cut
    by_char = parse(fmt, list(text))
    assert by_char[:2] == whole[:2]
    for _, args in calls:
        json.loads(args)
    if calls and "Oslo" not in text:  # (keys out of order are read whole)
        assert by_char[2] > len(calls)  # the arguments went out as they came, not whole at the end


def test_a_reply_cut_off_inside_a_call_keeps_what_it_has():
    content, calls, _ = parse("hermes", ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'])
    assert content == "" and calls == [("get_weather", '{"city": "Par')]


@pytest.mark.parametrize("template,fmt,native", [
    ("{% for m in messages %}{{ m.content }}{% endfor %}", "hermes", False),
    ("{% if tools %}<tools>{{ tools }}</tools> <tool_call>{% endif %}", "hermes", True),
    ("{% if tools %}<function=x><parameter=y>{% endif %}<tool_call>", "qwen3_coder", True),
    ("{% if tools %}<|python_tag|>{% endif %}", "llama3", True),
])
def test_the_format_comes_from_the_template(template, fmt, native):
    assert call_format(template) == (fmt, native)


def test_forced_call_grammar_names_only_the_allowed_tools():
    tools = [{"type": "function", "function": {"name": n, "parameters": TOOLS["get_weather"]}} for n in ("a", "b")]
    quote = lambda text: json.dumps(text)  # noqa: E731
    required = ToolSet(tools, "required", parallel=False).rules(quote)
    named = ToolSet(tools, "b").rules(quote)
    assert '"const": "a"' in required and '"const": "b"' in required and '("\\n" call)*' not in required
    assert '"const": "a"' not in named and '("\\n" call)*' in named


def test_without_parallel_calls_the_parser_says_when_the_one_call_is_whole():
    p = CallParser("hermes", TOOLS, parallel=False)
    p.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}')
    assert not p.finished
    p.feed("\n</tool_call>")
    assert p.finished


@pytest.mark.parametrize("fmt,answer", [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}'),
    ("qwen3_coder", "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                    "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>"),
])
def test_each_format_s_forced_grammar_takes_its_own_call_and_the_parser_reads_it(fmt, answer):
    """The forced-call grammar of each format, on the embedded model's real tokenizer:
    the format's own call is accepted token by token and ends the answer (only EOS
    after it); its parser reads the same call back."""
    import numpy as np

    from fermi.grammar import start
    from models import engine

    eng = engine("torch")
    tools = ToolSet([{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"]}}}], "required", parallel=False)
    tools.fmt = fmt
    mask = eng.grammars.mask(start({"calls": tools.rules(eng.grammars.literal)}))
    words = -(-eng.runtime.config.vocab_size // 32)
    for token in eng.tokenizer.encode(answer):
        mask.accept(token)  # raises if the grammar refuses it
    row = np.full(words, -1, dtype=np.int32)
    mask.fill(row)
    allowed = set(np.nonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))[0])
    assert allowed <= eng.eos_ids
    content, calls, _ = parse(fmt, [answer])
    assert calls == [("get_weather", '{"city": "Paris", "days": 2}')] and not content.strip()
