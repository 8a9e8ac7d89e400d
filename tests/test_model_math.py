"""Each backend's model code against transformers' (the reference implementation)
on tiny random-weight models: prefill, cached decode, batched decode, truncate."""

import numpy as np
import pytest

import tiny
from fermi.errors import ContextOverflow, FermiError
from fermi.sampling import SamplingParams

TOL = 1e-4  # float32


@pytest.fixture(scope="module", params=list(tiny.SPECS))
def model(request, tmp_path_factory) -> tiny.Tiny:
    return tiny.build(request.param, tmp_path_factory.mktemp("tiny"))


_runtimes = {}


@pytest.fixture
def rt(backend, model):
    key = (backend, model.arch)
    if key not in _runtimes:
        _runtimes[key] = tiny.backend_module(backend).load(model.files, dtype="float32")
    return _runtimes[key]


def tokens(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, tiny.VOCAB, n).tolist()


def close(rt, got, want):
    got = rt.to_numpy(got)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= TOL


def test_prefill_then_decode_matches_reference(rt, model):
    ids = tokens(52)
    ref = model.reference(ids)
    cache = rt.new_cache()
    close(rt, rt.prefill(ids[:20], cache), ref[19])
    for i in range(20, 52):
        close(rt, rt.decode([ids[i]], cache, [0])[0], ref[i])
    assert cache.lengths == [52]


def test_all_logits_match_reference(rt, model):
    ids = tokens(20, seed=1)
    ref = model.reference(ids)
    close(rt, rt.prefill(ids, rt.new_cache(), all_logits=True), ref)
    cache = rt.new_cache()  # after a cached prefix, the rows are those of the suffix
    rt.prefill(ids[:8], cache)
    close(rt, rt.prefill(ids[8:], cache, all_logits=True), ref[8:])


@pytest.mark.parametrize("slots", [(0, 1), (1, 0), (0, 2)])
@pytest.mark.parametrize("lengths", [(9, 17), (12, 12)])
def test_batched_decode_matches_each_alone(rt, model, slots, lengths):
    seqs = [tokens(n + 6, seed=10 + n) for n in lengths]
    refs = [model.reference(s) for s in seqs]
    cache = rt.new_cache(batch=3)
    alone = []
    for seq, n, slot in zip(seqs, lengths, slots):
        rt.prefill(seq[:n], cache, slot)
        c = rt.new_cache()  # the same sequence decoded by itself
        rt.prefill(seq[:n], c)
        alone.append([rt.to_numpy(rt.decode([t], c, [0])[0]) for t in seq[n:]])
    for step in range(6):
        ts = [seq[n + step] for seq, n in zip(seqs, lengths)]
        logits = rt.to_numpy(rt.decode(ts, cache, list(slots)))
        for row, (ref, n) in enumerate(zip(refs, lengths)):
            assert np.abs(logits[row] - ref[n + step]).max() <= TOL
            assert np.abs(logits[row] - alone[row][step]).max() <= TOL
    assert [cache.lengths[s] for s in slots] == [n + 6 for n in lengths]


def test_truncate_then_prefill_suffix(rt, model):
    ids = tokens(30, seed=2)
    ref = model.reference(ids)
    cache = rt.new_cache()
    rt.prefill(ids[:20], cache)
    for t in ids[20:24]:
        rt.decode([t], cache, [0])
    cache.truncate(0, 12)
    assert cache.lengths == [12]
    close(rt, rt.prefill(ids[12:24], cache), ref[23])
    close(rt, rt.decode([ids[24]], cache, [0])[0], ref[24])
    assert cache.lengths == [25]


def test_cache_grows_across_its_step(rt, model):
    ids = tokens(262, seed=3)
    ref = model.reference(ids)
    cache = rt.new_cache()
    close(rt, rt.prefill(ids[:250], cache), ref[249])
    small = cache.nbytes
    for i in range(250, 262):
        close(rt, rt.decode([ids[i]], cache, [0])[0], ref[i])
    assert cache.nbytes >= small > 0


