"""fermi: local LLM inference for Qwen3-family models."""

__version__ = "0.1.0"
