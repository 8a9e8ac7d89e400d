"""Phi-3 / Phi-3.5 in MLX: Llama whose checkpoint has q/k/v and gate/up fused
(qkv_proj, gate_up_proj), split into Llama's projections at load; longrope (su)
scaling, whose frequencies fermi.rope computes."""

from __future__ import annotations


from fermi.config import ModelConfig

from . import llama


class Model(llama.Model):
    @staticmethod
    def sanitize(tensors: dict, cfg: ModelConfig) -> dict:
        """qkv_proj -> q/k/v_proj, gate_up_proj -> gate/up_proj, by rows (a quantized
        weight's scales and biases too: each row is quantized on its own)."""
        q, kv, inter = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, \
            cfg.intermediate_size
        fused = {"self_attn.qkv_proj": (("q_proj", q), ("k_proj", kv), ("v_proj", kv)),
                 "mlp.gate_up_proj": (("gate_proj", inter), ("up_proj", inter))}
        out = {}
        for name, t in tensors.items():
            whole = next((f for f in fused if f".{f}." in name), None)
            if whole is None:
                out[name] = t
                continue
            prefix, suffix = name.split(f".{whole}.")
            parent = whole.split(".")[0]
            starts = [0]
            for _, rows in fused[whole]:
                starts.append(starts[-1] + rows)
            for (part, _), a, b in zip(fused[whole], starts, starts[1:]):
                out[f"{prefix}.{parent}.{part}.{suffix}"] = t[a:b]
        return out
