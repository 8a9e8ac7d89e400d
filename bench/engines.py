"""One adapter per engine. An adapter runs inside its own worker process:
`prepare` (make what the engine needs on disk, untimed), `load` (timed), then
`decode`/`prefill` on the given token ids, always greedy.

- `missing()`: why the engine cannot be imported here (a peer not installed), or None.
- `decode(messages, ids, n)`: `n` tokens after the prompt, EOS ignored -> Timing.
- `prefill(messages, ids)`: one token after the prompt -> Timing (its ttft is the prefill).
- `figures()`: weight bytes held, embedding bytes, KV bytes per position, KV bytes held.

A configuration the engine refuses (fermi's "not supported yet") raises
Unsupported from `load`; the table shows it as such, never as a number.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from .memory import cores
from .workloads import Timing, timed

clock = time.perf_counter


class Unsupported(Exception):
    """The engine cannot run this configuration (yet)."""


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class Adapter:
    name = ""
    family = ""  # "fermi" or the peer's name
    peer = False
    modules: tuple[str, ...] = ()  # what must import for the engine to exist here
    install = ""  # how to get it, for the "missing" line
    warm_full = False  # warm up on the timed decode length (not 16 tokens)

    def missing(self) -> str | None:
        for m in self.modules:
            if importlib.util.find_spec(m) is None:
                return f"'{m}' is not installed ({self.install})"
        return None

    def describe(self) -> dict:
        return {}

    def prepare(self, spec: dict) -> None:
        pass

    def load(self, spec: dict, cold: bool = False) -> None:
        raise NotImplementedError

    def decode(self, messages: list, ids: list[int], n: int) -> Timing:
        raise NotImplementedError

    def prefill(self, messages: list, ids: list[int]) -> Timing:
        raise NotImplementedError

    def figures(self) -> dict:
        """weight_bytes, embed_bytes, kv_bytes_per_pos, kv_bytes (held, at its largest)."""
        raise NotImplementedError


def _kv_per_pos(config: dict, dtype_bytes: int) -> int:
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * config["head_dim"] * dtype_bytes


# ---------------------------------------------------------------- fermi


class Fermi(Adapter):
    """fermi.sources.resolve + fermi.backends.get(backend).load(...), then the
    Engine: decode through the serving core (Scheduler.run; temperature 0, EOS ignored by emptying
    the engine's EOS set, no stop strings), or with loop="stream" through the
    runtime's own stream (prefill + sample + decode, no detokenizer)."""

    family = "fermi"
    modules = ("fermi",)

    def __init__(self, name: str, backend: str, dtype: str | None, quantize: int | None, loop: str = "session",
                 graphs: bool = True, kernels: bool = True):
        self.name, self.backend, self.dtype, self.quantize, self.loop = name, backend, dtype, quantize, loop
        self.graphs = graphs  # torch on a GPU: decode steps replayed as CUDA graphs (False: eager)
        self.kernels = kernels  # torch: fermi's native CPU kernels (False: the pure-torch path, as without a compiler)
        self.modules = ("fermi", backend)
        self.install = f"pip install {'mlx[cpu]' if backend == 'mlx' else backend}"
        self.engine = None
        self.kv_bytes = 0

    def describe(self) -> dict:
        d = {"backend": self.backend, "dtype": self.dtype, "quantize": self.quantize,
             "decode_loop": "serving core, EOS ignored" if self.loop == "session" else "runtime.stream"}
        if self.engine is not None:
            r = self.engine.runtime
            d.update(dtype=r.dtype, device=r.device, kernel=getattr(r, "kernel", None))
            if self.backend == "torch":
                import torch

                d["threads"] = torch.get_num_threads()
                d["cuda_graphs"] = r.cuda_graphs
        return d

    def _module(self):
        from fermi import backends
        from fermi.errors import FermiError

        try:
            return backends.get(self.backend)
        except FermiError as e:
            raise Unsupported(str(e)) from None

    def prepare(self, spec: dict) -> None:
        from fermi import sources

        self._module()
        sources.resolve(spec["path"]).weight_files()  # the float32 conversion, made once

    def load(self, spec: dict, cold: bool = False) -> None:
        from fermi import sources
        from fermi.engine import Engine
        from fermi.errors import FermiError

        module = self._module()
        if self.backend == "torch" and not self.kernels:
            from fermi.backends.torch import weights

            weights.kernels = None
        try:
            model = sources.resolve(spec["path"])
            # A GGUF's quantized tensors stay as they are under quantize=4|8; to compare
            # with mlx-lm (and for torch's q8_0 / q4_0), quantize the float32 conversion.
            blocks = False if self.quantize else None
            runtime = module.load(model, dtype=self.dtype, quantize=self.quantize, blocks=blocks)
            if self.backend == "torch":
                runtime.cuda_graphs = runtime.cuda_graphs and self.graphs
        except FermiError as e:
            if "not supported" in str(e) or "cannot run" in str(e):
                raise Unsupported(str(e)) from None
            raise
        self.engine = Engine(model, runtime)
        self.engine.eos_ids = set()  # the benchmark's ignore_eos: generation runs to max_new_tokens

    def _generate(self, messages, ids, n) -> Timing:
        engine = self.engine
        if self.loop == "stream":
            from fermi.sampling import SamplingParams

            r = engine.runtime
            cache = r.new_cache(1, engine.context_length)
            start = clock()
            stream = r.stream(ids, cache, 0, r.sampler(SamplingParams(temperature=0.0), ids))
            try:
                t = timed((s.token for s in stream), n, start, clock)
            finally:
                stream.close()
            self.kv_bytes = max(self.kv_bytes, cache.nbytes)
            return t
        core = engine.scheduler()
        request = engine.request(messages, "auto", n, temperature=0.0)
        if request.ids != list(ids):
            raise RuntimeError("fermi rendered the prompt to other ids than the harness")
        request.next_turn = None  # nothing to settle: each run is a new conversation
        done = None
        for rec in core.run(request):
            done = rec
        self.kv_bytes = max(self.kv_bytes, core.cache.nbytes)
        if done.completion_tokens != n:
            raise RuntimeError(f"fermi stopped after {done.completion_tokens} of {n} tokens ({done.finish_reason})")
        return Timing(done.ttft, done.decode_tps, done.completion_tokens)

    def decode(self, messages, ids, n):
        return self._generate(messages, ids, n)

    def prefill(self, messages, ids):
        return self._generate(messages, ids, 1)

    def figures(self) -> dict:
        r = self.engine.runtime
        if self.backend == "torch":
            named = [(k, v.numel() * v.element_size()) for k, v in
                     list(r.model.named_parameters()) + list(r.model.named_buffers())]
        else:
            from mlx.utils import tree_flatten

            named = [(k, v.nbytes) for k, v in tree_flatten(r.net.parameters())]
        return {
            "weight_bytes": r.weight_bytes,
            "embed_bytes": sum(b for k, b in named if "embed_tokens" in k),
            "separate_head": hasattr(r, "model") and hasattr(r.model.logits_layer(), "packed"),  # fbgemm's copy
            "kv_bytes_per_pos": _kv_per_pos(self.config, DTYPE_BYTES[getattr(r, "compute", r.dtype)]),
            "kv_bytes": self.kv_bytes,
        }

    @property
    def config(self) -> dict:
        c = self.engine.runtime.config
        return {"num_hidden_layers": c.num_hidden_layers, "num_key_value_heads": c.num_key_value_heads,
                "head_dim": c.head_dim}


# ---------------------------------------------------------------- transformers


class Transformers(Adapter):
    """AutoModelForCausalLM.from_pretrained on the model directory, or on the GGUF
    (gguf_file=..., dequantized by transformers), in `dtype` on the GPU if there is
    one, else the CPU; generate(do_sample=False, min_new_tokens=n) with a streamer
    that times each token as generate hands it out. `compiled`: a static KV cache,
    with which generate compiles the forward (torch.compile, CUDA graphs on a GPU)."""

    family = "transformers"
    peer = True
    modules = ("transformers", "torch", "gguf", "accelerate")
    install = "pip install transformers accelerate gguf"

    def __init__(self, name: str = "transformers", dtype: str = "float32", compiled: bool = False):
        self.name, self.dtype, self.compiled = name, dtype, compiled
        self.warm_full = compiled  # a static cache's length is prompt + n: compiled again for each n

    def describe(self) -> dict:
        import torch
        import transformers

        return {"dtype": self.dtype, "device": str(self.device), "version": transformers.__version__,
                "threads": torch.get_num_threads(), "cache": "static" if self.compiled else "dynamic",
                "compiled": getattr(getattr(self, "model", None), "_compiled_call", None) is not None,
                "decode_loop": "generate(min_new_tokens=n) + streamer"}

    def load(self, spec: dict, cold: bool = False) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        transformers.logging.set_verbosity_error()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        path, dtype = Path(spec["path"]), getattr(torch, self.dtype)
        if path.is_dir():
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        self.model = model.to(self.device).eval()
        if self.compiled:
            self.model.generation_config.cache_implementation = "static"
        self.config = spec["config"]
        self.kv_bytes = 0

    def _generate(self, ids, n) -> Timing:
        import torch
        from transformers.generation.streamers import BaseStreamer

        times: list[float] = []

        class Clock(BaseStreamer):
            prompt_seen = False

            def put(self, value):
                if not self.prompt_seen:  # generate() first hands over the prompt
                    self.prompt_seen = True
                    return
                times.append(clock())

            def end(self):
                pass

        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        start = clock()
        with torch.inference_mode():
            out = self.model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                temperature=None, top_p=None, top_k=None, streamer=Clock(), pad_token_id=0,
                return_dict_in_generate=True,
            )
        cache = getattr(out, "past_key_values", None)
        if cache is not None:
            self.kv_bytes = max(self.kv_bytes, _transformers_cache_bytes(cache))
        return _from_times(times, start)

    def decode(self, messages, ids, n):
        return self._generate(ids, n)

    def prefill(self, messages, ids):
        return self._generate(ids, 1)

    def figures(self) -> dict:
        seen, total = set(), 0
        for p in self.model.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
        emb = self.model.get_input_embeddings().weight
        return {"weight_bytes": total, "embed_bytes": emb.numel() * emb.element_size(),
                "kv_bytes_per_pos": _kv_per_pos(self.config, DTYPE_BYTES[self.dtype]), "kv_bytes": self.kv_bytes}


