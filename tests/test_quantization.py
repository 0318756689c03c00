"""int8/int4 GLM blocks: formats, the compiled C kernels, loading, parity and the build's fallbacks."""
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import modelscope_chatglm
from modelscope_chatglm.testing import tiny
from modelscope_chatglm.checkpoint import iter_checkpoint
from modelscope_chatglm.quantization import QuantizedLinear, dequantize, pack_int4, quantize, unpack_int4
from modelscope_chatglm.quantization import build
from modelscope_chatglm.quantization.build import load_library

# (M, K, N): odd N, K % 64 != 0, K over one 1024-float buffer chunk, M up to the 64 rows the kernel takes
SHAPES = [(1, 64, 48), (3, 200, 37), (1, 4096, 33), (8, 1000, 130), (5, 96, 1), (2, 2500, 9), (64, 1104, 21)]


# -- formats ------------------------------------------------------------------------------------------------
def test_int4_packing_is_bit_exact_against_the_spec():
    q = torch.tensor([[-7, 7, 0, -1, 3, -8]], dtype=torch.int8)
    packed = pack_int4(q)
    # high nibble = even column, low nibble = odd column, two's complement
    assert packed.view(torch.uint8).tolist() == [[0x97, 0x0F, 0x38]]
    assert torch.equal(unpack_int4(packed), q)
    every = torch.arange(-8, 8, dtype=torch.int8)
    grid = torch.cartesian_prod(every, every).reshape(1, -1)      # all 256 byte values
    assert torch.equal(unpack_int4(pack_int4(grid)), grid)
    # unpacking as the spec describes: high = byte >> 4 (arithmetic), low = (byte << 4 as u8) >> 4
    for byte in range(256):
        b = torch.tensor([[byte]], dtype=torch.uint8).view(torch.int8)
        signed = byte - 256 if byte > 127 else byte
        low = ((byte << 4) & 0xFF)
        low = (low - 256 if low > 127 else low) >> 4
        assert unpack_int4(b).tolist() == [[signed >> 4, low]]


@pytest.mark.parametrize('bits', [8, 4])
def test_quantize_follows_the_reference_rule(bits):
    w = torch.randn(37, 64, dtype=torch.float16)
    q, scale = quantize(w, bits)
    expect_scale = w.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)
    expect_q = torch.round(w / expect_scale[:, None]).to(torch.int8)
    assert torch.equal(scale, expect_scale) and scale.dtype == torch.float16
    assert torch.equal(unpack_int4(q) if bits == 4 else q, expect_q)
    assert int(expect_q.abs().max()) == 2 ** (bits - 1) - 1
    rel = (dequantize(q, scale, bits) - w.float()).abs().max() / w.abs().max()
    assert rel < (0.01 if bits == 8 else 0.1)


# -- kernels: SIMD = scalar reference = torch --------------------------------------------------------------
def run(lib, name, x, q, scale, bias, n):
    y = torch.empty(x.shape[0], n)
    args = [x.data_ptr(), x.shape[0], x.shape[1], q.data_ptr(), scale.data_ptr(),
            None if bias is None else bias.data_ptr(), y.data_ptr(), n]
    getattr(lib, name)(*args, *([] if name.endswith('_ref') else [torch.get_num_threads()]))
    return y


# The exact kernels on fp32 x (`q*_gemv`) and on a bf16 model's bf16 x (`q*_gemv_xbf16`).
X_KINDS = {'fp32-x': ('', torch.float32), 'bf16-x': ('_xbf16', torch.bfloat16)}


@pytest.mark.parametrize('x_kind', list(X_KINDS))
@pytest.mark.parametrize('bits', [8, 4])
@pytest.mark.parametrize('M,K,N', SHAPES)
def test_gemv_kernel_equals_scalar_reference_and_torch(isa_lib, bits, M, K, N, x_kind):
    lib, (suffix, x_dtype) = isa_lib, X_KINDS[x_kind]
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    w = torch.randn(N, K, generator=g)
    q, scale = quantize(w, bits)
    scale = scale.float()
    x = torch.randn(M, K, generator=g).to(x_dtype)
    bias = torch.randn(N, generator=g)
    expected = x.double() @ dequantize(q, scale, bits, torch.float64).t() + bias.double()
    fast = run(lib, f'q{bits}_gemv{suffix}', x, q, scale, bias, N)
    ref = run(lib, f'q{bits}_gemv{suffix}_ref', x, q, scale, bias, N)
    tol = 1e-4 * (1 + expected.abs().max().item())
    assert (fast.double() - expected).abs().max() < tol
    assert (ref.double() - expected).abs().max() < tol
    assert (fast - ref).abs().max() < tol
    no_bias = run(lib, f'q{bits}_gemv{suffix}', x, q, scale, None, N)
    assert torch.allclose(no_bias + bias, fast, atol=tol)


@pytest.mark.parametrize('bits', [8, 4, 16])
def test_bf16_x_kernels_multiply_bf16_pairs_only_on_avx512_bf16(isa_lib, bits):
    """The avx512-vnni-bf16 build sums bf16 x against the weights in pairs (vdpbf16ps): the same exact
    products as widening x to fp32, in another order, so some outputs differ in the last bits. Every
    other build widens x and runs the fp32 kernel: bit for bit the same."""
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(7, 2048, generator=g).bfloat16()
    if bits == 16:   # the LM head: bf16 weights; the fp32 kernel on the widened copy of the same numbers
        w = torch.randn(300, 2048, generator=g).bfloat16()
        paired, widened = torch.empty(7, 300), torch.empty(7, 300)
        isa_lib.bf16_gemv(x.data_ptr(), 7, 2048, w.data_ptr(), None, paired.data_ptr(), 300, 2)
        xf, wf = x.float(), w.float()
        isa_lib.f32_gemv(xf.data_ptr(), 7, 2048, wf.data_ptr(), None, widened.data_ptr(), 300, 2)
    else:
        q, scale = quantize(torch.randn(300, 2048, generator=g), bits)
        paired = run(isa_lib, f'q{bits}_gemv_xbf16', x, q, scale.float(), None, 300)
        widened = run(isa_lib, f'q{bits}_gemv', x.float(), q, scale.float(), None, 300)
    assert (paired - widened).abs().max() < 1e-4 * widened.abs().max()
    if isa_lib.kernel_isa().decode() == 'avx512-vnni-bf16':
        assert not torch.equal(paired, widened)
    else:
        assert torch.equal(paired, widened)


