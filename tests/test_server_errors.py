"""`fermi serve` under bad input, a wrong key, a full queue and concurrent
clients: raw httpx against a real server (the model's own template, an API key,
two generations at once, room for one more in the queue)."""

import json
import re
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpx
import pytest

from server_util import MODEL, Server

KEY = "s3cret-key"
HI = [{"role": "user", "content": "Name the capital of France."}]


@pytest.fixture(scope="module")
def server():
    with Server("--api-key", KEY, "--parallel", "2", "--drain-seconds", "3", "--header-timeout", "2",
                "--max-connections", "8", env={"FERMI_QUEUE_MAX": "1"}) as s:
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
    r = http.get(CHAT)
    assert_error(r, 405)
    assert "POST" in r.headers["allow"].split(", ")


@pytest.mark.parametrize("body", [b'{"messages": [{"role": "user", "con', b'{"messages": "\xff"}',
                                  b'{"messages": ' + b"[" * 1000 + b"]" * 1000 + b"}"],
                         ids=["truncated", "not-utf8", "nested-1000-deep"])
def test_json_that_cannot_be_read_is_invalid_json(http, body):
    err = assert_error(http.post(CHAT, content=body, headers={"Content-Type": "application/json"}), 400,
                       code="invalid_json")
    assert err["message"].startswith("the request body is not valid JSON")


def test_a_non_boolean_enable_thinking_has_a_code(http):
    assert_error(http.post(CHAT, json={"messages": HI, "chat_template_kwargs": {"enable_thinking": "yes"}}), 400,
                 param="chat_template_kwargs.enable_thinking", code="invalid_value")


