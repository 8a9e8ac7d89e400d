"""`python -m bench concurrency` (or `--concurrency`): many streaming clients at once.

A real `fermi serve` on loopback, then llama.cpp's `llama-server` on the same
GGUF, each asked by C concurrent clients at a time (each its own prompt,
`/v1/chat/completions` with stream=true, temperature 0, max_tokens = --tokens);
and `llama-batched-bench`'s engine-only figure beside them. Figures per client
count: the aggregate rate (every stream's completion tokens ÷ the wall time from
the first request sent to the last stream ended), the median stream's own rate
((tokens − 1) ÷ its first content token to its end) and time to first token
(p50, p95). One server at a time, so they never share the cores."""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import report

ENGINES = ("fermi", "llama-server", "llama-batched-bench")
GROUPS = {"all": list(ENGINES), "fermi": ["fermi"], "peers": ["llama-server", "llama-batched-bench"]}
TARGET_CLIENTS = 8  # the targets compare the aggregate at 8 clients
SCALING_TARGET = 4.0  # fermi at 8 clients ÷ fermi at 1 client
PEER_TARGET = 1.0  # fermi at 8 clients ÷ llama-server at 8 clients
BATCHED_PP = 128  # llama-batched-bench's prompt length per sequence (-npp)

# llama.cpp's binaries: $LLAMA_SERVER / $LLAMA_BATCHED_BENCH, then PATH, then this build folder
# (bench/README.md, "Concurrency", says how to build them there).
LLAMA_BIN = Path("/opt/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin")
_BUILD = ("build them: see bench/README.md, \"Concurrency\" (or set $LLAMA_SERVER / $LLAMA_BATCHED_BENCH)")

# One prompt per client, each asking for a long answer (fermi has no ignore_eos, so
# every stream's real token count comes from its usage chunk). Client i gets topic
# i (mod 16); from the 17th client on the message also carries the client's number,
# so no two clients ever send the same message.
TOPICS = [
    "the history of the printing press", "how a steam engine works", "the water cycle",
    "the life of a honeybee colony", "how the internet routes data", "the roads of the Roman Empire",
    "volcanoes and plate tectonics", "the invention of the telescope", "how vaccines train the immune system",
    "the migration of monarch butterflies", "the architecture of Gothic cathedrals", "how bread rises",
    "the first voyage around the world", "how an electric motor turns", "coral reefs and the life they hold",
    "the history and rules of chess",
]


def prompt(i: int) -> str:
    text = (f"Write a long, detailed essay about {TOPICS[i % len(TOPICS)]}. Cover its history, how it works "
            "and why it matters, in at least ten paragraphs.")
    return text if i < len(TOPICS) else f"{text} (Essay number {i + 1}.)"


def engine_list(text: str) -> list[str]:
    from .__main__ import engine_list as pick

    return pick(text, ENGINES, GROUPS, "bench concurrency")


def client_counts(text: str) -> list[int]:
    try:
        counts = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise SystemExit(f"bench concurrency: --clients takes comma-separated numbers, not '{text}'") from None
    if not counts or min(counts) < 1:
        raise SystemExit(f"bench concurrency: --clients needs numbers >= 1, not '{text}'")
    return list(dict.fromkeys(counts))