@pytest.mark.parametrize('head', ['f32', 'bf16', 'f16'])
@pytest.mark.parametrize('M,K,N', SHAPES)
def test_head_kernels_equal_scalar_reference_and_torch(isa_lib, M, K, N, head):
    """f32_gemv / bf16_gemv / f16_gemv: the LM head of a decode step (models/base.py lm_head), fp32 logits."""
    g = torch.Generator().manual_seed(M + K + N)
    w, x = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g)
    if head == 'bf16':   # a bf16 model's head: bf16 weights and x, fp32 logits
        w, x = w.bfloat16(), x.bfloat16()
    if head == 'f16':    # a quantized fp32 model's head, kept as the checkpoint's fp16: fp32 x
        w = w.half()
    expected = x.double() @ w.double().t()
    fast, ref = torch.empty(M, N), torch.empty(M, N)
    kernel = getattr(isa_lib, f'{head}_gemv')
    kernel(x.data_ptr(), M, K, w.data_ptr(), None, fast.data_ptr(), N, torch.get_num_threads())
    getattr(isa_lib, f'{head}_gemv_ref')(x.data_ptr(), M, K, w.data_ptr(), None, ref.data_ptr(), N)
    tol = 1e-4 * (1 + expected.abs().max().item())
    assert (fast.double() - expected).abs().max() < tol and (ref.double() - expected).abs().max() < tol
    alone = torch.empty(1, N)
    for m in range(M):
        kernel(x[m:m + 1].data_ptr(), 1, K, w.data_ptr(), None, alone.data_ptr(), N, 2)
        assert torch.equal(alone[0], fast[m])


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_lm_head_gives_a_row_the_same_logits_in_any_batch(lib, dtype):
    from modelscope_chatglm.models.base import lm_head
    w = torch.randn(3001, 1024).to(dtype)
    x = torch.randn(40, 1024).to(torch.float32 if dtype == torch.float16 else dtype)   # fp16 head: fp32 x
    alone = torch.cat([lm_head(x[i:i + 1], w) for i in range(40)])
    for M in (2, 3, 8, 17, 40):
        assert torch.equal(lm_head(x[:M], w), alone[:M]), M
    # fp32 logits even from a bf16 head: rounded to bf16 (8 bits), near-equal candidates would tie.
    assert alone.dtype == torch.float32
    assert (alone.double() - x.double() @ w.double().t()).abs().max() < 1e-3
    if dtype == torch.bfloat16:
        assert not torch.equal(alone, alone.bfloat16().float())
    if dtype == torch.float16:   # the checkpoint's fp16 head widens exactly: the fp32 head's logits
        assert torch.equal(alone, torch.cat([lm_head(x[i:i + 1], w.float()) for i in range(40)]))
    assert lm_head(x[None], w).shape == (1, 40, 3001)      # a whole prompt: F.linear


@pytest.mark.parametrize('x_kind', list(X_KINDS))
@pytest.mark.parametrize('bits', [8, 4])
@pytest.mark.parametrize('K', [200, 2056, 4096])
def test_a_row_gets_the_same_bits_whatever_else_is_in_the_call(isa_lib, bits, K, x_kind):
    """Batched decode must give each sequence exactly what it gets alone: row m of an M-row call equals
    the 1-row call on that row, bit for bit, for every M the kernel takes."""
    suffix, x_dtype = X_KINDS[x_kind]
    g = torch.Generator().manual_seed(K + bits)
    q, scale = quantize(torch.randn(45, K, generator=g), bits)
    scale = scale.float()
    x = torch.randn(64, K, generator=g).to(x_dtype)
    alone = torch.cat([run(isa_lib, f'q{bits}_gemv{suffix}', x[m:m + 1], q, scale, None, 45) for m in range(64)])
    for M in (2, 3, 4, 7, 16, 64):
        assert torch.equal(run(isa_lib, f'q{bits}_gemv{suffix}', x[:M], q, scale, None, 45), alone[:M]), M


def int8_activations_spec(x, q, scale, bits):
    """What the int8-activation kernels compute, written from their definition in torch (float64 sums):
    each block of 64 columns of a row of x scaled by max|x|/127 and rounded half to even, then the
    blocks' exact integer dot products times the scales."""
    w = (unpack_int4(q) if bits == 4 else q).double()
    y = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float64)
    for k0 in range(0, x.shape[1], 64):
        block = x[:, k0:k0 + 64]
        amax = block.abs().max(dim=1, keepdim=True).values
        inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))      # float32, as in C
        xq = torch.round(block * inv)
        assert xq.abs().max() <= 127
        y += (amax / 127.0).double() * (xq.double() @ w[:, k0:k0 + 64].t())
    return y * scale.double()


@pytest.mark.parametrize('bits', [8, 4])
@pytest.mark.parametrize('M,K,N', SHAPES + [(70, 4096, 5)])
def test_int8_activation_kernel_equals_its_definition_and_scalar_reference(isa_lib, bits, M, K, N):
    g = torch.Generator().manual_seed(M * 1000 + K + N + bits)
    q, scale = quantize(torch.randn(N, K, generator=g), bits)
    scale = scale.float()
    x = torch.randn(M, K, generator=g) * (1 + 10 * torch.rand(M, 1, generator=g))
    x[0, :7] = 0                                             # an all-zero start of a block
    bias = torch.randn(N, generator=g)
    spec = int8_activations_spec(x, q, scale, bits) + bias.double()
    fast = run(isa_lib, f'q{bits}_gemv_x8', x, q, scale, bias, N)
    ref = run(isa_lib, f'q{bits}_gemv_x8_ref', x, q, scale, bias, N)
    tol = 1e-5 * (1 + spec.abs().max().item())             # float32 summation order only
    assert (ref.double() - spec).abs().max() < tol
    assert torch.equal(fast, ref)                            # every build adds the blocks in the reference's order
    # ... and what quantizing x costs against the exact product: about 0.5% of the output's size.
    exact = x.double() @ dequantize(q, scale, bits, torch.float64).t() + bias.double()
    rel = ((fast.double() - exact).norm() / (exact - bias.double()).norm()).item()
    assert 1e-4 < rel < 0.02, rel


@pytest.mark.parametrize('bits', [8, 4])
@pytest.mark.parametrize('K', [160, 4096])
def test_int8_activations_give_a_row_the_same_bits_whatever_else_is_in_the_call(isa_lib, bits, K):
    """Also across the panels a long prompt is cut into (63 rows of 4096 columns)."""
    g = torch.Generator().manual_seed(K + bits)
    q, scale = quantize(torch.randn(45, K, generator=g), bits)
    scale = scale.float()
    x = torch.randn(130, K, generator=g)
    alone = torch.cat([run(isa_lib, f'q{bits}_gemv_x8', x[m:m + 1], q, scale, None, 45) for m in range(130)])
    for M in (2, 3, 4, 7, 16, 64, 130):
        assert torch.equal(run(isa_lib, f'q{bits}_gemv_x8', x[:M], q, scale, None, 45), alone[:M]), M


@pytest.mark.parametrize('bits', [8, 4])
@pytest.mark.parametrize('K', [4160, 4100])
def test_int8_activations_give_the_scalar_references_bits_on_every_build(isa_builds, bits, K):
    """The integer sums are exact on every build, and every build adds the blocks' scaled sums in the
    reference's order (one weight row per lane on x86, lanes added across per block on NEON): a model
    answers the same on every CPU. K = 4100 ends in a short block; 77 rows are 64 in full strips (AVX2:
    two of 32 for int4, four of 16 for int8; AVX-512: one of 64, two of 32) and a part; 70 rows of x are
    two panels of passes of up to 2 to 5 rows; for int4, 4160 columns are 65 blocks, 520 groups of 8
    columns: AVX-512 transposes 16 at a time and leaves the last 8 to its scalar loop."""
    g = torch.Generator().manual_seed(bits + K)
    q, scale = quantize(torch.randn(77, K, generator=g), bits)
    x = torch.randn(70, K, generator=g) * 3
    bias = torch.randn(77, generator=g)
    for march, lib in isa_builds.items():
        ref = run(lib, f'q{bits}_gemv_x8_ref', x, q, scale.float(), bias, 77)
        assert torch.equal(run(lib, f'q{bits}_gemv_x8', x, q, scale.float(), bias, 77), ref), march


