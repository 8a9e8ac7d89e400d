"""Model configuration: one flat dataclass keyed like Hugging Face's config.json."""

from dataclasses import MISSING, dataclass, field, fields

from .errors import FermiError

# The one architecture registry: a config's model_type -> the module of each backend
# (fermi.backends.torch.<module>, fermi.backends.mlx.<module>) whose `Model` runs it.
ARCHITECTURES = {"qwen3": "qwen3", "qwen2": "qwen2", "llama": "llama", "phi3": "phi3", "gemma3_text": "gemma3"}


@dataclass
class ModelConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # llama: q/k/v/o bias; qwen2 always has q/k/v bias
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)} - {"extra"}
        if "model_type" not in d:
            raise FermiError("model config has no 'model_type'")
        if d["model_type"] not in ARCHITECTURES:
            raise FermiError(
                f"unsupported architecture '{d['model_type']}' (fermi runs: {', '.join(ARCHITECTURES)})"
            )
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        if missing := [k for k in required if k not in d]:
            raise FermiError(f"model config lacks {', '.join(missing)}")
        known = {k: v for k, v in d.items() if k in names}
        if d.get("attn_logit_softcapping") or d.get("final_logit_softcapping"):
            raise FermiError("logit soft-capping (Gemma 2's) is not supported")
        if d.get("use_sliding_window") and not d.get("layer_types"):
            raise FermiError("a sliding window over some layers by max_window_layers is not supported")
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})

    def windows(self) -> list[int | None]:
        """Each layer's sliding attention window (None: it sees every earlier position),
        which says what its cache must keep: transformers 5's `layer_types`, else
        Phi-3's one `sliding_window` for every layer."""
        window, n = self.extra.get("sliding_window"), self.num_hidden_layers
        types = self.extra.get("layer_types")
        if types:
            return [window if t == "sliding_attention" else None for t in types]
        return [window if self.model_type == "phi3" else None] * n

    def rope_kinds(self) -> list[str | None]:
        """Each layer's kind of RoPE (fermi.rope.parameters' layer_type): its layer type
        where `rope_parameters` is given per layer type (Gemma 3's), else None."""
        params, types = self.extra.get("rope_parameters") or {}, self.extra.get("layer_types")
        if types and all(t in params for t in types):
            return list(types)
        return [None] * self.num_hidden_layers

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)
