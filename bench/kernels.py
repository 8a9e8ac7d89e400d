"""The quantized matrix kernels alone: GB/s of weight bytes and time a product, for
fermi's native kernels (q8_0, q4_0) and torch's int8 rows, at decode's row counts.
Each figure is the best of 5 passes over 40 different matrices (read cold).

    python -m bench.kernels [--rows 1,2,4,8,16] [--shapes 4864x896,896x4864,576x576]
"""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="bench.kernels", description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,2,4,8,16")
    p.add_argument("--shapes", default="4864x896,896x4864,576x576")
    p.add_argument("--count", type=int, default=40)
    args = p.parse_args(argv)
    import torch

    from fermi.backends.torch import weights

    kinds = {"int8 rows (torch)": (weights.int8_rows, weights.int8_linear)}
    if weights.kernels:
        kinds = {"q8_0": (weights.q8_blocks, lambda x, q, s: weights.block_linear(x, 8, q, s)),
                 "q4_0": (weights.q4_blocks, lambda x, q, s: weights.block_linear(x, 4, q, s)), **kinds}
    print(f"kernels: {weights.kernel_path()} · threads {torch.get_num_threads()}")
    print("| kind | shape | rows | GB/s | ms a product |\n| --- | --- | ---: | ---: | ---: |")
    for kind, (quantize, multiply) in kinds.items():
        for shape in args.shapes.split(","):
            n, k = map(int, shape.split("x"))
            mats = [quantize((n, k), lambda a, b, w=torch.randn(n, k): w[a:b]) for _ in range(args.count)]
            size = sum(q.numel() * q.element_size() + s.numel() * s.element_size() for q, s in mats)
            for m in map(int, args.rows.split(",")):
                x, best = torch.randn(m, k), float("inf")
                for _ in range(5):
                    t = time.perf_counter()
                    for q, s in mats:
                        multiply(x, q, s)
                    best = min(best, time.perf_counter() - t)
                print(f"| {kind} | {shape} | {m} | {size / best / 1e9:.1f} | {best / len(mats) * 1e3:.3f} |")


if __name__ == "__main__":
    main()
