"""The benchmark harness (bench/) on tiny settings: it runs end to end, its figures
are positive numbers, and a peer that is not installed is reported missing."""

from __future__ import annotations

import json
import math

import pytest

from fermi.cli import bench as bench_verb
from fermi.cli.main import parser

harness = bench_verb._harness()  # bench/__main__.py, loaded from this checkout
pytestmark = pytest.mark.skipif(harness is None, reason="no bench/ harness beside cli/")


def test_engine_names_and_groups():
    assert harness.engine_list("fermi-torch-f32,transformers") == ["fermi-torch-f32", "transformers"]
    assert "fermi-mlx-q4" in harness.engine_list("mlx") and "mlx-lm-q4" in harness.engine_list("mlx")
    assert harness.engine_list("all,fermi") == harness.engine_list("all")  # no engine twice
    with pytest.raises(SystemExit):
        harness.engine_list("no-such-engine")


def test_fermi_bench_verb_parses():
    args = parser().parse_args(["bench", "--model", "smollm2", "--engines", "fermi", "--runs", "1"])
    assert args.verb == "bench" and args.runs == 1 and args.engines == "fermi"


def test_smoke(tmp_path, monkeypatch, capsys):
    import sys

    engines = sys.modules[harness.__package__ + ".engines"]
    # However this machine is set up, llama.cpp must read as not installed here.
    monkeypatch.setattr(engines.LlamaCpp, "modules", ("llama_cpp_not_installed_for_this_test",))
    out_file = tmp_path / "bench.json"
    rc = harness.main([
        "--model", "smollm2", "--engines", "fermi-torch-f32,fermi-torch-int8,llama.cpp",
        "--runs", "1", "--warmup", "0", "--tokens", "4", "--prefill-tokens", "32", "--probe-mib", "32",
        "--no-cold", "--no-warm-start", "--json", str(out_file),
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    out = json.loads(out_file.read_text())
    results = {r["engine"]: r for r in out["results"]}

    assert out["bandwidth"]["gbps"] > 0
    assert len(out["bandwidth"]["probes_gbps"]) == 2  # before and after the engines: the faster counts
    assert out["bandwidth"]["gbps"] == max(out["bandwidth"]["probes_gbps"])
    f32 = results["fermi-torch-f32"]
    assert f32["status"] == "ok", f32
    for key in ("load_s", "ttft_s", "decode_tps", "prefill_tps", "prefill_ttft_s", "peak_rss", "weight_bytes",
                "kv_bytes", "bytes_per_token", "roofline", "mem_ratio"):
        assert isinstance(f32[key], (int, float)) and math.isfinite(f32[key]) and f32[key] > 0, key
    assert f32["decode_tokens"] == 4
    assert f32["prefill_prompt_tokens"] >= 32

    # Not implemented yet (or implemented since): either a row of figures or "unsupported", never a crash.
    assert results["fermi-torch-int8"]["status"] in ("ok", "unsupported"), results["fermi-torch-int8"]
    assert results["llama.cpp"]["status"] == "missing"
    assert "not installed" in results["llama.cpp"]["reason"]

    assert "python -m bench --model smollm2" in printed  # the command line it ran with
    assert "fermi-torch-f32" in printed and "missing" in printed
    assert any(t["target"].startswith("torch f32 decode ≥ 2×") and t["pass"] is None for t in out["targets"])


@pytest.mark.slow  # (33 s: the default run's time)
def test_model_directory_with_random_weights(tmp_path):
    """The way to figures where the weights cannot travel (bench/cuda.sh): bench.modeldir
    writes a model directory (the GGUF's config and tokenizer, random weights of its shapes)
    and `--model DIR` runs fermi and transformers on it."""
    import importlib

    modeldir = importlib.import_module(harness.__package__ + ".modeldir")
    folder = tmp_path / "smollm2"
    modeldir.main(["header", "smollm2", str(folder)])
    assert not list(folder.glob("*.safetensors"))
    modeldir.main(["fill", str(folder)])
    out_file = tmp_path / "bench.json"
    rc = harness.main([
        "--model", str(folder), "--engines", "fermi-torch-f32,transformers,llama.cpp", "--runs", "1", "--warmup", "0",
        "--tokens", "4", "--prefill-tokens", "32", "--probe-mib", "32", "--no-cold", "--no-warm-start",
        "--json", str(out_file),
    ])
    assert rc == 0
    out = json.loads(out_file.read_text())
    assert out["model"]["title"] == "smollm2 (model directory)"
    results = {r["engine"]: r for r in out["results"]}
    for name in ("fermi-torch-f32", "transformers"):
        assert results[name]["status"] == "ok", results[name]
        assert results[name]["decode_tokens"] == 4
    assert results["llama.cpp"]["status"] in ("unsupported", "missing")  # it reads GGUF files only
    # the same weights on both sides: 135M parameters in float32 (fermi folds the norms' into the projections)
    fermi, peer = results["fermi-torch-f32"]["weight_bytes"], results["transformers"]["weight_bytes"]
    assert 0.999 * peer < fermi <= peer