@pytest.mark.parametrize('bits', [8, 4])
def test_int8_activations_at_the_extremes_give_the_reference_bits_on_every_build(isa_builds, bits):
    """The largest products the integer sums can hold: weights at the ends of their range (int4 nibbles
    7 and -8, int8 127 and -128, which a checkpoint may hold though our quantizer never writes -128)
    against rows of x that quantize to +-127 everywhere. On AVX2 an int4 run adds 4 groups' products in
    int16 (16 x 15 x 127 = 30480): a fifth, or a saturating step, would change the bits. A row of x so
    small that 127 / max|x| overflows quantizes to +-127 too, not to an undefined conversion."""
    K, N = 1024, 64
    g = torch.Generator().manual_seed(bits)
    if bits == 4:
        codes = torch.tensor([0x77, 0x88, 0x78, 0x87], dtype=torch.uint8).view(torch.int8)
        q = codes[torch.randint(0, 4, (N, K // 2), generator=g)]
        q[:8] = codes[0]                                     # rows of all 7 ...
        q[8:16] = codes[1]                                   # ... and of all -8
    else:
        q = torch.where(torch.rand(N, K, generator=g) < 0.5, 127, -128).to(torch.int8)
        q[:8], q[8:16] = 127, -128
    scale = torch.rand(N, generator=g) + 0.5
    x = torch.ones(5, K)
    x[1] = -1.0
    x[2] = torch.where(torch.rand(K, generator=g) < 0.5, 1.0, -1.0)
    x[3] = 1e-38 * x[2]                                      # 127 / max|x| is inf in fp32
    x[4] = torch.randn(K, generator=g)
    for march, lib in isa_builds.items():
        ref = run(lib, f'q{bits}_gemv_x8_ref', x, q, scale, None, N)
        assert ref[:4].isfinite().all(), march
        lanes = q.clone()
        layouts = [(f'q{bits}_gemv_x8', q)]
        if lib.x8_relayout_weights(lanes.data_ptr(), N, K, bits, 1, 2) == 0:
            layouts.append((f'q{bits}_gemv_x8_lanes', lanes))
        for name, w in layouts:
            assert torch.equal(run(lib, name, x, w, scale, None, N), ref), (march, name)
    # All 7 (int4) or 127 against xq = 127: each block's sum is exactly 64 x 7 x 127 (or 64 x 127 x 127).
    top = 7 if bits == 4 else 127
    assert torch.equal(ref[0, :8], (K * top * scale[:8]).float())


def test_the_lane_layout_leaves_the_weights_alone_when_its_buffers_cannot_be_allocated(isa_builds):
    """Each thread moves strips through its own copy, allocated before any strip moves: when that fails
    (here: a copy for each of 2^30 threads), the call says so and no strip has moved. On every x86 build
    (the builds with the lane layout)."""
    strips = {march: lib for march, lib in isa_builds.items() if lib.kernel_isa().decode().startswith(('avx2', 'avx512'))}
    if not strips:
        pytest.skip('only the x86 builds have the lane layout (this is not an x86 machine)')
    q, _ = quantize(torch.randn(128, 4096), 4)
    for march, lib in strips.items():
        w = q.clone()
        assert lib.x8_relayout_weights(w.data_ptr(), 128, 4096, 4, 1, 1 << 30) == -2, march
        assert torch.equal(w, q), march
        assert lib.x8_relayout_weights(w.data_ptr(), 128, 4096, 4, 1, 2) == 0 and not torch.equal(w, q), march


@pytest.mark.parametrize('bits', [8, 4])
@pytest.mark.parametrize('N,K', [(4608, 4096), (4096, 13696)])
def test_int8_activations_at_full_width_give_the_reference_bits_on_every_build(isa_builds, bits, N, K):
    """ChatGLM2-6B's qkv and 4h_to_h shapes, on every instruction-set build, in the hub layout and in the
    lane layout, on 1, 2 and 5 threads: 3 rows of x together, and each alone, give gemv_x8_ref's bits."""
    g = torch.Generator().manual_seed(bits + N)
    q, scale = quantize(torch.randn(N, K, generator=g) * 0.02, bits)
    scale = scale.float()
    x = torch.randn(3, K, generator=g)
    ref = run(isa_builds['native'], f'q{bits}_gemv_x8_ref', x, q, scale, None, N)

    def call(lib, name, rows, w, threads):
        y = torch.empty(rows.shape[0], N)
        getattr(lib, name)(rows.data_ptr(), rows.shape[0], K, w.data_ptr(), scale.data_ptr(), None, y.data_ptr(), N, threads)
        return y
    for march, lib in isa_builds.items():
        lanes = q.clone()
        lane_layout = lib.x8_relayout_weights(lanes.data_ptr(), N, K, bits, 1, 2) == 0
        assert lane_layout == lib.kernel_isa().decode().startswith(('avx2', 'avx512')), march
        for name, w in [(f'q{bits}_gemv_x8', q)] + ([(f'q{bits}_gemv_x8_lanes', lanes)] if lane_layout else []):
            for threads in (1, 2, 5):
                assert torch.equal(call(lib, name, x, w, threads), ref), (march, name, threads)
                assert torch.equal(call(lib, name, x[1:2], w, threads), ref[1:2]), (march, name, threads)


@pytest.mark.parametrize('bits', [8, 4])
def test_bf16_prompts_of_up_to_128_rows_take_the_kernel_where_it_multiplies_bf16_pairs(lib, bits, monkeypatch):
    """On AVX512-BF16 a bf16 chunk of 100 rows (the serving scheduler prefills 128 at a time) goes
    through the kernel, row-invariant: each row is what it is alone. Elsewhere, and with the limit
    set back to 64, it takes the dequantized tiles."""
    from modelscope_chatglm.quantization import linear
    layer = QuantizedLinear(512, 96, bits, bias=False, dtype=torch.bfloat16, scale_dtype=torch.float32)
    layer.load_float_weight(torch.randn(96, 512))
    x = torch.randn(100, 512).bfloat16()
    tiled = []
    real = QuantizedLinear._tiled_matmul
    monkeypatch.setattr(QuantizedLinear, '_tiled_matmul', lambda self, *a: tiled.append(1) or real(self, *a))
    pairs = lib.kernel_isa().decode() == 'avx512-vnni-bf16'
    assert linear.kernel_rows(lib, torch.bfloat16) == (128 if pairs else 64)
    assert linear.kernel_rows(lib, torch.float32) == 64
    with torch.no_grad():
        together = layer(x)
        assert bool(tiled) != pairs
        if pairs:
            assert all(torch.equal(together[m:m + 1], layer(x[m:m + 1])) for m in range(100))
        monkeypatch.setattr(linear, 'DECODE_ROWS_BF16_PAIRS', 64)
        tiled.clear()
        layer(x)
        assert tiled


@pytest.mark.parametrize('bits', [8, 4])
def test_int8_activations_rearrange_the_weights_into_strips_and_give_them_back(lib, bits):
    """On x86 (AVX2, AVX-512), int8 activations put the weights in the lane layout once (no per-call
    transposes), with the same results as the hub layout; the state dict, and clearing the option, give
    the hub's bytes back. 77 rows: 64 in full strips in the lane layout (strips of 16 to 64 rows) and a
    part strip left in rows; 4100 columns end in a short block. The other builds (NEON, scalar) keep the
    hub layout."""
    layer = QuantizedLinear(4100, 77, bits, bias=True, dtype=torch.float32, scale_dtype=torch.float32)
    layer.load_float_weight(torch.randn(77, 4100))
    with torch.no_grad():
        layer.bias.copy_(torch.randn(77))
    hub = layer.weight.detach().clone()
    x = torch.randn(9, 4100)
    expected = run(lib, f'q{bits}_gemv_x8', x, hub, layer.weight_scale, layer.bias.detach(), 77)
    layer.int8_activations = True
    strips = lib.kernel_isa().decode().startswith(('avx2', 'avx512'))
    assert layer.lane_layout == strips
    assert torch.equal(layer.weight[:64], hub[:64]) != strips     # the full strips moved, on x86 only
    assert torch.equal(layer.weight[64:], hub[64:])                # the part strip never does
    with torch.no_grad():
        assert torch.equal(layer(x), expected)
        assert torch.equal(layer(x[3:4]), expected[3:4])
    assert torch.equal(layer.state_dict()['weight'], hub)
    # Loading weights into a layer in the lane layout: it stays usable.
    other = QuantizedLinear(4100, 77, bits, bias=True, dtype=torch.float32, scale_dtype=torch.float32)
    other.int8_activations = True
    other.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert torch.equal(other(x), expected)
    # Moving or converting the module (.to, .cuda, ...) hands its tensors over in the hub layout.
    handed = []
    other._apply(lambda t: handed.append(t.clone()) or t)
    assert torch.equal(handed[0], hub)
    assert other.lane_layout == strips
    with torch.no_grad():
        assert torch.equal(other(x), expected)
    layer.int8_activations = False
    assert not layer.lane_layout and torch.equal(layer.weight, hub)


@pytest.mark.parametrize('bits', [8, 4])
def test_int8_activations_let_a_nan_through(isa_lib, bits):
    """A NaN in x (a model that has broken down) gives NaN in its row, as the exact kernels do; rounding
    it to a quiet 0 would hide the failure."""
    q, scale = quantize(torch.randn(9, 160), bits)
    x = torch.randn(3, 160)
    x[1, 70] = float('nan')
    for name in (f'q{bits}_gemv_x8', f'q{bits}_gemv_x8_ref', f'q{bits}_gemv', f'q{bits}_gemv_xbf16'):
        y = run(isa_lib, name, x.bfloat16() if name.endswith('xbf16') else x, q, scale.float(), None, 9)
        assert y[1].isnan().all() and not y[[0, 2]].isnan().any(), name


@pytest.mark.parametrize('bits', [8, 4])
def test_quantized_linear_with_int8_activations(lib, bits):
    layer = QuantizedLinear(256, 96, bits, bias=True, dtype=torch.float32, scale_dtype=torch.float32)
    layer.load_float_weight(torch.randn(96, 256))
    with torch.no_grad():
        layer.bias.copy_(torch.randn(96))
    x = torch.randn(200, 256)          # past DECODE_ROWS: a prompt goes through the integer kernel too
    exact = layer(x)
    layer.int8_activations = True
    fast = layer(x)
    assert not torch.equal(fast, exact)
    assert ((fast - exact).norm() / exact.norm()).item() < 0.02
    assert torch.equal(torch.cat([layer(x[i:i + 1]) for i in range(0, 200, 37)]), fast[0:200:37])
    assert 'int8_activations=True' in repr(layer)


# -- the kernels' threads -------------------------------------------------------------------------------------
def kernel_calls(lib, seed=0):
    """Each exported kernel on one shape, inputs made now: {name: call(threads) -> its output}."""
    g = torch.Generator().manual_seed(seed)
    calls = {}

    def gemv(name, x, q, scale, n, out=torch.float32):
        def call(threads):
            y = torch.empty(x.shape[0], n, dtype=out)
            getattr(lib, name)(x.data_ptr(), x.shape[0], x.shape[1], q.data_ptr(), scale.data_ptr(), None,
                               y.data_ptr(), n, threads)
            return y
        return call

    def dequant(name, q, scale, dtype):
        def call(threads):
            tile = torch.empty(290, 1088, dtype=dtype)
            getattr(lib, name)(q.data_ptr(), scale.data_ptr(), 11, 301, 1088, tile.data_ptr(), threads)
            return tile
        return call

    for bits in (8, 4):
        q, scale = quantize(torch.randn(301, 1088, generator=g), bits)
        x = torch.randn(9, 1088, generator=g)
        for name in (f'q{bits}_gemv', f'q{bits}_gemv_x8'):
            calls[name] = gemv(name, x, q, scale.float(), 301)
        calls[f'q{bits}_gemv_xbf16'] = gemv(f'q{bits}_gemv_xbf16', x.bfloat16(), q, scale.float(), 301)
        calls[f'q{bits}_gemv_x8_bf16'] = gemv(f'q{bits}_gemv_x8_bf16', x.bfloat16(), q, scale.float(), 301,
                                                torch.bfloat16)
        for suffix, dtype in (('f32', torch.float32), ('bf16', torch.bfloat16)):
            calls[f'q{bits}_dequant_rows_{suffix}'] = dequant(f'q{bits}_dequant_rows_{suffix}', q, scale.float(), dtype)
    w, x = torch.randn(301, 1088, generator=g), torch.randn(5, 1088, generator=g)

    def head(name, x, w):
        def call(threads):
            y = torch.empty(5, 301)
            getattr(lib, name)(x.data_ptr(), 5, 1088, w.data_ptr(), None, y.data_ptr(), 301, threads)
            return y
        return call
    calls['f32_gemv'] = head('f32_gemv', x, w)
    calls['bf16_gemv'] = head('bf16_gemv', x.bfloat16(), w.bfloat16())
    calls['f16_gemv'] = head('f16_gemv', x, w.half())
    from test_attention import paged_call, paged_inputs
    inputs = paged_inputs([(9, 300, None), (1, 77, None), (5, 40, 20)], 32, 2, 128, seed)

    def attention(name, dtype):
        args, out, keep = paged_call(inputs, dtype)

        def call(threads):   # (no torch op that runs on OpenMP inside: see the fork test)
            fresh = torch.empty_like(out)
            assert getattr(lib, name)(*args[:-1], fresh.data_ptr(), threads) == 1 and keep
            return fresh
        return call
    calls['attend_f32'] = attention('attend_f32', torch.float32)
    calls['attend_bf16'] = attention('attend_bf16', torch.bfloat16)
    rows = torch.randn(40, 1088, generator=g)   # past the 16 rows from which rms_norm uses the threads

    def norm(name, dtype):
        x, w = rows.to(dtype), torch.randn(1088, generator=g).to(dtype)

        def call(threads):
            y = torch.empty_like(x)
            getattr(lib, name)(x.data_ptr(), 1088, 40, 1088, w.data_ptr(), 1e-5, y.data_ptr(), 1088, threads)
            return y
        return call
    calls['rms_norm_f32'] = norm('rms_norm_f32', torch.float32)
    calls['rms_norm_bf16'] = norm('rms_norm_bf16', torch.bfloat16)
    return calls


def every_kernel(lib, threads, seed=0):
    return {name: call(threads) for name, call in kernel_calls(lib, seed).items()}


def test_kernels_give_the_same_bits_on_any_number_of_threads(isa_lib):
    """Chunks of a call go to whichever thread asks first; no output may depend on which did. On every
    instruction-set build: a kernel a build lacks must still write its whole output."""
    serial = every_kernel(isa_lib, 1)
    for threads in (2, 3, 8, 300):
        for name, y in every_kernel(isa_lib, threads).items():
            assert torch.equal(y, serial[name]), (name, threads)


def test_kernels_called_from_several_threads_at_once(lib):
    """ctypes releases the GIL: several Python threads can be in the kernels together, each with its own
    OpenMP team. Each must get its own right answer."""
    expected = [every_kernel(lib, 1, seed) for seed in range(4)]
    failures = []

    def worker(seed):
        for _ in range(15):
            for name, y in every_kernel(lib, 2, seed).items():
                if not torch.equal(y, expected[seed][name]):
                    failures.append((seed, name))

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads) and failures == []


def test_kernels_work_in_a_forked_child(lib):
    """A child forked after the kernels' threads ran (a DataLoader worker, a pre-forking server) has none
    of them; OpenMP would wait for them forever (it did: the child hung). The kernels must run in the
    child's own thread. (The child runs nothing but the kernels and compares raw bytes: torch's own
    ops share that OpenMP runtime and hang there the same way.)"""
    calls = kernel_calls(lib)
    expected = {name: call(2).view(torch.uint8).numpy().tobytes() for name, call in calls.items()}
    pid = os.fork()
    if pid == 0:
        same = all(calls[name](2).view(torch.uint8).numpy().tobytes() == data for name, data in expected.items())
        os._exit(0 if same else 1)
    for _ in range(600):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        pytest.fail('the forked child hung in the kernels')
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize('bits', [8, 4])
def test_dequantized_tiles_match_torch(isa_lib, bits):
    lib = isa_lib
    w = torch.randn(70, 96)
    q, scale = quantize(w, bits)
    scale = scale.float()
    full = dequantize(q, scale, bits)
    out = torch.empty(30, 96)
    getattr(lib, f'q{bits}_dequant_rows_f32')(q.data_ptr(), scale.data_ptr(), 20, 50, 96, out.data_ptr(), 2)
    assert torch.equal(out, full[20:50])
    out16 = torch.empty(30, 96, dtype=torch.bfloat16)
    getattr(lib, f'q{bits}_dequant_rows_bf16')(q.data_ptr(), scale.data_ptr(), 20, 50, 96, out16.data_ptr(), 2)
    assert torch.equal(out16, full[20:50].to(torch.bfloat16))
    # no scale: the integer values themselves (what the prefill path multiplies x by)
    integers = (unpack_int4(q) if bits == 4 else q)[20:50].float()
    getattr(lib, f'q{bits}_dequant_rows_f32')(q.data_ptr(), None, 20, 50, 96, out.data_ptr(), 2)
    getattr(lib, f'q{bits}_dequant_rows_bf16')(q.data_ptr(), None, 20, 50, 96, out16.data_ptr(), 2)
    assert torch.equal(out, integers) and torch.equal(out16.float(), integers)


@pytest.mark.parametrize('bits', [8, 4])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('rows', [1, 5, 20, 40])   # 2-40 rows: the kernel; 80: tiled prefill
def test_quantized_linear_paths_agree(lib, bits, dtype, rows, monkeypatch):
    layer = QuantizedLinear(128, 300, bits, bias=True, dtype=dtype, scale_dtype=torch.float32)
    w = torch.randn(300, 128)
    layer.load_float_weight(w)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(300))
    x = torch.randn(2, rows, 128).to(dtype)
    expected = torch.nn.functional.linear(x.float(), dequantize(layer.weight, layer.weight_scale, bits),
                                          layer.bias.float())
    fast = layer(x)
    assert fast.shape == (2, rows, 300) and fast.dtype == dtype
    tol = 2e-2 * expected.abs().max().item() if dtype == torch.bfloat16 else 1e-4 * expected.abs().max().item()
    assert (fast.float() - expected).abs().max() < tol
    monkeypatch.setattr('modelscope_chatglm.quantization.linear.load_library', lambda: None)   # no compiler
    assert (layer(x).float() - expected).abs().max() < tol


@pytest.mark.parametrize('bits', [8, 4])
def test_bf16_prompt_rows_and_decode_rows_round_alike(lib, bits):
    """A bf16 prompt's rows go through bf16 tiles, whose matmul rounds x @ q to bf16 before the scales
    multiply it; a decode row goes through the kernel, which must round the same way, or a prompt
    prefilled cold and one continued from the prefix cache get different K/V (rounding once there and
    twice here changed 23% of the outputs and 2 of 50 greedy replies)."""
    g = torch.Generator().manual_seed(bits)
    layer = QuantizedLinear(1024, 512, bits, bias=True, dtype=torch.bfloat16, scale_dtype=torch.float32)
    layer.load_float_weight(torch.randn(512, 1024, generator=g) * 0.02)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(512, generator=g))
    x = torch.randn(100, 1024, generator=g).bfloat16()
    prompt = layer(x)                                            # past DECODE_ROWS: tiles
    decoded = torch.cat([layer(x[i:i + 1]) for i in range(100)])  # one row at a time: the kernel
    # Only the summation order differs, and the sums round to the same bf16 almost always.
    assert (prompt != decoded).float().mean().item() < 1e-3


