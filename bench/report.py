"""Figures derived from the workers' results (roofline, memory ratio, fermi's
ratio to each peer, the issue's targets) and the tables: rich on the terminal,
Markdown for the README."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

from .engines import SAME_PRECISION

MIB = 1 << 20


def machine() -> dict:
    from .memory import cores

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    if sys.platform == "darwin":
        import subprocess

        try:
            cpu = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                 text=True).stdout.strip() or cpu
        except OSError:
            pass
    try:
        import psutil

        memory = psutil.virtual_memory().total
    except ImportError:
        memory = None
    versions = {}
    for dist in ("torch", "mlx", "transformers", "llama-cpp-python", "mlx-lm", "fermi"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu, "cores": cores(), "cpu_count": os.cpu_count(), "memory_bytes": memory,
            "platform": platform.platform(), "python": platform.python_version(), "versions": versions}


def describe_machine(m: dict) -> str:
    mem = f", {m['memory_bytes'] / (1 << 30):.0f} GiB RAM" if m.get("memory_bytes") else ""
    return f"{m['cpu']}, {m['cores']} cores{mem}, {m['platform']}, Python {m['python']}"


def derive(out: dict) -> None:
    """Adds to each ok result: bytes_per_token, roofline, model_rss, mem_ratio;
    and to `out`: ratios (fermi engine -> peer -> decode/prefill) and targets."""
    gbps = out["bandwidth"].get("gbps") if out["bandwidth"].get("status", "ok") == "ok" else None
    tied = out["model"]["config"]["tie_word_embeddings"]
    chat = out["settings"]["chat_tokens"]
    for r in out["results"]:
        if r["status"] != "ok":
            continue
        # Per token, decode reads every weight once, except the embedding table of an
        # untied model (one row); a tied model's lm_head reads the whole table.
        context = chat + r["decode_tokens"] / 2  # the average position during decode
        # (An engine that holds the output projection apart from the table, as torch float16
        # on a CPU does, reads one row of the table even when the model ties them.)
        whole_table = tied and not r.get("separate_head")
        r["bytes_per_token"] = int(r["weight_bytes"] - (0 if whole_table else r["embed_bytes"])
                                   + r["kv_bytes_per_pos"] * context)
        r["roofline"] = r["decode_tps"] * r["bytes_per_token"] / (gbps * 1e9) if gbps else None
        # On a GPU, the model's memory is what torch allocated there at most.
        r["model_rss"] = r.get("gpu_peak") or r["peak_rss"] - r["base_rss"]
        r["mem_ratio"] = r["model_rss"] / (r["weight_bytes"] + r["kv_bytes"])

    ok = {r["engine"]: r for r in out["results"] if r["status"] == "ok"}
    ratios = {}
    for name, r in ok.items():
        if r["family"] != "fermi":
            continue
        ratios[name] = {peer: {"decode": r["decode_tps"] / p["decode_tps"], "prefill": r["prefill_tps"] / p["prefill_tps"]}
                        for peer, p in ok.items() if p["peer"] and p["decode_tps"] > 0 and p["prefill_tps"] > 0}
    out["ratios"] = ratios
    out["targets"] = _targets(out, ok)


def _targets(out: dict, ok: dict) -> list[dict]:
    rows = []

    def row(target, value, passed, missing=None):
        rows.append({"target": target, "measured": value if missing is None else f"n/a: {missing} did not run",
                     "pass": None if missing else bool(passed)})

    def need(*names):
        absent = [n for n in names if n not in ok]
        return ", ".join(absent) if absent else None

    f32, hf = ok.get("fermi-torch-f32"), ok.get("transformers")
    m = need("fermi-torch-f32", "transformers")
    row("torch f32 decode ≥ 2× transformers f32",
        None if m else f"{f32['decode_tps'] / hf['decode_tps']:.2f}×",
        not m and f32["decode_tps"] >= 2 * hf["decode_tps"], m)
    m = need("fermi-torch-f32") or (None if f32.get("roofline") is not None else "the bandwidth probe")
    row("torch f32 decode ≥ 80% of roofline", None if m else f"{f32['roofline']:.0%}",
        not m and f32["roofline"] >= 0.8, m)
    low = [ok[n] for n in ("fermi-torch-gguf", "fermi-torch-int8", "fermi-torch-int4") if n in ok]
    best_d = max(low, key=lambda r: r["decode_tps"]) if low else None
    best_p = max(low, key=lambda r: r["prefill_tps"]) if low else None
    lc = ok.get("llama.cpp")
    m = need("llama.cpp") or (None if low else "fermi-torch-gguf/int8/int4")
    row("torch quantized (best) decode ≥ llama.cpp",
        None if m else f"{best_d['decode_tps'] / lc['decode_tps']:.2f}× ({best_d['engine']})",
        not m and best_d["decode_tps"] >= lc["decode_tps"], m)
    row("torch quantized (best) prefill ≥ 2× llama.cpp",
        None if m else f"{best_p['prefill_tps'] / lc['prefill_tps']:.2f}× ({best_p['engine']})",
        not m and best_p["prefill_tps"] >= 2 * lc["prefill_tps"], m)
    for mine, peer in SAME_PRECISION.items():
        m = need(mine, peer)
        if m and mine not in ok and peer not in ok:
            continue  # neither side was asked for
        a, b = ok.get(mine), ok.get(peer)
        row(f"{mine} ≥ {peer} (decode, prefill)",
            None if m else f"{a['decode_tps'] / b['decode_tps']:.2f}×, {a['prefill_tps'] / b['prefill_tps']:.2f}×",
            not m and a["decode_tps"] >= b["decode_tps"] and a["prefill_tps"] >= b["prefill_tps"], m)
    mine = [r for r in ok.values() if r["family"] == "fermi"]
    if mine:
        worst = max(mine, key=lambda r: r["mem_ratio"])
        row("fermi peak memory ≤ 1.3× (weights + KV cache)",
            f"worst {worst['mem_ratio']:.2f}× ({worst['engine']})", worst["mem_ratio"] <= 1.3)
    if out["model"]["model"] == "smollm2":
        for backend, w in out.get("warm_start", {}).items():
            if w.get("status") == "ok":
                row(f"warm start < 3 s (fermi run, {backend})", f"{w['wall_s']:.2f} s", w["wall_s"] < 3.0)
    return rows


# ---------------------------------------------------------------- tables


def _num(x, fmt="{:.1f}") -> str:
    if x is None:
        return "—"
    if fmt == "{:.0f}" and abs(x) < 10:
        fmt = "{:.2g}"  # a slow figure keeps two digits
    return fmt.format(x)


def tables(out: dict) -> list[tuple[str, list[str], list[list[str]], list[str]]]:
    """(title, headers, rows, notes) for each table."""
    main_rows, notes = [], []
    for r in out["results"]:
        if r["status"] != "ok":
            main_rows.append([r["engine"], r["status"]] + ["—"] * 10)
            notes.append(f"{r['engine']}: {r['status']}: {r.get('reason', '')}")
            continue
        main_rows.append([
            r["engine"], _num(r["load_s"], "{:.2f}"), _num(r.get("load_cold_s"), "{:.2f}"), _num(r["ttft_s"] * 1000, "{:.0f}"), _num(r["prefill_tps"], "{:.0f}"),
            _num(r["decode_tps"]), _num(r.get("roofline"), "{:.0%}"),
            _num(r["peak_rss"] / MIB, "{:.0f}"), _num(r["model_rss"] / MIB, "{:.0f}"),
            _num(r["weight_bytes"] / MIB, "{:.0f}"), _num(r["kv_bytes"] / MIB, "{:.1f}"),
            _num(r["mem_ratio"], "{:.2f}×"),
        ])
    s = out["settings"]
    main = ("engines", ["engine", "load s", "cold s", "ttft ms", "prefill t/s", "decode t/s", "roofline",
                        "peak MiB", "model MiB", "weights MiB", "KV MiB", "mem ×"], main_rows, notes)
    out_tables = [main]

    peers = [r["engine"] for r in out["results"] if r["status"] == "ok" and r["peer"]]
    if out["ratios"] and peers:
        rows = [[name] + [f"{v[p]['decode']:.2f}× · {v[p]['prefill']:.2f}×" if p in v else "—" for p in peers]
                for name, v in out["ratios"].items()]
        out_tables.append(("fermi ÷ peer (decode · prefill)", ["fermi"] + peers, rows, []))
    if out["targets"]:
        rows = [[t["target"], t["measured"], {True: "pass", False: "FAIL", None: "—"}[t["pass"]]]
                for t in out["targets"]]
        out_tables.append(("targets (issue 6)", ["target", "measured", ""], rows, []))
    notes = [f"decode: {s['tokens']} greedy tokens after a {s['chat_tokens']}-token chat prompt, EOS ignored; "
             f"prefill: a {s['prefill_tokens']}-token prompt (prompt ÷ time to first token); "
             f"median of {s['runs']} runs after {s['warmup']} warm-up; fermi loop: {s['loop']}"]
    notes.append("load: resolve + backend load after imports (cold: fermi's cache empty, the GGUF converted again); "
                 "ttft: on the chat prompt; model MiB: peak RSS − RSS after imports (on a GPU: the most "
                 "GPU memory torch allocated); "
                 "mem ×: model MiB ÷ (weights + KV cache held)")
    bw = out["bandwidth"]
    if bw.get("gbps"):
        where = f"{bw['cuda_device']}'s memory" if bw.get("cuda_device") else "memory"
        probes = " and ".join(f"{g:.1f}" for g in bw.get("probes_gbps", []) if g)
        notes.append(f"bandwidth {bw['gbps']:.1f} GB/s ({where}: best read of a {bw['buffer_mib']} MiB buffer, "
                     f"probed before and after the engines: {probes}; "
                     f"CPU, 1 thread {bw['numpy_1thread_gbps']:.1f} GB/s); "
                     "roofline = decode tok/s × bytes read per token ÷ bandwidth")
    for backend, w in out.get("warm_start", {}).items():
        if w.get("status") == "ok":
            notes.append(f"warm start ({backend}): {w['wall_s']:.2f} s, whole process of `{w['command']}`")
        else:
            notes.append(f"warm start ({backend}): {w.get('status')}: {w.get('reason')}")
    out_tables.append(("", [], [], notes))
    return out_tables


def header(out: dict) -> list[str]:
    m = out["model"]
    return [f"$ {out['command']}", f"{out['date']} · {describe_machine(out['machine'])}",
            f"model: {m['title']}, {m['file_bytes'] / MIB:.0f} MiB file"]


def print_rich(out: dict, made=None, width: int = 150) -> None:
    """The tables (`made(out)`, default this module's `tables`) on the terminal."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.width = max(console.width, width)  # a pipe or a narrow terminal must not squeeze the columns
    for line in header(out):
        console.print(line, highlight=False, markup=False)
    for title, headers, rows, notes in (made or tables)(out):
        if headers:
            t = Table(title=title or None, title_justify="left")
            for i, h in enumerate(headers):
                t.add_column(h, justify="left" if i == 0 else "right", no_wrap=i == 0)
            for row in rows:
                t.add_row(*row)
            console.print(t)
        for n in notes:
            console.print(n, highlight=False, markup=False, style="dim")


def markdown(out: dict, made=None) -> str:
    lines = [f"`{out['command']}`", "", f"{out['date']} · {describe_machine(out['machine'])}", ""]
    for title, headers, rows, notes in (made or tables)(out):
        if headers:
            if title:
                lines += [f"**{title}**", ""]
            lines.append("| " + " | ".join(headers) + " |")
            lines.append("|" + "|".join([" --- "] + [" ---: "] * (len(headers) - 1)) + "|")
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            lines.append("")
        lines += [f"- {n}" for n in notes]
        if notes:
            lines.append("")
    return "\n".join(lines)
