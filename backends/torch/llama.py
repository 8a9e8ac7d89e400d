"""Llama (SmolLM2, Llama 3.x) in PyTorch, and the base that qwen2 and qwen3 extend.

Read top to bottom: rotary embedding → RMSNorm → Attention → MLP → Block → Model.
Module names match the checkpoint's weight names (model.layers.N.self_attn.o_proj
…) but for the projections that read the same input, fused into one matmul
(q/k/v -> qkv_proj, gate/up -> gate_up_proj, as FUSED says). How the weights are
held (float, blocks, int8, fbgemm float16) is storage.py's: it swaps the
nn.Linear and Embedding layers here for its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fermi import rope
from fermi.config import ModelConfig

from .cache import KVCache, Span
from .storage import Embedding
from .weights import SPLIT_ROWS

# Projections of the same input run as one matmul: storage.checkpoint_state joins the
# checkpoint's weights (and biases) in this order.
FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}

# ---------------------------------------------------------------- rotary embedding


class Rotary:
    """cos/sin tables for positions [0, size), grown by doubling on demand so a short
    session does not build a table for the whole context. `sin` carries the sign of
    rotate_half, so applying RoPE is x*cos + swap_halves(x)*sin."""

    def __init__(self, freqs: rope.Frequencies, dtype: torch.dtype, device):
        self.freqs, self.device = freqs, device
        self.inv_freq = torch.from_numpy(freqs.inv_freq).to(device)
        self.dtype, self.size = dtype, 0
        self.cos = self.sin = None

    def _grow(self, n: int) -> None:
        self.size = max(1024, 1 << (n - 1).bit_length())
        t = torch.arange(self.size, device=self.device).float()
        freqs = torch.outer(t, self.inv_freq)  # [size, head_dim/2], float32 like HF
        f = self.freqs
        if f.long_inv_freq is not None and self.size > f.long_from:  # longrope: past the original context
            freqs[f.long_from:] = torch.outer(t[f.long_from:], torch.from_numpy(f.long_inv_freq).to(self.device))
        cos, sin = freqs.cos() * f.attention_factor, freqs.sin() * f.attention_factor
        self.cos = torch.cat([cos, cos], -1).to(self.dtype)  # [size, head_dim]
        self.sin = torch.cat([-sin, sin], -1).to(self.dtype)

    def reserve(self, n: int) -> None:
        if n > self.size:
            self._grow(n)

    def __call__(self, span: Span):
        """cos, sin broadcastable to [n, heads, length, head_dim]."""
        self.reserve(span.end)
        if span.positions is None:
            return self.cos[span.start:span.end], self.sin[span.start:span.end]  # [L, D]
        pos = span.rows_positions()  # [n, length]
        n, length = pos.shape
        return self.cos[pos].view(n, 1, length, -1), self.sin[pos].view(n, 1, length, -1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.addcmul(x * cos, torch.cat([x[..., half:], x[..., :half]], -1), sin)


def attention_mask(span: Span, device, window: int | None = None) -> tuple[torch.Tensor | None, bool]:
    """(mask, is_causal) for scaled_dot_product_attention: each query sees the keys
    at positions <= its own; with a sliding `window`, only the `window` newest of
    them (its own included). A bool mask is True where attention is allowed."""
    if window is not None and span.end > window:
        pos = span.rows_positions() if span.positions is not None else \
            torch.arange(span.start, span.end, device=device)[None]  # [n or 1, length]
        back = pos[:, :, None] - torch.arange(span.end, device=device)  # how far back each key is
        return ((back >= 0) & (back < window)).view(pos.shape[0], 1, pos.shape[1], span.end), False
    if span.positions is not None:  # rows at different positions: each query its own
        pos = span.rows_positions()  # [n, length]
        keys = torch.arange(span.end, device=device)
        return (keys <= pos[:, :, None]).view(pos.shape[0], 1, pos.shape[1], span.end), False
    if span.length == 1:
        return None, False  # the one query is the newest position: it sees everything
    if span.start == 0:
        return None, True
    queries = torch.arange(span.start, span.end, device=device)
    return torch.arange(span.end, device=device)[None, :] <= queries[:, None], False


# ---------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.eps_t = None  # on a CPU, eps as a [1, 1, 1] float32 tensor for decode (setup)

    def setup(self, device) -> None:
        if device.type == "cpu":
            self.eps_t = torch.full((1, 1, 1), self.eps, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in float32 then cast back before the weight, as transformers does.
        d = x.shape[-1]
        if self.eps_t is None or x.numel() > SPLIT_ROWS * d:
            y = F.rms_norm(x.float(), (d,), eps=self.eps).to(x.dtype)
        else:
            # A decode step on a CPU: F.rms_norm costs ~25 us a call within one (several
            # small kernels), a batched dot product per row, rsqrt and one product ~6
            # (measured; for a prefill's many rows the batched products are slower).
            rows = x.float().reshape(-1, 1, d)
            mean_sq = torch.baddbmm(self.eps_t, rows, rows.mT, alpha=1 / d)  # eps + mean(x^2), [rows, 1, 1]
            y = (rows * mean_sq.rsqrt_()).view(x.shape).to(x.dtype)
        return y if self.weight is None else y * self.weight  # None: folded (storage.fold_norms)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, qkv_bias: bool | None = None, o_bias: bool | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        qkv_bias = config.attention_bias if qkv_bias is None else qkv_bias
        o_bias = config.attention_bias if o_bias is None else o_bias
        hidden, q_dim, kv_dim = config.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(hidden, q_dim + 2 * kv_dim, bias=qkv_bias)  # q_proj, k_proj, v_proj (FUSED)
        self.o_proj = nn.Linear(q_dim, hidden, bias=o_bias)
        self.scale = None  # of the scores: None is 1/sqrt(head_dim)

    def qk_norm(self, qk: torch.Tensor) -> torch.Tensor:
        return qk  # qwen3 normalizes each head here

    def forward(self, x, rope, mask, causal, cache: KVCache, layer: int, span: Span):
        b, n = x.shape[:2]
        heads, kv_heads = self.n_heads, self.n_kv_heads
        qkv = self.qkv_proj(x).view(b, n, heads + 2 * kv_heads, self.head_dim)
        # q and k heads together (one RoPE), [b, n, heads, head_dim] -> [b, heads, n, head_dim]
        qk = apply_rope(self.qk_norm(qkv[:, :, :heads + kv_heads]).transpose(1, 2), *rope)
        q, k = qk.split([heads, kv_heads], dim=1)
        k, v = cache.update(layer, span, k, qkv[:, :, heads + kv_heads:].transpose(1, 2))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                                             enable_gqa=heads != kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    act = staticmethod(F.silu)

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=bias)  # gate_proj, up_proj (FUSED)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, attention: type[Attention]):
        super().__init__()
        self.self_attn = attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, rope, mask, causal, cache, layer, span):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, causal, cache, layer, span)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The checkpoint's `model.*`: embeddings, blocks and the final norm."""

    def __init__(self, config: ModelConfig, attention: type[Attention], block: type[nn.Module], norm: type[nn.Module]):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(block(config, attention) for _ in range(config.num_hidden_layers))
        self.norm = norm(config.hidden_size, config.rms_norm_eps)


