"""The models and the prompts every engine runs, and the timing of one workload.

Every engine gets the same token ids: the chat prompts are rendered once, with
the model's own chat template and fermi's tokenizer (the ones `fermi run` uses),
and the peers are fed those ids rather than their own tokenization."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# The decode workload: a short chat prompt, then `--tokens` generated greedily.
CHAT = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."}]

# A prose passage for teacher-forced comparisons (~320 tokens): bench.accuracy and the tests.
PROSE = """The history of astronomy is a story of patient observation. Long before telescopes,
people watched the sky to keep track of the seasons, to plan harvests and to navigate across
open water. Babylonian scribes recorded the positions of the planets on clay tablets, and Greek
thinkers tried to explain those motions with nested spheres and circles. Ptolemy's model
predicted the positions of the planets well enough to be used for more than a thousand years.
In the sixteenth century Copernicus proposed that the Earth and the other planets move around
the Sun, which made the geometry simpler but did not at first make the predictions better.
Tycho Brahe then measured the planets with greater care than anyone before him, and Johannes
Kepler used those measurements to show that the orbits are ellipses rather than circles. Galileo
turned a small telescope to the sky and saw the moons of Jupiter, the phases of Venus and the
craters of the Moon. Newton finally explained why the planets move as they do: the same force
that makes an apple fall keeps the Moon in its orbit. Since then astronomers have learned that
the Sun is one star among hundreds of billions in our galaxy, that there are countless galaxies
beyond it, and that the universe has been expanding for almost fourteen billion years. Modern
observatories in deserts and on mountains, and telescopes in space, keep adding to this story
every year, and each new instrument shows something that nobody expected to find."""

# The prefill workload: notes like these, added until the rendered prompt holds
# about `--prefill-tokens` tokens.
_NOTES = [
    "The harbour office opens at seven and closes at five, except on public holidays.",
    "Ferries to the northern islands leave every two hours when the sea is calm.",
    "The old lighthouse was automated in 1987 and its keeper's cottage became a museum.",
    "Fishing boats must report their catch to the co-operative before noon.",
    "A storm in March damaged the breakwater; repairs are planned for the summer.",
    "The lifeboat crew trains on Tuesday evenings and welcomes new volunteers.",
    "Visitors can climb the 142 steps of the tower between April and October.",
    "The tide table is posted outside the post office and updated every Monday.",
    "Seals are often seen on the rocks below the cliff path at low tide.",
    "The café on the pier serves fish soup, bread baked in the village and strong tea.",
    "Parking near the quay is limited to two hours from June to September.",
    "The annual regatta raises money for the school and the lifeboat station.",
]


@dataclass(frozen=True)
class Model:
    key: str  # what --model takes
    title: str
    fermi_name: str  # the name `fermi run --model` knows
    locate: Callable[[], Path]  # the GGUF file (assembled and checked once, for Qwen), or a model directory


def _smollm2() -> Path:
    from fermi.embedded import smollm2_path

    return smollm2_path()


def _qwen() -> Path:
    from fermi.embedded import qwen25_coder_path

    return qwen25_coder_path()


MODELS = {
    "smollm2": Model("smollm2", "SmolLM2-135M-Instruct (Q4_1 GGUF)", "smollm2-135m", _smollm2),
    "qwen0.5b": Model("qwen0.5b", "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF)", "qwen2.5-coder-0.5b", _qwen),
}


def model(key: str) -> Model:
    """One of MODELS, or a model directory (config.json, tokenizer, safetensors)."""
    if key in MODELS:
        return MODELS[key]
    path = Path(key).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise SystemExit(f"bench: --model takes {', '.join(MODELS)} or a model directory; {key} is neither")
    return Model(path.name, f"{path.name} (model directory)", str(path), lambda: path)


def prefill_messages(render: Callable[[list], list[int]], target: int) -> list[dict]:
    """A user message asking for a summary of numbered notes, as many as it takes
    for the rendered prompt to reach `target` tokens."""
    lines: list[str] = []
    while True:
        note = _NOTES[len(lines) % len(_NOTES)]
        lines.append(f"{len(lines) + 1}. {note}")
        messages = [{"role": "user", "content": "Summarize these notes in three sentences:\n\n" + "\n".join(lines)}]
        if len(render(messages)) >= target:
            return messages


def prepare(model: Model, prefill_tokens: int = 400) -> dict:
    """What every worker needs to know about the model and the prompts (JSON-able).
    Reads the GGUF's metadata and tokenizer only: no weights, no backend."""
    from fermi import sources
    from fermi.engine import Engine

    path = model.locate()
    files = sources.resolve(model.fermi_name)
    engine = Engine(files, runtime=None)  # the prompt side of the engine only
    render = lambda messages: engine.prompt(messages, "auto").ids  # noqa: E731
    long_messages = prefill_messages(render, prefill_tokens)
    c = files.config
    return {
        "model": model.key,
        "title": model.title,
        "fermi_name": model.fermi_name,
        "path": str(path),
        "file_bytes": sum(f.stat().st_size for f in ([path] if path.is_file() else path.iterdir())),
        "config": {
            "model_type": c.model_type, "num_hidden_layers": c.num_hidden_layers,
            "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
            "hidden_size": c.hidden_size, "vocab_size": c.vocab_size,
            "tie_word_embeddings": bool(c.tie_word_embeddings),
        },
        "chat": {"messages": CHAT, "ids": render(CHAT)},
        "prefill": {"messages": long_messages, "ids": render(long_messages)},
    }


