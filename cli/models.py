"""`fermi list`, `fermi show MODEL`, `fermi pull REPO_ID[:FILE|:QUANT]`,
`fermi rm MODEL` and `fermi ps`: the models on this machine (fermi/registry.py)
and what a running server has loaded."""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
import urllib.error
import urllib.request

from fermi import registry, sources
from fermi.errors import FermiError


def add_parser(sub) -> None:
    p = sub.add_parser("list", help="the models on this machine")
    p.set_defaults(func=list_models)
    p = sub.add_parser("show", help="a model's details")
    p.add_argument("model")
    p.set_defaults(func=show)
    p = sub.add_parser("pull", help="fetch a model from the Hugging Face hub")
    p.add_argument("model", help="REPO_ID (safetensors), REPO_ID:FILE or REPO_ID:QUANT (a GGUF file of the repo)")
    p.set_defaults(func=pull)
    p = sub.add_parser("rm", help="delete a model from the Hugging Face cache")
    p.add_argument("model")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask first")
    p.set_defaults(func=rm)
    p = sub.add_parser("ps", help="the models a running fermi serve has loaded")
    p.add_argument("--host", default=os.environ.get("FERMI_HOST") or "127.0.0.1")
    p.add_argument("--port", type=int, default=int(os.environ.get("FERMI_PORT") or 8000))
    p.set_defaults(func=ps)


def size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def when(t: float) -> str:
    return _dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")


def table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def list_models(args) -> int:
    rows = [["NAME", "SIZE", "FORMAT", "QUANTIZATION", "SOURCE", "MODIFIED"]]
    rows += [[e.name, size(e.size), e.format, e.quantization, e.source, when(e.modified)] for e in registry.entries()]
    table(rows)
    return 0


def entry(name: str) -> registry.Entry:
    e = registry.find(name)
    if e is None:
        raise FermiError(f"model '{name}' is not on this machine (fermi list shows what is; fermi pull fetches)")
    return e


def parameters(c) -> int:
    """The weight count from the config: embeddings, attention, MLP (norms aside)."""
    head, heads, kv = c.head_dim, c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads
    attention = c.hidden_size * head * (2 * heads + 2 * kv)
    mlp = 3 * c.hidden_size * c.intermediate_size
    embed = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return embed + c.num_hidden_layers * (attention + mlp)


def show(args) -> int:
    e = entry(args.model)
    m = sources.resolve(e.spec)
    c = m.config
    template = m.chat_template or ""
    caps = ["completion"] + (["thinking"] if "enable_thinking" in template or "<think>" in template else [])
    caps.append("tools" if "tools" in template else "tools (described by fermi)")
    rows = [["name", e.name], ["architecture", c.model_type], ["parameters", f"{parameters(c) / 1e6:.0f}M"],
            ["context length", str(c.max_position_embeddings)], ["format", e.format],
            ["quantization", e.quantization], ["size", size(e.size)], ["capabilities", ", ".join(caps)],
            ["source", e.source]]
    license_ = m.generation_config.get("license") if isinstance(m.generation_config, dict) else None
    if license_:
        rows.append(["license", str(license_)])
    table(rows)
    if template:
        print("\nchat template:")
        print("\n".join("  " + line for line in template.splitlines()[:12]))
        if len(template.splitlines()) > 12:
            print(f"  … ({len(template.splitlines())} lines)")
    return 0


def pull(args) -> int:
    e = registry.pull(args.model, progress=lambda msg: print(f"fermi: {msg}", file=sys.stderr))
    print(f"fermi: {e.name} ({size(e.size)}) is in the cache", file=sys.stderr)
    return 0


def rm(args) -> int:
    e = entry(args.model)
    if not args.yes:
        if not sys.stdin.isatty():
            raise FermiError(f"not deleting {e.name} without asking: run fermi rm -y {args.model}")
        if input(f"delete {e.name} ({size(e.size)})? [y/N] ").strip().lower() not in ("y", "yes"):
            print("fermi: kept", file=sys.stderr)
            return 1
    registry.remove(e.name)
    print(f"fermi: deleted {e.name}", file=sys.stderr)
    return 0


def ps(args) -> int:
    url = f"http://{args.host}:{args.port}/api/ps"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            models = json.loads(r.read())["models"]
    except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
        raise FermiError(f"no fermi server answers at {url} ({getattr(e, 'reason', e)})") from None
    rows = [["NAME", "SIZE", "CONTEXT", "UNTIL"]]
    rows += [[m["name"], size(m.get("size", 0)), str(m.get("context_length", "")), m.get("expires_at", "")]
             for m in models]
    table(rows)
    return 0
