"""`python -m bench.soak --minutes N`: a real `fermi serve` under mixed traffic
for N minutes, its memory sampled.

C client threads, each looping over a seeded random mix: chat completions whole
and streamed, Responses whole and streamed, two-turn conversations (the second
turn on the first's answer), and clients that hang up after a few chunks. Every
request must end as HTTP says it should: a 200 whose body or stream is whole
(a stream ends with `data: [DONE]` or `response.completed`/`.incomplete`), or a
503 refusal (queue full); a hang-up must leave the server answering. Anything
else is a lost request. The server's RSS is sampled every 5 s; growth is
measured from the sample at the end of the first minute (warm-up) to the last.
Results go to bench/results/<date>-soak.json."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from .concurrency import Server, fermi_command, free_port

HERE = Path(__file__).resolve().parent
QUESTIONS = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain.",
             "Explain in a few sentences why the sky is blue.", "List five prime numbers.",
             "Tell me a fact about cats.", "How does a bicycle stay upright?", "Say hello in Spanish."]
KINDS = ("chat", "chat_stream", "responses", "responses_stream", "two_turns", "hang_up")


def sse_events(r) -> list[str]:
    return [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]


def one(client, base: str, kind: str, rng: random.Random, tokens: int) -> str:
    """One request of `kind`: "ok", "refused" (503), or what went wrong."""
    q = rng.choice(QUESTIONS)
    chat = {"messages": [{"role": "user", "content": q}], "max_tokens": tokens, "temperature": 0.7,
            "seed": rng.randrange(1 << 30)}
    if kind == "chat":
        r = client.post(base + "/v1/chat/completions", json=chat)
        return check(r, lambda body: body["choices"][0]["message"] is not None)
    if kind == "chat_stream":
        with client.stream("POST", base + "/v1/chat/completions", json={**chat, "stream": True}) as r:
            if r.status_code != 200:
                r.read()
                return check(r, None)
            events = sse_events(r)
        return "ok" if events and events[-1] == "[DONE]" and not any('"error"' in e for e in events) \
            else f"stream ended without [DONE]: {events[-1:]}"
    if kind in ("responses", "responses_stream"):
        body = {"input": q, "max_output_tokens": tokens, "stream": kind.endswith("stream")}
        if not body["stream"]:
            return check(client.post(base + "/v1/responses", json=body), lambda b: b["status"] in
                         ("completed", "incomplete"))
        with client.stream("POST", base + "/v1/responses", json=body) as r:
            if r.status_code != 200:
                r.read()
                return check(r, None)
            types = [json.loads(e).get("type") for e in sse_events(r)]
        return "ok" if types and types[-1] in ("response.completed", "response.incomplete") \
            else f"responses stream ended with {types[-1:]}"
    if kind == "two_turns":
        r = client.post(base + "/v1/chat/completions", json=chat)
        if r.status_code != 200:
            return check(r, None)
        answer = r.json()["choices"][0]["message"]["content"] or ""
        turn2 = {**chat, "messages": chat["messages"] + [{"role": "assistant", "content": answer},
                                                         {"role": "user", "content": "Say more."}]}
        return check(client.post(base + "/v1/chat/completions", json=turn2),
                     lambda body: body["choices"][0]["message"] is not None)
    if kind == "hang_up":
        with client.stream("POST", base + "/v1/chat/completions", json={**chat, "stream": True,
                                                                         "max_tokens": tokens * 4}) as r:
            if r.status_code != 200:
                r.read()
                return check(r, None)
            for n, _ in enumerate(r.iter_lines()):
                if n >= 6:
                    break  # hang up mid-answer
        return "ok"
    raise ValueError(kind)


def check(r, whole) -> str:
    if r.status_code == 503:
        return "refused"
    if r.status_code != 200:
        return f"HTTP {r.status_code}: {r.text[:120]}"
    try:
        return "ok" if whole is None or whole(r.json()) else f"an incomplete body: {r.text[:120]}"
    except (ValueError, KeyError, TypeError, IndexError) as e:
        return f"an unreadable body ({type(e).__name__}): {r.text[:120]}"


def soak(minutes: float, clients: int, tokens: int, seed: int, parallel: int | None) -> dict:
    import httpx
    import psutil

    port = free_port()
    cmd = fermi_command("smollm2-135m", port, None) + (["--parallel", str(parallel)] if parallel else [])
    server = Server(cmd, port, env=None, log_dir=Path(tempfile.mkdtemp(prefix="fermi-soak-")))
    server.wait_ready(300)
    proc = psutil.Process(server.proc.pid)
    outcomes: Counter = Counter()
    problems: list[str] = []
    rss: list[tuple[float, int]] = []
    start = time.monotonic()
    stop = start + minutes * 60
    lock = threading.Lock()

    def client_loop(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        with httpx.Client(timeout=httpx.Timeout(300, connect=30), trust_env=False) as client:
            while time.monotonic() < stop:
                kind = rng.choice(KINDS)
                try:
                    result = one(client, server.base, kind, rng, tokens)
                except httpx.HTTPError as e:
                    result = f"{type(e).__name__}: {e}"
                with lock:
                    outcomes[(kind, "ok" if result in ("ok", "refused") else "lost")] += 1
                    outcomes[("all", result if result in ("ok", "refused") else "lost")] += 1
                    if result not in ("ok", "refused"):
                        problems.append(f"{kind}: {result}")

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        rss.append((time.monotonic() - start, proc.memory_info().rss))
        time.sleep(5)
    for t in threads:
        t.join()
    rss.append((time.monotonic() - start, proc.memory_info().rss))
    alive = httpx.get(server.base + "/health", timeout=10, trust_env=False).json()
    server.stop()
    warm = next((b for t, b in rss if t >= 60), rss[0][1])
    result = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"), "minutes": minutes, "clients": clients,
        "max_tokens": tokens, "seed": seed, "command": " ".join(["python -m bench.soak"] + sys.argv[1:]),
        "requests": sum(n for (k, _), n in outcomes.items() if k == "all"),
        "ok": outcomes[("all", "ok")], "refused_503": outcomes[("all", "refused")], "lost": outcomes[("all", "lost")],
        "by_kind": {k: {"ok": outcomes[(k, "ok")], "lost": outcomes[(k, "lost")]} for k in KINDS},
        "problems": problems[:20], "health_after": alive,
        "rss_mib": {"start": rss[0][1] / 2**20, "after_1_min": warm / 2**20, "end": rss[-1][1] / 2**20,
                    "max": max(b for _, b in rss) / 2**20},
        "rss_growth_after_warmup": rss[-1][1] / warm - 1,
    }
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32, help="max tokens an answer (hang-ups ask for 4x)")
    p.add_argument("--parallel", type=int, help="the server's --parallel (default: its own)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    r = soak(args.minutes, args.clients, args.tokens, args.seed, args.parallel)
    out = HERE / "results" / f"{r['date'][:10]}-soak.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(r, indent=2) + "\n")
    print(f"{r['requests']} requests in {args.minutes:g} min with {args.clients} clients: {r['ok']} ok, "
          f"{r['refused_503']} refused (503), {r['lost']} lost")
    m = r["rss_mib"]
    print(f"RSS: {m['start']:.0f} MiB at start, {m['after_1_min']:.0f} after 1 min, {m['end']:.0f} at the end "
          f"({100 * r['rss_growth_after_warmup']:+.1f}% after warm-up), max {m['max']:.0f}")
    for line in r["problems"]:
        print("  lost:", line)
    print(f"written: {out}")
    return 0 if r["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