# -- models ------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def quantized_dirs(tmp_path_factory, sp_models):
    """Pre-quantized tiny checkpoints (THUDM layout), their fp16 source, and a glm1 one."""
    root = tmp_path_factory.mktemp('quant')
    dirs = {'fp16': tiny.build(str(root / 'fp16'), 'glm2', 'bin', 2, seed=11, sp_model=sp_models['glm2'])}
    for bits in (8, 4):
        dirs[bits] = tiny.build(str(root / f'int{bits}'), 'glm2', 'bin', 2, seed=11, sp_model=sp_models['glm2'],
                                quantization_bit=bits)
    return dirs


def dequantized_copy(quant_dir, out_dir, bits):
    """The same model with its quantized linears dequantized to fp32: what the reference runs."""
    shutil.copytree(quant_dir, out_dir, ignore=shutil.ignore_patterns('*.bin', '*.json'))
    for name in ('tokenizer_config.json', 'configuration.json', 'generation_config.json'):
        if os.path.exists(os.path.join(quant_dir, name)):
            shutil.copy(os.path.join(quant_dir, name), out_dir)
    cfg = json.load(open(os.path.join(quant_dir, 'config.json')))
    # fp32 in the config too: the reference builds its modules in config.torch_dtype, and fp16 modules
    # would round the dequantized values it is given.
    cfg.update(quantization_bit=0, torch_dtype='float32')
    json.dump(cfg, open(os.path.join(out_dir, 'config.json'), 'w'))
    state = {}
    for _, tensors in iter_checkpoint(quant_dir):
        state.update(tensors)
    out = {}
    for key, t in state.items():
        if key.endswith('.weight_scale'):
            continue
        scale_key = key[:-len('weight')] + 'weight_scale'
        out[key] = dequantize(t, state[scale_key], bits) if scale_key in state else t.float()
    tiny.save_shards(out, out_dir, 'bin', 1)
    return out_dir


