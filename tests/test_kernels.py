"""fermi's native CPU kernels (backends/torch/kernels.c) against torch: each path this
CPU runs (AVX-512 VNNI, AVX2, plain C), 8 and 4 bits, the row counts of decode and of
a serving batch; the blocks' quantization; and the pure-torch fallback."""

import pytest
import torch

from fermi.backends.torch import weights
from fermi.backends.torch.weights import QK, block_linear, dequantized, q4_blocks, q8_blocks

kernels = weights.kernels
needs_kernels = pytest.mark.skipif(kernels is None, reason="the native kernels are not built (no compiler)")
PATHS = ["avx512-vnni", "avx2", "c"]


def quantized_x(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel sees it: each block of 32 on 255 levels of its own scale."""
    b = x.view(x.shape[0], -1, QK)
    s = b.abs().amax(-1, keepdim=True) / 127
    return ((b / torch.where(s > 0, s, 1)).round() * s).view_as(x)


def test_the_kernels_are_built_on_this_machine():
    """CI installs with a compiler: the kernels must be there (else every test below
    would skip and the fallback would be all that ran)."""
    assert kernels is not None and weights.kernel_path() in PATHS


@needs_kernels
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_equals_torch_on_each_path(path, bits):
    if not kernels.use(path):
        pytest.skip(f"this CPU does not run the {path} path")
    try:
        g = torch.Generator().manual_seed(bits)
        for n, k in [(96, 64), (40, 96), (33, 160)]:  # an odd number of blocks; rows not a tile's multiple
            w = torch.randn(n, k, generator=g) * torch.logspace(-2, 1, n)[:, None]
            q, scale = (q8_blocks if bits == 8 else q4_blocks)(w.shape, lambda a, b: w[a:b])
            for m in (1, 3, 8, 9, 16):
                x = torch.randn(m, k, generator=g)
                x[0, :QK] = 0  # a block of zeros (scale 0)
                ref = quantized_x(x) @ dequantized(bits, q, scale).T
                got = block_linear(x, bits, q, scale)
                assert (got - ref).abs().max() <= 1e-4 * ref.abs().max(), (path, n, k, m)
    finally:
        kernels.use(PATHS[0]) or kernels.use(PATHS[1]) or kernels.use("c")  # back to the best path


@needs_kernels
@pytest.mark.parametrize("path", PATHS)
def test_kernel_with_mins_equals_torch_on_each_path(path):
    """4-bit blocks with a min each (a GGUF's Q4_1 / Q4_K kept): weight = scale * q + min."""
    if not kernels.use(path):
        pytest.skip(f"this CPU does not run the {path} path")
    try:
        g = torch.Generator().manual_seed(7)
        for n, k in [(40, 96), (33, 320)]:  # 3 and 10 blocks: the AVX2 min loop's 8 and its tail
            q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
            scale = (torch.rand(n, k // QK, generator=g) * 0.1).half()
            mins = (-torch.rand(n, k // QK, generator=g)).half()
            for m in (1, 4, 9):
                x = torch.randn(m, k, generator=g)
                ref = quantized_x(x) @ dequantized(4, q, scale, mins=mins).T
                got = block_linear(x, 4, q, scale, mins=mins)
                assert (got - ref).abs().max() <= 1e-4 * ref.abs().max(), (path, n, k, m)
    finally:
        kernels.use(PATHS[0]) or kernels.use(PATHS[1]) or kernels.use("c")


@needs_kernels
def test_kernel_activations_quantize_as_described():
    x = torch.randn(3, 96) * 5
    q, s = torch.empty(3, 96, dtype=torch.int8), torch.empty(3, 3)
    kernels.q8_quantize(x.data_ptr(), q.data_ptr(), s.data_ptr(), 3, 96)
    assert torch.allclose(s, x.view(3, 3, QK).abs().amax(-1) / 127)
    assert torch.allclose((q.view(3, 3, QK).float() * s[..., None]).view(3, 96), quantized_x(x), atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_blocks_round_each_weight_within_a_step_of_its_scale(bits):
    w = torch.randn(70, 64, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 2, 70)[:, None]
    before = w.clone()
    q, scale = (q8_blocks if bits == 8 else q4_blocks)(w.shape, lambda a, b: w[a:b])
    assert torch.equal(w, before)  # the weight (a mapped file's, at load) is only read
    assert scale.shape == (70, 2) and scale.dtype == torch.float16
    assert q.shape == (70, 64 if bits == 8 else 32)
    err = (dequantized(bits, q, scale) - w).abs().view(70, 2, QK)
    step = scale.float().abs()[..., None] * (0.5 if bits == 8 else 1.0)  # (4 bits: +8 clamps to 7)
    assert (err <= step * 1.001).all()


def test_without_the_kernels_the_blocks_multiply_in_torch(monkeypatch):
    """The fallback (no compiler at install, or FERMI_KERNELS=0): the same blocks,
    dequantized and multiplied in bfloat16, within bfloat16's rounding."""
    monkeypatch.setattr(weights, "kernels", None)
    w, x = torch.randn(48, 64), torch.randn(2, 64)
    for bits in (8, 4):
        q, scale = (q8_blocks if bits == 8 else q4_blocks)(w.shape, lambda a, b: w[a:b])
        ref = x @ dequantized(bits, q, scale).T
        assert (block_linear(x, bits, q, scale) - ref).abs().max() <= 2e-2 * ref.abs().max()


@needs_kernels
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_fuses_the_norm_glu_bias_and_residual(path, bits):
    """fused.Project: the RMSNorm before a product, SiLU(gate) * up before it, the bias
    and the residual after it, inside the kernel's call = the torch ops around it."""
    import torch.nn.functional as F

    from fermi.backends.torch import fused, llama
    from fermi.backends.torch.storage import QBlocks

    if not kernels.use(path):
        pytest.skip(f"this CPU does not run the {path} path")
    try:
        g = torch.Generator().manual_seed(bits)
        n, k = 80, 96
        proj = QBlocks(torch.nn.Linear(k, n, bias=True, device="meta"), bits)
        w = torch.randn(n, k, generator=g)
        held = (q8_blocks if bits == 8 else q4_blocks)(w.shape, lambda a, b: w[a:b]) + (torch.randn(n, generator=g),)
        for name, t in zip(("weight", "weight_scale", "bias"), held):
            setattr(proj, name, torch.nn.Parameter(t, requires_grad=False))
        norm = llama.RMSNorm(k, 1e-5)
        norm.weight.data = 1 + 0.3 * torch.randn(k, generator=g)
        for m in (1, 5):
            x, h, res = torch.randn(m, k, generator=g) * 3, torch.randn(m, 2 * k, generator=g), torch.randn(m, n)
            want = [block_linear(F.rms_norm(x, (k,), eps=1e-5) * norm.weight, bits, proj.weight, proj.weight_scale),
                    block_linear(F.silu(h[:, :k]) * h[:, k:], bits, proj.weight, proj.weight_scale)]
            got = [fused.Project(proj, norm)(x) - proj.bias, fused.Project(proj, glu=True)(h, into=res.clone()) - res
                   - proj.bias]
            for a, b in zip(got, want):
                assert (a - b).abs().max() <= 1e-3 * b.abs().max(), (path, m)
    finally:
        kernels.use(PATHS[0]) or kernels.use(PATHS[1]) or kernels.use("c")


def _attention(q, k, v, scale):
    """softmax(q k^T * scale) v for one head: q [hd], k and v [t, hd]."""
    return torch.softmax(k @ q * scale, 0) @ v


@needs_kernels
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("norms", [False, True])
def test_attend_equals_attention_in_torch(path, window, norms):
    """kernels.attend for rows at their own positions and cache rows: each q/k head
    RMS-normalized (qwen3) and rotated, k and v written at the row's position, each
    head attending over its row's keys [lo, pos] with its group's kv head (GQA)."""
    from fermi import rope
    from fermi.backends.torch import llama

    if not kernels.use(path):
        pytest.skip(f"this CPU does not run the {path} path")
    try:
        g = torch.Generator().manual_seed(window)
        heads, kvh, hd, cap, batch = 6, 2, 16, 40, 4
        rot = llama.Rotary(rope.frequencies({"rope_type": "default", "rope_theta": 10000.0}, hd, 64), torch.float32, "cpu")
        rot.reserve(cap)
        kc, vc = torch.randn(batch, kvh, cap, hd, generator=g), torch.randn(batch, kvh, cap, hd, generator=g)
        qn, kn = (1 + 0.3 * torch.randn(hd, generator=g), 1 + 0.3 * torch.randn(hd, generator=g)) if norms else (None,) * 2
        rows, pos = [3, 0, 1], [17, 0, 39]
        qkv = torch.randn(3, (heads + 2 * kvh) * hd, generator=g)
        where = torch.tensor(rows + pos)
        out, k2, v2, x = torch.empty(3, heads * hd), kc.clone(), vc.clone(), qkv.clone()
        kernels.attend(out.data_ptr(), x.data_ptr(), k2.data_ptr(), v2.data_ptr(), rot.cos.data_ptr(),
                       rot.sin.data_ptr(), qn.data_ptr() if norms else 0, kn.data_ptr() if norms else 0,
                       where.data_ptr(), where.data_ptr() + 24, 3, heads, kvh, hd, cap, window, 1e-6, 0.3)
        for i, (r, p) in enumerate(zip(rows, pos)):
            h = qkv[i].view(heads + 2 * kvh, hd)
            q, k, v = h[:heads], h[heads:heads + kvh], h[heads + kvh:]
            if norms:
                q, k = (torch.nn.functional.rms_norm(t, (hd,), eps=1e-6) * w for t, w in ((q, qn), (k, kn)))
            q, k = (llama.apply_rope(t, rot.cos[p], rot.sin[p]) for t in (q, k))
            kc[r, :, p], vc[r, :, p] = k, v
            lo = max(0, p - window + 1) if window else 0
            for head in range(heads):
                want = _attention(q[head], kc[r, head // 3, lo:p + 1], vc[r, head // 3, lo:p + 1], 0.3)
                assert (out[i].view(heads, hd)[head] - want).abs().max() <= 1e-5, (path, i, head)
        assert torch.allclose(k2, kc, atol=1e-6) and torch.equal(v2, vc)
    finally:
        kernels.use(PATHS[0]) or kernels.use(PATHS[1]) or kernels.use("c")
