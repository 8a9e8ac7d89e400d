"""Tools and structured output through a real `fermi serve` (SmolLM2, whose
template knows no tools: fermi describes them in the Hermes format) and the real
clients: the openai SDK (chat completions and Responses), LangChain."""

import json

import jsonschema
import pytest
from openai import BadRequestError, OpenAI
from pydantic import BaseModel, Field

from server_util import MODEL, Server

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Get the local time in a city",
                                           "parameters": WEATHER}}]
FLAT = [{"type": "function", **t["function"]} for t in TOOLS]
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]
SCHEMA = {  # every kind of constraint the issue names
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]+$"},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "height_m": {"type": "number"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 2, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]},
    },
    "required": ["name", "age", "height_m", "role", "tags", "address"],
}


@pytest.fixture(scope="module")
def server():
    with Server("--parallel", "4") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=120)


def create(client, **kw):
    kw = {"messages": ASK, "temperature": 0, "max_tokens": 120, **kw}
    return client.chat.completions.create(model=MODEL, **kw)


def streamed(client, **kw):
    """(content, {index: [id, name, arguments]}, finish_reason) of a streamed answer."""
    content, calls, finish = "", {}, None
    for chunk in create(client, stream=True, **kw):
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for tc in delta.tool_calls or []:
                if tc.id:
                    calls[tc.index] = [tc.id, tc.function.name, ""]
                calls[tc.index][2] += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, calls, finish


# --- structured output


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)
    hobbies: list[str] = Field(min_length=1, max_length=3)


def test_parse_with_a_pydantic_model_returns_the_object(client):
    r = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Describe a person."}],
                                      response_format=Person, temperature=0, max_tokens=200)
    person = r.choices[0].message.parsed
    assert isinstance(person, Person) and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_answers_validate_streamed_and_whole(client, seed):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    ask = [{"role": "user", "content": "Invent a user record."}]
    whole = create(client, messages=ask, response_format=fmt, temperature=1.0, seed=seed, max_tokens=300)
    jsonschema.validate(json.loads(whole.choices[0].message.content), SCHEMA)
    content, _, finish = streamed(client, messages=ask, response_format=fmt, temperature=1.0, seed=seed, max_tokens=300)
    assert content == whole.choices[0].message.content and finish == "stop"


def test_json_object_answers_parse(client):
    r = create(client, messages=[{"role": "user", "content": "Name the capital of France. Answer in JSON."}],
               response_format={"type": "json_object"}, max_tokens=300)
    assert r.choices[0].finish_reason == "stop"  # (an answer cut off by max_tokens is cut off)
    assert isinstance(json.loads(r.choices[0].message.content), dict)


@pytest.mark.parametrize("schema,names", [
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "strin"}, "strin"),
    ({"type": "string", "pattern": "(?=a)b"}, "look-around"),
])
def test_a_schema_that_cannot_be_enforced_is_a_400_naming_it(client, schema, names):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    with pytest.raises(BadRequestError) as e:
        create(client, response_format=fmt)
    err = e.value.body
    assert names in err["message"] and err["param"] == "response_format.json_schema.schema"


# --- tools


