"""`python -m bench grammar`: what constrained decoding costs per token.

B requests with a JSON schema (and then the same B free) decode together in one
serving core on the embedded SmolLM2. Timed: a whole step of the free run
(decode and sampling), the masks' fill per step in the constrained run
(llguidance, every constrained row), and the batched sampling call replayed on one
step's logits with and without that step's masks (the difference is applying
them on the device; replayed, since MLX evaluates the forward lazily inside the
sampling call). The target: the mask's cost (fill + apply) at most 10% of a step,
at batch 1 and 8.

With xgrammar installed, its fill time on the same token sequences is measured
beside llguidance's (the reason fermi uses llguidance: bench/README "Grammar")."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"]}},
    "required": ["name", "age", "email", "tags", "address"]}
PROMPT = [{"role": "user", "content": "Invent a customer record."}]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="a fermi model spec (default: smollm2-135m)")
    p.add_argument("--backends", default="torch", help="comma-separated: torch, mlx (default: torch)")
    p.add_argument("--dtype", help="the backend's dtype (default: its own)")
    p.add_argument("--batches", default="1,8", help="requests decoded together (default 1,8)")
    p.add_argument("--tokens", type=int, default=48, help="tokens per request (default 48)")
    p.add_argument("--json", type=Path, help="where to write the results (default bench/results/<date>-grammar.json)")


class Timer:
    """Wraps obj.name, adding each call's seconds to a list (and keeping its last arguments)."""

    def __init__(self, obj, name: str):
        self.obj, self.name, self.inner, self.times = obj, name, getattr(obj, name), []
        self.last = None
        setattr(obj, name, self)

    def __call__(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            self.last = a
            return self.inner(*a, **kw)
        finally:
            self.times.append(time.perf_counter() - t0)

    def undo(self) -> None:
        delattr(self.obj, self.name)


def one_run(engine, batch: int, tokens: int, constrained: bool) -> dict:
    core = engine.scheduler(batch)
    requests = [engine.request(PROMPT, "off", tokens, json_schema=SCHEMA if constrained else None,
                               temperature=0.8, seed=i) for i in range(batch)]
    for r in requests:
        r.next_turn = None  # no settles: only the decode steps are timed
    core.submit_all(requests)
    step, sample, masks = Timer(core, "step"), Timer(core.runtime, "sample"), Timer(core, "_masks")
    replay = None
    try:
        while core.busy:
            if len(step.times) == 3 and sample.last is not None:
                replay = sample.last  # a full batch's logits, rows and masks
            core.step()
    finally:
        for t in (step, sample, masks):
            t.undo()
    out = {"step_ms": 1000 * statistics.median(step.times[1:]),  # the first step is the prefill's
           "fill_ms": 1000 * statistics.median(masks.times[1:]), "tokens": [r.output.generated for r in requests]}
    if replay is not None and replay[2] is not None:
        logits, rows, bitmask = replay
        times = {True: [], False: []}
        for _ in range(20):
            for with_masks in (True, False):
                t0 = time.perf_counter()
                core.runtime.sample(logits, rows, bitmask if with_masks else None)
                times[with_masks].append(time.perf_counter() - t0)
        out["apply_ms"] = 1000 * max(0.0, statistics.median(times[True]) - statistics.median(times[False]))
    return out


def xgrammar_fill_ms(engine, traces: list[list[int]]) -> float | None:
    """xgrammar's fill time per token on the same sequences (None when not installed)."""
    try:
        import xgrammar as xg
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return None
    info = xg.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=engine.tokenizer.tok),
                                             vocab_size=engine.runtime.config.vocab_size,
                                             stop_token_ids=sorted(engine.eos_ids))
    compiled = xg.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    bitmask = xg.allocate_token_bitmask(1, engine.runtime.config.vocab_size)
    times = []
    for trace in traces:
        matcher = xg.GrammarMatcher(compiled)
        for token in trace:
            t0 = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask, 0)
            times.append(time.perf_counter() - t0)
            if not matcher.accept_token(token):
                break
    return 1000 * statistics.median(times) if times else None


def llguidance_fill_ms(engine, traces: list[list[int]]) -> float:
    import numpy as np

    from fermi.grammar import json_grammar

    row = np.full(-(-engine.runtime.config.vocab_size // 32), -1, dtype=np.int32)
    times = []
    for trace in traces:
        mask = engine.grammars.mask(json_grammar(SCHEMA))
        for token in trace:
            t0 = time.perf_counter()
            mask.fill(row)
            times.append(time.perf_counter() - t0)
            mask.accept(token)
    return 1000 * statistics.median(times)


def run(args) -> int:
    from fermi import backends, sources
    from fermi.engine import Engine

    batches = [int(b) for b in args.batches.split(",")]
    model = sources.resolve(args.model)
    rows = []
    for backend in args.backends.split(","):
        engine = Engine(model, backends.get(backend).load(model, dtype=args.dtype))
        engine.grammars.lltok  # built once, before anything is timed
        one_run(engine, 1, 4, True)  # warm-up
        for b in batches:
            free = one_run(engine, b, args.tokens, False)
            bound = one_run(engine, b, args.tokens, True)
            apply_ms = bound["apply_ms"]
            traces = bound.pop("tokens")
            row = {"backend": backend, "dtype": engine.runtime.dtype, "batch": b, "step_ms": free["step_ms"],
                   "fill_ms": bound["fill_ms"], "apply_ms": apply_ms,
                   "mask_share": (bound["fill_ms"] + apply_ms) / free["step_ms"],
                   "llguidance_fill_row_ms": llguidance_fill_ms(engine, traces),
                   "xgrammar_fill_row_ms": xgrammar_fill_ms(engine, traces)}
            rows.append(row)
            print(f"bench grammar: {backend} batch {b}: step {row['step_ms']:.1f} ms · fill {row['fill_ms']:.2f} ms "
                  f"· apply {apply_ms:.2f} ms · mask {100 * row['mask_share']:.1f}% of a step", file=sys.stderr)
    print("\n| backend | dtype | batch | step ms | mask fill ms (all rows) | mask apply ms | mask / step "
          "| fill per row: llguidance ms | xgrammar ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        xg = f"{r['xgrammar_fill_row_ms']:.3f}" if r["xgrammar_fill_row_ms"] is not None else "not installed"
        print(f"| {r['backend']} | {r['dtype']} | {r['batch']} | {r['step_ms']:.1f} | {r['fill_ms']:.2f} "
              f"| {r['apply_ms']:.2f} | {100 * r['mask_share']:.1f}% | {r['llguidance_fill_row_ms']:.3f} | {xg} |")
    path = args.json or HERE / "results" / f"{_dt.date.today().isoformat()}-grammar.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"command": args.command, "model": args.model, "tokens": args.tokens, "rows": rows},
                               indent=1))
    print(f"results: {path}")
    return 0