@pytest.mark.parametrize('bits', [8, 4])
def test_prequantized_checkpoint_matches_reference_on_dequantized_weights(quantized_dirs, tmp_path, reference, bits):
    model = modelscope_chatglm.load(quantized_dirs[bits], device='cpu', dtype='float32', int8_activations=False)
    layer = model.model.layers[0]
    assert isinstance(layer.mlp.dense_h_to_4h, QuantizedLinear) and layer.mlp.dense_h_to_4h.bits == bits
    assert layer.self_attention.query_key_value.weight_scale.dtype == torch.float32    # fp16 in the file
    # not quantized, and kept as the checkpoint's fp16 (widened exactly where used); the blocks compute in fp32
    assert model.model.word_embeddings.weight.dtype == model.model.output_layer.weight.dtype == torch.float16
    assert model.dtype == torch.float32
    ref_dir = dequantized_copy(quantized_dirs[bits], str(tmp_path / 'deq'), bits)
    prompt = model.build_inputs('你好，请介绍一下你自己。' + ' The quick brown fox.' * 3)
    ref = reference({'model_dir': ref_dir, 'cases': [
        {'kind': 'logits', 'name': 'logits', 'prompts': [prompt]},
        {'kind': 'greedy', 'name': 'greedy', 'prompt': prompt, 'max_new_tokens': 16}]})
    diff = (model.logits(prompt) - ref['logits']).abs().max().item()
    print(f'\n[int{bits}] max |logit diff| vs reference on dequantized weights: {diff:.3g}')
    assert diff < 5e-3
    assert model.generate(prompt, max_new_tokens=16, do_sample=False) == ref['greedy']


