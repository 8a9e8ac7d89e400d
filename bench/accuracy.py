"""How closely fermi's quantized configurations follow float32: teacher-forced over
a prose text (workloads.PROSE, ~300 positions) one decode step a token, the share of positions whose top-1
token is float32's and the mean next-token KL divergence from float32.

    python -m bench.accuracy                          # SmolLM2: its GGUF's blocks, q8_0, q4_0, int8 rows, float16, bfloat16
    python -m bench.accuracy --model qwen0.5b --configs q8_0,q4_0
"""

from __future__ import annotations

import argparse

CONFIGS = {  # name -> (load options, native kernels)
    "gguf": ({"quantize": None}, True),  # a GGUF's own blocks (the default on a CPU)
    "q8_0": ({"quantize": 8, "blocks": False}, True),  # the float32 conversion rounded
    "q4_0": ({"quantize": 4, "blocks": False}, True),
    "int8": ({"quantize": 8, "blocks": False}, False),  # int8 rows: the path without the native kernels
    "float16": ({"dtype": "float16"}, True),
    "bfloat16": ({"dtype": "bfloat16"}, True),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="bench.accuracy", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="smollm2, qwen0.5b or a model directory")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    args = p.parse_args(argv)
    import torch

    from fermi import sources
    from fermi.backends import torch as backend
    from fermi.backends.torch import weights

    from .workloads import PROSE, model

    files = sources.resolve(str(model(args.model).locate()))
    native = weights.kernels

    def log_probs(**load):
        """Each position's next-token log-probabilities, the text fed one token a step
        (decode: the path, and the kernels, generation runs)."""
        rt = backend.load(files, **{"dtype": "float32", "quantize": 0, **load})
        ids = files.tokenizer.encode(PROSE)
        cache = rt.new_cache()
        rows = [rt.prefill(ids[:1], cache)] + [rt.decode([t], cache, [0])[0] for t in ids[1:-1]]
        return torch.log_softmax(torch.stack(rows).float(), -1), rt.dtype, len(rows)

    ref, _, n = log_probs()
    print(f"{args.model}: {n} positions, teacher-forced, against float32 · kernels: {weights.kernel_path()}")
    print("| config | held as | top-1 = float32's | mean KL (nats) |\n| --- | --- | ---: | ---: |")
    for name in args.configs.split(","):
        load, kernels = CONFIGS[name]
        weights.kernels = native if kernels else None
        lp, held, _ = log_probs(**load)
        agree = (lp.argmax(-1) == ref.argmax(-1)).float().mean().item()
        kl = (ref.exp() * (ref - lp)).sum(-1).mean().item()
        print(f"| {name} | {held} | {agree:.1%} | {kl:.4f} |")


if __name__ == "__main__":
    main()
