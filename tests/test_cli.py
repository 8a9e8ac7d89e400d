"""`fermi run` end to end on the embedded model, and its error paths."""

import json
import os
import subprocess
import sys

import pytest

from fermi.embedded import smollm2_path


def fermi(*args, stdin=None, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "fermi.cli.main", *args],
        input=stdin, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "FERMI_OFFLINE": "1", **(env or {})},
    )


def test_run_prints_the_answer(backend):
    r = fermi("run", "--model", "smollm2-135m", "--backend", backend, "--temperature", "0",
              "--max-new-tokens", "12", "--verbose", "Name the capital of France.")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    lines = r.stderr.strip().splitlines()
    assert backend in lines[0]  # the startup line: model, backend, device, dtype
    assert "tok/s" in lines[-1] and "ttft" in lines[-1]


def test_run_keeps_the_gguf_blocks_on_torch():
    """On a CPU the torch backend keeps a GGUF's blocks (SmolLM2: Q4_1, its table Q8_0)
    and multiplies them with fermi's kernels, the startup line says so; `--quantize 8`
    has nothing float left to round; `--quantize 0` runs the weights dequantized."""
    from fermi.backends.torch import weights

    for flags, line in [((), f"· q4_1+q8_0 ({weights.kernel_path()} kernels) ·"),
                        (("--quantize", "8"), f"· q4_1+q8_0 ({weights.kernel_path()} kernels) ·"),
                        (("--quantize", "0"), "· float32 ·")]:
        r = fermi("run", "--model", "smollm2-135m", "--backend", "torch", *flags, "--temperature", "0",
                  "--max-new-tokens", "12", "Name the capital of France.")
        assert r.returncode == 0, r.stderr
        assert "Paris" in r.stdout
        assert line in r.stderr.splitlines()[0]


def test_backends_print_the_same_text():
    outs = {
        b: fermi("run", "-m", "smollm2-135m", "--backend", b, "--dtype", "float32", "--temperature", "0",
                 "--max-new-tokens", "24", "-q", "Name three colours.").stdout
        for b in ("torch", "mlx")
    }
    assert outs["torch"] and outs["torch"] == outs["mlx"]


def test_prompt_from_stdin_and_gguf_path():
    r = fermi("run", "--model", str(smollm2_path()), "--backend", "torch", "--temperature", "0",
              "--max-new-tokens", "8", "-q", "-", stdin="Name the capital of France.")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and r.stderr == ""


def test_default_model_falls_back_to_embedded_offline(tmp_path):
    r = fermi("run", "--backend", "torch", "--temperature", "0", "--max-new-tokens", "4", "Hi",
              env={"HF_HOME": str(tmp_path), "FERMI_MODEL": ""})
    assert r.returncode == 0, r.stderr
    assert "Qwen/Qwen3-1.7B" in r.stderr and "embedded" in r.stderr
    assert r.stdout.strip()


def one_line_error(r, *words):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_missing_file():
    one_line_error(fermi("run", "-m", "/nonexistent/model.gguf", "Hi"), "/nonexistent/model.gguf")


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "intermediate_size": 8,
                                                      "num_hidden_layers": 1, "num_attention_heads": 1}))
    one_line_error(fermi("run", "-m", str(tmp_path), "Hi"), "safetensors")
    (tmp_path / "config.json").unlink()
    one_line_error(fermi("run", "-m", str(tmp_path), "Hi"), "config.json")


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    one_line_error(fermi("run", "-m", str(tmp_path), "Hi"), "mamba")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(smollm2_path().read_bytes()[:100_000])
    one_line_error(fermi("run", "-m", str(bad), "Hi"), "bad.gguf")


def test_unknown_hub_id_offline(tmp_path):
    one_line_error(fermi("run", "-m", "nobody/no-such-model", "Hi", env={"HF_HOME": str(tmp_path)}),
                   "nobody/no-such-model", "offline")


def test_prompt_longer_than_context():
    one_line_error(fermi("run", "-m", "smollm2-135m", "--backend", "torch", "-q", "-", stdin="hello " * 9000),
                   "8192")


@pytest.mark.parametrize("flag", [["--thinking", "maybe"], ["--temperature", "hot"]])
def test_bad_flags(flag):
    r = fermi("run", "-m", "smollm2-135m", *flag, "Hi")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_run_json_and_json_schema_answer_parse(tmp_path):
    import jsonschema

    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"]}
    path = tmp_path / "city.json"
    path.write_text(json.dumps(schema))
    r = fermi("run", "--model", "smollm2-135m", "--temperature", "0", "--json-schema", str(path),
              "Name a city in France.")
    assert r.returncode == 0, r.stderr
    jsonschema.validate(json.loads(r.stdout), schema)
    r = fermi("run", "--model", "smollm2-135m", "--temperature", "0", "--json",
              "Name the capital of France. Answer in JSON.")
    assert r.returncode == 0, r.stderr
    assert isinstance(json.loads(r.stdout), dict)


def test_run_json_schema_errors_are_one_line(tmp_path):
    (tmp_path / "unique.json").write_text('{"type": "array", "uniqueItems": true}')
    (tmp_path / "broken.json").write_text('{"type":')
    one_line_error(fermi("run", "--json-schema", str(tmp_path / "unique.json"), "x"), "uniqueItems")
    one_line_error(fermi("run", "--json-schema", str(tmp_path / "broken.json"), "x"), "broken.json", "not JSON")


def test_run_raw_sends_the_prompt_as_it_is():
    r = fermi("run", "--model", "smollm2-135m", "--raw", "--temperature", "0", "--max-new-tokens", "6", "--verbose",
              "The capital of France is")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(" Paris")  # a continuation, its leading space kept
    assert "prompt 5 tokens" in r.stderr.splitlines()[-1]


def test_bad_flags_are_one_line_before_any_model_loads():
    one_line_error(fermi("run", "--temperature", "-1", "Hi"), "temperature", "-1")
    one_line_error(fermi("run", "--top-p", "0", "Hi"), "top_p")
    one_line_error(fermi("run", "--max-new-tokens", "0", "Hi"), "--max-new-tokens")
    r = fermi("run", "--bogus", "Hi")  # the verb's own usage, not the top level's
    assert r.returncode == 2 and r.stderr.startswith("usage: fermi run") and "--bogus" in r.stderr
    r = fermi("run", "-m", "smollm2-135m", "--quantize", "0", "--max-new-tokens", "2", "--temperature", "0", "Hi")
    assert r.returncode == 0, r.stderr
