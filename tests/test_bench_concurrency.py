"""The concurrency workload (bench/concurrency.py) on tiny settings: a real `fermi serve`
of SmolLM2-135M, 1 then 2 streaming clients of 8 tokens; llama.cpp's peers run when
their binaries are built, and read as missing otherwise."""

from __future__ import annotations

import importlib
import json
import math

import pytest

from fermi.cli import bench as bench_verb

harness = bench_verb._harness()  # bench/__main__.py, loaded from this checkout
pytestmark = pytest.mark.skipif(harness is None, reason="no bench/ harness beside cli/")


@pytest.fixture(scope="module")
def conc():
    return importlib.import_module(harness.__package__ + ".concurrency")


def test_arguments(conc):
    p = harness.argparse.ArgumentParser()
    harness.add_arguments(p)
    args = p.parse_args(["--concurrency", "--clients", "1,2,8", "--parallel", "4", "--dtype", "float32"])
    assert args.concurrency and args.parallel == 4 and args.dtype == "float32"
    assert conc.client_counts(args.clients) == [1, 2, 8]
    assert conc.engine_list("all") == list(conc.ENGINES)
    assert conc.engine_list("peers,fermi") == ["llama-server", "llama-batched-bench", "fermi"]
    for bad in ("0", "1,x"):
        with pytest.raises(SystemExit):
            conc.client_counts(bad)
    with pytest.raises(SystemExit):
        conc.engine_list("fermi-torch-f32")
    assert len({conc.prompt(i) for i in range(40)}) == 40  # every client its own message


def test_parse_batched_bench(conc):
    text = """
main: n_kv_max = 4096, n_batch = 2048, n_ubatch = 512, flash_attn = 0, is_pp_shared = 0, n_gpu_layers = -1
|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|   128 |    128 |    1 |    256 |    0.135 |   948.15 |    1.036 |   123.55 |    1.171 |   218.61 |
|   128 |    128 |    2 |    512 |    0.262 |   977.10 |    1.517 |   168.75 |    1.779 |   287.80 |
"""
    rows = conc.parse_batched_bench(text)
    assert [r["b"] for r in rows] == [1, 2]
    assert rows[1]["s_tg_tps"] == 168.75 and rows[0]["pp"] == 128 and rows[0]["n_kv"] == 256


def test_percentile(conc):
    assert conc.percentile([], 50) is None
    assert conc.percentile([3.0], 95) == 3.0
    assert conc.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert conc.percentile([float(i) for i in range(101)], 95) == pytest.approx(95.0)


def test_against_fermi_serve(conc, monkeypatch, tmp_path):
    model = importlib.import_module(harness.__package__ + ".workloads").model
    monkeypatch.setenv("FERMI_OFFLINE", "1")
    out = conc.run_workload(model("smollm2"), [1, 2], tokens=8, runs=1, warmup=1, parallel=2, dtype="float32",
                            timeout=120)
    json.dumps(out)  # all of it goes into the results file
    assert set(out["engines"]) == set(conc.ENGINES)
    assert out["settings"]["clients"] == [1, 2] and out["settings"]["parallel"] == 2
    fermi = out["engines"]["fermi"]
    assert fermi["status"] == "ok", fermi
    assert "FERMI_ENGINE_POOL=2" in fermi["command"] and "--dtype float32" in fermi["command"]
    assert [r["clients"] for r in fermi["rounds"]] == [1, 2]
    for row in fermi["rounds"]:
        assert row["errors"] == 0
        assert math.isfinite(row["agg_tps"]) and row["agg_tps"] > 0
        assert row["ttft_p50_s"] > 0 and row["ttft_p95_s"] >= row["ttft_p50_s"]
        (rnd,) = row["rounds"]
        assert len(rnd["streams"]) == row["clients"]
        assert rnd["completion_tokens"] == sum(s["completion_tokens"] for s in rnd["streams"])
        for s in rnd["streams"]:
            assert s["error"] is None and 0 < s["completion_tokens"] <= 8, s
            assert s["ttft_s"] > 0 and s["end_s"] >= s["first_s"] > 0
    for peer in ("llama-server", "llama-batched-bench"):  # built or not, a row; never a crash
        r = out["engines"][peer]
        assert r["status"] in ("ok", "missing"), r
        if peer == "llama-server" and r["status"] == "ok":
            assert all(row["agg_tps"] > 0 for row in r["rounds"])
        if peer == "llama-batched-bench" and r["status"] == "ok":
            assert set(r["s_tg"]) == {"1", "2"}
    # Without 8 clients the targets cannot be judged: n/a, not a failure.
    assert [t["pass"] for t in out["targets"]] == [None, None]
    out["command"] = "python -m bench concurrency --clients 1,2 --tokens 8"
    assert "concurrency" in conc.markdown(out)
