"""Model management end to end, in a temporary Hugging Face cache fed by a fake
hub (tests/fake_hub.py) through the real huggingface_hub client: `fermi pull`,
`list`, `show`, `rm`; and several models behind one server: a request names any
model of the registry, FERMI_MAX_LOADED=1 swaps them, keep_alive 0 unloads after
the answer, a running request is never cut; /api/pull and /api/delete through
the official ollama client."""

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import ollama
import pytest
from openai import OpenAI

from fake_hub import FakeHub
from models import engine
from server_util import MODEL, QWEN3_STYLE, Server
from tiny import build

REPO = "acme/tiny-qwen3"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The fake hub with one repo: a tiny random Qwen3 with SmolLM2's tokenizer and a
    thinking-aware template (it answers nonsense, in the right shapes)."""
    root = tmp_path_factory.mktemp("hub")
    tok = engine("torch").tokenizer
    tiny = build("qwen3", root / "acme", vocab_size=tok.vocab_size)
    repo = root / REPO
    tiny.path.rename(repo)
    (repo / "tokenizer.json").write_text(tok.tok.to_str())
    (repo / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": QWEN3_STYLE}))
    h = FakeHub(root)
    yield h
    h.close()


@pytest.fixture(scope="module")
def env(hub, tmp_path_factory):
    home = tmp_path_factory.mktemp("hf-home")
    folder = tmp_path_factory.mktemp("models")
    (folder / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 64)  # listed, but it cannot load
    return {"HF_HOME": str(home), "HF_ENDPOINT": hub.url, "FERMI_OFFLINE": "", "HF_HUB_DISABLE_TELEMETRY": "1",
            "FERMI_CACHE": str(tmp_path_factory.mktemp("fermi-cache")), "FERMI_MODELS": str(folder)}


def fermi(*args, env=None, stdin=None):
    return subprocess.run([sys.executable, "-m", "fermi.cli.main", *args], input=stdin, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def test_a_gguf_in_the_models_folder_is_a_model(tmp_path):
    from fermi.embedded import smollm2_path

    (tmp_path / "my-model.gguf").symlink_to(smollm2_path())
    env = {"FERMI_MODELS": str(tmp_path), "FERMI_OFFLINE": "1"}
    assert "my-model" in fermi("list", env=env).stdout
    assert "llama" in fermi("show", "my-model", env=env).stdout
    assert fermi("rm", "-y", "my-model", env=env).returncode == 0 and not (tmp_path / "my-model.gguf").exists()


def test_pull_list_show_rm(env):
    r = fermi("pull", REPO, env=env)
    assert r.returncode == 0, r.stderr
    listed = fermi("list", env=env).stdout
    assert REPO in listed and "smollm2-135m" in listed and "safetensors" in listed
    shown = fermi("show", REPO, env=env).stdout
    assert "qwen3" in shown and "thinking" in shown
    missing = fermi("pull", "acme/nope", env=env)
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1
    offline = fermi("pull", REPO, env={**env, "FERMI_OFFLINE": "1"})
    assert offline.returncode == 1 and "offline" in offline.stderr
    asked = fermi("rm", REPO, env=env, stdin="n\n")  # not a terminal: it will not ask, so it refuses
    assert asked.returncode == 1 and REPO in fermi("list", env=env).stdout
    assert fermi("rm", "-y", REPO, env=env).returncode == 0
    assert REPO not in fermi("list", env=env).stdout


@pytest.fixture(scope="module")
def server(env):
    assert fermi("pull", REPO, env=env).returncode == 0
    with Server("--parallel", "2", "--max-loaded", "1", env=env) as s:
        yield s


def loaded(server) -> list[str]:
    return [m["name"] for m in httpx.get(server.url("/api/ps")).json()["models"]]


def test_requests_name_any_model_and_max_loaded_swaps_them(server):
    client = OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=120)
    ask = dict(messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
    assert {m.id for m in client.models.list().data} >= {MODEL, REPO}
    assert loaded(server) == [MODEL]
    for name in (REPO, MODEL, REPO):
        r = client.chat.completions.create(model=name, **ask)
        assert r.model == name and r.choices[0].message.content is not None
        assert loaded(server) == [name]  # one resident at a time
    with pytest.raises(Exception) as e:
        client.chat.completions.create(model="/etc/passwd", **ask)  # a path is not a model of the registry
    assert getattr(e.value, "status_code", None) == 404
    assert "loading acme/tiny-qwen3" in server.log() and "unloading" in server.log()


def test_a_running_request_is_never_cut_by_an_unload(server):
    client = OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=120)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    got = {}
    story = dict(model=MODEL, max_tokens=40, temperature=0, messages=[{"role": "user", "content": "Tell me a story."}])

    def long():
        got["long"] = client.chat.completions.create(**story)

    t = threading.Thread(target=long)
    t.start()
    time.sleep(0.5)
    other = client.chat.completions.create(model=REPO, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    t.join()
    assert other.choices[0].message is not None and loaded(server) == [REPO]
    alone = client.chat.completions.create(**story)  # (SmolLM2 loaded again)
    assert got["long"].choices[0].message.content == alone.choices[0].message.content  # not cut short
    assert got["long"].usage.completion_tokens == alone.usage.completion_tokens


def test_fermi_ps_asks_the_server(server, env):
    r = fermi("ps", "--port", str(server.port), env=env)
    assert r.returncode == 0 and loaded(server)[0] in r.stdout
    gone = fermi("ps", "--port", "1", env=env)
    assert gone.returncode == 1 and "no fermi server" in gone.stderr


def test_keep_alive_zero_unloads_after_the_answer_and_think_on_the_thinking_model(server):
    client = ollama.Client(host=server.base, timeout=120)
    r = client.chat(model=REPO, messages=[{"role": "user", "content": "Hi"}], think=True, keep_alive=0,
                    options={"num_predict": 4, "temperature": 0})
    assert r.done and r.message.thinking  # its template opens the think block
    deadline = time.monotonic() + 10
    while REPO in loaded(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert REPO not in loaded(server)


def test_ollama_pull_and_delete(server, env):
    client = ollama.Client(host=server.base, timeout=120)
    statuses = [p.status for p in client.pull(REPO, stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert client.pull(REPO).status == "success"
    with pytest.raises(ollama.ResponseError) as e:
        client.pull("acme/nope")
    assert e.value.status_code == 400
    client.delete(REPO)
    assert REPO not in [m.model for m in client.list().models]
    with pytest.raises(ollama.ResponseError) as e:
        client.delete(REPO)
    assert e.value.status_code == 404


def test_a_model_that_fails_to_load_is_a_503_each_time_and_the_others_still_answer(server):
    client = OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=120)
    ask = dict(messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    for _ in range(2):  # not stuck: the failed load left, the next request tries again
        with pytest.raises(Exception) as e:
            client.chat.completions.create(model="broken", **ask)
        assert getattr(e.value, "status_code", None) == 503 and "failed to load" in str(e.value)
    assert client.chat.completions.create(model=MODEL, **ask).choices
