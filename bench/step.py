"""Where a CPU decode step's time goes: the whole step (one row, a 400-token context),
the matrix products in it (every projection and the lm_head, called in the step's
order with the inputs it gave them), and the rest (norms, RoPE, the cache, attention, residuals, Python);
the fused step (fused.py) and the modules' forward, one process.

    python -m bench.step                               # SmolLM2: its GGUF's blocks, q8_0, q4_0, float32
    python -m bench.step --model qwen0.5b --configs q8_0
"""

from __future__ import annotations

import argparse
import time

CONFIGS = {"gguf": {"quantize": None}, "q8_0": {"quantize": 8, "blocks": False},
           "q4_0": {"quantize": 4, "blocks": False}, "float32": {"quantize": 0}}


def per_call(fn, n: int) -> float:
    """Seconds a call, the best of three rounds of n."""
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="bench.step", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="smollm2, qwen0.5b or a model directory")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args(argv)
    import torch

    from fermi import sources
    from fermi.backends import torch as backend
    from fermi.backends.torch import weights

    from .workloads import PROSE, model

    files = sources.resolve(str(model(args.model).locate()))
    ids = files.tokenizer.encode(PROSE * 2)[:400]
    print(f"{args.model}: one row, {len(ids)}-token context · kernels: {weights.kernel_path()} · "
          f"{torch.get_num_threads()} threads")
    print("| config | step | ms/step | products | outside them | tok/s |\n| --- | --- | ---: | ---: | ---: | ---: |")
    for name in args.configs.split(","):
        rt = backend.load(files, **{"dtype": "float32", **CONFIGS[name]})
        step, m = rt.fused, rt.model
        # the products' inputs, recorded in one step of the modules' forward
        inputs, cache = [], rt.new_cache()
        rt.fused = None
        projections = [layer for block in m.model.layers for layer in (
            block.self_attn.qkv_proj, block.self_attn.o_proj, block.mlp.gate_up_proj, block.mlp.down_proj)]
        token = int(rt.prefill(ids, cache).argmax())
        hooks = [layer.register_forward_pre_hook(lambda mod, a: inputs.append((mod, a[0].clone())))
                 for layer in projections]
        rt.decode([token], cache, [0])
        for h in hooks:
            h.remove()
        hidden = torch.randn(1, m.config.hidden_size)
        with torch.inference_mode():
            # all of a step's products in its order (each weight read from memory once a round, as in a step)
            products = per_call(lambda: [mod(x) for mod, x in inputs] + [m.logits(hidden)], 10)
        for label, fused in (("fused", step), ("modules", None)):
            if label == "fused" and step is None:
                continue
            rt.fused = fused
            cache = rt.new_cache()
            token = int(rt.prefill(ids, cache).argmax())

            def one():
                nonlocal token
                token = int(rt.decode([token], cache, [0])[0].argmax())

            per_call(one, 3)  # warm
            s = per_call(one, args.steps // 3 or 1)
            print(f"| {name} ({rt.dtype}) | {label} | {1e3 * s:.2f} | {1e3 * products:.2f} | "
                  f"{1e3 * (s - products):.2f} | {1 / s:.1f} |")


if __name__ == "__main__":
    main()
