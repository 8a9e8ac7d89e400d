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
