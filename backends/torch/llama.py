"""Llama (SmolLM2, Llama 3.x) in PyTorch, and the base that qwen2 and qwen3 extend.

Read top to bottom: rotary embedding → RMSNorm → Attention → MLP → Block → Model.
Module names match the checkpoint's weight names (model.layers.N.self_attn.o_proj
…) but for the projections that read the same input, fused into one matmul
(q/k/v -> qkv_proj, gate/up -> gate_up_proj): Model.sanitized is the one place
that maps a Hugging Face state dict onto this model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fermi.config import ModelConfig
from fermi.errors import FermiError

from .cache import KVCache, Span
from .weights import (SPLIT_ROWS, give_back_freed_memory, half_bytes, half_linear, int8_linear,
                      linear, linear_t, pack_half, stacked, transposed, weight_blocks)

HEAD_ROWS = 32768  # rows of the output projection packed at a time (Model.pack_half)
# Projections of the same input run as one matmul: Model.sanitized concatenates the
# checkpoint's weights (and biases) in this order.
FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}

# ---------------------------------------------------------------- rotary embedding


def rope_parameters(config: ModelConfig) -> tuple[float, dict]:
    """(theta, scaling) from either spelling of the config: transformers 5 writes one
    `rope_parameters` dict (rope_type, rope_theta, …); older configs have
    `rope_theta` and `rope_scaling` (whose type may be spelled `type`)."""
    params = config.extra.get("rope_parameters")
    if params:
        return float(params.get("rope_theta", config.rope_theta)), dict(params)
    return float(config.rope_theta), dict(config.rope_scaling or {})


def rope_frequencies(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], computed as transformers does (float32)."""
    theta, scaling = rope_parameters(config)
    dim = config.head_dim
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band
        # between low_freq_factor and high_freq_factor interpolated smoothly.
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise FermiError(f"rope scaling '{kind}' is not supported by the torch backend")


