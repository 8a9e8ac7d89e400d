"""`fermi serve` end to end: the official openai SDK against a real server process
on loopback, serving the embedded SmolLM2 with a Qwen3-style chat template (so
thinking on/off/auto has an effect on a model that does not think by itself)."""

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import NotFoundError, OpenAI

from server_util import MODEL, QWEN3_STYLE, Server

ASK = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def server():
    with Server("--parallel", "8", template=QWEN3_STYLE) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=120)


def chat(client, messages=ASK, thinking="off", max_tokens=8, **kw):
    extra = kw.pop("extra_body", {})
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0,
                                          extra_body={"thinking": thinking, **extra}, **kw)


def reasoning_of(obj):
    return getattr(obj, "reasoning_content", None), getattr(obj, "reasoning", None)


# --- health, models, schema


def test_health_models_and_schema(server, client):
    assert 503 in server.health_seen  # the port answered while the model loaded
    assert httpx.get(server.url("/health")).json()["status"] == "ok"
    models = client.models.list().data
    assert models[0].id == MODEL and models[0].model_extra["loaded"] is True
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(NotFoundError):
        client.models.retrieve("no-such/model")
    paths = httpx.get(server.url("/schema/openapi.json")).json()["paths"]
    assert {"/v1/chat/completions", "/v1/responses", "/v1/models", "/health"} <= set(paths)


# --- thinking


@pytest.mark.parametrize("mode", ["on", "off", "auto"])
def test_chat_thinking_stream_and_whole(client, mode):
    whole = chat(client, thinking=mode, max_tokens=4)
    msg = whole.choices[0].message
    reasoning, also = reasoning_of(msg)
    chunks = list(chat(client, thinking=mode, max_tokens=4, stream=True, stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    streamed = "".join(reasoning_of(c.choices[0].delta)[0] or "" for c in chunks if c.choices)
    assert (content, streamed or None) == (msg.content, reasoning)  # the stream says what the whole answer says
    if mode == "off":  # the answer, and nothing in the reasoning fields (a bug elsewhere)
        assert msg.content and reasoning is None and also is None
        assert not any(reasoning_of(c.choices[0].delta) != (None, None) for c in chunks if c.choices)
        assert whole.usage.completion_tokens_details.reasoning_tokens == 0
    else:  # the template opened a think block: all the model said is reasoning
        assert reasoning and also == reasoning and msg.content == ""
        assert whole.usage.completion_tokens_details.reasoning_tokens > 0
    # stream shape: role first, finish_reason on the last choice, then a usage chunk with no choices
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


@pytest.fixture(scope="module")
def off_prompt_tokens(client):
    return chat(client, thinking="off", max_tokens=1).usage.prompt_tokens


@pytest.mark.parametrize("spelling, thinks", [
    ({"chat_template_kwargs": {"enable_thinking": False}}, False),
    ({"chat_template_kwargs": {"enable_thinking": True}, "reasoning_effort": "none"}, True),
    ({"reasoning_effort": "none"}, False),
    ({"reasoning_effort": "low"}, True),
    ({"thinking": "off", "chat_template_kwargs": {"enable_thinking": True}}, False),
])
def test_thinking_spellings_and_precedence(client, off_prompt_tokens, spelling, thinks):
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1, temperature=0, extra_body=spelling)
    # thinking off renders a closed empty think block: more prompt tokens than "<think>\n"
    assert (r.usage.prompt_tokens < off_prompt_tokens) == thinks


def test_inline_reasoning_stays_in_content(client):
    r = chat(client, thinking="on", max_tokens=4, extra_body={"reasoning_format": "inline"})
    msg = r.choices[0].message
    assert msg.content.startswith("<think>\n") and msg.content.endswith("</think>")
    assert reasoning_of(msg) == (None, None)


# --- responses


def test_responses_whole(client):
    r = client.responses.create(model=MODEL, input="Name three colours.", instructions="You are a helpful assistant.",
                                max_output_tokens=4, temperature=0, reasoning={"effort": "high"})
    assert r.object == "response" and r.id.startswith("resp_") and r.instructions.startswith("You are")
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens" and r.usage.output_tokens == 4
    else:
        assert r.status == "completed" and r.usage.output_tokens < 4
    kinds = [item.type for item in r.output]
    assert kinds == ["reasoning", "message"]
    assert r.output[0].content[0].type == "reasoning_text" and r.output[0].content[0].text and r.output[0].summary == []
    assert r.usage.output_tokens_details.reasoning_tokens > 0

    off = client.responses.create(model=MODEL, input=[{"role": "user", "content": "Name three colours."}],
                                  max_output_tokens=4, temperature=0, reasoning={"effort": "none"})
    assert [item.type for item in off.output] == ["message"]
    assert off.output_text and off.output[0].content[0].annotations == []
    assert off.usage.total_tokens == off.usage.input_tokens + off.usage.output_tokens


def test_responses_stream_event_order(client):
    events = list(client.responses.create(model=MODEL, input="Say just: yes", max_output_tokens=6, temperature=0,
                                          stream=True, extra_body={"thinking": "on"}))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    types = [e.type for e in events]
    item = ["response.output_item.added", "response.content_part.added"]
    end = ["response.content_part.done", "response.output_item.done"]
    n = types.count("response.reasoning_text.delta")
    expected = (["response.created", "response.in_progress"]
                + item + ["response.reasoning_text.delta"] * n + ["response.reasoning_text.done"] + end)
    assert n > 0 and types[: len(expected)] == expected
    rest = types[len(expected):]
    m = rest.count("response.output_text.delta")
    assert rest == item + ["response.output_text.delta"] * m + ["response.output_text.done"] + end + [rest[-1]]
    final = events[-1]
    assert final.type in ("response.completed", "response.incomplete")
    assert final.response.status == final.type.split(".")[1]
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert final.response.output[0].content[0].text == reasoning
    assert final.response.usage.output_tokens > 0


# --- sampling, stops, cache


def test_stop_strings_and_logprobs(client):
    full = chat(client, max_tokens=10, logprobs=True, top_logprobs=2)
    text = full.choices[0].message.content
    lps = full.choices[0].logprobs.content
    # one entry per generated token; the answer's opening whitespace is trimmed from the text only
    assert len(lps) == full.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in lps)
    assert "".join(t.token for t in lps).strip() == text.strip()
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip()
    cut = chat(client, max_tokens=10, stop=stop)  # a string; the mlx smoke test sends a list
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]


