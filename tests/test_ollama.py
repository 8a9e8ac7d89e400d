"""Ollama's API end to end: the official `ollama` Python client against a real
`fermi serve` (SmolLM2 with the Qwen3-style template, so `think` has an effect)."""

import json

import httpx
import ollama
import pytest
from pydantic import BaseModel

from server_util import MODEL, QWEN3_STYLE, Server

ASK = [{"role": "user", "content": "Name the capital of France."}]
GREEDY = {"temperature": 0, "num_predict": 12}


@pytest.fixture(scope="module")
def server():
    with Server("--parallel", "2", template=QWEN3_STYLE) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.base, timeout=120)


def test_chat_whole_and_streamed_agree(client):
    whole = client.chat(model=MODEL, messages=ASK, think=False, options=GREEDY)
    assert whole.done and whole.done_reason in ("stop", "length") and whole.message.content
    assert whole.prompt_eval_count > 0 and whole.eval_count > 0 and whole.total_duration > 0
    chunks = list(client.chat(model=MODEL, messages=ASK, think=False, options=GREEDY, stream=True))
    assert [c.done for c in chunks].count(True) == 1 and chunks[-1].done
    assert "".join(c.message.content for c in chunks) == whole.message.content
    assert chunks[-1].eval_count == whole.eval_count


def test_think_puts_the_reasoning_in_message_thinking(client):
    on = client.chat(model=MODEL, messages=ASK, think=True, options=GREEDY)
    assert on.message.thinking  # the template opened a think block: what follows is reasoning
    off = client.chat(model=MODEL, messages=ASK, think=False, options=GREEDY)
    assert not off.message.thinking and off.message.content
    streamed = list(client.chat(model=MODEL, messages=ASK, think=True, options=GREEDY, stream=True))
    assert "".join(c.message.thinking or "" for c in streamed) == on.message.thinking


def test_generate_with_the_template_and_raw(client):
    g = client.generate(model=MODEL, prompt="Name the capital of France.", think=False, options=GREEDY)
    assert g.done and g.response
    raw = client.generate(model=MODEL, prompt="The capital of France is", raw=True, options=GREEDY)
    streamed = "".join(c.response for c in client.generate(model=MODEL, prompt="The capital of France is", raw=True,
                                                         options=GREEDY, stream=True))
    assert raw.response and streamed == raw.response
    # raw: the prompt as it is (5 tokens), no chat template around it
    assert raw.prompt_eval_count < 10 < g.prompt_eval_count


class City(BaseModel):
    name: str
    country: str


def test_format_json_schema_and_json(client):
    r = client.chat(model=MODEL, messages=[{"role": "user", "content": "Name a city in France."}], think=False,
                    format=City.model_json_schema(), options={"temperature": 0})
    assert isinstance(City.model_validate_json(r.message.content), City)
    r = client.chat(model=MODEL, messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
                    think=False, format="json", options={"temperature": 0})
    assert isinstance(json.loads(r.message.content), dict)


def test_past_tool_calls_and_results_render_back(client):
    """(The calls themselves: Qwen2.5-Coder in the slow tier, test_tools_agents.py; SmolLM2 makes none.)"""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Get the weather in a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                              "required": ["city"]}}}]
    history = [{"role": "user", "content": "What is the weather in Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
               {"role": "tool", "content": "18 C", "tool_name": "get_weather"}]
    assert client.chat(model=MODEL, messages=history, think=False, tools=tools, options=GREEDY).done


def test_list_show_ps_version(client, server):
    m, *others = client.list().models  # the loaded model, then the others on this machine
    assert m.model == MODEL and m.size > 0 and m.details.family == "llama"
    assert MODEL not in [o.model for o in others] and all(o.size > 0 for o in others)
    (p,) = client.ps().models
    assert p.model == MODEL and p.context_length > 0
    s = client.show(MODEL)
    assert "completion" in s.capabilities and "thinking" in s.capabilities and s.template == QWEN3_STYLE
    assert s.modelinfo["general.architecture"] == "llama"
    assert httpx.get(server.url("/api/version")).json()["version"]
    assert httpx.get(server.url("/api/health")).json() == {"status": "ok"}
    assert "running" in httpx.get(server.url("/")).text


def test_errors_are_ollama_error_objects(client, server):
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="nope", messages=ASK)
    assert e.value.status_code == 404 and "nope" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model=MODEL, messages=ASK, options={"mirostat": 1})
    assert e.value.status_code == 400 and "mirostat" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model=MODEL, messages=[{"role": "user", "content": "hi", "images": ["aGk="]}])
    assert e.value.status_code == 400 and "images" in e.value.error
    r = httpx.post(server.url("/api/chat"), json={"model": MODEL, "messages": ASK,
                                                   "format": {"type": "array", "uniqueItems": True}})
    assert r.status_code == 400 and "uniqueItems" in r.json()["error"]
    r = httpx.post(server.url("/api/chat"), content=b"{", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and isinstance(r.json()["error"], str)
    with pytest.raises(ollama.ResponseError) as e:  # this server runs offline (FERMI_OFFLINE=1)
        client.pull("acme/tiny")
    assert e.value.status_code == 400 and "offline" in e.value.error
    assert [p.get("error") for p in map(json.loads, httpx.post(server.url("/api/pull"), json={
        "model": "acme/tiny"}).text.splitlines())][-1].startswith("cannot pull")
    # hardware hints are taken (fermi decides those itself)
    assert client.chat(model=MODEL, messages=ASK, think=False, options={**GREEDY, "num_thread": 2}).done
