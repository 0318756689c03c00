"""GPU kernels for the int8/int4 GLM blocks, in Triton: the weights are dequantised in registers.

    y = (x @ Q.T) * scale + bias        x [M, K] fp16/bf16/fp32, Q int8 [N, K] or int4 packed [N, K/2]

The files' layout is used as it is (no repacking): int4 byte j of a row holds column 2j in its HIGH
nibble and column 2j+1 in its LOW nibble (formats.py); a loaded tile is unpacked in registers and
interleaved back into column order, so x is read contiguously. The integers are exact in fp16/bf16,
and the per-row scale multiplies the fp32 sum at the end.

Three paths, by the number of rows of x:
- `_gemv_kernel` (M <= GEMV_ROWS, decode): a program owns BLOCK_N output columns for all M rows and
  streams their weights once; multiply-adds on the CUDA cores. Decode is bound by weight bytes, so
  int8 moves half and int4 a quarter of what fp16 moves.
- `_gemm_kernel` (M <= TILE_ROWS[bits]: batched decode, short prompts): tiles through `tl.dot` (tensor
  cores), dequantising each weight tile after it is loaded.
- longer prompts: W dequantised (`_dequantize_kernel`) into a reused buffer, then cuBLAS. With
  thousands of rows the matmul dwarfs one pass over W, and cuBLAS beats our tiles there. This path
  rounds Q * scale to x's dtype before multiplying, as the reference implementation does.

`reference_linear` is the torch reference both are tested against (also on CPU, under
TRITON_INTERPRET=1, where Triton runs these kernels in numpy).
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import formats

GEMV_ROWS = 8     # rows of x up to which the streaming GEMV beats the tensor-core tiles


@triton.jit
def _load_weights(w_ptr, rn, rk, N, KW, BITS: tl.constexpr):
    """Integer weights Q[rn, columns of bytes rk] -> [BN, BK] (int8) or [BN, 2*BK] (int4, unpacked in
    column order: the high nibble of byte j is column 2j, its low nibble column 2j+1)."""
    mask = (rn[:, None] < N) & (rk[None, :] < KW)
    w = tl.load(w_ptr + rn[:, None].to(tl.int64) * KW + rk[None, :], mask=mask, other=0)
    if BITS == 4:
        hi = w >> 4                               # arithmetic shift: the sign of the high nibble
        lo = (w << 4).to(tl.int8) >> 4            # low nibble moved up, then shifted back signed
        w = tl.reshape(tl.join(hi, lo), (w.shape[0], 2 * w.shape[1]))
    return w


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, M, N, KW, stride_xm, stride_ym,
                 BITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # KW and BLOCK_K count weight bytes per row: columns for int8, column pairs for int4.
    COLS: tl.constexpr = 2 * BLOCK_K if BITS == 4 else BLOCK_K
    PER_BYTE: tl.constexpr = 2 if BITS == 4 else 1
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    # Products accumulate element-wise; the one cross-thread sum over K happens after the loop.
    acc = tl.zeros((BLOCK_M, BLOCK_N, COLS), dtype=tl.float32)
    for k0 in range(0, KW, BLOCK_K):
        w = _load_weights(w_ptr, rn, k0 + tl.arange(0, BLOCK_K), N, KW, BITS).to(tl.float32)
        rc = k0 * PER_BYTE + tl.arange(0, COLS)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rc[None, :],
                    mask=(rm[:, None] < M) & (rc[None, :] < KW * PER_BYTE), other=0.)
        acc += x.to(tl.float32)[:, None, :] * w[None, :, :]
    _store(tl.sum(acc, axis=2), scale_ptr, bias_ptr, y_ptr, rm, rn, M, N, stride_ym, HAS_BIAS)


@triton.jit
def _store(acc, scale_ptr, bias_ptr, y_ptr, rm, rn, M, N, stride_ym, HAS_BIAS: tl.constexpr):
    """y[rm, rn] = acc * scale[rn] (+ bias[rn]), rounded once to y's dtype."""
    scale = tl.load(scale_ptr + rn, mask=rn < N, other=0.).to(tl.float32)
    acc = acc * scale[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, M, N, KW, stride_xm, stride_ym,
                 BITS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    COLS: tl.constexpr = 2 * BLOCK_K if BITS == 4 else BLOCK_K
    PER_BYTE: tl.constexpr = 2 if BITS == 4 else 1
    # Grouped launch order: GROUP_M row tiles run next to each other over the same weight tiles, so a
    # weight tile is read from memory once and from L2 after that.
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = pid // (GROUP_M * tiles_n) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % rows
    pid_n = (pid % (GROUP_M * tiles_n)) // rows
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KW, BLOCK_K):
        w = _load_weights(w_ptr, rn, k0 + tl.arange(0, BLOCK_K), N, KW, BITS).to(DOT_DTYPE)
        rc = k0 * PER_BYTE + tl.arange(0, COLS)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rc[None, :],
                    mask=(rm[:, None] < M) & (rc[None, :] < KW * PER_BYTE), other=0.).to(DOT_DTYPE)
        if IEEE:   # fp32 models: full fp32 products, not the tensor cores' tf32
            acc = tl.dot(x, tl.trans(w), acc, input_precision='ieee')
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    _store(acc, scale_ptr, bias_ptr, y_ptr, rm, rn, M, N, stride_ym, HAS_BIAS)