def find_binary(name: str, env_var: str) -> Path | None:
    """$env_var, then PATH, then the build folder; llama-batched-bench also beside the
    llama-server that $LLAMA_SERVER names."""
    if os.environ.get(env_var):
        path = Path(os.environ[env_var]).expanduser()
        return path if path.is_file() and os.access(path, os.X_OK) else None
    candidates = []
    if name != "llama-server" and os.environ.get("LLAMA_SERVER"):
        candidates.append(Path(os.environ["LLAMA_SERVER"]).expanduser().parent / name)
    found = shutil.which(name)
    if found:
        candidates.append(Path(found))
    candidates.append(LLAMA_BIN / name)
    return next((p for p in candidates if p.is_file() and os.access(p, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between the closest ranks (numpy's default)."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# ---------------------------------------------------------------- servers


class Server:
    """A server process on 127.0.0.1:port, its stderr and stdout in a log file; ready when
    GET /health answers 200 (fermi: 503 while the model loads; llama-server likewise)."""

    def __init__(self, cmd: list[str], port: int, env: dict | None = None, log_dir: Path | None = None):
        self.cmd, self.port = cmd, port
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = Path(log_dir or tempfile.mkdtemp(prefix="fermi-bench-conc-")) / f"server-{port}.log"
        self.log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env)

    def log_tail(self, n: int = 5) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " / ".join(lines[-n:])

    def wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{Path(self.cmd[0]).name} exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if httpx.get(self.base + "/health", timeout=5, trust_env=False).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server was not ready in {timeout:.0f} s: {self.log_tail()}")

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()


def fermi_command(fermi_name: str, port: int, dtype: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "fermi.cli.main", "serve", "--model", fermi_name, "--backend", "torch",
           "--host", "127.0.0.1", "--port", str(port)]
    return cmd + (["--dtype", dtype] if dtype else [])


def llama_server_command(binary: Path, gguf: Path, port: int, parallel: int, slot_ctx: int, threads: int) -> list[str]:
    # --jinja: the GGUF's own chat template, as fermi renders it.
    return [str(binary), "-m", str(gguf), "-np", str(parallel), "-c", str(parallel * slot_ctx), "-t", str(threads),
            "--host", "127.0.0.1", "--port", str(port), "--jinja"]


# ---------------------------------------------------------------- clients


def stream_one(base: str, i: int, tokens: int, extra: dict, timeout: float, barrier=None) -> dict:
    """One streaming chat completion (client i's prompt; `extra` joins the request's body);
    times and counts it. Never raises: an error is a field."""
    import httpx

    body = {"messages": [{"role": "user", "content": prompt(i)}], "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0, "max_tokens": tokens, **extra}
    rec = {"client": i, "completion_tokens": None, "prompt_tokens": None, "chunks": 0, "ttft_s": None,
           "stream_tps": None, "finish_reason": None, "error": None}
    clock = time.perf_counter
    with httpx.Client(timeout=httpx.Timeout(timeout, connect=30), trust_env=False) as client:
        sent = first = None
        try:
            if barrier is not None:
                barrier.wait(timeout=60)
            sent = clock()
            with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    rec["error"] = f"HTTP {r.status_code}: {r.text[:200]}"
                else:
                    for line in r.iter_lines():
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            break
                        chunk = json.loads(data)
                        if "error" in chunk:
                            rec["error"] = str(chunk["error"])[:200]
                            break
                        for choice in chunk.get("choices") or ():
                            delta = choice.get("delta") or {}
                            if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
                                rec["chunks"] += 1
                                if first is None:
                                    first = clock()
                            if choice.get("finish_reason"):
                                rec["finish_reason"] = choice["finish_reason"]
                        if chunk.get("usage"):
                            rec["completion_tokens"] = chunk["usage"].get("completion_tokens")
                            rec["prompt_tokens"] = chunk["usage"].get("prompt_tokens")
        except (httpx.HTTPError, json.JSONDecodeError, OSError, threading.BrokenBarrierError) as e:
            rec["error"] = f"{type(e).__name__}: {e}"
        end = clock()
    if rec["completion_tokens"] is None and rec["error"] is None:
        rec["completion_tokens"] = rec["chunks"]  # no usage chunk: one content chunk a token, about
        rec["tokens_from"] = "chunks"
    rec.update(sent=sent, first=first, end=end)
    if first is not None and sent is not None:
        rec["ttft_s"] = first - sent
        n = rec["completion_tokens"] or 0
        rec["stream_tps"] = (n - 1) / (end - first) if n > 1 and end > first else None
    if rec["error"] is None and not rec["completion_tokens"]:
        rec["error"] = "the stream carried no token"
    return rec


def round_of(base: str, clients: int, tokens: int, extra: dict, timeout: float) -> dict:
    """C clients at once (threads released together); aggregate = tokens ÷ (last end − first sent)."""
    barrier = threading.Barrier(clients)
    recs: list[dict | None] = [None] * clients

    def go(i):
        try:
            recs[i] = stream_one(base, i, tokens, extra, timeout, barrier)
        except Exception as e:  # noqa: BLE001  (a client's bug is its stream's error, not a hung round)
            barrier.abort()
            now = time.perf_counter()
            recs[i] = {"client": i, "completion_tokens": None, "ttft_s": None, "stream_tps": None,
                       "error": f"{type(e).__name__}: {e}", "sent": None, "first": None, "end": now}

    threads = [threading.Thread(target=go, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sent = min((r["sent"] for r in recs if r["sent"] is not None), default=min(r["end"] for r in recs))
    end = max(r["end"] for r in recs)
    total = sum(r["completion_tokens"] or 0 for r in recs if r["error"] is None)
    for r in recs:  # relative times: JSON-able and readable
        r["sent_s"] = None if r.pop("sent") is None else 0.0
        r["first_s"] = None if r["first"] is None else r["first"] - sent
        r["end_s"] = r.pop("end") - sent
        r.pop("first")
    wall = end - sent
    return {"wall_s": wall, "agg_tps": total / wall if wall > 0 else 0.0, "completion_tokens": total,
            "errors": sum(r["error"] is not None for r in recs), "streams": recs}


def measure_server(base: str, counts: list[int], tokens: int, runs: int, warmup: int, extra: dict, timeout: float,
                   say=lambda msg: None) -> list[dict]:
    """Warm-up request(s), then `runs` rounds at each client count; per count the median
    aggregate, the median stream rate and TTFT p50/p95 over every stream of its rounds."""
    for i in range(warmup):
        say(f"warm-up {i + 1}/{warmup}")
        w = stream_one(base, 0, tokens, extra, timeout)
        if w["error"]:
            raise RuntimeError(f"the warm-up request failed: {w['error']}")
    out = []
    for c in counts:
        rounds = []
        for r in range(runs):
            rounds.append(round_of(base, c, tokens, extra, timeout))
            say(f"{c} client(s), run {r + 1}/{runs}: {rounds[-1]['agg_tps']:.1f} tok/s"
                + (f", {rounds[-1]['errors']} error(s)" if rounds[-1]["errors"] else ""))
        streams = [s for rd in rounds for s in rd["streams"] if s["error"] is None]
        rates = [s["stream_tps"] for s in streams if s["stream_tps"] is not None]
        ttfts = [s["ttft_s"] for s in streams if s["ttft_s"] is not None]
        counts_ = [s["completion_tokens"] for s in streams]
        out.append({
            "clients": c,
            "agg_tps": statistics.median(rd["agg_tps"] for rd in rounds),
            "agg_tps_runs": [rd["agg_tps"] for rd in rounds],
            "per_stream_tps": statistics.median(rates) if rates else None,
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95),
            "tokens_min": min(counts_) if counts_ else 0, "tokens_max": max(counts_) if counts_ else 0,
            "errors": sum(rd["errors"] for rd in rounds),
            "rounds": rounds,
        })
    return out


# ---------------------------------------------------------------- llama-batched-bench


def parse_batched_bench(text: str) -> list[dict]:
    """The Markdown table llama-batched-bench prints: | PP | TG | B | N_KV | T_PP s | S_PP t/s | ... |"""
    rows, headers = [], None
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if headers is None:
            if "S_TG t/s" in cells and "B" in cells:
                headers = cells
            continue
        if all(set(c) <= set("-: ") for c in cells):
            continue
        try:
            values = [float(c) for c in cells]
        except ValueError:
            continue
        key = lambda h: re.sub(r"[^a-z0-9]+", "_", h.lower().replace("t/s", "tps")).strip("_")  # noqa: E731
        row = {key(h): v for h, v in zip(headers, values)}
        for k in ("pp", "tg", "b", "n_kv"):
            if k in row:
                row[k] = int(row[k])
        rows.append(row)
    return rows


def batched_bench(binary: Path, gguf: Path, counts: list[int], tokens: int, threads: int, timeout: float) -> dict:
    ctx = max(4096, max(counts) * (BATCHED_PP + tokens))
    cmd = [str(binary), "-m", str(gguf), "-c", str(ctx), "-b", "2048", "-ub", "512", "-npp", str(BATCHED_PP),
           "-ntg", str(tokens), "-npl", ",".join(map(str, counts)), "-t", str(threads)]
    command = " ".join(map(shlex.quote, cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"took longer than {timeout:.0f} s (--timeout)", "command": command}
    rows = parse_batched_bench(proc.stdout + "\n" + proc.stderr)
    if proc.returncode != 0 or not rows:
        tail = " / ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        return {"status": "error", "reason": f"exited {proc.returncode}: {tail}", "command": command}
    return {"status": "ok", "command": command, "rows": rows,
            "s_tg": {str(r["b"]): r.get("s_tg_tps") for r in rows}}


# ---------------------------------------------------------------- the workload


def run_workload(model, counts: list[int], tokens: int = 128, runs: int = 3, warmup: int = 1,
                 parallel: int | None = None, dtype: str | None = None, engines=ENGINES, threads: int | None = None,
                 slot_ctx: int | None = None, timeout: float = 1800, say=lambda msg: None) -> dict:
    """Every engine of `engines` in turn; a bench.workloads.Model in, the results' dict out."""
    from .memory import cores
    from .report import machine

    parallel = parallel or max(counts)
    threads = threads or cores()
    slot_ctx = slot_ctx or max(512, tokens + 256)  # a prompt (~50 tokens) and the reply, with room
    gguf = Path(model.locate())
    results: dict[str, dict] = {}
    tmp = Path(tempfile.mkdtemp(prefix="fermi-bench-conc-"))
    try:
        for name in engines:
            say(f"bench concurrency: {name}")
            if name == "llama-batched-bench":
                binary = find_binary(name, "LLAMA_BATCHED_BENCH")
                if binary is None:
                    results[name] = {"status": "missing", "reason": f"no {name} binary: {_BUILD}"}
                elif not gguf.is_file():
                    results[name] = {"status": "missing", "reason": "llama.cpp reads a GGUF; this model is a directory"}
                else:
                    results[name] = batched_bench(binary, gguf, counts, tokens, threads, timeout)
                continue
            port = free_port()
            if name == "fermi":
                cmd = fermi_command(model.fermi_name, port, dtype)
                env = {"FERMI_ENGINE_POOL": str(parallel), "FERMI_QUEUE_MAX": str(max(64, max(counts)))}
                extra = {"model": model.fermi_name, "thinking": "off"}
            else:
                binary = find_binary("llama-server", "LLAMA_SERVER")
                if binary is None:
                    results[name] = {"status": "missing", "reason": f"no llama-server binary: {_BUILD}"}
                    continue
                if not gguf.is_file():
                    results[name] = {"status": "missing", "reason": "llama.cpp reads a GGUF; this model is a directory"}
                    continue
                cmd = llama_server_command(binary, gguf, port, parallel, slot_ctx, threads)
                env, extra = {}, {"model": gguf.name}  # one model: llama-server answers whatever it is called
            shown = " ".join([*(f"{k}={v}" for k, v in env.items()), *map(shlex.quote, cmd)])
            base = {"command": shown.replace(shlex.quote(sys.executable) + " -m fermi.cli.main", "fermi")}
            server = Server(cmd, port, env={**os.environ, **env}, log_dir=tmp)
            try:
                t0 = time.perf_counter()
                server.wait_ready(timeout)
                base["ready_s"] = time.perf_counter() - t0
                rows = measure_server(server.base, counts, tokens, runs, warmup, extra, timeout,
                                      say=lambda msg: say(f"bench concurrency:   {name}: {msg}"))
                results[name] = {**base, "status": "ok", "rounds": rows}
            except Exception as e:  # noqa: BLE001  (a failing engine is a row, never the end of the run)
                results[name] = {**base, "status": "error", "reason": str(e)}
            finally:
                server.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {
        "workload": "concurrency",
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "model": {"model": model.key, "title": model.title, "fermi_name": model.fermi_name, "path": str(gguf),
                  "file_bytes": gguf.stat().st_size if gguf.is_file() else sum(f.stat().st_size for f in gguf.iterdir())},
        "settings": {"clients": counts, "tokens": tokens, "runs": runs, "warmup": warmup, "parallel": parallel,
                     "dtype": dtype, "backend": "torch", "threads": threads, "slot_ctx": slot_ctx,
                     "batched_pp": BATCHED_PP},
        "engines": results,
    }
    out["targets"] = targets(out)
    return out


def _at(result: dict | None, clients: int) -> dict | None:
    if not result or result.get("status") != "ok":
        return None
    return next((r for r in result["rounds"] if r["clients"] == clients and r["agg_tps"] > 0), None)


def targets(out: dict) -> list[dict]:
    e, n = out["engines"], TARGET_CLIENTS
    rows = []
    f1, f8, l8 = _at(e.get("fermi"), 1), _at(e.get("fermi"), n), _at(e.get("llama-server"), n)
    missing = ", ".join(x for x, r in (("fermi at 1 client", f1), (f"fermi at {n} clients", f8)) if not r) or None
    rows.append({"target": f"fermi aggregate at {n} clients ≥ {SCALING_TARGET:g}× at 1 client",
                 "measured": f"n/a: {missing} did not run" if missing else f"{f8['agg_tps'] / f1['agg_tps']:.2f}×",
                 "pass": None if missing else f8["agg_tps"] >= SCALING_TARGET * f1["agg_tps"]})
    missing = ", ".join(x for x, r in ((f"fermi at {n} clients", f8), (f"llama-server at {n} clients", l8))
                        if not r) or None
    rows.append({"target": f"fermi aggregate at {n} clients ≥ {PEER_TARGET:g}× llama-server at {n}",
                 "measured": f"n/a: {missing} did not run" if missing else f"{f8['agg_tps'] / l8['agg_tps']:.2f}×",
                 "pass": None if missing else f8["agg_tps"] >= PEER_TARGET * l8["agg_tps"]})
    return rows


# ---------------------------------------------------------------- tables


def _n(x, fmt="{:.1f}") -> str:
    return "—" if x is None else fmt.format(x)


def _ttft(r: dict | None) -> str:
    if not r or r["ttft_p50_s"] is None:
        return "—"
    return f"{r['ttft_p50_s'] * 1000:.0f} / {r['ttft_p95_s'] * 1000:.0f}"


def tables(out: dict) -> list[tuple[str, list[str], list[list[str]], list[str]]]:
    e, s = out["engines"], out["settings"]
    fermi, llama, bb = e.get("fermi"), e.get("llama-server"), e.get("llama-batched-bench")
    rows = []
    for c in s["clients"]:
        f, lr, f1 = _at(fermi, c), _at(llama, c), _at(fermi, 1)
        s_tg = bb["s_tg"].get(str(c)) if bb and bb.get("status") == "ok" else None
        rows.append([
            str(c), _n(f and f["agg_tps"]), _n(f and f1 and f["agg_tps"] / f1["agg_tps"], "{:.2f}×"),
            _n(f and f["per_stream_tps"]), _ttft(f),
            _n(lr and lr["agg_tps"]), _n(lr and lr["per_stream_tps"]), _ttft(lr),
            _n(f and lr and f["agg_tps"] / lr["agg_tps"], "{:.2f}×"), _n(s_tg),
        ])
    headers = ["clients", "fermi agg t/s", "× 1 client", "per-stream t/s", "ttft p50/p95 ms",
               "llama-server agg t/s", "per-stream t/s", "ttft p50/p95 ms", "fermi ÷ llama-server",
               "batched-bench S_TG t/s"]
    notes = []
    for name in ENGINES:
        r = e.get(name)
        if r is None:
            continue
        if r["status"] != "ok":
            notes.append(f"{name}: {r['status']}: {r.get('reason', '')}")
            continue
        notes.append(f"{name}: `{r['command']}`")
        for row in r.get("rounds", ()):
            if row["errors"] or row["tokens_min"] < s["tokens"]:
                notes.append(f"{name} at {row['clients']} client(s): streams of {row['tokens_min']}–"
                             f"{row['tokens_max']} tokens (asked {s['tokens']})"
                             + (f", {row['errors']} failed" if row["errors"] else ""))
    notes.append(f"each client its own prompt, stream=true, temperature 0, max_tokens {s['tokens']}; "
                 f"{s['parallel']} server slots; median of {s['runs']} run(s) after {s['warmup']} warm-up request(s); "
                 "agg: completion tokens of every stream ÷ (last stream's end − first request sent); per-stream: "
                 "median of (tokens − 1) ÷ (first content token → end); ttft over every request; "
                 f"batched-bench: {BATCHED_PP}-token prompts, {s['tokens']} generated, B sequences decoded together")
    out_tables = [("concurrency", headers, rows, notes)]
    t_rows = [[t["target"], t["measured"], {True: "PASS", False: "FAIL", None: "—"}[t["pass"]]] for t in out["targets"]]
    out_tables.append(("targets", ["target", "measured", ""], t_rows, []))
    return out_tables


def print_rich(out: dict) -> None:
    report.print_rich(out, tables, width=170)


def markdown(out: dict) -> str:
    return report.markdown(out, tables)


def run(args) -> int:
    """`python -m bench concurrency …` (the arguments of bench/__main__.py's add_arguments)."""
    from .workloads import model as find_model

    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    model = find_model(args.model)
    counts = client_counts(args.clients)
    engines = engine_list(args.engines)
    out = run_workload(model, counts, tokens=args.tokens, runs=args.runs, warmup=args.warmup, parallel=args.parallel,
                       dtype=args.dtype, engines=engines, threads=args.threads, slot_ctx=args.slot_ctx,
                       timeout=args.timeout, say=say)
    out["command"] = getattr(args, "command", None) or "python -m bench concurrency"
    path = args.json or Path(__file__).resolve().parent / "results" / \
        f"{_dt.date.today().isoformat()}-concurrency-{model.key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print_rich(out)
    if args.markdown:
        print(markdown(out))
    print(f"results: {path}")
    print(f"reproduce: {out['command']}")
    return 0
