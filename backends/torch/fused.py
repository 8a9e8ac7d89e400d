"""A step on the CPU in five calls a layer (runtime.decode, and runtime.prefill where
every product is native: Step.native):
the q/k/v projection with the norm before it, attention (kernels.attend: each row's
q/k norms, RoPE, cache write and attention in one call), o_proj adding into the
residual, gate/up with its norm, down with the SiLU-GLU before it and the residual
after. Weights in blocks (QBlocks) do the norm, the GLU, the bias and the residual
inside the kernel's call; other weights (float32 blocks, float16) run them as torch
ops around their product. The math is llama.Model.forward's, for the architectures
built of its Block (llama, qwen2, qwen3, phi3): a step of ~900 small torch calls
becomes ~150 (SmolLM2; bench/README, issue 20's "Second pass")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import llama, qwen3, weights
from .storage import QBlocks


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


class Project:
    """One projection of a layer, with what runs around it: the norm before it (the
    RMSNorm module), the GLU before it, the residual it adds into."""

    def __init__(self, proj, norm: llama.RMSNorm | None = None, glu: bool = False):
        self.proj, self.norm, self.glu = proj, norm, glu
        self.native = isinstance(proj, QBlocks) and (norm is None or norm.weight is not None)
        if self.native:
            n, nb = proj.weight_scale.shape
            self.call = weights.kernels.q8_linear if proj.bits == 8 else weights.kernels.q4_linear
            self.args = (proj.weight.data_ptr(), proj.weight_scale.data_ptr(), n, nb * weights.QK, _ptr(proj.bias),
                         _ptr(norm.weight) if norm else 0, norm.eps if norm else 0.0, int(glu))
            self.mins = () if proj.weight_min is None else (proj.weight_min.data_ptr(),)  # (q4 with mins)

    def __call__(self, x: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        m = x.shape[0]  # (a decode step: the kernel, however many rows)
        if self.native:
            w, s, n, k, bias, norm, eps, glu = self.args
            y = torch.empty(m, n) if into is None else into
            self.call(y.data_ptr(), x.data_ptr(), w, s, m, n, k, bias, norm, eps, glu, int(into is not None), *self.mins)
            return y
        if self.glu:
            gate, up = x.chunk(2, -1)
            x = F.silu(gate) * up
        if self.norm is not None:
            x = self.norm(x)
        y = self.proj(x)
        return y if into is None else into.add_(y)


class Layer:
    def __init__(self, block: llama.Block, window: int | None, rotary: llama.Rotary):
        a, mlp = block.self_attn, block.mlp
        self.qkv = Project(a.qkv_proj, block.input_layernorm)
        self.o = Project(a.o_proj)
        self.gate_up = Project(mlp.gate_up_proj, block.post_attention_layernorm)
        self.down = Project(mlp.down_proj, glu=True)
        qn, kn = getattr(a, "q_norm", None), getattr(a, "k_norm", None)
        self.heads, self.kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
        self.norms = (_ptr(qn.weight) if qn else 0, _ptr(kn.weight) if kn else 0)
        self.eps = qn.eps if qn else 0.0
        self.scale = a.scale or a.head_dim ** -0.5
        self.window, self.rotary = window or 0, rotary


class Step:
    def __init__(self, model: llama.Model):
        self.model = model
        self.layers = [Layer(block, model.windows[i], model.rotaries[model.rope_kinds[i]])
                       for i, block in enumerate(model.model.layers)]
        self.head = Project(model.logits_layer(), model.model.norm)
        # Every product in the kernel (weights in blocks): each row's numbers are its own
        # whatever rows share the call, so prefills run here too (runtime.prefill).
        self.native = self.head.native and all(p.native for layer in self.layers
                                               for p in (layer.qkv, layer.o, layer.gate_up, layer.down))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., hidden] -> the final norm and lm_head's logits [rows, vocab]."""
        return self.head(h.reshape(-1, h.shape[-1]).contiguous())

    def __call__(self, cache, tokens: list[int], slots: list[int], positions: list[int]) -> torch.Tensor:
        """Token i at positions[i] of sequence slots[i] (a decode step: one a slot; a
        prefill: a prompt's run of positions, several slots' at once) -> hidden states
        [n, hidden] after the last layer (before the final norm); writes the cache, not
        cache.lengths. A row sees the cache's keys up to its own position, those this
        call writes included."""
        m = len(tokens)
        x = self.model.embed(torch.tensor(tokens).view(m, 1)).view(m, -1).to(torch.float32, copy=True)
        where = torch.tensor(slots + positions, dtype=torch.int64)  # rows, then positions
        rows, pos = where.data_ptr(), where.data_ptr() + 8 * m
        for rotary in self.model.rotaries.values():
            rotary.reserve(max(positions) + 1)
        cap = cache.capacity
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(x)
            out = torch.empty(m, layer.heads * layer.head_dim)
            weights.kernels.attend(out.data_ptr(), qkv.data_ptr(), cache.k[i].data_ptr(), cache.v[i].data_ptr(),
                                   layer.rotary.cos.data_ptr(), layer.rotary.sin.data_ptr(), *layer.norms, rows, pos,
                                   m, layer.heads, layer.kv_heads, layer.head_dim, cap, layer.window, layer.eps,
                                   layer.scale)
            layer.o(out, into=x)
            layer.down(layer.gate_up(x), into=x)
        return x


def plan(model, device: torch.device, compute: torch.dtype) -> Step | None:
    """The fused step for this model, or None where it does not apply (no native
    kernels, not a CPU float32 step, an architecture not built of llama's Block: gemma3)."""
    if weights.kernels is None or device.type != "cpu" or compute != torch.float32:
        return None
    if type(model).Block is not llama.Block or type(model).Norm is not llama.RMSNorm:
        return None
    attention = type(model.model.layers[0].self_attn)
    if attention.qk_norm not in (llama.Attention.qk_norm, qwen3.Attention.qk_norm):
        return None
    if any(type(b.mlp) is not llama.MLP or b.mlp.act is not F.silu for b in model.model.layers):
        return None
    return Step(model)
