"""Slow tier: a full tool round trip with Qwen2.5-Coder-0.5B (its own template
teaches the Hermes format; greedily it answers with the bare call object), through
chat completions, the Responses API and Ollama's /api/chat, streamed and not; and
the OpenAI Agents SDK running an agent with one function tool. A 0.5B model may only echo the tool's
result: these tests assert the wire shapes and the prefix reuse, not its wording."""

import asyncio
import json

import pytest
from openai import AsyncOpenAI, OpenAI

from server_util import Server

MODEL = "qwen2.5-coder-0.5b"
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
                                           "parameters": WEATHER}}]
QUESTION = "What is the weather in Paris right now?"
ASK = [{"role": "user", "content": QUESTION}]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    with Server("--parallel", "2", model=MODEL) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=300)


def test_chat_round_trip_streamed_and_whole(client):
    whole = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=60)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0,
                                                 max_tokens=60, stream=True))
    pieces = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices]
    assert pieces[0].id and pieces[0].function.name == "get_weather"
    assert len(pieces) > 2  # the arguments came in pieces, as generated
    assert "".join(p.function.arguments or "" for p in pieces) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    history = ASK + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                            temperature=0, max_tokens=30)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    assert answer.usage.prompt_tokens_details.cached_tokens >= whole.usage.prompt_tokens


def test_responses_round_trip(client):
    flat = [{"type": "function", **t["function"]} for t in TOOLS]
    r = client.responses.create(model=MODEL, input=QUESTION, tools=flat, temperature=0, max_output_tokens=60)
    (fc,) = r.output
    assert fc.type == "function_call" and json.loads(fc.arguments) == {"city": "Paris"}
    deltas = ""
    with client.responses.stream(model=MODEL, input=QUESTION, tools=flat, temperature=0,
                                 max_output_tokens=60) as s:
        for e in s:
            if e.type == "response.function_call_arguments.delta":
                deltas += e.delta
    assert deltas == fc.arguments
    back = client.responses.create(
        model=MODEL, tools=flat, tool_choice="none", temperature=0, max_output_tokens=30,
        input=[{"role": "user", "content": QUESTION},
               {"type": "function_call", "call_id": fc.call_id, "name": fc.name, "arguments": fc.arguments},
               {"type": "function_call_output", "call_id": fc.call_id, "output": "18 C and sunny"}])
    assert back.output_text and back.usage.input_tokens_details.cached_tokens >= r.usage.input_tokens


def test_an_agents_sdk_agent_calls_its_tool_and_finishes(server):
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    seen = []

    @function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        seen.append(city)
        return f"It is 18 C and sunny in {city}."

    client = AsyncOpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=300)
    agent = Agent(name="weather", instructions="Answer questions about the weather.", tools=[get_weather],
                  model=OpenAIChatCompletionsModel(model=MODEL, openai_client=client),
                  model_settings=ModelSettings(temperature=0, max_tokens=60))
    result = asyncio.run(Runner.run(agent, QUESTION, max_turns=4))
    assert seen and set(seen) == {"Paris"}  # (a 0.5B model may call it again before it answers)
    assert isinstance(result.final_output, str) and result.final_output


def test_the_ollama_client_gets_calls_with_object_arguments(server):
    import ollama

    client = ollama.Client(host=server.base, timeout=300)
    r = client.chat(model=MODEL, messages=ASK, tools=TOOLS, options={"temperature": 0, "num_predict": 60})
    (call,) = r.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    chunks = list(client.chat(model=MODEL, messages=ASK, tools=TOOLS, options={"temperature": 0, "num_predict": 60},
                              stream=True))
    calls = [c for ch in chunks for c in (ch.message.tool_calls or [])]
    assert [(c.function.name, c.function.arguments) for c in calls] == [("get_weather", {"city": "Paris"})]