@triton.jit
def _dequantize_kernel(w_ptr, scale_ptr, out_ptr, N, KW, BITS: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[N, K] = Q * scale[:, None], rounded once to out's dtype (formats.dequantize)."""
    COLS: tl.constexpr = 2 * BLOCK_K if BITS == 4 else BLOCK_K
    PER_BYTE: tl.constexpr = 2 if BITS == 4 else 1
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    w = _load_weights(w_ptr, rn, rk, N, KW, BITS).to(tl.float32)
    scale = tl.load(scale_ptr + rn, mask=rn < N, other=0.).to(tl.float32)
    rc = tl.program_id(1) * COLS + tl.arange(0, COLS)
    tl.store(out_ptr + rn[:, None].to(tl.int64) * (KW * PER_BYTE) + rc[None, :],
             (w * scale[:, None]).to(out_ptr.dtype.element_ty),
             mask=(rn[:, None] < N) & (rc[None, :] < KW * PER_BYTE))


# Launch shapes, tuned on an H100 (benchmarks/bench_gpu.py kernels --sweep prints the alternatives):
# per (bits, N, K) for the ChatGLM-6B-sized layers, a default for every other shape. BLOCK_K counts
# weight bytes; the GEMV's shrinks as rows grow, so that the products stay in registers.
GEMV_CONFIGS = {
    (8, 4608, 4096): {'BLOCK_N': 4, 'BLOCK_K': 512, 'num_warps': 4},
    (8, 4096, 4096): {'BLOCK_N': 8, 'BLOCK_K': 1024, 'num_warps': 4},
    (8, 27392, 4096): {'BLOCK_N': 4, 'BLOCK_K': 512, 'num_warps': 1},
    (8, 4096, 13696): {'BLOCK_N': 8, 'BLOCK_K': 1024, 'num_warps': 4},
    (4, 4608, 4096): {'BLOCK_N': 4, 'BLOCK_K': 256, 'num_warps': 4},
    (4, 4096, 4096): {'BLOCK_N': 4, 'BLOCK_K': 256, 'num_warps': 2},
    (4, 27392, 4096): {'BLOCK_N': 4, 'BLOCK_K': 256, 'num_warps': 2},
    (4, 4096, 13696): {'BLOCK_N': 4, 'BLOCK_K': 256, 'num_warps': 4},
    8: {'BLOCK_N': 8, 'BLOCK_K': 512, 'num_warps': 4},
    4: {'BLOCK_N': 4, 'BLOCK_K': 256, 'num_warps': 2},
}
GEMM_CONFIGS = {
    8: {'BLOCK_N': 32, 'BLOCK_K': 256, 'GROUP_M': 8, 'num_warps': 4, 'num_stages': 4},
    4: {'BLOCK_N': 32, 'BLOCK_K': 128, 'GROUP_M': 8, 'num_warps': 4, 'num_stages': 3},
}
TILE_ROWS = {8: 128, 4: 64}   # rows of x up to which the fused GEMM beats dequantise + cuBLAS
_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

# Prefill: the whole W dequantised into one buffer per (device, dtype), reused by every layer, then
# cuBLAS. The lock keeps two threads from interleaving dequantise and multiply (work on one stream
# then runs in launch order). Never used while a CUDA graph is captured: the buffer may be replaced.
_workspaces = {}
_workspace_lock = threading.Lock()


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias, bits: int,
                     gemv_config=None, gemm_config=None, tile_rows=None) -> torch.Tensor:
    """x [M, K] (contiguous rows), weight int8 [N, K] or int4 packed [N, K/2], scale [N], bias [N] or
    None -> y [M, N] in x's dtype."""
    if x.dtype not in _DOT_DTYPES:
        raise TypeError(f'quantized_linear takes fp16/bf16/fp32 activations, got {x.dtype}')
    M = x.shape[0]
    N, KW = weight.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    tile_rows = TILE_ROWS[bits] if tile_rows is None else tile_rows
    if M > tile_rows and x.is_cuda and not torch.cuda.is_current_stream_capturing():
        return _dequantized_matmul(x, weight, scale, bias, bits)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    bias_arg = bias if bias is not None else scale     # never read when HAS_BIAS is False
    if M <= GEMV_ROWS:
        cfg = dict(gemv_config or GEMV_CONFIGS.get((bits, N, x.shape[1])) or GEMV_CONFIGS[bits])
        block_m = triton.next_power_of_2(M)
        cfg['BLOCK_K'] = max(16, cfg['BLOCK_K'] // block_m)
        _gemv_kernel[(triton.cdiv(N, cfg['BLOCK_N']),)](
            x, weight, scale, bias_arg, y, M, N, KW, x.stride(0), y.stride(0),
            BITS=bits, HAS_BIAS=bias is not None, BLOCK_M=block_m, **cfg)
    else:
        cfg = dict(gemm_config or GEMM_CONFIGS[bits])
        if x.dtype == torch.float32 and gemm_config is None:   # fp32 tiles: twice the shared memory
            cfg['BLOCK_K'] //= 2
        cfg.setdefault('BLOCK_M', min(64, max(16, triton.next_power_of_2(M))))
        grid = (triton.cdiv(M, cfg['BLOCK_M']) * triton.cdiv(N, cfg['BLOCK_N']),)
        _gemm_kernel[grid](x, weight, scale, bias_arg, y, M, N, KW, x.stride(0), y.stride(0),
                           BITS=bits, HAS_BIAS=bias is not None, DOT_DTYPE=_DOT_DTYPES[x.dtype],
                           IEEE=x.dtype == torch.float32, **cfg)
    return y


def dequantize(weight, scale, bits, dtype, out=None):
    """Q, scale -> W [N, K] = Q * scale in `dtype` (into `out` when given)."""
    N, KW = weight.shape
    K = 2 * KW if bits == 4 else KW
    out = torch.empty(N, K, dtype=dtype, device=weight.device) if out is None else out
    block_n, block_k = 32, 128
    _dequantize_kernel[(triton.cdiv(N, block_n), triton.cdiv(KW, block_k))](
        weight, scale, out, N, KW, BITS=bits, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def _dequantized_matmul(x, weight, scale, bias, bits):
    N, KW = weight.shape
    K = 2 * KW if bits == 4 else KW
    with _workspace_lock:
        key = (x.device, x.dtype)
        buffer = _workspaces.get(key)
        if buffer is None or buffer.numel() < N * K:
            _workspaces[key] = None   # free the old one first
            buffer = _workspaces[key] = torch.empty(N * K, dtype=x.dtype, device=x.device)
        w = dequantize(weight, scale, bits, x.dtype, out=buffer[:N * K].view(N, K))
        return F.linear(x, w, bias)


def reference_linear(x, weight, scale, bias, bits):
    """The same function in torch, in fp32: integers times x, then the scale (as the kernels do)."""
    q = formats.unpack_int4(weight) if bits == 4 else weight
    y = F.linear(x.float(), q.float()) * scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