class Rotary:
    """cos/sin tables for positions [0, size), grown by doubling on demand so a short
    session does not build a table for the whole context. `sin` carries the sign of
    rotate_half, so applying RoPE is x*cos + swap_halves(x)*sin."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device):
        self.inv_freq = rope_frequencies(config).to(device)
        self.dtype, self.size = dtype, 0
        self.cos = self.sin = None

    def _grow(self, n: int) -> None:
        self.size = max(1024, 1 << (n - 1).bit_length())
        t = torch.arange(self.size, device=self.inv_freq.device).float()
        freqs = torch.outer(t, self.inv_freq)  # [size, head_dim/2], float32 like HF
        cos, sin = freqs.cos(), freqs.sin()
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


def attention_mask(span: Span, device) -> tuple[torch.Tensor | None, bool]:
    """(mask, is_causal) for scaled_dot_product_attention: each query sees the keys
    at positions <= its own. A bool mask is True where attention is allowed."""
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


class Linear(nn.Linear):
    """nn.Linear whose few-row products (decode) use every core: on a CPU torch runs
    a matrix-vector product on one thread, bound by one core's memory bandwidth
    (~12 GB/s of ~33 here). With the weight cut into `parts` blocks, one batched matmul
    runs them in parallel: blocks of rows (`linear`), or for a weight wider than it is
    deep, blocks of columns of the weight held as [in, out] (`weight_t`, `linear_t`),
    which streams faster at those shapes (gate/up: 28 GB/s against 22 here)."""

    parts = 1  # set by Model.split: torch's thread count on a CPU
    blocks = None  # the weight as `parts` blocks, views made once (make_blocks): see weight_blocks
    packed = None  # float16 weights packed for fbgemm (see pack_half)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_parameter("weight_t", None)  # the weight as [in, out], when split
        self.register_parameter("weight_scale", None)  # int8 weights: a scale per row (hold_int8)

    def hold_int8(self) -> None:
        """Before loading: the weight is read as int8 rows with a scale each (Model.sanitized)."""
        self.weight_scale = nn.Parameter(torch.empty(self.out_features, dtype=torch.bfloat16), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_scale is not None:
            return int8_linear(x, self.weight, self.weight_scale, self.bias)
        if self.packed is not None:
            return half_linear(x, self.packed)
        if self.weight_t is not None:
            return linear_t(x, self.weight_t, self.bias, self.blocks)
        return linear(x, self.weight, self.bias, self.blocks)

    def split(self, parts: int) -> None:
        if parts > 1 and self.out_features > self.in_features and self.weight is not None:
            self.weight_t = nn.Parameter(transposed(self.weight), requires_grad=False)
            self.register_parameter("weight", None)
        self.parts = parts

    def make_blocks(self) -> None:
        """The blocks, as views of the weights held now (again once they are loaded)."""
        held_t = self.weight_t is not None
        weight = self.weight_t if held_t else self.weight
        self.blocks = None if weight is None else weight_blocks(weight, self.parts, held_t)


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
        return y if self.weight is None else y * self.weight  # None: folded (Model.fold_norms)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, qkv_bias: bool | None = None, o_bias: bool | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        qkv_bias = config.attention_bias if qkv_bias is None else qkv_bias
        o_bias = config.attention_bias if o_bias is None else o_bias
        hidden, q_dim, kv_dim = config.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.qkv_proj = Linear(hidden, q_dim + 2 * kv_dim, bias=qkv_bias)  # q_proj, k_proj, v_proj (FUSED)
        self.o_proj = Linear(q_dim, hidden, bias=o_bias)

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
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=heads != kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_up_proj = Linear(hidden, 2 * inter, bias=bias)  # gate_proj, up_proj (FUSED)
        self.down_proj = Linear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


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

    def __init__(self, config: ModelConfig, attention: type[Attention]):
        super().__init__()
        # An explicit empty weight skips the random init: the checkpoint fills it, and
        # normal_ on the meta device costs over a second of one-time setup at startup.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(Block(config, attention) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Model(nn.Module):
    def __init__(self, config: ModelConfig, attention: type[Attention] = Attention):
        super().__init__()
        self.config = config
        self.model = Decoder(config, attention)
        # Tied embeddings: the output projection reuses embed_tokens, no lm_head weight.
        self.lm_head = None if config.tie_word_embeddings else Linear(
            config.hidden_size, config.vocab_size, bias=False
        )
        self.rotary: Rotary | None = None  # built by setup(), once the dtype and device are known
        self.packed_head = None  # the output projection in blocks of rows, when pack_half() ran
        self.packed_bytes = 0  # bytes of the weights pack_half() handed to fbgemm
        self.parts = 1  # for the output projection, as Linear.parts (see split)
        self.head_t = None  # a tied table as [hidden, vocab], when split
        self.head_blocks = None  # head_t as `parts` blocks (split_views)
        self.embed_scale = None  # int8 embedding table: a scale per row (hold_int8)

    def sanitized(self, tensors, dtype: torch.dtype | None = None) -> dict:
        """Checkpoint tensors, (name, tensor) one at a time -> this model's state dict: a
        tied lm_head dropped, the parts of each FUSED projection concatenated once all
        are in, a weight this model holds as [in, out] (see split) transposed. Each
        tensor kept is made in one copy, converted to `dtype` in it (a conversion
        beforehand would be a second copy, whose freed memory the heap keeps), so the
        caller may hand in views of a mapped file; the extra memory is one layer's
        parts (or the table, if it comes first). A matrix the model holds as int8
        (hold_int8) comes as (int8, scale) rows (weights.int8_rows)."""
        held_t = {f"{n}.weight": f"{n}.weight_t" for n, m in self.named_modules()
                  if isinstance(m, Linear) and m.weight_t is not None}
        if self.head_t is not None:
            held_t["model.embed_tokens.weight"] = "head_t"
        int8 = {f"{n}.weight": f"{n}.weight_scale" for n, m in self.named_modules()
                if isinstance(m, Linear) and m.weight_scale is not None}
        if self.embed_scale is not None:
            int8["model.embed_tokens.weight"] = "embed_scale"
        state, pending = {}, {}
        for name, t in tensors:
            if name == "lm_head.weight" and self.lm_head is None:
                continue
            parts = [t]
            fused, p = next(((f, p) for f, ps in FUSED.items() for p in ps if f".{p}." in name), (None, None))
            if fused:
                prefix, kind = name.split(f".{p}.")  # model.layers.N, weight|bias
                name = f"{prefix}.{fused}.{kind}"
                group = pending.setdefault(name, {})
                group[f"{prefix}.{p}.{kind}"] = t
                if len(group) < len(FUSED[fused]):
                    continue
                group = pending.pop(name)
                parts = [group[f"{prefix}.{q}.{kind}"] for q in FUSED[fused]]
            if name in held_t:  # [out, in] parts -> one [in, out]
                state[held_t[name]] = transposed(*parts, dtype=dtype)
            elif name in int8:  # (int8, scale) parts
                state[name], state[int8[name]] = parts[0] if len(parts) == 1 else map(torch.cat, zip(*parts))
            else:  # (an int8 one here is not the model's: left to be reported as unexpected)
                state[name] = parts[0][0] if isinstance(parts[0], tuple) else stacked(parts, dtype)
        for group in pending.values():  # parts without their partners: reported as unexpected
            state.update(group)
        return state

    def setup(self, dtype: torch.dtype, device) -> None:
        """Once the weights are loaded: the rotary tables, the norms' eps, the blocks."""
        self.rotary = Rotary(self.config, dtype, device)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.setup(torch.device(device))
        self.split_views()

    def split_views(self) -> None:
        """The blocks of the weights held now (Linear.blocks, head_blocks): views, made
        again once the weights are loaded."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.make_blocks()
        self.head_blocks = None if self.head_t is None else weight_blocks(self.head_t, self.parts, held_t=True)

    def forward(self, ids: torch.Tensor, cache: KVCache, span: Span) -> torch.Tensor:
        """ids [n, length] -> hidden states [n, length, hidden], before the final norm
        (so the caller can keep only the positions it needs logits for)."""
        rope = self.rotary(span)
        mask, causal = attention_mask(span, ids.device)
        x = self.embed(ids).to(self.rotary.dtype)
        for i, block in enumerate(self.model.layers):
            x = block(x, rope, mask, causal, cache, i, span)
        return x

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.embed_scale is not None:  # int8 rows
            return self.model.embed_tokens(ids).float() * self.embed_scale[ids, None].float()
        if self.head_t is None:
            return self.model.embed_tokens(ids)
        return self.head_t[:, ids].movedim(0, -1)  # [hidden, n, length] -> [n, length, hidden]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.model.norm(h)
        if self.packed_head is not None:
            return torch.cat([half_linear(h, block) for block in self.packed_head], -1)
        if self.head_t is not None:
            return linear_t(h, self.head_t, blocks=self.head_blocks)
        if self.lm_head is not None:
            return self.lm_head(h)
        if self.embed_scale is not None:
            return int8_linear(h, self.model.embed_tokens.weight, self.embed_scale)
        return F.linear(h, self.model.embed_tokens.weight)

    def split(self, parts: int) -> None:
        """parts > 1: decode GEMVs cut into `parts` blocks, the wide weights held as
        [in, out] (see Linear); a tied table too, the embedding then reading its columns.
        Called on the meta device before loading, the weights are read in that layout."""
        self.parts = parts
        emb = self.model.embed_tokens
        if parts > 1 and self.lm_head is None and emb.weight is not None:
            self.head_t = nn.Parameter(transposed(emb.weight), requires_grad=False)
            emb.register_parameter("weight", None)
        for m in self.modules():
            if isinstance(m, Linear):
                m.split(parts)
        self.split_views()

    def fold_norms(self) -> None:
        """Each block's norm weights multiplied into the projections they feed (qkv,
        gate_up), in place: one elementwise product less per norm (~3% of a CPU decode
        step for SmolLM2). For float32, where the product adds no rounding to speak of."""
        for block in self.model.layers:
            for norm, proj in ((block.input_layernorm, block.self_attn.qkv_proj),
                               (block.post_attention_layernorm, block.mlp.gate_up_proj)):
                if proj.weight_t is not None:
                    proj.weight_t.mul_(norm.weight[:, None])  # [in, out]: a row per input
                else:
                    proj.weight.mul_(norm.weight)
                norm.weight = None

    def hold_int8(self) -> None:
        """Before loading (on the meta device): every matrix, the embedding table and an
        untied lm_head read as int8 rows with a bfloat16 scale each (int8_rows), the
        rest as it comes. Products run through int8_linear, the embedding dequantizes
        the rows it looks up."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.hold_int8()
        self.embed_scale = nn.Parameter(torch.empty(self.config.vocab_size, dtype=torch.bfloat16), requires_grad=False)

    def pack_half(self) -> None:
        """Weights loaded in float16 -> every matrix product's weight packed by fbgemm,
        the embedding table left in float16, the rest (norms) float32. Activations and
        the KV cache are float32."""
        emb = self.model.embed_tokens
        head = emb.weight if self.lm_head is None else self.lm_head.weight
        # The output projection in blocks of rows (each output is its own row's product,
        # so the logits are the same): packing converts what it packs to float32 first,
        # and a whole table (Qwen2.5-0.5B's, 545 MB) would peak at 1.5x the weights.
        blocks = head.split(HEAD_ROWS)
        self.packed_head, self.lm_head = [pack_half(b) for b in blocks], None
        self.packed_bytes = sum(half_bytes(b) for b in blocks)
        for m in self.modules():
            if isinstance(m, Linear):
                m.packed = pack_half(m.weight, None if m.bias is None else m.bias.float())
                self.packed_bytes += half_bytes(m.weight) + (0 if m.bias is None else m.bias.numel() * 4)
                m.register_parameter("weight", None)
                m.register_parameter("bias", None)
                give_back_freed_memory()  # else the float16 copies stay resident beside the packed ones
        for name, p in self.named_parameters():
            if p is not emb.weight:
                p.data = p.data.float()