@pytest.mark.parametrize('family', ['glm2', 'glm1'])
def test_an_fp16_head_and_embedding_give_the_fp32_ones_logprobs_exactly(glm2_dir, glm1_dir, family):
    """A quantized fp32 model keeps the checkpoint's fp16 embedding and head (half their memory and of the
    head's bytes per decode step); widened in registers, they give exactly what fp32 copies give."""
    model = modelscope_chatglm.load({'glm2': glm2_dir, 'glm1': glm1_dir}[family], device='cpu', dtype='float32',
                                    quantization_bit=4, int8_activations=False)
    assert model.model.word_embeddings.weight.dtype == torch.float16
    prompt = model.build_inputs('你好，请介绍一下你自己。')

    assert len(prompt) < 64   # every position's logits through the head kernels (1-64 rows)
    fp16 = model.generate(prompt, max_new_tokens=12, do_sample=False, stop_ids=[])
    fp16_logits = model.logits(prompt)
    model.model.word_embeddings.float()
    if family == 'glm2':
        model.model.output_layer.float()
    model.clear_cache()
    assert model.generate(prompt, max_new_tokens=12, do_sample=False, stop_ids=[]) == fp16
    assert torch.equal(model.logits(prompt), fp16_logits)


@pytest.mark.parametrize('bits', [8, 4])
def test_quantize_on_load_equals_prequantized(quantized_dirs, bits):
    pre = modelscope_chatglm.load(quantized_dirs[bits], device='cpu', dtype='float32')
    onload = modelscope_chatglm.load(quantized_dirs['fp16'], device='cpu', dtype='float32', quantization_bit=bits)
    for a, b in zip(pre.model.state_dict().values(), onload.model.state_dict().values()):
        assert torch.equal(a, b)
    prompt = pre.build_inputs('你好')
    assert torch.equal(pre.logits(prompt), onload.logits(prompt))


def test_chatglm6b_int4_and_int8(tmp_path):
    sp = tiny.train_sentencepiece('glm1')
    fp = modelscope_chatglm.load(tiny.build(str(tmp_path / 'fp'), 'glm1', 'bin', 2, sp_model=sp),
                                 device='cpu', dtype='float32')
    for bits in (8, 4):
        d = tiny.build(str(tmp_path / f'q{bits}'), 'glm1', 'bin', 2, sp_model=sp, quantization_bit=bits)
        q = modelscope_chatglm.load(d, device='cpu', dtype='float32')
        assert q.model.layers[1].attention.query_key_value.bits == bits
        prompt = q.build_inputs('你好')
        rel = ((q.logits(prompt) - fp.logits(prompt)).abs().max() / fp.logits(prompt).abs().max()).item()
        assert rel < (0.05 if bits == 8 else 0.5)
        q.chat('你好', max_new_tokens=6)


@pytest.mark.parametrize('native', [True, False])
def test_quantized_cpu_default_dtype_follows_the_cpu(quantized_dirs, monkeypatch, native):
    """bf16 only where the CPU multiplies it natively (AMX, AVX512-BF16); emulated bf16 is slow."""
    from modelscope_chatglm import loading
    monkeypatch.setattr(loading, 'cpu_has_native_bf16', lambda: native)
    model = modelscope_chatglm.load(quantized_dirs[8], device='cpu')
    assert model.dtype == (torch.bfloat16 if native else torch.float32)
    assert modelscope_chatglm.load(quantized_dirs['fp16'], device='cpu').dtype == torch.float32   # unquantized


def test_bfloat16_quantized_model_runs_prefill_and_decode(quantized_dirs):
    model = modelscope_chatglm.load(quantized_dirs[8], device='cpu', dtype='bfloat16')
    ref = modelscope_chatglm.load(quantized_dirs[8], device='cpu', dtype='float32')
    prompt = model.build_inputs('你好，请介绍一下你自己。' * 3)
    rel = ((model.logits(prompt) - ref.logits(prompt)).abs().max() / ref.logits(prompt).abs().max()).item()
    assert rel < 0.05
    assert len(model.generate(prompt, max_new_tokens=5, do_sample=False, stop_ids=[])) == 5


