"""The gRPC service end to end: grpcio clients against a real `fermi serve
--grpc-port` (beside its HTTP API, the openai SDK for the comparisons), and the
Gradio demo driven through gradio_client. One server for the module: an API
key, 2 slots, a queue of 1, 3 sessions kept, idle sessions gone after 6 s; the
Qwen3-style template, so that thinking on/off has an effect."""

import filecmp
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from openai import OpenAI

from fermi.server.rpc import codegen
from fermi.server.rpc import fermi_pb2 as pb
from fermi.server.rpc import fermi_pb2_grpc as pb_grpc
from fermi.server.rpc.sessions import SessionError, Sessions
from server_util import MODEL, QWEN3_STYLE, Server, free_port

KEY = "grpc-secret"
AUTH = [("authorization", f"Bearer {KEY}")]
TTL_MS = 6000
ROOT = Path(__file__).resolve().parents[1]


# --- no server


def test_checked_in_stubs_are_what_the_proto_generates(tmp_path):
    for path in codegen.generate(tmp_path):
        assert filecmp.cmp(path, ROOT / "server" / "rpc" / path.name, shallow=False), \
            f"{path.name} is stale: run python -m fermi.server.rpc.codegen"


def test_sessions_evict_the_least_recently_used_idle_one_and_expire_idle_ones():
    now = [0.0]
    s = Sessions(max_sessions=2, ttl_s=10, clock=lambda: now[0])
    a, b = s.create(), s.create()
    a.busy = True
    c = s.create()  # b goes: a is busy (older, but generating)
    assert set(s.live) == {a.id, c.id}
    with pytest.raises(SessionError, match="evicted") as e:
        s.get(b.id)
    assert e.value.code == "not_found"
    c.busy = True
    with pytest.raises(SessionError) as e:
        s.create()  # every session is generating
    assert e.value.code == "full"
    a.busy = c.busy = False
    now[0] = 5
    s.get(a.id)  # used: its idle time starts again
    now[0] = 12
    assert s.expire() == [c]
    assert s.get(a.id) is a
    now[0] = 30
    with pytest.raises(SessionError, match="expired"):
        s.get(a.id)


# --- a real server


@pytest.fixture(scope="module")
def server():
    grpc_port = free_port()
    s = Server("--api-key", KEY, "--parallel", "2", "--queue-max", "1", "--grpc-port", str(grpc_port),
               "--session-max", "3", "--session-ttl-ms", str(TTL_MS), "--drain-seconds", "1", template=QWEN3_STYLE)
    s.grpc = f"127.0.0.1:{grpc_port}"
    with s:
        yield s


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc) as channel:
        yield pb_grpc.FermiStub(channel)


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url("/v1"), api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(autouse=True)
def idle_after(request):
    """Each test leaves the engine idle (a cancelled stream's slot freed) for the next."""
    yield
    if "server" in request.fixturenames and request.getfixturevalue("server").proc.poll() is None:
        server = request.getfixturevalue("server")
        for _ in range(200):
            h = httpx.get(server.url("/health")).json()
            if h["active"] == 0 and h["waiting"] == 0:
                return
            time.sleep(0.05)
        raise AssertionError(f"the engine is still busy after the test: {h}")


def generate(stub, prompt, session_id="", max_new_tokens=24, **kw):
    """(text, session_id, last response, pieces) of a greedy, thinking-off turn."""
    kw.setdefault("thinking", pb.THINKING_OFF)
    request = pb.GenerateRequest(session_id=session_id, prompt=prompt, max_new_tokens=max_new_tokens,
                                 temperature=0, **kw)
    pieces = list(stub.Generate(request, metadata=AUTH, timeout=120))
    last = pieces[-1]
    assert last.finish_reason and not last.token  # the last one carries finish reason and usage
    assert all(not p.finish_reason for p in pieces[:-1])
    return "".join(p.token for p in pieces[:-1]), last.session_id, last, pieces[:-1]


def http_answer(client, messages, max_tokens=24):
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0,
                                       extra_body={"thinking": "off"})
    return r.choices[0].message.content, r.usage


