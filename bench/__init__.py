"""fermi's benchmark harness: `python -m bench` (or `fermi bench`) runs the same
workloads on fermi's backends and on the peer engines (transformers, llama.cpp,
mlx-lm), each engine configuration in its own process, and prints one table.
See bench/README.md."""