@pytest.mark.parametrize('bits', [8, 4])
def test_int8_activations_model(quantized_dirs, tmp_path, bits):
    exact = modelscope_chatglm.load(quantized_dirs[bits], device='cpu', dtype='float32', int8_activations=False)
    fast = modelscope_chatglm.load(quantized_dirs[bits], device='cpu', dtype='float32', int8_activations=True)
    linears = [m for m in fast.model.modules() if isinstance(m, QuantizedLinear)]
    assert linears and all(m.int8_activations for m in linears)
    assert not any(m.int8_activations for m in exact.model.modules() if isinstance(m, QuantizedLinear))
    # the default, where the compiled kernels are (docs/quantization.md, "Which activations by default")
    default = modelscope_chatglm.load(quantized_dirs[bits], device='cpu', dtype='float32')
    assert all(m.int8_activations for m in default.model.modules() if isinstance(m, QuantizedLinear))
    prompt = exact.build_inputs('你好，请介绍一下你自己。' + ' The quick brown fox.' * 3)
    a, b = exact.logits(prompt), fast.logits(prompt)
    assert not torch.equal(a, b)
    assert ((a - b).abs().max() / a.abs().max()).item() < 0.05
    # the YAML key and the pipeline argument reach the layers
    cfg = tmp_path / 'x8.yaml'
    cfg.write_text(f'model: {quantized_dirs[bits]}\ndevice: cpu\ndtype: float32\nint8_activations: true\n')
    assert torch.equal(modelscope_chatglm.load(str(cfg)).logits(prompt), b)
    assert torch.equal(default.logits(prompt), b)
    cfg.write_text(f'model: {quantized_dirs[bits]}\ndevice: cpu\ndtype: float32\nint8_activations: false\n')
    assert torch.equal(modelscope_chatglm.load(str(cfg)).logits(prompt), a)
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks
    pipe = pipeline(task=Tasks.chat, model=quantized_dirs[bits], device='cpu', int8_activations=True)
    assert all(m.int8_activations for m in pipe.chat_model.model.modules() if isinstance(m, QuantizedLinear))


def test_int8_activations_errors(quantized_dirs, tmp_path):
    with pytest.raises(ValueError, match='int8_activations applies to the int8/int4 blocks.*quantization_bit=4'):
        modelscope_chatglm.load(quantized_dirs['fp16'], device='cpu', int8_activations=True)
    cfg = tmp_path / 'bad.yaml'
    cfg.write_text(f'model: {quantized_dirs[8]}\nint8_activations: "false"\n')
    with pytest.raises(ValueError, match="int8_activations must be true or false, got 'false'"):
        modelscope_chatglm.load(str(cfg))


def test_quantization_errors(quantized_dirs, tmp_path):
    with pytest.raises(ValueError, match='must be 8 or 4'):
        modelscope_chatglm.load(quantized_dirs['fp16'], quantization_bit=3)
    with pytest.raises(modelscope_chatglm.CheckpointError, match='holds int8 weights'):
        modelscope_chatglm.load(quantized_dirs[8], quantization_bit=4)
    d = tmp_path / 'qe'
    shutil.copytree(quantized_dirs[4], d)
    cfg = json.load(open(d / 'config.json'))
    cfg['quantization_embeddings'] = True
    json.dump(cfg, open(d / 'config.json', 'w'))
    with pytest.raises(modelscope_chatglm.CheckpointError, match='quantization_embeddings'):
        modelscope_chatglm.load(str(d))
    d = tmp_path / 'noq'
    shutil.copytree(quantized_dirs[8], d)
    cfg = json.load(open(d / 'config.json'))
    cfg['quantization_bit'] = 0
    json.dump(cfg, open(d / 'config.json', 'w'))
    with pytest.raises(modelscope_chatglm.CheckpointError, match='config.json lacks quantization_bit'):
        modelscope_chatglm.load(str(d))


# -- the build: cache, concurrency, no compiler ----------------------------------------------------------------
PROBE = textwrap.dedent('''
    import logging, sys, time
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s %(message)s')
    from modelscope_chatglm.quantization import build
    t = time.time()
    lib = build.load_library()
    print('RESULT', None if lib is None else lib.kernel_isa().decode(), round(time.time() - t, 3))
''')


def probe(env, cache):
    env = dict(os.environ, MODELSCOPE_CHATGLM_KERNEL_CACHE=str(cache), **env)
    return subprocess.Popen([sys.executable, '-c', PROBE], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_two_processes_compiling_at_once_both_succeed_and_the_cache_is_reused(tmp_path):
    cache = tmp_path / 'kernels'
    procs = [probe({}, cache) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for out in outs:
        assert 'RESULT avx' in out or 'RESULT scalar' in out, out
    libs = [f for f in os.listdir(cache) if f.endswith('.so')]
    assert len(libs) == 1 and not [f for f in os.listdir(cache) if f.startswith('.build-')]
    mtime = os.path.getmtime(cache / libs[0])
    out = probe({}, cache).communicate(timeout=300)[0]
    assert 'compiled the CPU kernels' not in out and 'RESULT' in out   # loaded, not rebuilt
    assert os.path.getmtime(cache / libs[0]) == mtime


def test_without_a_compiler_torch_takes_over_with_one_warning(tmp_path, quantized_dirs):
    empty = tmp_path / 'empty-path'
    empty.mkdir()
    env = {'PATH': str(empty), 'CC': ''}   # python is started by its full path; gcc/cc/clang are not found
    code = PROBE + textwrap.dedent(f'''
        import modelscope_chatglm
        m = modelscope_chatglm.load({quantized_dirs[4]!r}, device='cpu', dtype='float32')
        print('REPLY', len(m.generate(m.build_inputs('hi'), max_new_tokens=3, do_sample=False, stop_ids=[])))
    ''')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, MODELSCOPE_CHATGLM_KERNEL_CACHE=str(tmp_path / 'c'), **env))
    out = proc.stdout + proc.stderr
    assert 'RESULT None' in out and 'REPLY 3' in out, out
    assert out.count('no C compiler found') == 1


def test_a_compiler_without_openmp_gives_single_threaded_kernels_and_names_the_error(tmp_path):
    """A gcc without libgomp's headers (or clang without libomp) fails on -fopenmp: the kernels are
    built without it, and the warning quotes the compiler's error line, not the include chain before it
    or its trailing caret."""
    gcc = shutil.which('gcc') or shutil.which('cc')
    wrapper = tmp_path / 'cc-without-openmp'
    wrapper.write_text(textwrap.dedent(f'''\
        #!/bin/sh
        case "$*" in *-fopenmp*)
            echo "In file included from kernels/quant_kernels.c:64:" >&2
            echo "kernels/common.h:39:10: fatal error: omp.h: No such file or directory" >&2
            echo "   39 | #include <omp.h>" >&2
            echo "      |          ^~~~~~~" >&2
            exit 1;;
        esac
        exec {gcc} "$@"
    '''))
    wrapper.chmod(0o755)
    out = probe({'CC': str(wrapper)}, tmp_path / 'kernels').communicate(timeout=300)[0]
    assert 'RESULT avx' in out or 'RESULT scalar' in out, out
    assert ('compiling the CPU kernels with OpenMP failed (kernels/common.h:39:10: fatal error: omp.h: No such '
            'file or directory); building them single-threaded') in out, out


def test_read_only_cache_falls_back_to_a_temp_dir(tmp_path):
    if os.geteuid() == 0:
        cache = '/proc/modelscope-chatglm-readonly'   # not writable even for root
    else:
        cache = tmp_path / 'ro'
        cache.mkdir()
        os.chmod(cache, 0o500)
    out = probe({}, cache).communicate(timeout=300)[0]
    assert 'RESULT avx' in out or 'RESULT scalar' in out, out
    assert 'not writable' in out


