"""One engine configuration in a process of its own, so its load time and peak
resident memory are its alone: `python -m bench.worker PHASE SPEC.json`.

Phases: `prepare` (what the engine needs on disk, untimed), `cold` (a load with
fermi's cache empty: the parent points FERMI_CACHE at a new directory),
`measure` (warm load, warm-up, the timed runs, memory), `probe` (the
bandwidth probe). The result is one line on stdout, `BENCH-RESULT {json}`;
progress goes to stderr."""

from __future__ import annotations

import importlib
import json
import sys
import time
import traceback

MARKER = "BENCH-RESULT "


def log(msg: str) -> None:
    print(f"  · {msg}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> dict:
    phase, spec_file = argv
    spec = json.loads(open(spec_file, encoding="utf-8").read())
    from . import memory

    if phase == "probe":
        return memory.bandwidth(spec["probe_mib"])

    from .engines import Unsupported, make
    from .workloads import run_workloads

    adapter = make(spec["engine"], spec.get("loop", "session"))
    result = {"engine": adapter.name, "family": adapter.family, "peer": adapter.peer}
    reason = adapter.missing()
    if reason:
        return {**result, "status": "missing", "reason": reason}
    try:
        # Libraries are imported before the clock and the baseline memory start:
        # load time and model memory are about the model, not the interpreter.
        for m in adapter.modules:
            importlib.import_module(m)
        if adapter.family == "fermi":
            importlib.import_module(f"fermi.backends.{adapter.backend}")
            importlib.import_module("fermi.engine")
        work = spec["workload"]
        if phase == "prepare":
            adapter.prepare(work)
            return {**result, "status": "ok"}
        base = memory.rss()
        t0 = time.perf_counter()
        adapter.load(work, cold=phase == "cold")
        load_s = time.perf_counter() - t0
        log(f"{adapter.name}: loaded in {load_s:.2f} s")
        if phase == "cold":
            return {**result, "status": "ok", "load_cold_s": load_s}
        figures = run_workloads(adapter, work, spec["tokens"], spec["runs"], spec["warmup"],
                                log=lambda m: log(f"{adapter.name}: {m}"))
        return {
            **result, "status": "ok", "load_s": load_s, **figures, **adapter.figures(),
            "base_rss": base, "peak_rss": memory.peak_rss(), "gpu_peak": memory.gpu_peak(), "info": adapter.describe(),
        }
    except Unsupported as e:
        return {**result, "status": "unsupported", "reason": str(e)}
    except Exception as e:  # a broken engine is a row of the table, not the end of the run
        traceback.print_exc()
        lines = str(e).strip().splitlines()
        return {**result, "status": "error", "reason": f"{type(e).__name__}: {lines[0] if lines else ''}"}


if __name__ == "__main__":
    out = main(sys.argv[1:])
    sys.stdout.write("\n" + MARKER + json.dumps(out) + "\n")
    sys.stdout.flush()
