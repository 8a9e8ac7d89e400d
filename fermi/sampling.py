"""Sampling parameters: one value per request, read by the backends' samplers."""

from dataclasses import dataclass, replace

# Qwen3's recommended settings, used when a request sets none (DESIGN.md).
THINKING_DEFAULTS = dict(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0)
NON_THINKING_DEFAULTS = dict(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # HF style, over prompt and generated tokens
    presence_penalty: float = 0.0  # OpenAI style, over generated tokens
    frequency_penalty: float = 0.0  # OpenAI style, over generated tokens
    seed: int | None = None
    logprobs: int | None = None  # None: off; k >= 0: chosen token's logprob and the top k

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def replace(self, **changes) -> "SamplingParams":
        return replace(self, **changes)


def resolve(
    given: dict, thinking: bool, generation_config: dict | None = None
) -> SamplingParams:
    """Fill what the request left unset (None) from the model's generation_config,
    else from the Qwen3 recommendations for the thinking mode."""
    base = dict(THINKING_DEFAULTS if thinking else NON_THINKING_DEFAULTS)
    for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        if generation_config and generation_config.get(key) is not None:
            base[key] = generation_config[key]
    if generation_config and generation_config.get("do_sample") is False:
        base["temperature"] = 0.0
    base.update({k: v for k, v in given.items() if v is not None})
    return SamplingParams(**base)