def test_a_full_disk_under_the_cache_falls_back_to_a_temp_dir(tmp_path):
    """ENOSPC while writing the library: the build moves to the private dir under $TMPDIR, as for a
    read-only cache (it gave up, and every start tried again for ~13 s). A real full filesystem: a
    64 KiB tmpfs."""
    if os.geteuid() != 0 or not shutil.which('mount'):
        pytest.skip('mounting a small tmpfs needs root')
    full = tmp_path / 'full'
    full.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64k,mode=0700', 'tmpfs', str(full)]).returncode:
        pytest.skip('this machine does not let us mount a tmpfs')
    try:
        (full / 'kernels').mkdir(mode=0o700)
        temp = tmp_path / 'tmp'
        temp.mkdir()
        out = probe({'TMPDIR': str(temp)}, full / 'kernels').communicate(timeout=300)[0]
        assert 'RESULT avx' in out or 'RESULT scalar' in out, out
        assert 'no room to write the compiled kernels' in out, out
        assert [f for d in temp.iterdir() for f in os.listdir(d) if f.endswith('.so')]
        assert not [f for f in os.listdir(full / 'kernels') if f.endswith('.so') or f.startswith('.build-')]
    finally:
        subprocess.run(['umount', str(full)])


def built_library(cache):
    out = probe({}, cache).communicate(timeout=300)[0]
    assert 'RESULT avx' in out or 'RESULT scalar' in out, out
    libs = [cache / f for f in os.listdir(cache) if f.endswith('.so')]
    assert len(libs) == 1, libs
    return libs[0], out


def test_a_truncated_cached_library_is_rebuilt_not_loaded(tmp_path):
    """A crash mid-write or a full disk leaves a short .so; dlopen on it can die with SIGBUS."""
    cache = tmp_path / 'kernels'
    path, _ = built_library(cache)
    whole = path.read_bytes()
    path.write_bytes(whole[:20000])
    again, out = built_library(cache)
    assert again == path and 'does not match the size and digest' in out
    assert path.stat().st_size == len(whole)


def test_the_unity_file_includes_every_part_of_the_kernels_once():
    """build.py compiles quant_kernels.c alone; it #includes the other files of kernels/ (setup.py ships
    kernels/*.c and kernels/*.h, and the library's name hashes them all): a part left out of the
    #includes, or one included that is not there, would be code that is shipped but never built."""
    kernels = os.path.dirname(build.SOURCE)
    with open(build.SOURCE) as f:
        included = re.findall(r'^#include "([^"]+)"', f.read(), re.M)
    parts = [name for name in os.listdir(kernels) if name.endswith(('.c', '.h')) and name != 'quant_kernels.c']
    assert sorted(included) == sorted(parts) and len(set(included)) == len(included), (included, parts)


def test_editing_any_part_of_the_kernels_gives_the_library_another_name(tmp_path, monkeypatch):
    """The cache key covers every .c and .h of kernels/, not only the unity file: a cached library
    built from the old code of an edited part must not be loaded."""
    copy = tmp_path / 'kernels'
    shutil.copytree(os.path.dirname(build.SOURCE), copy)
    monkeypatch.setattr(build, 'SOURCE', str(copy / 'quant_kernels.c'))
    cc = build.find_compiler() or 'cc'

    def name():
        return build.library_path(cc, True, str(tmp_path))

    before = name()
    parts = sorted(f for f in os.listdir(copy) if f.endswith(('.c', '.h')))
    assert {'quant_kernels.c', 'common.h', 'reference.c'} <= set(parts)
    names = set()
    for part in parts:
        original = (copy / part).read_bytes()
        (copy / part).write_bytes(original + b'\n')
        names.add(name())
        (copy / part).write_bytes(original)
    assert before not in names and len(names) == len(parts)
    assert name() == before


def plant(directory, marker):
    """A library with a constructor, under the name the loader would look for: loading it writes marker."""
    cc = build.find_compiler()
    target = build.library_path(cc, True, str(directory))
    src = directory / 'evil.c'
    src.write_text(f'#include <stdio.h>\n__attribute__((constructor)) static void planted(void) '
                   f'{{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n')
    subprocess.run([cc, str(src), '-shared', '-fPIC', '-o', target], check=True)
    data = open(target, 'rb').read()
    with open(target + '.sha256', 'w') as f:   # the attacker can write the digest record too
        f.write(f'{len(data)} {hashlib.sha256(data).hexdigest()}')
    return target


def test_a_cache_dir_others_can_write_is_refused(tmp_path):
    cache = tmp_path / 'shared-cache'
    cache.mkdir()
    marker = tmp_path / 'PLANTED-CODE-RAN'
    plant(cache, marker)
    os.chmod(cache, 0o777)
    (tmp_path / 'tmp').mkdir()
    out = probe({'TMPDIR': str(tmp_path / 'tmp')}, cache).communicate(timeout=300)[0]   # the fallback goes here
    assert not marker.exists(), out
    assert 'is writable by others' in out and ('RESULT avx' in out or 'RESULT scalar' in out), out


def test_a_cache_dir_owned_by_someone_else_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip('making a directory owned by another user needs root')
    cache = tmp_path / 'foreign-cache'
    cache.mkdir()
    marker = tmp_path / 'PLANTED-CODE-RAN'
    plant(cache, marker)
    os.chown(cache, 12345, 12345)
    os.chmod(cache, 0o755)
    out = probe({}, cache).communicate(timeout=300)[0]
    assert not marker.exists(), out
    assert 'belongs to uid 12345' in out and ('RESULT avx' in out or 'RESULT scalar' in out), out


def test_quantization_through_yaml_pipeline_and_defaults(quantized_dirs, tmp_path):
    import modelscope_chatglm  # noqa: F401  (registers with ModelScope)
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks
    from modelscope_chatglm.loading import cpu_has_native_bf16
    model = modelscope_chatglm.load(quantized_dirs['fp16'], device='cpu', quantization_bit=4)
    default = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert model.dtype == default and model.model.layers[0].mlp.dense_4h_to_h.bits == 4
    yaml_path = tmp_path / 'q8.yaml'
    yaml_path.write_text(f'model: {quantized_dirs["fp16"]}\nquantization_bit: 8\ndtype: float32\n')
    from_yaml = modelscope_chatglm.load(str(yaml_path))
    assert from_yaml.model.layers[0].self_attention.dense.bits == 8 and from_yaml.dtype == torch.float32
    pipe = pipeline(task=Tasks.chat, model=quantized_dirs['fp16'], quantization_bit=8, dtype='float32')
    assert pipe.chat_model.model.layers[1].self_attention.dense.bits == 8
    out = pipe({'text': '你好', 'history': []}, max_new_tokens=4, do_sample=False)
    assert out['response'] == from_yaml.chat('你好', max_new_tokens=4, do_sample=False)[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('bits', [8, 4])
def test_gpu_quantized_model_matches_cpu(quantized_dirs, bits):
    cpu = modelscope_chatglm.load(quantized_dirs[bits], device='cpu', dtype='float32', int8_activations=False)
    gpu = modelscope_chatglm.load(quantized_dirs[bits], device='cuda', dtype='float16')
    prompt = cpu.build_inputs('你好，请介绍一下你自己。')
    a, b = cpu.logits(prompt), gpu.logits(prompt).cpu()
    assert ((a - b).abs().max() / a.abs().max()).item() < 0.05
    assert len(gpu.generate(prompt, max_new_tokens=4, do_sample=False, stop_ids=[])) == 4
