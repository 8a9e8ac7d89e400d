"""A bench model with random weights, for a machine the real weights cannot reach
(the lent GPU machine: 64 MiB travel with the checkout, no network there).

    python -m bench.randomized header smollm2 DIR   # here: config.json and tokenizer from the GGUF
    python -m bench.randomized fill DIR             # there: random weights of the config's shapes

`fill` draws the weights with transformers' own initialization (bfloat16) and
saves them as model.safetensors; `python -m bench --model DIR` then runs on it.
Speed and memory do not depend on the weights' values; the answers are noise.
"""

from __future__ import annotations

import sys
from pathlib import Path


def fill(folder: Path, dtype: str = "bfloat16") -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(folder)


def main(argv: list[str]) -> None:
    if len(argv) == 3 and argv[0] == "header":
        from .engines import write_header
        from .workloads import model

        write_header(str(model(argv[1]).locate()), Path(argv[2]))
    elif len(argv) == 2 and argv[0] == "fill":
        fill(Path(argv[1]))
    else:
        raise SystemExit(__doc__.split("\n\n")[1])


if __name__ == "__main__":
    main(sys.argv[1:])