def _from_times(times: list[float], start: float) -> Timing:
    if not times:
        raise RuntimeError("the engine generated no token")
    n = len(times)
    span = times[-1] - times[0]
    return Timing(times[0] - start, (n - 1) / span if n > 1 and span > 0 else 0.0, n)


def _transformers_cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []) or []:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is not None and hasattr(t, "numel"):
                total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------- llama.cpp


class LlamaCpp(Adapter):
    """llama_cpp.Llama on the same GGUF file, quantized as it is, n_threads = the
    cores this process may use; decode through Llama.generate (greedy, temp 0),
    after Llama.reset() so no run reuses the previous run's prompt."""

    name = family = "llama.cpp"
    peer = True
    modules = ("llama_cpp",)
    install = "pip install llama-cpp-python: it builds llama.cpp from source, several minutes"

    def describe(self) -> dict:
        import llama_cpp

        return {"dtype": "GGUF as is", "version": getattr(llama_cpp, "__version__", "?"), "threads": cores(),
                "decode_loop": "Llama.generate(temp=0)"}

    def load(self, spec: dict, cold: bool = False) -> None:
        from llama_cpp import Llama

        if Path(spec["path"]).is_dir():
            raise Unsupported("llama.cpp reads GGUF files; this model is a directory")
        self.spec = spec
        n_ctx = max(2048, len(spec["prefill"]["ids"]) + 64, len(spec["chat"]["ids"]) + 1024)
        self.llm = Llama(model_path=spec["path"], n_threads=cores(), n_threads_batch=cores(), n_ctx=n_ctx,
                         verbose=False)
        self.n_ctx = n_ctx

    def _generate(self, ids, n) -> Timing:
        self.llm.reset()
        start = clock()
        gen = self.llm.generate(list(ids), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True)
        try:
            return timed(gen, n, start, clock)
        finally:
            gen.close()

    def decode(self, messages, ids, n):
        return self._generate(ids, n)

    def prefill(self, messages, ids):
        return self._generate(ids, 1)

    def figures(self) -> dict:
        from gguf import GGUFReader

        tensors = GGUFReader(self.spec["path"]).tensors
        total = sum(int(t.n_bytes) for t in tensors)
        embed = sum(int(t.n_bytes) for t in tensors if t.name.startswith("token_embd."))
        per_pos = _kv_per_pos(self.spec["config"], 2)  # llama.cpp's default KV type is F16
        return {"weight_bytes": total, "embed_bytes": embed, "kv_bytes_per_pos": per_pos,
                "kv_bytes": per_pos * self.n_ctx}  # llama.cpp allocates the whole context up front


