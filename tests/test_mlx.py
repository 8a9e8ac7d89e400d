"""MLX-only behaviour: half precision against the float32 reference, GGUF tensors
kept in MLX's quantized layout, and 4-bit quantization at load time. (The model
math and the sampler are shared tests, run on every backend.)"""

from __future__ import annotations

import numpy as np
import pytest

import tiny
from fermi.errors import FermiError

mx = pytest.importorskip("mlx.core")
import gguf  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from fermi.backends import mlx as backend  # noqa: E402
from fermi.errors import ContextOverflow  # noqa: E402
from fermi.sampling import SamplingParams  # noqa: E402
from fermi.sources import ModelFiles  # noqa: E402

T = gguf.GGMLQuantizationType


def tokens(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, tiny.VOCAB, n).tolist()


@pytest.fixture(scope="module")
def tinies(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: tiny.build(arch, root) for arch in tiny.SPECS}


# ---------------------------------------------------------------- half precision

# Errors relative to the logit scale (max |reference logit|): float16 keeps ~3
# decimal digits per op, bfloat16 ~2.
@pytest.mark.parametrize("dtype, tol", [("float16", 2e-2), ("bfloat16", 8e-2)])
@pytest.mark.parametrize("arch", list(tiny.SPECS))
def test_half_precision_follows_float32_reference(tinies, arch, dtype, tol):
    model = tinies[arch]
    rt = backend.load(model.files, dtype=dtype)
    assert rt.dtype == dtype
    ids = tokens(52)
    ref = model.reference(ids)[19:]
    cache = rt.new_cache()
    got = [rt.to_numpy(rt.prefill(ids[:20], cache))]  # then 32 cached decode steps
    got += [rt.to_numpy(rt.decode([t], cache, [0])[0]) for t in ids[20:]]
    assert np.abs(np.array(got) - ref).max() <= tol * np.abs(ref).max()


# ---------------------------------------------------------------- the stream

def test_stream_stops_its_step_ahead_at_the_context_end(tinies):
    model = tinies["qwen2"]
    rt = backend.load(model.files, dtype="float32")
    prompt = tokens(10, seed=3)
    cache = rt.new_cache(max_len=14)
    gen = rt.stream(prompt, cache, 0, rt.sampler(SamplingParams(temperature=0), prompt))
    # 14 positions hold the prompt and 4 tokens; the 5th token needs no position of
    # its own until it is fed back, so it still comes; the 6th cannot.
    out = [next(gen).token for _ in range(5)]
    assert cache.lengths == [14]
    with pytest.raises(ContextOverflow):
        next(gen)
    ref = model.reference(prompt + out)
    assert out == ref[len(prompt) - 1:-1].argmax(-1).tolist()


# ---------------------------------------------------------------- quantization

@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_on_load(tinies, bits):
    """Every Linear and the (tied) embedding quantized; the logits are exactly those
    of a float model holding the dequantized weights, so only rounding is lost."""
    model = tinies["qwen3"]
    full = backend.load(model.files, dtype="float32")
    rt = backend.load(model.files, dtype="float32", quantize=bits)
    layers = dict(rt.net.named_modules())
    assert isinstance(layers["model.layers.0.mlp.down_proj"], nn.QuantizedLinear)
    assert isinstance(layers["model.embed_tokens"], nn.QuantizedEmbedding)  # tied: the lm_head too
    assert rt.weight_bytes < full.weight_bytes * (0.3 if bits == 8 else 0.2)
    deq = {f"{path}.weight": mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size, bits=m.bits)
           for path, m in layers.items() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    assert all(m.bits == bits and m.group_size == backend.GROUP_SIZE for path, m in layers.items()
               if f"{path}.weight" in deq)
    full.net.load_weights(list(deq.items()), strict=False)
    ids = tokens(24, seed=1)
    got = rt.to_numpy(rt.prefill(ids, rt.new_cache(), all_logits=True))
    want = full.to_numpy(full.prefill(ids, full.new_cache(), all_logits=True))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("arch", ["qwen3", "llama3"])  # a tied table; an lm_head of its own
