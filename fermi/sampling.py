"""Sampling parameters: one value per request, read by the backends' samplers."""

from dataclasses import dataclass, replace

from .errors import FermiError

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


# The values a request may give: (least, most, whether the least itself is refused).
RANGES = {"temperature": (0.0, 2.0, False), "top_p": (0.0, 1.0, True), "top_k": (-1, None, False),
          "min_p": (0.0, 1.0, False), "repetition_penalty": (0.0, 10.0, True), "presence_penalty": (-2.0, 2.0, False),
          "frequency_penalty": (-2.0, 2.0, False)}


def check(given: dict) -> None:
    """FermiError naming the first value out of its range (None: unset, fine)."""
    for key, (least, most, open_low) in RANGES.items():
        v = given.get(key)
        if v is None:
            continue
        if (v <= least if open_low else v < least) or (most is not None and v > most):
            bounds = (f"above {least:g}" if open_low else f"at least {least:g}") + \
                ("" if most is None else f" and at most {most:g}")
            raise FermiError(f"{key} must be {bounds}, not {v:g}")


def resolve(
    given: dict, thinking: bool, generation_config: dict | None = None
) -> SamplingParams:
    """Fill what the request left unset (None) from the model's generation_config,
    else from the Qwen3 recommendations for the thinking mode."""
    check(given)
    base = dict(THINKING_DEFAULTS if thinking else NON_THINKING_DEFAULTS)
    for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        if generation_config and generation_config.get(key) is not None:
            base[key] = generation_config[key]
    if generation_config and generation_config.get("do_sample") is False:
        base["temperature"] = 0.0
    base.update({k: v for k, v in given.items() if v is not None})
    return SamplingParams(**base)