# ---------------------------------------------------------------- mlx-lm


class MlxLm(Adapter):
    """mlx_lm.load on a model directory the harness makes once in fermi's cache:
    config.json (from the GGUF's metadata), model.safetensors (a link to fermi's
    float32 conversion of the same GGUF) and the tokenizer files. Then, as
    mlx_lm.convert would: cast to the dtype, quantize (group size 64) for q4/q8.
    Decode through mlx_lm.generate.generate_step (greedy, it never stops at EOS)."""

    family = "mlx-lm"
    peer = True
    modules = ("mlx_lm", "mlx")
    install = "pip install mlx-lm"

    def __init__(self, name: str, dtype: str, bits: int | None):
        self.name, self.dtype, self.bits = name, dtype, bits

    def describe(self) -> dict:
        from importlib.metadata import version

        return {"dtype": self.dtype, "bits": self.bits, "version": version("mlx-lm"),
                "decode_loop": "generate_step"}

    def prepare(self, spec: dict) -> None:
        from .modeldir import model_dir

        model_dir(spec)

    def load(self, spec: dict, cold: bool = False) -> None:
        import mlx.core as mx
        from mlx.utils import tree_flatten, tree_map_with_path
        from mlx_lm import load
        from mlx_lm.utils import quantize_model

        from .modeldir import model_dir

        self.config = spec["config"]
        path = model_dir(spec)
        model, _tokenizer, config = load(str(path), return_config=True)
        if self.dtype != "float32":
            dt = getattr(mx, self.dtype)
            cast = getattr(model, "cast_predicate", lambda _: True)
            model.update(tree_map_with_path(
                lambda k, v: v.astype(dt) if cast(k) and mx.issubdtype(v.dtype, mx.floating) else v,
                model.parameters()))
        if self.bits:
            model, _ = quantize_model(model, config, 64, self.bits)
        mx.eval(model.parameters())
        self.model = model
        self.weights = [(k, v.nbytes) for k, v in tree_flatten(model.parameters())]
        self.kv_bytes = 0

    def _generate(self, ids, n) -> Timing:
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model)
        start = clock()
        gen = generate_step(mx.array(list(ids)), self.model, max_tokens=n, prompt_cache=cache)
        try:
            t = timed((tok for tok, _ in gen), n, start, clock)
        finally:
            gen.close()
        self.kv_bytes = max(self.kv_bytes, sum(getattr(c, "nbytes", 0) for c in cache))
        return t

    def decode(self, messages, ids, n):
        return self._generate(ids, n)

    def prefill(self, messages, ids):
        return self._generate(ids, 1)

    def figures(self) -> dict:
        return {
            "weight_bytes": sum(b for _, b in self.weights),
            "embed_bytes": sum(b for k, b in self.weights if "embed_tokens" in k),
            "kv_bytes_per_pos": _kv_per_pos(self.config, DTYPE_BYTES["float32" if self.dtype == "float32" else "float16"]),
            "kv_bytes": self.kv_bytes,
        }