@dataclass
class Timing:
    """One generation: seconds from the request to the first token, and the
    decode rate after it ((tokens - 1) / (end - first token))."""

    ttft: float
    decode_tps: float
    tokens: int


def timed(stream, n: int, start: float, clock) -> Timing:
    """Consume `n` tokens from an iterator of tokens, timing them from `start`."""
    first = end = None
    count = 0
    for _ in stream:
        now = clock()
        first = first if first is not None else now
        end = now
        count += 1
        if count >= n:
            break
    if first is None:
        raise RuntimeError("the engine generated no token")
    tps = (count - 1) / (end - first) if count > 1 and end > first else 0.0
    return Timing(first - start, tps, count)


def run_workloads(adapter, spec: dict, tokens: int, runs: int, warmup: int, log=lambda msg: None) -> dict:
    """Warm-up, then `runs` decode runs (chat prompt, `tokens` greedy tokens, EOS
    ignored) and `runs` prefill runs (long prompt, one token); medians."""
    chat, long = spec["chat"], spec["prefill"]
    for i in range(warmup):
        log(f"warm-up {i + 1}/{warmup}")
        # An engine that compiles for each cache length warms up on the timed length.
        adapter.decode(chat["messages"], chat["ids"], tokens if adapter.warm_full else min(tokens, 16))
        adapter.prefill(long["messages"], long["ids"])
    decodes, prefills = [], []
    for i in range(runs):
        log(f"decode {i + 1}/{runs}")
        decodes.append(adapter.decode(chat["messages"], chat["ids"], tokens))
    for i in range(runs):
        log(f"prefill {i + 1}/{runs}")
        prefills.append(adapter.prefill(long["messages"], long["ids"]))
    n_long = len(long["ids"])
    return {
        "decode_tps": statistics.median(t.decode_tps for t in decodes),
        "decode_tps_runs": [t.decode_tps for t in decodes],
        "decode_tokens": min(t.tokens for t in decodes),
        "ttft_s": statistics.median(t.ttft for t in decodes),
        "ttft_s_runs": [t.ttft for t in decodes],
        "chat_prompt_tokens": len(chat["ids"]),
        "prefill_ttft_s": statistics.median(t.ttft for t in prefills),
        "prefill_ttft_s_runs": [t.ttft for t in prefills],
        "prefill_tps": n_long / statistics.median(t.ttft for t in prefills),
        "prefill_prompt_tokens": n_long,
    }
