"""`fermi serve` under bad input, a wrong key, a full queue and concurrent
clients: raw httpx against a real server (the model's own template, an API key,
two generations at once, room for one more in the queue)."""

import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpx
import pytest

from server_util import MODEL, Server

KEY = "s3cret-key"
HI = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    with Server("--api-key", KEY, "--parallel", "2", env={"FERMI_QUEUE_MAX": "1"}) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


def assert_error(r: httpx.Response, status: int, param=None, code=None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def test_api_key(server):
    url = server.url("/v1/models")
    err = assert_error(httpx.get(url), 401, code="invalid_api_key")
    assert err["type"] == "authentication_error"
    assert_error(httpx.get(url, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.post(server.url("/v1/chat/completions"), json={"messages": HI}), 401)
    assert httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(server.url("/health")).status_code == 200  # no key needed to know it is up


CHAT = "/v1/chat/completions"
BAD = [
    # (path, body, status, param)
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}', 400, None),  # malformed JSON
    (CHAT, b"[1, 2]", 400, None),  # JSON, not an object
    (CHAT, b"", 400, None),
    (CHAT, {}, 400, "messages"),
    (CHAT, {"messages": "hi"}, 400, "messages"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    (CHAT, {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages[0].content[0]"),
    (CHAT, {"messages": HI, "model": "gpt-4o"}, 404, "model"),
    (CHAT, {"messages": HI, "n": 17}, 400, "n"),
    (CHAT, {"messages": HI, "n": 0}, 400, "n"),
    (CHAT, {"messages": HI, "tools": [{"type": "function", "function": {"name": "a b"}}]}, 400, "tools[0].name"),
    (CHAT, {"messages": HI, "response_format": {"type": "xml"}}, 400, "response_format.type"),
    (CHAT, {"messages": HI, "response_format": {"type": "json_schema"}}, 400, "response_format.json_schema.schema"),
    (CHAT, {"messages": HI, "temperature": "hot"}, 400, "temperature"),
    (CHAT, {"messages": HI, "temperature": 2.5}, 400, "temperature"),
    (CHAT, {"messages": HI, "temperature": -0.1}, 400, "temperature"),
    (CHAT, {"messages": HI, "top_p": 1.5}, 400, "top_p"),
    (CHAT, {"messages": HI, "top_p": 0}, 400, "top_p"),
    (CHAT, {"messages": HI, "max_tokens": -1}, 400, "max_tokens"),
    (CHAT, {"messages": HI, "max_completion_tokens": -5}, 400, "max_completion_tokens"),
    (CHAT, {"messages": HI, "thinking": "maybe"}, 400, "thinking"),
    (CHAT, {"messages": HI, "stop": 3}, 400, "stop"),
    ("/v1/responses", {}, 400, "input"),
    ("/v1/responses", {"input": 5}, 400, "input"),
    ("/v1/responses", {"input": "hi", "max_output_tokens": -1}, 400, "max_output_tokens"),
    ("/v1/responses", {"input": "hi", "model": "nope"}, 404, "model"),
    ("/v1/responses", {"input": [{"type": "function_call", "name": "f"}]}, 400, "input[0]"),  # no call_id
    ("/v1/responses", {"input": [{"type": "image_generation_call"}]}, 400, "input[0].type"),
    ("/v1/responses", {"input": "hi", "tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
    ("/v1/responses", {"input": "hi", "text": {"format": {"type": "json_schema", "schema": {"not": {}}}}}, 400,
     "text.format.schema"),
]


@pytest.mark.parametrize("path, body, status, param", BAD,
                         ids=[f"{i}-{b[0].split('/')[-1]}" for i, b in enumerate(BAD)])
def test_bad_input_is_an_error_object(http, path, body, status, param):
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post(path, json=body)
    err = assert_error(r, status, param)
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_prompt_longer_than_the_context(http):
    r = http.post(CHAT, json={"messages": [{"role": "user", "content": "word " * 9000}]})
    err = assert_error(r, 400, code="context_length_exceeded")
    numbers = [int(n) for n in re.findall(r"\d+", err["message"])]
    assert 8192 in numbers and any(n > 8192 for n in numbers)  # both lengths


def test_body_too_large(http):
    assert_error(http.post(CHAT, content=b" " * (9 * 1024 * 1024), headers={"Content-Type": "application/json"}),
                 413)


def test_unknown_route_and_method(http):
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.get(CHAT), 405)


def test_a_normal_request_after_all_of_them(http):
    r = http.post(CHAT, json={"messages": HI, "max_tokens": 8, "temperature": 0, "model": MODEL})
    assert r.status_code == 200, r.text
    body = r.json()
    assert "Paris" in body["choices"][0]["message"]["content"]
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")


COUNT = "Repeat the word hello 1000 times."  # greedy, it loops on and on


def stream_body(content: str, max_tokens: int = 2000) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True}


def wait_for_stats(http, timeout=30, **want) -> dict:
    """/health's counts once they are `want` (the engine thread admits between steps)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = http.get("/health").json()
        if all(stats[k] == v for k, v in want.items()) or time.monotonic() > deadline:
            assert all(stats[k] == v for k, v in want.items()), str(stats)
            return stats
        time.sleep(0.1)


def test_full_queue_answers_503_at_once(http):
    wait_for_stats(http, active=0, waiting=0)
    with ExitStack() as streams:
        # two generations run (2 slots), one waits (queue 1)...
        for active, waiting in [(1, 0), (2, 0), (2, 1)]:
            r = streams.enter_context(http.stream("POST", CHAT, json=stream_body(COUNT)))
            assert r.status_code == 200
            wait_for_stats(http, active=active, waiting=waiting)
        # ...so the next one is refused, now
        err = assert_error(http.post(CHAT, json={"messages": HI, "max_tokens": 2}, timeout=10), 503, code="overloaded")
        assert err["type"] == "server_error"
    # the three hang up: their places free, and the server answers again
    r = http.post(CHAT, json={"messages": HI, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    wait_for_stats(http, active=0, waiting=0)


def test_concurrent_clients_get_what_they_would_alone(http):
    prompts = ["Name a fruit.", "Name a colour.", "Name an animal."]

    def ask(prompt):
        r = http.post(CHAT, json={"messages": [{"role": "user", "content": prompt}], "max_tokens": 4,
                                  "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    alone = [ask(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:  # two at once, the third queued
        together = list(pool.map(ask, prompts))
    assert together == alone


def test_request_log_and_clean_shutdown(server):
    assert server.stop(signal.SIGTERM) == 0
    log = server.log()
    assert "Traceback" not in log
    lines = log.splitlines()
    assert any(re.fullmatch(r"fermi: POST /v1/chat/completions 200 prompt=\d+ cached=\d+ completion=\d+ "
                            r"\d+\.\d+s", line) for line in lines), log
    assert any(re.fullmatch(r"fermi: GET /v1/models 401 \d+\.\d+s", line) for line in lines), log
    assert any(" 503 " in line for line in lines) and any(" 413 " in line for line in lines)


def test_settings_env_and_flags():
    from fermi.errors import FermiError
    from fermi.server.app import Settings

    env = {"FERMI_API_KEY": "k", "FERMI_PORT": "9000", "FERMI_ENGINE_POOL": "2", "FERMI_SESSION_TTL_MS": "0"}
    s = Settings.from_env(env)
    assert (s.host, s.port, s.api_key, s.parallel, s.session_ttl_ms, s.queue_max) == ("127.0.0.1", 9000, "k", 2, 0, 64)
    assert Settings.from_env({}).parallel is None  # the device's default: 4 slots on a CPU, 8 on a GPU
    assert Settings.from_env(env, port=8123, api_key="flag").port == 8123  # flags win
    with pytest.raises(FermiError, match="FERMI_ENGINE_POOL"):
        Settings.from_env({"FERMI_ENGINE_POOL": "0"})