def test_seed_reproducibility(client):
    def sample(seed):
        return client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=6, temperature=1.0, seed=seed,
                                              extra_body={"thinking": "off", "top_k": 0, "top_p": 1.0}
                                              ).choices[0].message.content

    a, b, c = sample(7), sample(7), sample(8)
    assert a == b and a != c


def test_second_turn_reports_cached_tokens(client):
    history = [{"role": "user", "content": "Tell me about the moon."}]
    first = chat(client, history, max_tokens=8)
    answer = first.choices[0].message.content
    history += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And the sun?"}]
    second = chat(client, history, max_tokens=4)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # The past turn is rendered without its (empty) think block, so only the server's
    # settle after turn one makes the whole history reusable.
    assert cached >= first.usage.prompt_tokens
    assert second.usage.prompt_tokens - cached < 20  # the new user message and its framing


def test_eight_streaming_clients_at_once_each_get_their_solo_answer(server, client):
    questions = ["Name a fruit.", "Name a colour.", "Name an animal.", "Name a city.", "What is 2 + 2?",
                 "Say hello.", "Name a planet.", "Name a tree."]

    def ask(q):
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"thinking": "off"})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, chunks[-1].usage.completion_tokens, (chunks[0], chunks[-1])

    alone = [ask(q)[:2] for q in questions]
    with ThreadPoolExecutor(len(questions)) as pool:
        together = list(pool.map(ask, questions))
    assert [t[:2] for t in together] == alone
    assert all(text for text, _ in alone)
    assert httpx.get(server.url("/health")).json()["slots"] == 8


# --- disconnects


def test_disconnect_frees_the_engine(server, client):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Repeat the word hello 1000 times."}],
            "max_tokens": 2000, "temperature": 0, "stream": True, "thinking": "off"}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.url("/v1/chat/completions"), json=body) as r:
            got = 0
            for line in r.iter_lines():
                got += line.startswith("data: ")
                if got >= 3:
                    break  # hang up mid-stream
    start = time.perf_counter()
    after = chat(client, max_tokens=2)
    assert after.choices[0].message.content
    assert time.perf_counter() - start < 60  # the abandoned 2000 tokens would take many minutes here
    line = next(line for line in server.log().splitlines() if "client disconnected" in line)
    assert int(line.split("completion=")[1].split()[0]) < 100
    assert httpx.get(server.url("/health")).json()["active"] == 0


# --- the other backend


def test_mlx_backend_smoke():
    pytest.importorskip("fermi.backends.mlx")
    with Server("--dtype", "float32", backend="mlx") as s:
        c = OpenAI(base_url=s.url("/v1"), api_key="unused", max_retries=0, timeout=120)
        r = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, temperature=0, stop=["never", "seen"])
        assert r.choices[0].message.content and r.usage.completion_tokens == 4
        assert s.stop(signal.SIGINT) == 0  # Ctrl-C: a clean shutdown
        assert "Traceback" not in s.log()
