"""Constrained decoding in the serving core, on both backends with the real
SmolLM2: schema-valid JSON, forced tool calls, the reasoning left free before
`</think>`, n choices that share one prefill and equal their solo answers, and a
tool round trip whose settle makes the next request prefill only its new tokens."""

import dataclasses
import json

import jsonschema
import numpy as np

from fermi.engine import Engine
from fermi.tools import ToolSet
from models import chat, engine
from server_util import QWEN3_STYLE

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3}},
    "required": ["name", "age", "tags"]}
WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Get the weather in a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                            "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


def text(records):
    return "".join(r.text for r in records[:-1] if r.kind == "content")


def test_json_schema_answers_validate_on_both_backends(backend):
    eng = engine(backend)
    core = eng.scheduler()
    for seed in range(2):
        records = list(core.run(eng.request([{"role": "user", "content": "Make up a person."}], max_tokens=200,
                                            json_schema=SCHEMA, temperature=1.0, seed=seed)))
        assert records[-1].finish_reason == "stop"
        jsonschema.validate(json.loads(text(records)), SCHEMA)


def test_a_forced_call_is_read_as_a_call_and_the_settle_renders_it():
    eng = engine("torch")  # (the mask's way through each backend is the JSON test's; the rest knows no backend)
    core = eng.scheduler()
    tools = ToolSet(WEATHER, "required", parallel=False)
    records = list(core.run(eng.request(ASK, max_tokens=60, tools=tools, temperature=0.0)))
    calls = [r for r in records[:-1] if r.kind == "tool_call"]
    assert records[-1].finish_reason == "tool_calls" and calls[0].name == "get_weather"
    arguments = "".join(c.arguments for c in calls)
    assert isinstance(json.loads(arguments)["city"], str)
    while core.busy:  # the settle
        core.step()
    history = ASK + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": calls[0].id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "18 C"}]
    follow = eng.request(history, max_tokens=4, tools=ToolSet(WEATHER, "none"), temperature=0.0)
    done = list(core.run(follow))[-1]
    new = len(eng.tokenizer.encode("<tool_response>\n18 C\n</tool_response>"))
    assert done.cached_tokens >= done.prompt_tokens - new - 8  # the tool result and the turn's tags


def test_with_thinking_the_reasoning_is_free_and_the_grammar_starts_after_think():
    eng = engine("torch")
    thinker = Engine(dataclasses.replace(eng.model, chat_template=QWEN3_STYLE), eng.runtime)
    request = thinker.request([{"role": "user", "content": "Make up a person."}], "on", json_schema=SCHEMA)
    assert request.in_reasoning
    (mask,) = request.masks
    words = -(-eng.runtime.config.vocab_size // 32)

    def allowed() -> int:
        row = np.full(words, -1, dtype=np.int32)
        mask.fill(row)
        return int(np.unpackbits(row.view(np.uint8)).sum())

    everything = allowed()
    for token in eng.tokenizer.encode("Let me think: {no JSON here} ...</think>"):
        assert allowed() == everything  # reasoning: any token
        mask.accept(token)
    assert allowed() < everything / 10  # now only what can open the JSON (or the blank line before it)
    for token in eng.tokenizer.encode('\n\n{"name": "Ada", "age": 36, "tags": ["a"]}'):
        mask.accept(token)  # raises if the grammar refuses it


def test_n_choices_share_one_prefill_and_equal_their_solo_answers(backend):
    eng = engine(backend)
    core = eng.scheduler(3)
    first = eng.request([{"role": "user", "content": "Tell me a story."}], max_tokens=6, temperature=0.9, seed=4)
    choices = [first] + [eng.fork(first, i) for i in (1, 2)]
    got = {id(r): [] for r in choices}
    for r in choices:
        r.sink = got[id(r)].append
    core.submit_all(choices)
    prefills = []
    forward = core.runtime.prefill_batch
    core.runtime.prefill_batch = lambda chunks, *a: prefills.append(len(chunks)) or forward(chunks, *a)
    try:
        while not all(r.finished for r in choices):  # (the settle after them is not counted)
            core.step()
    finally:
        del core.runtime.prefill_batch
    assert prefills == [1]  # the prompt went through the model once
    for i, r in enumerate(choices):
        solo = chat(eng, [{"role": "user", "content": "Tell me a story."}], max_new_tokens=6, temperature=0.9,
                    seed=4 + i)
        assert got[id(r)][-1].tokens == solo[-1].tokens