def test_quantize_tables_in_blocks_of_rows(tinies, arch, monkeypatch):
    """A float table (the embedding, an untied lm_head) is quantized from its file a
    block of rows at a time, never held whole in float: the same arrays as quantizing
    it whole."""
    monkeypatch.setattr(backend, "ROW_BLOCK", 64)  # 300 rows: four blocks and a short one
    quantized_rows, read = backend._quantized_rows, []
    monkeypatch.setattr(backend, "_quantized_rows", lambda files, name, *a: read.append(name) or quantized_rows(files, name, *a))
    model = tinies[arch]
    rt = backend.load(model.files, dtype="float32", quantize=4)
    full = {}
    for f in model.files.weight_files():
        full.update(mx.load(str(f)))
    tables = {"model.embed_tokens.weight": rt.net.model.embed_tokens}
    if not model.hf.config.tie_word_embeddings:
        tables["lm_head.weight"] = rt.net.lm_head
    assert sorted(read) == sorted(tables) and len(tables) == (2 if arch == "llama3" else 1)
    for name, m in tables.items():
        want = mx.quantize(full[name], group_size=backend.GROUP_SIZE, bits=4)
        assert all(mx.array_equal(got, w).item() for got, w in zip((m.weight, m.scales, m.biases), want))


@pytest.mark.parametrize("group, bits, mixed", [(32, 4, False), (64, 4, False), (64, 4, True), (32, 8, False)])
def test_quantize_leaves_a_checkpoint_saved_quantized_alone(tinies, tmp_path, group, bits, mixed):
    """A safetensors checkpoint whose weights are already quantized, as mlx-lm saves
    one (scales beside them, config.json's `quantization` naming the group size, per
    layer where a recipe mixes them) loads as it is, under quantize=4 too: nothing is
    rounded again, the tables included."""
    import json

    model = tinies["llama3"]  # an lm_head of its own
    first = backend.load(model.files, dtype="float32")
    quantization = {"group_size": group, "bits": bits}
    if mixed:  # one layer's down_proj at 8 bits in groups of 32
        special = "model.layers.1.mlp.down_proj"
        quantization[special] = {"group_size": 32, "bits": 8}
        nn.quantize(first.net, class_predicate=lambda p, m: p == special and {"group_size": 32, "bits": 8})
    nn.quantize(first.net, group_size=group, bits=bits, class_predicate=lambda p, m: hasattr(m, "to_quantized"))
    config = json.loads((model.path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization": quantization}))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(tree_flatten(first.net.parameters())))
    again = backend.load(tiny.model_files(tmp_path), dtype="float32", quantize=4)
    ids = tokens(24, seed=2)
    got = again.to_numpy(again.prefill(ids, again.new_cache(), all_logits=True))
    want = first.to_numpy(first.prefill(ids, first.new_cache(), all_logits=True))
    assert np.array_equal(got, want)


# ---------------------------------------------------------------- GGUF, small and synthetic

@pytest.fixture(scope="module")
def llama256(tmp_path_factory):
    """The tiny llama with rows of 256, the K-quants' block."""
    return tiny.build("llama", tmp_path_factory.mktemp("tiny"), hidden_size=256, intermediate_size=512)


# bits MLX holds each GGUF type in: the affine ones exactly, the rest rounded to 8 bits
BITS = {T.Q4_0: 4, T.Q4_1: 4, T.Q5_0: 5, T.Q5_1: 5, T.Q8_0: 8, T.Q4_K: 4, T.Q5_K: 5, T.Q6_K: 8}


@pytest.mark.parametrize("types", [(T.Q4_0,), (T.Q4_1,), (T.Q8_0,), (T.Q5_0, T.Q5_1, T.F16, T.BF16),
                                   (T.Q4_K, T.Q5_K, T.Q6_K, T.F32)])
def test_gguf_loads_quantized_and_exact(tinies, llama256, tmp_path, types, monkeypatch):
    """Every quantized tensor stays quantized, in the bits of its type; the logits
    are those of gguf's own dequantization, exactly (Q6_K, rounded to 8 bits,
    within a fraction of a percent). Made once, then read from the cache."""
    monkeypatch.setenv("FERMI_CACHE", str(tmp_path / "cache"))
    model = llama256 if any(t.name.endswith("_K") for t in types) else tinies["llama"]
    # llama: the Q/K permutation; biases; tied embeddings
    files = tiny.write_gguf(model, tmp_path / "tiny.gguf", types)
    quant = backend.load(files, dtype="float32")  # GGUF: quantized by default
    floats = ModelFiles(files.name, files.path, files.config, None, None, _weights=files.weight_files())
    expected = backend.load(floats, dtype="float32")  # what gguf's dequantizer makes of the file
    kinds = {}
    for path, m in quant.net.named_modules():
        if isinstance(m, (nn.Linear, nn.QuantizedLinear, nn.Embedding, nn.QuantizedEmbedding)):
            kinds[path] = (getattr(m, "bits", None), getattr(m, "group_size", None))
    want = {}
    for i, (name, p) in enumerate(model.hf.state_dict().items()):  # as write_gguf counts
        kind = types[i % len(types)]
        if p.ndim == 2 and name != "lm_head.weight":  # tied
            want[name.removesuffix(".weight")] = (BITS[kind], 32) if kind in BITS else (None, None)
    assert kinds == want
    if any(k in BITS for k in types):
        assert quant.weight_bytes < expected.weight_bytes * 0.6  # scales and float tensors included
    ids = tokens(30, seed=2)
    got = quant.to_numpy(quant.prefill(ids, quant.new_cache(), all_logits=True))
    want = expected.to_numpy(expected.prefill(ids, expected.new_cache(), all_logits=True))
    tol = 1e-2 if T.Q6_K in types else 1e-4
    assert np.abs(got - want).max() <= tol * np.abs(want).max()
    assert list((tmp_path / "cache" / "gguf").glob("*/mlx.safetensors"))
    again = backend.load(files, dtype="float32")  # from the cache
    assert np.array_equal(again.to_numpy(again.prefill(ids, again.new_cache(), all_logits=True)), got)
    deq = backend.load(files, dtype="float32", quantize=0)  # quantize=0: all dequantized
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in deq.net.named_modules())
    assert deq.weight_bytes == expected.weight_bytes
    plain = backend.load(files, dtype="float32", blocks=False)  # the explicit option, whatever the source
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in plain.net.named_modules())
    assert np.array_equal(plain.to_numpy(plain.prefill(ids, plain.new_cache(), all_logits=True)), want)
    with pytest.raises(FermiError, match="no quantized blocks to keep"):
        backend.load(floats, dtype="float32", blocks=True)