def test_request_ids_and_a_log_that_cannot_be_forged(server, http):
    r = http.get("/v1/models", headers={"X-Request-Id": "trace-42"})
    assert r.headers["x-request-id"] == "trace-42"
    generated = http.get("/v1/models").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert http.get("/v1/models", headers={"X-Request-Id": "bad id"}).headers["x-request-id"] != "bad id"
    http.get("/v1/models%0Afermi: forged line %E2%9C%93")
    time.sleep(0.2)
    log = server.log()
    assert any(line.startswith("fermi: trace-42 GET /v1/models 200") for line in log.splitlines())
    assert not any(line.startswith("fermi: forged") for line in log.splitlines())
    assert "/v1/models\\nfermi: forged line \\u2713 404" in log


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
        r = http.post(CHAT, json={"messages": HI, "max_tokens": 2}, timeout=10)
        err = assert_error(r, 503, code="overloaded")
        assert err["type"] == "server_error" and r.headers["retry-after"] == "1"
    # the three hang up: their places free, and the server answers again
    r = http.post(CHAT, json={"messages": HI, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    wait_for_stats(http, active=0, waiting=0)


def test_a_queued_request_whose_client_gives_up_leaves_at_once(server, http):
    wait_for_stats(http, active=0, waiting=0)
    with ExitStack() as streams:
        for active in (1, 2):
            streams.enter_context(http.stream("POST", CHAT, json=stream_body(COUNT)))
            wait_for_stats(http, active=active)
        with pytest.raises(httpx.ReadTimeout):  # queued behind the two, it gives up after 2 s
            http.post(CHAT, json={"messages": [{"role": "user", "content": "Give up."}], "max_tokens": 2},
                      timeout=2)
        stats = wait_for_stats(http, timeout=5, waiting=0)  # ...and leaves the queue while they still run
        assert stats["active"] == 2
        gone = re.compile(r"POST /v1/chat/completions \S+ prompt=\d+ cached=0 completion=0 ([\d.]+)s \(cancelled\)")
        deadline = time.monotonic() + 10
        while not gone.search(server.log()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert float(gone.search(server.log()).group(1)) < 5, server.log()  # its handler ended: it was told
    wait_for_stats(http, active=0, waiting=0)


def scrape(http) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_metrics_move_by_exactly_what_was_asked(server, http):
    assert_error(httpx.get(server.url("/metrics")), 401)  # behind the key (--metrics-public opens it)
    wait_for_stats(http, active=0, waiting=0)
    before = scrape(http)
    count = {"messages": [{"role": "user", "content": "Count from 1 to 100."}], "max_tokens": 3, "temperature": 0}
    usages = [http.post(CHAT, json=count).json()["usage"] for _ in range(2)]
    assert_error(http.post(CHAT, json={"messages": []}), 400)
    after = scrape(http)
    model = (("model", MODEL),)

    def moved(name, labels=model):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    chat = (("route", CHAT),)
    assert moved("fermi_requests_total", chat + (("status", "200"),)) == 2
    assert moved("fermi_requests_total", chat + (("status", "400"),)) == 1
    assert moved("fermi_request_duration_seconds_count", chat) == 3
    assert moved("fermi_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert moved("fermi_cached_tokens_total") == sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert moved("fermi_generated_tokens_total") == 6
    assert moved("fermi_answers_total", (("finish_reason", "length"),) + model) == 2
    assert moved("fermi_time_to_first_token_seconds_count") == 2
    assert moved("fermi_inter_token_latency_seconds_count") == 2
    assert after[("fermi_slots", model)] == 2 and after[("fermi_active_slots", model)] == 0
    assert after[("fermi_queue_depth", model)] == 0 and after[("fermi_model_load_seconds", model)] > 0
    assert 0 < after[("fermi_kv_cache_tokens", model)] <= after[("fermi_kv_cache_capacity_tokens", model)]
    assert 0 <= after[("fermi_prefix_cache_hit_ratio", model)] <= 1


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


# --- web pages: Host, body types, CORS


def test_the_schema_page_needs_nothing_from_elsewhere(server):
    page = httpx.get(server.url("/schema"))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    links = re.findall(r"""(?:src|href)=['"]([^'"]+)""", page.text)
    assert any(link.endswith(".js") for link in links) and any(link.endswith(".css") for link in links)
    for link in links:  # the renderer's script, styles and icon come from this server (offline: not blank)
        assert link.startswith("/schema/"), link
        r = httpx.get(server.url(link))
        assert r.status_code == 200 and len(r.content) > 100, link
    assert "SwaggerUIBundle" in httpx.get(server.url("/schema/assets/swagger-ui-bundle.js")).text
    assert httpx.get(server.url("/schema/openapi.json")).json()["paths"]["/ready"]


def test_a_host_that_is_not_an_address_or_localhost_is_refused(server, http):
    port = server.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "app.localhost"):
        assert http.get("/v1/models", headers={"Host": host}).status_code == 200, host
    err = assert_error(http.get("/v1/models", headers={"Host": f"rebound.example:{port}"}), 403,
                       code="host_not_allowed")
    assert "--allowed-hosts" in err["message"]


@pytest.mark.parametrize("kind", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None])
def test_a_body_not_declared_json_is_refused(http, kind):
    body = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}'
    headers = {"Content-Type": kind} if kind else {}
    r = http.post(CHAT, content=body, headers=headers)  # (None: httpx sends no Content-Type for bytes)
    assert kind is not None or "content-type" not in r.request.headers
    err = assert_error(r, 415, code="unsupported_media_type")
    assert "application/json" in err["message"]
    ok = http.post(CHAT, content=body, headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200, ok.text


def test_cors_is_off_unless_asked_and_allowed_hosts_widen_the_host_check():
    from litestar.testing import TestClient

    from fermi.server.app import Settings, create_app

    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type,authorization"}
    with TestClient(create_app(None, Settings()), base_url="http://127.0.0.1:8000") as c:
        r = c.get("/health", headers={"Origin": "https://app.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        assert "access-control-allow-origin" not in c.options(CHAT, headers=preflight).headers
        assert c.get("/health", headers={"Host": "box.lan"}).status_code == 403
    settings = Settings(cors_origins="https://app.example", allowed_hosts="box.lan")
    with TestClient(create_app(None, settings), base_url="http://127.0.0.1:8000") as c:
        r = c.options(CHAT, headers=preflight)
        assert r.status_code in (200, 204) and r.headers["access-control-allow-origin"] == "https://app.example"
        r = c.get("/health", headers={"Origin": "https://app.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        assert "access-control-allow-origin" not in c.options(CHAT, headers={**preflight, "Origin": "https://x.example"}).headers
        assert c.get("/health", headers={"Host": "box.lan"}).status_code == 200
        assert c.get("/health", headers={"Host": "other.lan"}).status_code == 403


def test_a_client_that_never_finishes_its_request_head_is_let_go(server, http):
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # ...and never the blank line
        s.settimeout(30)
        opened = time.monotonic()
        assert s.recv(100) == b""  # closed by the server
        assert 1.5 < time.monotonic() - opened < 10  # --header-timeout 2
    assert http.get("/health").status_code == 200


def read_all(s: socket.socket) -> bytes:
    s.settimeout(10)
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def test_connections_beyond_max_connections_get_503_and_the_server_goes_on(server, http):
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    with ExitStack() as stack:  # 9 open connections (and the client's own): beyond --max-connections 8
        socks = [stack.enter_context(socket.create_connection(("127.0.0.1", server.port))) for _ in range(9)]
        socks[-1].sendall(request)
        head, _, body = read_all(socks[-1]).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 "), head
        assert b"retry-after: 1" in head.lower() and b"content-type: application/json" in head.lower()
        err = json.loads(body)["error"]
        assert err["code"] == "too_many_connections" and "--max-connections" in err["message"]
        socks[0].sendall(request)  # those within the bound are answered
        assert read_all(socks[0]).startswith(b"HTTP/1.1 200 ")
    assert http.get("/health").status_code == 200  # closed, they free their places


def test_liveness_and_readiness_while_loading_and_after_a_failed_load():
    import threading

    from litestar.testing import TestClient

    from fermi.server.app import Settings, create_app

    release = threading.Event()

    def load():
        release.wait(30)
        raise OSError("no such weights")

    with TestClient(create_app(load, Settings()), base_url="http://127.0.0.1:8000") as c:
        assert c.get("/live").status_code == 200 and c.get("/live").json()["status"] == "loading"
        for path in ("/ready", "/health"):
            assert c.get(path).status_code == 503 and c.get(path).json()["status"] == "loading"
        release.set()
        deadline = time.monotonic() + 10
        while c.get("/live").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        for path in ("/live", "/ready", "/health"):
            r = c.get(path)
            assert r.status_code == 503 and r.json()["status"] == "error" and "no such weights" in r.json()["error"]
    with TestClient(create_app(None, Settings()), base_url="http://127.0.0.1:8000") as c:
        assert c.get("/ready").status_code == 200 and c.get("/ready").json()["status"] == "ok"
        c.app.state.fleet.drain()  # (SIGTERM's): not ready, so a load balancer stops sending; yet alive
        assert c.get("/ready").status_code == 503 and c.get("/ready").json()["status"] == "draining"
        assert c.get("/live").status_code == 200


def test_sigterm_drains_then_cuts_what_still_runs_and_says_so(server, http):
    assert http.post(CHAT, json={"messages": HI, "max_tokens": 2}).status_code == 200
    assert httpx.get(server.url("/v1/models")).status_code == 401
    wait_for_stats(http, active=0, waiting=0)
    with ExitStack() as streams, ThreadPoolExecutor(1) as pool:
        running = [streams.enter_context(http.stream("POST", CHAT, json=stream_body(COUNT))) for _ in range(2)]
        assert running[0].headers["content-type"].startswith("text/event-stream")  # (not the route's JSON)
        wait_for_stats(http, active=2)
        queued = pool.submit(http.post, CHAT, json={"messages": HI, "max_tokens": 2})
        wait_for_stats(http, waiting=1)
        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        r = queued.result()  # the queued one: 503 at once, to retry elsewhere
        err = assert_error(r, 503, code="shutting_down")
        assert r.headers["retry-after"] == "1" and time.monotonic() - signalled < 2.5
        lines = list(running[0].iter_lines())  # the running one goes on for the drain's 3 s, then is cut
        assert time.monotonic() - signalled >= 2.5
    events = [line for line in lines if line]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][len("data: "):])["error"]
    assert "cut short after" in error["message"] and "shutting down" in error["message"]
    assert not any('"finish_reason":"stop"' in line for line in lines)  # it does not look complete
    assert err["type"] == "server_error"
    assert server.proc.wait(30) == 0
    log = server.log()
    assert "Traceback" not in log
    lines = log.splitlines()
    assert any(re.fullmatch(r"fermi: \w+ POST /v1/chat/completions 200 prompt=\d+ cached=\d+ completion=\d+ "
                            r"\d+\.\d+s", line) for line in lines), log
    assert any(re.fullmatch(r"fermi: \w+ POST /v1/chat/completions 200 prompt=\d+ cached=\d+ completion=[1-9]\d* "
                            r"\d+\.\d+s \(cut short\)", line) for line in lines), log  # its tokens counted
    assert any(re.fullmatch(r"fermi: \w+ GET /v1/models 401 \d+\.\d+s", line) for line in lines), log


def test_json_logs_are_one_object_a_line():
    with Server("--log-format", "json") as s:
        httpx.post(s.url("/v1/chat/completions"), json={"messages": HI, "max_tokens": 2},
                   headers={"X-Request-Id": "json-1"})
        httpx.get(s.url("/v1/models%0Aforged"))
        time.sleep(0.2)
        records = [json.loads(line) for line in s.log().splitlines()]  # every line parses
    chat = next(r for r in records if r.get("request_id") == "json-1")
    assert (chat["method"], chat["path"], chat["status"], chat["completion_tokens"]) == ("POST", CHAT, 200, 2)
    assert chat["level"] == "info" and chat["duration_s"] > 0 and chat["prompt_tokens"] > 0
    assert any(r.get("path") == "/v1/models\nforged" and r["status"] == 404 for r in records)


def test_settings_env_and_flags():
    from fermi.errors import FermiError
    from fermi.server.app import Settings

    env = {"FERMI_API_KEY": "k", "FERMI_PORT": "9000", "FERMI_ENGINE_POOL": "2", "FERMI_SESSION_TTL_MS": "0"}
    s = Settings.from_env(env)
    assert (s.host, s.port, s.api_key, s.parallel, s.session_ttl_ms, s.queue_max) == ("127.0.0.1", 9000, "k", 2, 0, 64)
    assert (s.max_tokens, s.grpc_port, s.session_max) == (4096, None, 256)
    s = Settings.from_env({"FERMI_MAX_TOKENS": "0", "FERMI_GRPC_PORT": "50051", "FERMI_SESSION_MAX": "8"})
    assert (s.max_tokens, s.grpc_port, s.session_max) == (0, 50051, 8)
    assert Settings.from_env({}).parallel is None  # the device's default: 4 slots on a CPU, 8 on a GPU
    assert Settings.from_env(env, port=8123, api_key="flag").port == 8123  # flags win
    with pytest.raises(FermiError, match="FERMI_ENGINE_POOL"):
        Settings.from_env({"FERMI_ENGINE_POOL": "0"})