class Model(nn.Module):
    FUSED = FUSED
    Block, Norm = Block, RMSNorm  # an architecture's own, in its subclass

    def __init__(self, config: ModelConfig, attention: type[Attention] = Attention):
        super().__init__()
        self.config = config
        self.model = Decoder(config, attention, self.Block, self.Norm)
        # Tied embeddings: the output projection reuses embed_tokens, no lm_head weight.
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                         bias=False)
        self.rotaries: dict[str | None, Rotary] = {}  # by config.rope_kinds(), built by setup()
        # each layer's sliding window and kind of RoPE: read once, not every step
        self.windows, self.rope_kinds = config.windows(), config.rope_kinds()

    @property
    def rotary(self) -> Rotary:
        return next(iter(self.rotaries.values()))

    def setup(self, dtype: torch.dtype, device) -> None:
        """Once the weights are loaded: the rotary tables, the norms' eps."""
        c = self.config
        self.rotaries = {kind: Rotary(rope.frequencies(rope.parameters(c, kind), c.head_dim, c.max_position_embeddings),
                                      dtype, device) for kind in dict.fromkeys(self.rope_kinds)}
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.setup(torch.device(device))

    def norm_feeds(self) -> list[tuple[RMSNorm, nn.Module]]:
        """(norm, the projection its output feeds alone): what storage.fold_norms may fold."""
        return [pair for block in self.model.layers for pair in ((block.input_layernorm, block.self_attn.qkv_proj),
                                                                  (block.post_attention_layernorm, block.mlp.gate_up_proj))]

    def forward(self, ids: torch.Tensor, cache: KVCache, span: Span) -> torch.Tensor:
        """ids [n, length] -> hidden states [n, length, hidden], before the final norm
        (so the caller can keep only the positions it needs logits for)."""
        ropes = {kind: rotary(span) for kind, rotary in self.rotaries.items()}
        windows, kinds = self.windows, self.rope_kinds
        masks = {w: attention_mask(span, ids.device, w) for w in set(windows)}
        x = self.embed(ids).to(self.rotary.dtype)
        for i, block in enumerate(self.model.layers):
            x = block(x, ropes[kinds[i]], *masks[windows[i]], cache, i, span)
        return x

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def logits_layer(self) -> nn.Module:
        return self.model.embed_tokens if self.lm_head is None else self.lm_head

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.model.norm(h)
        return self.model.embed_tokens.as_linear(h) if self.lm_head is None else self.lm_head(h)