# ---------------------------------------------------------------- SmolLM2, the real Q4_1 GGUF

@pytest.fixture(scope="module")
def smollm2():
    from fermi import sources

    return sources.resolve("smollm2-135m")


@pytest.fixture(scope="module")
def smollm2_f32(smollm2):
    return backend.load(smollm2, dtype="float32", quantize=0)  # the dequantized reference


def chat_ids(model, text: str) -> list[int]:
    return model.tokenizer.encode(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")


def greedy(rt, ids, n):
    gen = rt.stream(ids, rt.new_cache(), 0, rt.sampler(SamplingParams(temperature=0), ids))
    out = [next(gen).token for _ in range(n)]
    gen.close()
    return out


def test_smollm2_q4_1_stays_quantized_and_greedy_matches(smollm2, smollm2_f32):
    rt = backend.load(smollm2, dtype="float32")
    q = rt.net.model.layers[0].self_attn.q_proj
    assert isinstance(q, nn.QuantizedLinear) and (q.bits, q.group_size) == (4, 32)  # Q4_1
    e = rt.net.model.embed_tokens
    assert isinstance(e, nn.QuantizedEmbedding) and e.bits == 8  # the Q8_0 embedding
    assert rt.weight_bytes < smollm2_f32.weight_bytes / 3
    ids = chat_ids(smollm2, "Explain in a few sentences why the sky is blue.")
    assert greedy(rt, ids, 24) == greedy(smollm2_f32, ids, 24)


from models import TEXT  # noqa: E402  (a prose passage, shared with the torch tests)


CODE = '''
def merge_sorted(a: list[int], b: list[int]) -> list[int]:
    """Merge two sorted lists into one sorted list."""
    i, j, out = 0, 0, []
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    out.extend(a[i:])
    out.extend(b[j:])
    return out


class Counter:
    def __init__(self):
        self.counts = {}

    def add(self, word: str) -> None:
        self.counts[word] = self.counts.get(word, 0) + 1

    def most_common(self, n: int) -> list[tuple[str, int]]:
        return sorted(self.counts.items(), key=lambda kv: -kv[1])[:n]
'''


def teacher_forcing(model, reference, n: int | None, settings=("float16", "gguf", "4-bit")) -> dict:
    """Top-1 agreement with the float32 reference (the GGUF dequantized) over the
    text's positions, and how often the choice is in the reference's top 5:
    - float16: from the dequantized weights;
    - gguf: the file's quantized weights as MLX holds them by default (its own
      4-, 5- and 8-bit integers, see fermi.gguf.AFFINE_BITS);
    - 4-bit: `quantize=4` on a float copy of the weights (group 64). These models
      exist here only as 4/5-bit GGUFs, so their "float" weights were rounded
      once already, on another grid, and rounding them again to 4 bits is the
      worst case for it: SmolLM2-135M keeps ~2/3 of its top-1 choices,
      Qwen2.5-0.5B ~4/5, while staying in the reference's top 5 on ~90% / ~99%."""
    ids = model.tokenizer.encode(TEXT + CODE)[:n]
    ref = reference.to_numpy(reference.prefill(ids, reference.new_cache(), all_logits=True))
    top5 = np.argsort(-ref, axis=-1)[:, :5]
    floats = ModelFiles(model.name, model.path, model.config, model.tokenizer, None, _weights=model.weight_files())
    runs = {"float16": (model, dict(dtype="float16", quantize=0)), "gguf": (model, dict(dtype="float32")),
            "4-bit": (floats, dict(dtype="float32", quantize=4))}
    results = {}
    for name in settings:
        source, kw = runs[name]
        rt = backend.load(source, **kw)
        top1 = rt.to_numpy(rt.prefill(ids, rt.new_cache(), all_logits=True)).argmax(-1)
        results[name] = ((top1 == ref.argmax(-1)).mean(), (top5 == top1[:, None]).any(-1).mean(), len(ids))
    return results


@pytest.mark.slow  # (41 s at 64 positions on mlx[cpu]: the default run's time)
def test_smollm2_half_and_4bit_under_teacher_forcing_long(smollm2, smollm2_f32):
    r = teacher_forcing(smollm2, smollm2_f32, 320)
    assert r["float16"][2] >= 300
    assert r["float16"][0] >= 0.95 and r["gguf"][0] >= 0.85, r
    assert r["4-bit"][0] >= 0.55 and r["4-bit"][1] >= 0.85, r


@pytest.mark.slow
def test_qwen25_quantized_under_teacher_forcing():
    """Qwen2.5-Coder-0.5B (the Q4_K_M GGUF: Q5_0, Q4_K, Q6_K, Q8_0 tensors), 320
    positions. (float16 is left to SmolLM2: MLX's CPU float16 kernels are slow.)"""
    from fermi import embedded, sources

    model = sources.resolve(str(embedded.qwen25_coder_path()))
    r = teacher_forcing(model, backend.load(model, dtype="float32", quantize=0), 320, ("gguf", "4-bit"))
    assert r["gguf"][2] >= 300
    assert r["gguf"][0] >= 0.85, r
    assert r["4-bit"][0] >= 0.75 and r["4-bit"][1] >= 0.95, r