def code_of(call) -> tuple:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_every_refusal_maps_to_its_status_code():
    from fermi.errors import FermiError
    from fermi.server.rpc.service import refused
    from fermi.server.schemas import APIError

    C = grpc.StatusCode
    cases = [(APIError(503, "the model is still loading", code="model_loading"), C.UNAVAILABLE),
             (APIError(503, "the server is shutting down", code="shutting_down"), C.UNAVAILABLE),
             (APIError(503, "busy", code="overloaded"), C.RESOURCE_EXHAUSTED),
             (APIError(400, "bad"), C.INVALID_ARGUMENT), (APIError(404, "no model"), C.NOT_FOUND),
             (SessionError("busy", "generating"), C.FAILED_PRECONDITION),
             (SessionError("not_found", "gone"), C.NOT_FOUND), (SessionError("full", "full"), C.RESOURCE_EXHAUSTED),
             (FermiError("bad value"), C.INVALID_ARGUMENT), (RuntimeError("bug"), C.INTERNAL)]
    for error, code in cases:
        assert refused(error).code == code, error


def test_generate_streams_the_http_answer_piece_by_piece(stub, client):
    text, session_id, last, pieces = generate(stub, "Name three colours.")
    answer, usage = http_answer(client, [{"role": "user", "content": "Name three colours."}])
    assert text == answer and text
    assert len(pieces) > 3 and all(p.session_id == session_id for p in pieces)
    assert all("\ufffd" not in p.token and p.kind == pb.KIND_CONTENT for p in pieces)
    ids = [i for p in pieces for i in p.token_ids]
    assert all(p.token_id == p.token_ids[-1] for p in pieces if p.token_ids)
    assert len(ids) <= last.usage.completion_tokens == usage.completion_tokens
    assert last.usage.prompt_tokens == usage.prompt_tokens
    assert last.finish_reason == pb.FINISH_REASON_LENGTH if usage.completion_tokens == 24 else pb.FINISH_REASON_STOP
    assert last.usage.time_to_first_token_s > 0 and last.usage.tokens_per_second > 0


def test_thinking_comes_as_reasoning_pieces_then_content(stub, client):
    messages = [{"role": "user", "content": "Name three colours."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                       extra_body={"thinking": "on"})
    _, _, _, pieces = generate(stub, messages[0]["content"], thinking=pb.THINKING_ON)
    kinds = [p.kind for p in pieces]
    assert kinds[0] == pb.KIND_REASONING and kinds == sorted(kinds, reverse=True)  # reasoning first, then content
    reasoning = "".join(p.token for p in pieces if p.kind == pb.KIND_REASONING)
    content = "".join(p.token for p in pieces if p.kind == pb.KIND_CONTENT)
    assert (reasoning, content) == (r.choices[0].message.reasoning_content, r.choices[0].message.content or "")


def test_a_session_keeps_the_conversation_and_its_cache(stub, client):
    first, session_id, one, _ = generate(stub, "Name the capital of France.", system="Be brief.")
    second, same, two, _ = generate(stub, "And of Italy?", session_id=session_id)
    info = stub.ResetSession(pb.SessionRequest(session_id=session_id), metadata=AUTH)
    again, _, three, _ = generate(stub, "Name the capital of France.", session_id=session_id)
    assert same == session_id
    assert two.usage.cached_tokens >= one.usage.prompt_tokens  # the whole first turn was reused
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name the capital of France."},
               {"role": "assistant", "content": first}, {"role": "user", "content": "And of Italy?"}]
    assert (second, two.usage.prompt_tokens) == (lambda a, u: (a, u.prompt_tokens))(*http_answer(client, history))
    assert (info.session_id, info.messages, info.model) == (session_id, 4, MODEL)  # two turns forgotten
    assert again == first  # the same system prompt, an empty history
    stub.CloseSession(pb.SessionRequest(session_id=session_id), metadata=AUTH)
    code, details = code_of(lambda: generate(stub, "Hi", session_id=session_id))
    assert code == grpc.StatusCode.NOT_FOUND and "closed" in details


def test_sessions_past_the_limit_or_the_ttl_are_not_found(stub):
    ids = [generate(stub, "Hi", max_new_tokens=1)[1] for _ in range(4)]  # 3 are kept
    code, details = code_of(lambda: generate(stub, "Hi", session_id=ids[0], max_new_tokens=1))
    assert code == grpc.StatusCode.NOT_FOUND and "evicted" in details and "FERMI_SESSION_MAX" in details
    generate(stub, "Hi", session_id=ids[3], max_new_tokens=1)
    time.sleep(TTL_MS / 1000 + 0.6)
    code, details = code_of(lambda: stub.ResetSession(pb.SessionRequest(session_id=ids[3]), metadata=AUTH))
    assert code == grpc.StatusCode.NOT_FOUND and "expired" in details


