"""Llama (SmolLM2, Llama 3.x) in MLX; the base that qwen2.py and qwen3.py extend.

Read top to bottom: config → RoPE → Attention → MLP → Block → Model. Module names
match the Hugging Face checkpoint (model.layers.N.self_attn.q_proj, ...), so its
safetensors load with no renaming. Layers never move a cache position: they write
where the `Span` says (see cache.py) and the runtime advances the lengths.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from fermi import rope
from fermi.config import ModelConfig

from .cache import Span


class RoPE(nn.Module):
    """HF layout (rotate halves, traditional=False), the frequencies from fermi.rope
    (every scaling kind). Longrope's long factors apply from their position on; yarn's
    and longrope's attention factor scales the result (as it scales HF's cos and sin)."""

    def __init__(self, cfg: ModelConfig, params: dict | None = None):
        super().__init__()
        self.dims = cfg.head_dim
        f = rope.frequencies(params or rope.parameters(cfg), cfg.head_dim, cfg.max_position_embeddings)
        self._freqs = mx.array(f.periods)  # "_": not a parameter
        self._long = None if f.long_inv_freq is None else mx.array(rope.Frequencies(f.long_inv_freq).periods)
        self.long_from, self.factor = f.long_from, f.attention_factor

    def __call__(self, x: mx.array, offset: int | mx.array) -> mx.array:
        y = mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._freqs)
        early = isinstance(offset, int) and offset + x.shape[2] <= (self.long_from or 0)
        if self._long is not None and not early:
            starts = mx.array(offset).reshape(-1, 1, 1, 1)  # [n or 1, 1, 1, 1]
            late = (starts + mx.arange(x.shape[2])[:, None]) >= self.long_from  # [.., length, 1]
            long = mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0, offset=offset,
                                freqs=self._long)
            y = mx.where(late, long, y)
        return y if self.factor == 1.0 else y * self.factor


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        dim, self.n_heads, self.n_kv_heads = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = hd = cfg.head_dim
        self.scale = hd ** -0.5
        qkv_bias, o_bias = self.biases(cfg)
        self.q_proj = nn.Linear(dim, self.n_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, dim, bias=o_bias)
        self.rope = RoPE(cfg, rope.parameters(cfg, cfg.rope_kinds()[layer]))

    @staticmethod
    def biases(cfg: ModelConfig) -> tuple[bool, bool]:
        """(q/k/v bias, o bias): Llama has one switch for all four."""
        return cfg.attention_bias, cfg.attention_bias

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        B, L, _ = x.shape
        # [B, L, heads * hd] -> [B, heads, L, hd]
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        return q, k, v

    def __call__(self, x: mx.array, span: Span, layer: int, mask) -> mx.array:
        B, L, _ = x.shape
        q, k, v = self.project(x)
        q, k = self.rope(q, span.offset), self.rope(k, span.offset)
        k, v = span.update(layer, k, v)
        # GQA is native: k/v keep n_kv_heads.
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    act = staticmethod(nn.silu)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim, hidden, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, attention: type[Attention], layer: int):
        super().__init__()
        self.self_attn = attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, x: mx.array, span: Span, layer: int, mask) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), span, layer, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, attention: type[Attention], block=Block, norm=nn.RMSNorm):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [block(cfg, attention, i) for i in range(cfg.num_hidden_layers)]
        self.norm = norm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self._windows = cfg.windows()  # each layer's sliding window, or None
        self._embed_scale = None  # the embedding's output times this (Gemma)

    def __call__(self, ids: mx.array, span: Span) -> mx.array:
        h = self.embed_tokens(ids)
        if self._embed_scale is not None:
            h = h * mx.array(self._embed_scale, dtype=h.dtype)
        masks = {w: span.mask_for(w) for w in set(self._windows)}
        for i, layer in enumerate(self.layers):
            h = layer(h, span, i, masks[self._windows[i]])
        return self.norm(h)


class Model(nn.Module):
    """`hidden` (ids [B, L] -> [B, L, hidden]) and `logits` are separate so a prefill
    runs the vocabulary projection on its last position only."""

    attention, block, norm = Attention, Block, nn.RMSNorm  # an architecture's own, in its subclass

    def __init__(self, cfg: ModelConfig, tied: bool):
        super().__init__()
        self.tied = tied
        self.model = Transformer(cfg, self.attention, self.block, self.norm)
        if not tied:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def hidden(self, ids: mx.array, span: Span) -> mx.array:
        return self.model(ids, span)

    def logits(self, h: mx.array) -> mx.array:
        return self.model.embed_tokens.as_linear(h) if self.tied else self.lm_head(h)
