"""Tiny random-weight reference models, shared by the backends' tests.

`build(arch, root)` makes a transformers model (the reference implementation),
saves it with `save_pretrained` (config.json + model.safetensors) and returns a
`Tiny` with the directory, a `ModelFiles` for it (no tokenizer needed) and the
reference's logits. Also per-backend helpers: `backend_module`, `to_backend`.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from fermi.config import ModelConfig
from fermi.sources import ModelFiles

VOCAB = 300
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    initializer_range=0.15, rms_norm_eps=1e-6,
)

# arch name -> (transformers class names, config overrides). Between them they cover:
# head_dim != hidden/heads, q/k/v bias, q/k norm, llama3 and linear rope scaling,
# tied and untied embeddings, o_proj and MLP biases, a non-default rope_theta.
SPECS = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        head_dim=32, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    # fused qkv/gate_up in the checkpoint, longrope (its long factors from position 300:
    # test_phi3_longrope_past_the_original_context), a sliding window shorter than the tests
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        tie_word_embeddings=False, sliding_window=12, original_max_position_embeddings=300, pad_token_id=0,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "short_factor": [1.0 + 0.1 * i for i in range(8)],
                         "long_factor": [1.0 + 3.0 * i for i in range(8)]})),
    # a sliding and a full layer, each its own RoPE (the full one scaled), (1 + w) norms,
    # GeGLU, the scaled embedding, a score scale that is not head_dim's
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=32, query_pre_attn_scalar=24, sliding_window=12, tie_word_embeddings=True,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}})),
}


@dataclass
class Tiny:
    arch: str
    path: Path
    files: ModelFiles
    hf: torch.nn.Module  # the reference, float32, eager attention

    def reference(self, ids) -> np.ndarray:
        """Full-sequence logits of the reference, [len(ids), vocab]."""
        with torch.no_grad():
            return self.hf(torch.tensor([list(ids)])).logits[0].float().numpy()


def build(arch: str, root: Path, seed: int = 0, **dims) -> Tiny:
    """`dims` override COMMON's sizes and the spec's settings (the directory is then
    named after them)."""
    import transformers

    config_name, model_name, overrides = SPECS[arch]
    config = getattr(transformers, config_name)(**{**COMMON, **overrides, **dims})
    config._attn_implementation = "eager"  # the plainest reference math
    torch.manual_seed(seed)
    hf = getattr(transformers, model_name)(config).float().eval()
    with torch.no_grad():  # init leaves norms at 1 and biases at 0: make them matter
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
    path = Path(root) / "-".join([arch, *(f"{k}{v}" for k, v in dims.items())])
    hf.save_pretrained(path)
    return Tiny(arch, path, model_files(path), hf)


def model_files(path: Path) -> ModelFiles:
    """A ModelFiles for a directory of config.json + *.safetensors, no tokenizer."""
    path = Path(path)
    config = ModelConfig.from_dict(json.loads((path / "config.json").read_text()))
    return ModelFiles(
        name=path.name, path=path, config=config, tokenizer=None, chat_template=None,
        _weights=sorted(path.glob("*.safetensors")),
    )


def backend_module(name: str):
    """fermi.backends.<name>, or skip the test where the platform cannot run it
    (a backend that fails to import is a failure, not a skip)."""
    module = importlib.import_module(f"fermi.backends.{name}")
    reason = module.available()
    if reason:
        pytest.skip(f"backend {name} cannot run here: {reason}")
    return module


def to_backend(name: str, x) -> object:
    """A numpy array as the backend's own array type (float32)."""
    x = np.asarray(x, dtype=np.float32)
    if name == "torch":
        return torch.from_numpy(x.copy())
    if name == "mlx":
        import mlx.core as mx

        return mx.array(x)
    raise ValueError(name)


def gguf_blocks(rows: int, cols: int, kind, rng: np.random.Generator) -> np.ndarray:
    """Random but well-formed GGUF blocks of a quantized type (any bit pattern is a
    valid block once its float16 fields hold sane numbers): the way to write the
    K-quants, which the gguf package cannot quantize. Weights come out ~0.1."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[kind]
    n = rows * cols // block
    raw = rng.integers(0, 256, (n, size), dtype=np.uint8)
    half = lambda lo, hi: rng.uniform(lo, hi, n).astype(np.float16).view(np.uint8).reshape(n, 2)
    name = kind.name
    if name == "Q6_K":  # d last, times int8 sub-scales
        raw[:, -2:] = half(2e-5, 1e-4)
    elif name.endswith("_K"):  # d, dmin, times 6-bit sub-scales and mins
        raw[:, 0:2], raw[:, 2:4] = half(2e-4, 1e-3), half(0, 1e-3)
    else:
        raw[:, 0:2] = half(5e-3, 2e-2)
        if name.endswith("_1"):
            raw[:, 2:4] = half(-0.15, -0.05)
    return raw.reshape(rows, cols // block * size)


def to_gguf_name(hf: str) -> str:
    from fermi.gguf import _LAYER, _TOP

    base, _, kind = hf.rpartition(".")
    if base.startswith("model.layers."):
        _, _, n, part = base.split(".", 3)
        return f"blk.{n}.{ {v: k for k, v in _LAYER.items()}[part]}.{kind}"
    return f"{ {v: k for k, v in _TOP.items()}[base]}.{kind}"


def write_gguf(model: Tiny, path, types) -> ModelFiles:
    """The tiny llama as llama.cpp would write it (Q/K rows permuted for its
    interleaved RoPE), 2-D tensors in types[i % len(types)] (K-quants as random
    blocks: the gguf package cannot make them); returns ModelFiles whose
    weight_files() hold what gguf's own dequantizer makes of it (the expectation)."""
    import gguf
    from gguf.quants import dequantize, quantize
    from safetensors.numpy import save_file

    T = gguf.GGMLQuantizationType
    cfg = model.files.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    expected = {}
    rng = np.random.default_rng(0)
    for i, (name, p) in enumerate(model.hf.state_dict().items()):
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = p.float().numpy()
        n = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(name.split(".")[-2])
        g = w.reshape(n, 2, -1, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape) if n else w
        kind = types[i % len(types)] if w.ndim == 2 else T.F32
        if kind.name.endswith("_K"):
            data = gguf_blocks(*w.shape, kind, rng)
        else:
            data = quantize(g, kind) if kind != T.F32 else g
        writer.add_tensor(to_gguf_name(name), data, raw_dtype=kind)
        back = dequantize(data, kind).reshape(w.shape).astype(np.float32)
        # undo the permutation: [n, half, 2] rows back to [n, 2, half]
        expected[name] = back.reshape(n, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape) if n else back
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    save_file({k: np.ascontiguousarray(v) for k, v in expected.items()}, str(path) + ".safetensors")
    return ModelFiles(name=path.name, path=path, config=cfg, tokenizer=None, chat_template=None,
                      gguf=path, _weights=[path.parent / (path.name + ".safetensors")])