def test_context_overflow(rt, model):
    ids = tokens(30, seed=4)
    cache = rt.new_cache(max_len=24)
    with pytest.raises(ContextOverflow):
        rt.prefill(ids, cache)
    rt.prefill(ids[:20], cache)
    for t in ids[20:24]:
        rt.decode([t], cache, [0])
    with pytest.raises(ContextOverflow):
        rt.decode([ids[24]], cache, [0])


def test_stream_greedy_follows_reference(rt, model):
    prompt = tokens(10, seed=5)
    gen = rt.stream(prompt, rt.new_cache(), 0, rt.sampler(SamplingParams(temperature=0), prompt))
    out = [next(gen).token for _ in range(8)]
    gen.close()
    ref = model.reference(prompt + out)
    assert out == ref[len(prompt) - 1:-1].argmax(-1).tolist()



@pytest.mark.parametrize("slots", [(0,), (1, 0), (0, 2)])
def test_torch_graph_step_matches_reference(model, slots):
    """The decode step a CUDA graph records (graphs.static_step: ids, positions and slots
    read from tensors, attention over the cache's whole capacity with the rest masked,
    the batch padded with a row that writes into the cache's spare slot) gives the
    reference's logits. Run eagerly here, so a CPU checks it too; on a GPU every
    decode in this file goes through the recorded graphs."""
    import torch

    from fermi.backends.torch import graphs
    from fermi.backends.torch.cache import KVCache

    rt = tiny.backend_module("torch").load(model.files, dtype="float32")
    seqs = [tokens(n + 4, seed=20 + n) for n in (9, 15)[:len(slots)]]
    c = rt.config
    cache = KVCache(c.num_hidden_layers, 3, c.num_key_value_heads, c.head_dim, c.max_position_embeddings,
                    torch.float32, rt.torch_device, spare=1)
    for seq, slot in zip(seqs, slots):
        rt.prefill(seq[:-4], cache, slot)
    device = rt.torch_device
    with torch.inference_mode():
        for step in range(4):
            n = [len(seq) - 4 + step for seq in seqs]  # each row's position
            ids, positions, rows = graphs.padded([seq[p] for seq, p in zip(seqs, n)], n, list(slots),
                                                 len(slots) + 1, cache.batch)
            assert rows[-1] == 3  # the pad writes into the spare slot
            logits = graphs.static_step(rt.model, cache, torch.tensor(ids, device=device).view(-1, 1),
                                        torch.tensor(positions, device=device), torch.tensor(rows, device=device))
            for row, (seq, p) in enumerate(zip(seqs, n)):
                close(rt, logits[row], model.reference(seq[:p + 1])[p])
    assert cache.capacity > max(len(s) for s in seqs)  # the masked tail was read
    assert [graphs.bucket(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]


def test_torch_cuda_graph_decode_equals_eager(model):
    """On a GPU, decode replays recorded graphs: the same logits as the eager step,
    one graph per cache and padded batch size, recorded again when the cache grows."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("CUDA graphs need a CUDA device")
    graphed = tiny.backend_module("torch").load(model.files, dtype="bfloat16")
    eager = tiny.backend_module("torch").load(model.files, dtype="bfloat16")
    eager.cuda_graphs = False
    assert graphed.cuda_graphs
    ids = tokens(270, seed=6)
    caches = {rt: (rt.new_cache(batch=2), rt.new_cache()) for rt in (graphed, eager)}
    got = {}
    for rt, (a, b) in caches.items():
        rt.prefill(ids[:240], a, 0)
        rt.prefill(ids[:100], a, 1)
        rt.prefill(ids[:50], b)
        got[rt] = [rt.to_numpy(torch.cat([rt.decode([ids[240 + i]], a, [0]), rt.decode([ids[i], ids[i]], a, [1, 0]),
                                          rt.decode([ids[50 + i]], b, [0])]))
                   for i in range(24)]  # a grows past 256 on the way
    a, b = caches[graphed]
    assert set(a.steps) == {1, 2} and set(b.steps) == {1}
    scale = np.abs(np.array(got[eager])).max()
    assert np.abs(np.array(got[graphed]) - np.array(got[eager])).max() <= 2e-2 * scale
    # Three rows of a batch of four replay the graph of four, one row padding.
    padded = {}
    for rt in (graphed, eager):
        c = rt.new_cache(batch=4)
        for slot, n in ((3, 30), (0, 12), (2, 50)):
            rt.prefill(ids[:n], c, slot)
        padded[rt] = [rt.to_numpy(rt.decode([ids[i], ids[i + 1], ids[i + 2]], c, [3, 0, 2])) for i in range(8)]
        if rt is graphed:
            assert set(c.steps) == {4}
    assert np.abs(np.array(padded[graphed]) - np.array(padded[eager])).max() <= 2e-2 * scale


@pytest.mark.parametrize("parts", [2, 3, 4])
def test_torch_split_linear_decode_matches_reference(model, parts):
    """The torch CPU decode path that cuts each weight into `parts` blocks (one batched
    matmul, so every core reads weights) gives the reference's logits: with the weights
    read in that layout at load (torch's thread count = parts), and re-split after."""
    import torch

    from fermi.backends.torch import storage

    threads = torch.get_num_threads()
    torch.set_num_threads(parts)
    try:
        split_at_load = tiny.backend_module("torch").load(model.files, dtype="float32")
    finally:
        torch.set_num_threads(threads)
    resplit = tiny.backend_module("torch").load(model.files, dtype="float32")
    storage.hold(resplit.model, "blocks", parts)
    ids = tokens(30, seed=4)
    ref = model.reference(ids)
    # A GPU splits nothing at load (only the CPU's float32 decode does): there, the re-split alone.
    for rt in (split_at_load, resplit) if split_at_load.torch_device.type == "cpu" else (resplit,):
        gate_up = rt.model.model.layers[0].mlp.gate_up_proj
        assert isinstance(gate_up, storage.Blocks) and gate_up.parts == parts and gate_up.weight_t is not None
        cache = rt.new_cache(batch=2)
        rt.prefill(ids[:20], cache, 0)
        rt.prefill(ids[:20], cache, 1)
        for i in range(20, 30):  # two rows per step: both slots
            got = rt.decode([ids[i], ids[i]], cache, [0, 1])
            close(rt, got[0], ref[i])
            close(rt, got[1], ref[i])


def test_torch_split_linear_equals_f_linear():
    import torch
    import torch.nn.functional as F

    from fermi.backends.torch.weights import SPLIT_ROWS, linear, linear_t, weight_blocks

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 40, generator=g), torch.randn(96, generator=g)
    w_t = w.t().contiguous()
    assert weight_blocks(w, 1) is None and weight_blocks(w, 5) is None  # 5 does not divide 96
    for rows in (1, 3, SPLIT_ROWS, SPLIT_ROWS + 1):  # past SPLIT_ROWS: the plain product
        x = torch.randn(rows, 1, 40, generator=g)
        for parts in (2, 4, 5):
            for bias in (None, b):
                want = F.linear(x, w, bias)
                assert torch.allclose(linear(x, w, bias, weight_blocks(w, parts)), want, atol=1e-5)
                assert torch.allclose(linear_t(x, w_t, bias, weight_blocks(w_t, parts, held_t=True)), want, atol=1e-5)


def test_torch_rms_norm_on_a_cpu_equals_f_rms_norm():
    """The CPU's RMSNorm at decode (a batched dot product per row) gives F.rms_norm's
    result: one row, rows of a batch, 8 heads (Qwen3's per-head norm), in float32 and
    bfloat16; past 8 rows (a prefill) it is F.rms_norm."""
    import torch
    import torch.nn.functional as F

    from fermi.backends.torch.llama import RMSNorm

    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(64, 1e-6)
    norm.weight.data = torch.randn(64, generator=g)
    norm.setup(torch.device("cpu"))
    assert norm.eps_t is not None
    for shape in ((1, 1, 64), (3, 1, 64), (1, 1, 8, 64), (1, 37, 64)):
        x = torch.randn(*shape, generator=g) * 3
        for dtype in (torch.float32, torch.bfloat16):
            want = F.rms_norm(x.to(dtype).float(), (64,), eps=1e-6).to(dtype) * norm.weight
            got = norm(x.to(dtype))
            assert got.shape == want.shape and got.dtype == want.dtype
            assert torch.allclose(got.float(), want.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)


def test_torch_checkpoint_missing_a_projection_is_one_clear_error(model, tmp_path):
    """q/k/v and gate/up are fused at load; a checkpoint lacking one part names it."""
    import shutil

    from safetensors.torch import load_file, save_file

    from fermi.errors import FermiError

    shutil.copytree(model.path, tmp_path / "m")
    (path,) = (tmp_path / "m").glob("*.safetensors")
    state = load_file(path)
    fused = "model.layers.1.self_attn.k_proj.weight" not in state  # (phi3's checkpoint: fused already)
    del state["model.layers.1.self_attn.qkv_proj.weight" if fused else "model.layers.1.self_attn.k_proj.weight"]
    save_file(state, path)
    with pytest.raises(FermiError, match=r"weights do not match.*missing.*layers\.1\.self_attn\.qkv_proj" +
                       ("" if fused else r".*unexpected.*layers\.1\.self_attn\.q_proj")):
        tiny.backend_module("torch").load(tiny.model_files(tmp_path / "m"), dtype="float32")


@pytest.mark.parametrize("dtype, tol", [("float16", 2e-2), ("bfloat16", 8e-2)])
def test_torch_half_precision_follows_reference(model, dtype, tol):
    """torch on the CPU: float16 holds the weights in float16 (fbgemm) and computes in
    float32; bfloat16 computes in bfloat16. Errors relative to the logit scale."""
    import torch

    from fermi.backends.torch import storage

    rt = tiny.backend_module("torch").load(model.files, dtype=dtype)
    full = tiny.backend_module("torch").load(model.files, dtype="float32")
    assert rt.dtype == dtype
    if dtype == "float16" and rt.torch_device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines:
        # fbgemm pads inputs to 512 (test_torch_half_bytes_is_what_fbgemm_holds): the
        # tiny model's 64-wide matrices take more than in float32
        assert rt.compute == "float32" and isinstance(rt.model.logits_layer(), storage.Half)
    else:
        assert rt.weight_bytes < 0.7 * full.weight_bytes
    ids = tokens(40, seed=5)
    ref = model.reference(ids)[19:]
    cache = rt.new_cache()
    got = [rt.to_numpy(rt.prefill(ids[:20], cache))]
    got += [rt.to_numpy(rt.decode([t], cache, [0])[0]) for t in ids[20:]]
    assert np.abs(np.array(got) - ref).max() <= tol * np.abs(ref).max()


@pytest.mark.parametrize("bits,native", [(8, True), (8, False), (4, True)], ids=["q8_0", "int8-rows", "q4_0"])
def test_torch_quantized_follows_reference(model, bits, native, monkeypatch):
    """torch --quantize 8|4 on a CPU: every matrix and the embedding held in blocks of
    32 (the native kernels at decode, activations quantized per block too), or without
    the kernels as int8 rows (torch's int8 kernel at decode, a dequantized bfloat16
    matmul at prefill). Against transformers with its weights rounded the same way,
    errors relative to the logit scale."""
    import copy

    import torch

    from fermi.backends.torch import weights

    if torch.cuda.is_available():
        pytest.skip("quantized weights run on the CPU only")
    if not native:
        monkeypatch.setattr(weights, "kernels", None)
    elif weights.kernels is None:
        pytest.skip("the native kernels are not built")
    rt = tiny.backend_module("torch").load(model.files, dtype="float32", quantize=bits)
    full = tiny.backend_module("torch").load(model.files, dtype="float32")
    assert rt.dtype == {8: "q8_0" if native else "int8", 4: "q4_0"}[bits]
    assert rt.model.model.layers[0].mlp.down_proj.weight.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert rt.weight_bytes < 0.35 * full.weight_bytes  # the norms and biases stay float32
    ids = tokens(40, seed=5)
    cache = rt.new_cache()
    got = [rt.to_numpy(rt.prefill(ids[:20], cache))]  # 20 rows (int8 rows: the dequantized matmul)
    got += [rt.to_numpy(rt.decode([t], cache, [0])[0]) for t in ids[20:]]  # one row
    rounded = copy.deepcopy(model.hf)  # (the tiny Gemma moves 14% of its logit scale by int8 rows alone)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() == 2:
                if rt.dtype == "int8":
                    q, scale = weights.int8_rows(p.shape, lambda a, b: p[a:b])
                    p.copy_(q.float() * scale.float()[:, None])
                else:
                    p.copy_(weights.dequantized(bits, *(weights.q8_blocks if bits == 8 else weights.q4_blocks)(
                        p.shape, lambda a, b: p[a:b])))
        ref = rounded(torch.tensor([ids])).logits[0].numpy()[19:]
    assert np.abs(np.array(got) - ref).max() <= 8e-2 * np.abs(ref).max()  # bfloat16's bound


def test_torch_cpu_decode_runs_the_fused_step(model):
    """On a CPU with the native kernels, decode steps run fused.Step (five calls a
    layer), so the decode tests above check its math against transformers; gemma3's
    block is its own and runs the modules."""
    import torch

    from fermi.backends.torch import weights

    if torch.cuda.is_available() or weights.kernels is None:
        pytest.skip("the fused step runs on a CPU with the native kernels")
    for load in ({}, {"quantize": 8}, {"quantize": 4}):
        rt = tiny.backend_module("torch").load(model.files, dtype="float32", **load)
        assert (rt.fused is None) == (model.arch == "gemma3")


@pytest.mark.parametrize("bits", [8, 4])
def test_torch_quantized_batched_decode_equals_each_alone(model, bits):
    """Each row of a batched decode step is quantized and multiplied on its own:
    rows at different positions give the logits each gives alone, exactly in the fused
    step (gemma3's modules: within float32 rounding, attention's masked and unmasked
    paths differ in it)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("quantized weights run on the CPU only")
    rt = tiny.backend_module("torch").load(model.files, dtype="float32", quantize=bits)
    lengths, slots = (9, 17, 4), (2, 0, 1)
    seqs = [tokens(n + 5, seed=20 + n) for n in lengths]
    alone = []
    for seq, n in zip(seqs, lengths):
        c = rt.new_cache()
        rt.prefill(seq[:n], c)
        alone.append([rt.to_numpy(rt.decode([t], c, [0])[0]) for t in seq[n:]])
    cache = rt.new_cache(batch=3)
    for seq, n, slot in zip(seqs, lengths, slots):
        rt.prefill(seq[:n], cache, slot)
    for step in range(5):
        logits = rt.to_numpy(rt.decode([seq[n + step] for seq, n in zip(seqs, lengths)], cache, list(slots)))
        for row in range(3):
            if rt.fused is not None:
                assert np.array_equal(logits[row], alone[row][step])
            else:
                assert np.abs(logits[row] - alone[row][step]).max() <= TOL


def test_torch_int8_rows_round_to_their_scale():
    """int8_rows: each row on 255 levels of its own scale (bfloat16, as the kernel reads
    it), within one step of the float weight; INT8_ROWS at a time gives the same."""
    import torch

    from fermi.backends.torch import weights

    w = torch.randn(70, 33, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 70)[:, None]
    before = w.clone()
    q, scale = weights.int8_rows(w.shape, lambda a, b: w[a:b])
    assert torch.equal(w, before)  # the weight (a mapped file's, at load) is only read
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and q.abs().max() == 127
    assert ((q.float() * scale.float()[:, None] - w).abs() <= scale.float()[:, None]).all()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(weights, "INT8_ROWS", 8)
        q8, scale8 = weights.int8_rows(w.shape, lambda a, b: w[a:b])
    assert torch.equal(q8, q) and torch.equal(scale8, scale)


def test_torch_quantize_other_than_8_is_one_clear_error(model):
    from fermi.errors import FermiError

    with pytest.raises(FermiError, match="2-bit weights are not supported by the torch backend"):
        tiny.backend_module("torch").load(model.files, dtype="float32", quantize=2)
    with pytest.raises(FermiError, match="--quantize 8 computes in float32"):
        tiny.backend_module("torch").load(model.files, dtype="bfloat16", quantize=8)


def test_torch_half_head_packed_in_row_blocks_is_the_same(model, monkeypatch):
    """CPU float16 packs the output projection a block of rows at a time (packing a
    whole table first converts all of it to float32): the same logits as in one block."""
    import torch

    from fermi.backends.torch import storage

    if torch.cuda.is_available() or "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("float16 is packed by fbgemm on an x86 CPU only")
    whole = tiny.backend_module("torch").load(model.files, dtype="float16")
    monkeypatch.setattr(storage, "HEAD_ROWS", 7)
    blocks = tiny.backend_module("torch").load(model.files, dtype="float16")
    assert len(whole.model.logits_layer().packed) == 1
    assert len(blocks.model.logits_layer().packed) == -(-tiny.VOCAB // 7)
    ids = tokens(20, seed=7)
    got, want = (rt.to_numpy(rt.prefill(ids, rt.new_cache(), all_logits=True)) for rt in (blocks, whole))
    assert np.array_equal(got, want)


def test_torch_half_bytes_is_what_fbgemm_holds():
    """A float16 CPU model's weight_bytes counts fbgemm's padded blocks: the resident
    memory that packing adds, measured, at widths that pad and that do not."""
    import ctypes
    from pathlib import Path

    import torch

    from fermi.backends.torch.weights import half_bytes, pack_half

    statm = Path("/proc/self/statm")
    if "fbgemm" not in torch.backends.quantized.supported_engines or not statm.exists():
        pytest.skip("fbgemm's float16 packing, measured through /proc: x86 Linux only")
    def resident() -> int:  # after giving back what packing freed (its float16 copies)
        ctypes.CDLL(None).malloc_trim(0)
        return int(statm.read_text().split()[1]) * 4096

    for n, k in ((4000, 576), (4001, 1024), (4608, 896)):
        w = torch.randn(n, k)
        before = resident()
        packed = [pack_half(w) for _ in range(8)]
        grown = (resident() - before) / len(packed)
        assert abs(grown - half_bytes(w)) < 0.05 * half_bytes(w), (n, k, grown, half_bytes(w))
        del packed


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_phi3_longrope_past_the_original_context(backend, tmp_path):
    """From original_max_position_embeddings on, longrope rotates with its long factors:
    a prompt within the original context, then decode steps past it, equal
    transformers' own cached generation step for step (its rule: a forward that
    reaches past the original context uses the long factors)."""
    import torch

    m = tiny.build("phi3", tmp_path, original_max_position_embeddings=24)
    ids = tokens(40, seed=9)
    with torch.no_grad():
        out = m.hf(torch.tensor([ids[:20]]), use_cache=True)
        want = [out.logits[0, -1].numpy()]
        for i in range(20, 39):
            out = m.hf(torch.tensor([[ids[i]]]), past_key_values=out.past_key_values, use_cache=True)
            want.append(out.logits[0, -1].numpy())
    rt = tiny.backend_module(backend).load(m.files, dtype="float32")
    cache = rt.new_cache()
    got = [rt.prefill(ids[:20], cache)] + [rt.decode([ids[i]], cache, [0])[0] for i in range(20, 39)]
    for g, w in zip(got, want):
        close(rt, g, w)
    short = tiny.build("phi3", tmp_path / "short", original_max_position_embeddings=400)  # the long ones matter
    assert np.abs(short.reference(ids)[-1] - want[-1]).max() > 100 * TOL