def test_cancelling_a_stream_frees_its_slot_and_a_busy_session_is_refused(server, stub):
    long = pb.GenerateRequest(prompt="Count from 1 to 1000.", max_new_tokens=2000, temperature=0,
                              thinking=pb.THINKING_OFF)
    call = stub.Generate(long, metadata=AUTH)
    first = next(call)
    for _ in range(2):  # a refusal leaves the session busy with the first request
        code, details = code_of(lambda: generate(stub, "Hi", session_id=first.session_id))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "already generating" in details
    assert httpx.get(server.url("/health")).json()["active"] == 1
    call.cancel()
    deadline = time.monotonic() + 10
    while httpx.get(server.url("/health")).json()["active"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert httpx.get(server.url("/health")).json()["active"] == 0
    line = next(line for line in server.log().splitlines() if "gRPC Generate CANCELLED" in line)
    assert line
    # The session goes on: the cancelled turn's partial answer stays in its history.
    info = stub.ResetSession(pb.SessionRequest(session_id=first.session_id), metadata=AUTH)
    assert info.messages == 2


def test_the_queue_full_is_resource_exhausted(stub):
    long = pb.GenerateRequest(prompt="Count from 1 to 1000.", max_new_tokens=2000, temperature=0,
                              thinking=pb.THINKING_OFF)
    calls = [stub.Generate(long, metadata=AUTH) for _ in range(2)]
    for c in calls:
        next(c)  # both slots decode
    waiting = stub.Generate(long, metadata=AUTH)  # the one place in the queue
    time.sleep(0.3)
    try:
        code, details = code_of(lambda: generate(stub, "Hi"))  # a new session: the 3 kept are generating
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "sessions are generating" in details
        hi = pb.ChatRequest(messages=[pb.Message(role="user", content="Hi")], max_new_tokens=1)
        code, details = code_of(lambda: list(stub.Chat(hi, metadata=AUTH)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "busy" in details  # the queue is full
    finally:
        for c in calls + [waiting]:
            c.cancel()


def test_the_api_key_is_enforced_but_not_on_health_and_reflection(server, stub):
    request = pb.GenerateRequest(prompt="Hi", max_new_tokens=1)
    for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", KEY)]):
        code, details = code_of(lambda: list(stub.Generate(request, metadata=metadata)))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer" in details
    code, _ = code_of(lambda: stub.ListModels(pb.ListModelsRequest()))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(server.grpc) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        for service in ("", "fermi.v1.Fermi"):
            assert check(health_pb2.HealthCheckRequest(service=service)).status == \
                health_pb2.HealthCheckResponse.SERVING
        reflected = ProtoReflectionDescriptorDatabase(channel)  # what grpcurl reads the schema from
        assert "fermi.v1.Fermi" in reflected.get_services()
        generate_method = DescriptorPool(reflected).FindServiceByName("fermi.v1.Fermi").FindMethodByName("Generate")
        assert generate_method.output_type.full_name == "fermi.v1.GenerateResponse"


@pytest.mark.parametrize("fields, words", [
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt="Hi", temperature=5), "temperature"),
    (dict(prompt="Hi", top_p=0), "top_p"),
    (dict(prompt="Hi", repeat_penalty=-1), "repeat_penalty"),
    (dict(prompt="Hi", max_new_tokens=0), "max_new_tokens"),
    (dict(prompt="Hi", thinking=7), "thinking"),
    (dict(prompt="word " * 9000), "context"),
    (dict(prompt="Hi", model="no-such/model"), "not on this machine"),
    (dict(prompt="Hi", session_id="nope"), "not known"),
])
def test_bad_input_gets_a_clear_status(stub, fields, words):
    code, details = code_of(lambda: list(stub.Generate(pb.GenerateRequest(**fields), metadata=AUTH)))
    expected = grpc.StatusCode.NOT_FOUND if "model" in fields or "session_id" in fields \
        else grpc.StatusCode.INVALID_ARGUMENT
    assert code == expected and words in details


def test_chat_is_stateless_and_checks_its_messages(stub, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}]
    request = pb.ChatRequest(messages=[pb.Message(**m) for m in messages], max_new_tokens=16, temperature=0,
                             thinking=pb.THINKING_OFF)
    pieces = list(stub.Chat(request, metadata=AUTH))
    assert "".join(p.token for p in pieces) == http_answer(client, messages, 16)[0]
    assert pieces[-1].session_id == "" and pieces[-1].usage.completion_tokens
    bad = pb.ChatRequest(messages=[pb.Message(role="robot", content="Hi")])
    code, details = code_of(lambda: list(stub.Chat(bad, metadata=AUTH)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "messages[0].role" in details
    code, _ = code_of(lambda: list(stub.Chat(pb.ChatRequest(), metadata=AUTH)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    models = stub.ListModels(pb.ListModelsRequest(), metadata=AUTH).models
    assert models[0].id == MODEL and models[0].loaded


def test_grpc_and_http_requests_decode_together_each_as_alone(server, stub, client):
    prompts = ["Name three colours.", "Name three animals."]
    alone_grpc = generate(stub, prompts[0], max_new_tokens=32)[0]
    alone_http = http_answer(client, [{"role": "user", "content": prompts[1]}], 32)[0]
    times = {}

    def over_grpc():
        got = generate(stub, prompts[0], max_new_tokens=32)
        times["grpc"] = time.monotonic()
        return got[0]

    def over_http():
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompts[1]}],
                                                max_tokens=32, temperature=0, stream=True,
                                                extra_body={"thinking": "off"})
        text = []
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                times.setdefault("http_first", time.monotonic())
                text.append(chunk.choices[0].delta.content)
        return "".join(text)

    with ThreadPoolExecutor(2) as pool:
        g, h = pool.submit(over_grpc), pool.submit(over_http)
        assert (g.result(), h.result()) == (alone_grpc, alone_http)
    # One engine thread steps one batch: both answers progressing at once were decoded together.
    assert times["http_first"] < times["grpc"]
    assert "grpc.aio" not in server.log() and "Traceback" not in server.log()


# --- the Gradio demo


def test_the_gradio_demo_streams_answers_and_resets_its_session(server, tmp_path):
    from gradio_client import Client

    port = free_port()
    log = open(tmp_path / "demo.log", "wb")
    env = {"GRADIO_ANALYTICS_ENABLED": "False", "FERMI_API_KEY": KEY, "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path)}
    demo = subprocess.Popen([sys.executable, str(ROOT / "demo" / "gradio_app.py"), "--grpc", server.grpc,
                             "--port", str(port), "--max-new-tokens", "24"], stdout=log, stderr=log, env=env)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert demo.poll() is None, (tmp_path / "demo.log").read_text()
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        page = Client(url, verbose=False)
        job = page.submit("Name the capital of France.", [], "off", api_name="/send")
        updates = list(job)
        box, chat, usage = updates[-1]
        answer = chat[-1]["content"][0]["text"]
        assert chat[0]["role"] == "user" and chat[-1]["role"] == "assistant" and answer
        shown = [u[1][-1]["content"][0]["text"] for u in updates if u[1][-1]["role"] == "assistant"]
        assert len(set(shown)) > 3 and all(answer.startswith(t) for t in shown)  # it grew piece by piece
        session = usage.rsplit("session ", 1)[1]
        first_prompt = int(re.match(r"(\d+) prompt tokens \((\d+) cached\)", usage).group(1))
        _, chat, usage = page.predict("And of Italy?", chat, "off", api_name="/send")
        cached = int(re.match(r"(\d+) prompt tokens \((\d+) cached\)", usage).group(2))
        assert usage.endswith(session) and cached >= first_prompt  # the same session, its cache reused
        chat, usage = page.predict(api_name="/reset")
        assert chat == [] and usage == "new session"
        _, chat, usage = page.predict("Name the capital of France.", [], "off", api_name="/send")
        assert not usage.endswith(session) and chat[-1]["content"][0]["text"]  # a new session answers
    finally:
        demo.terminate()
        demo.wait(30)
        log.close()


# --- last: shutting down


def test_shutdown_ends_running_streams_with_unavailable_and_exits_cleanly(server, stub):
    long = pb.GenerateRequest(prompt="Count from 1 to 1000.", max_new_tokens=2000, temperature=0,
                              thinking=pb.THINKING_OFF)
    call = stub.Generate(long, metadata=AUTH)
    next(call)
    server.proc.send_signal(signal.SIGTERM)
    code, details = code_of(lambda: list(call))
    assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details
    assert server.proc.wait(30) == 0
    assert "Traceback" not in server.log()