# ---------------------------------------------------------------- the registry


def quant_dtype() -> str:
    """Activations and scales of the MLX quantized configurations: float16 on Metal;
    float32 on the CPU, where MLX's float16 quantized matmul is some 30x slower."""
    try:
        import mlx.core as mx

        return "float16" if mx.metal.is_available() else "float32"
    except Exception:
        return "float16"


def _fermi(name, backend, dtype, quantize, graphs=True, kernels=True):
    return lambda loop="session": Fermi(name, backend, quant_dtype() if dtype == "quant" else dtype, quantize, loop,
                                        graphs, kernels)


ENGINES = {
    # fermi, each backend and dtype. dtype None = the backend's default (CPU: float32).
    # torch: quantize=0 dequantizes a GGUF; 8/4 round the float32 conversion; "gguf"
    # keeps the file's own blocks (fermi's default on a CPU).
    "fermi-torch-f32": _fermi("fermi-torch-f32", "torch", "float32", 0),
    "fermi-torch-f16": _fermi("fermi-torch-f16", "torch", "float16", 0),  # CPU: fp16 weights, fp32 math
    "fermi-torch-bf16": _fermi("fermi-torch-bf16", "torch", "bfloat16", 0),
    "fermi-torch-bf16-eager": _fermi("fermi-torch-bf16-eager", "torch", "bfloat16", 0, graphs=False),  # no CUDA graphs
    "fermi-torch-gguf": _fermi("fermi-torch-gguf", "torch", None, None),  # the GGUF's blocks, native kernels
    "fermi-torch-int8": _fermi("fermi-torch-int8", "torch", None, 8),  # q8_0 blocks, native kernels
    "fermi-torch-int8-torch": _fermi("fermi-torch-int8-torch", "torch", None, 8, kernels=False),  # int8 rows, no kernels
    "fermi-torch-int4": _fermi("fermi-torch-int4", "torch", None, 4),  # q4_0 blocks, native kernels
    # MLX: quantize=0 dequantizes the GGUF to the dtype; 4/8 quantize the float32
    # conversion (group 64); "gguf" keeps the file's own blocks (fermi's default).
    # "quant": quant_dtype(), float16 on Metal, float32 on the CPU.
    "fermi-mlx-f32": _fermi("fermi-mlx-f32", "mlx", "float32", 0),
    "fermi-mlx-f16": _fermi("fermi-mlx-f16", "mlx", "float16", 0),
    "fermi-mlx-q4": _fermi("fermi-mlx-q4", "mlx", "quant", 4),
    "fermi-mlx-q8": _fermi("fermi-mlx-q8", "mlx", "quant", 8),
    "fermi-mlx-gguf": _fermi("fermi-mlx-gguf", "mlx", "quant", None),
    # peers
    "transformers": lambda loop="session": Transformers(),
    "transformers-bf16": lambda loop="session": Transformers("transformers-bf16", "bfloat16"),
    "transformers-bf16-compile": lambda loop="session": Transformers("transformers-bf16-compile", "bfloat16", True),
    "llama.cpp": lambda loop="session": LlamaCpp(),
    "mlx-lm": lambda loop="session": MlxLm("mlx-lm", "float32", None),
    "mlx-lm-f16": lambda loop="session": MlxLm("mlx-lm-f16", "float16", None),
    "mlx-lm-q4": lambda loop="session": MlxLm("mlx-lm-q4", quant_dtype(), 4),
    "mlx-lm-q8": lambda loop="session": MlxLm("mlx-lm-q8", quant_dtype(), 8),
}

# The peer that runs the same precision as a fermi MLX configuration.
SAME_PRECISION = {"fermi-mlx-f32": "mlx-lm", "fermi-mlx-f16": "mlx-lm-f16",
                  "fermi-mlx-q4": "mlx-lm-q4", "fermi-mlx-q8": "mlx-lm-q8"}

# Engines for a GPU's figures only (on a CPU: bfloat16 is slow there and has no graphs).
GPU_ONLY = ["fermi-torch-bf16-eager", "transformers-bf16", "transformers-bf16-compile"]
_CPU = [e for e in ENGINES if e not in GPU_ONLY]

GROUPS = {
    "all": _CPU,
    "fermi": [e for e in _CPU if e.startswith("fermi-")],
    "peers": [e for e in _CPU if not e.startswith("fermi-")],
    "torch": [e for e in _CPU if e.startswith("fermi-torch")] + ["transformers", "llama.cpp"],
    "mlx": [e for e in _CPU if e.startswith("fermi-mlx") or e.startswith("mlx-lm")],
    "cuda": ["fermi-torch-bf16", *GPU_ONLY],
}


def make(name: str, loop: str = "session") -> Adapter:
    return ENGINES[name](loop)