def test_required_tool_choice_returns_a_valid_call_streamed_as_it_comes(client):
    r = create(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in ("get_weather", "get_time")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)

    content, calls, finish = streamed(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    assert content == "" and finish == "tool_calls" and len(calls) == 1
    _, name, arguments = calls[0]
    assert (name, arguments) == (call.function.name, call.function.arguments)


def test_a_named_tool_choice_calls_that_tool(client):
    r = create(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = r.choices[0].message.tool_calls
    assert calls and {c.function.name for c in calls} == {"get_time"}


def test_a_tool_round_trip_reuses_the_whole_first_prompt(client):
    first = create(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
    second = create(client, messages=history, tools=TOOLS, tool_choice="none", max_tokens=20)
    assert second.choices[0].finish_reason in ("stop", "length") and not second.choices[0].message.tool_calls
    assert second.choices[0].message.content
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_bad_tools_are_400s_naming_the_field(client):
    for kw, param in [(dict(tools=[{"type": "web_search"}]), "tools[0].type"),
                      (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
                      (dict(tool_choice="required"), "tool_choice"),
                      (dict(tools=TOOLS, tool_choice="sometimes"), "tool_choice")]:
        with pytest.raises(BadRequestError) as e:
            create(client, **kw)
        assert e.value.body["param"] == param, kw


# --- n choices


def test_n_choices_share_the_prompt_and_each_equals_its_solo_answer(client):
    ask = [{"role": "user", "content": "Tell me a story."}]
    r = create(client, messages=ask, n=3, temperature=0.9, seed=10, max_tokens=12)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for i, c in enumerate(r.choices):  # choice i draws with seed + i
        solo = create(client, messages=ask, temperature=0.9, seed=10 + i, max_tokens=12)
        assert c.message.content == solo.choices[0].message.content
    assert r.usage.completion_tokens == sum(12 for _ in r.choices)


# --- the Responses API


def test_responses_function_calls_and_their_results(client):
    r = client.responses.create(model=MODEL, input=ASK[0]["content"], tools=FLAT, tool_choice="required",
                                parallel_tool_calls=False, temperature=0, max_output_tokens=80)
    (fc,) = r.output
    assert fc.type == "function_call" and fc.status == "completed" and r.status == "completed"
    jsonschema.validate(json.loads(fc.arguments), WEATHER)

    events, deltas = [], ""
    with client.responses.stream(model=MODEL, input=ASK[0]["content"], tools=FLAT, tool_choice="required",
                                 parallel_tool_calls=False, temperature=0, max_output_tokens=80) as s:
        for e in s:
            events.append(e.type)
            if e.type == "response.function_call_arguments.delta":
                deltas += e.delta
        final = s.get_final_response()
    assert events[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert events[-3:] == ["response.function_call_arguments.done", "response.output_item.done",
                           "response.completed"]
    assert deltas == fc.arguments == final.output[0].arguments

    back = client.responses.create(
        model=MODEL, tools=FLAT, tool_choice="none", temperature=0, max_output_tokens=16,
        input=[{"role": "user", "content": ASK[0]["content"]},
               {"type": "function_call", "call_id": fc.call_id, "name": fc.name, "arguments": fc.arguments},
               {"type": "function_call_output", "call_id": fc.call_id, "output": "18 C and sunny"}])
    assert back.output_text and back.usage.input_tokens_details.cached_tokens >= r.usage.input_tokens


class City(BaseModel):
    name: str
    country: str


def test_responses_text_format_parses(client):
    r = client.responses.parse(model=MODEL, input="Name a city in France.", text_format=City, temperature=0,
                               max_output_tokens=60)
    assert isinstance(r.output_parsed, City)


# --- LangChain


def test_langchain_bind_tools_and_structured_output(server):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return "18 C"

    llm = ChatOpenAI(base_url=server.url("/v1"), api_key="unused", model=MODEL, temperature=0, max_tokens=80,
                     max_retries=0)
    message = llm.bind_tools([get_weather], tool_choice="required").invoke(ASK[0]["content"])
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"
    assert isinstance(message.tool_calls[0]["args"].get("city"), str)
    assert isinstance(llm.with_structured_output(City).invoke("Name a city in France."), City)


# --- text completions (no chat template)


def test_completions_whole_streamed_echo_lists_and_logprobs(client):
    kw = dict(model=MODEL, max_tokens=8, temperature=0)
    whole = client.completions.create(prompt="The capital of France is", **kw)
    text = whole.choices[0].text
    assert text.startswith(" ") and "Paris" in text  # the model's own text: its leading space kept
    assert whole.usage.prompt_tokens == 5 and whole.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(prompt="The capital of France is",
                                                                              stream=True, **kw) if c.choices)
    assert streamed == text
    both = client.completions.create(prompt=["The capital of France is", "One, two,"], echo=True, n=2, **kw)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert both.choices[0].text == both.choices[1].text == "The capital of France is" + text
    assert both.choices[2].text.startswith("One, two,")
    lp = client.completions.create(prompt="The capital of France is", logprobs=2, **kw).choices[0].logprobs
    assert "".join(lp.tokens) == text and len(lp.token_logprobs) == len(lp.tokens) == 8
    assert all(len(top) == 2 and max(top.values()) >= got - 1e-5 for top, got in zip(lp.top_logprobs, lp.token_logprobs))
    ids = client.completions.create(prompt=[504, 3575, 282, 4649, 314], **kw)  # token ids
    assert ids.usage.prompt_tokens == 5
    with pytest.raises(BadRequestError):
        client.completions.create(prompt="x", suffix="y", **kw)
    with pytest.raises(BadRequestError):
        client.completions.create(prompt=[[]], **kw)
