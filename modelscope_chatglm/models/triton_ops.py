"""Fused GPU kernels for the GLM2/3 block, in Triton; glm2.py calls them on CUDA tensors.

A decode step is memory-bound and short: launched as the ~50 small torch kernels per block that
RMSNorm (six), RoPE (a dozen for q and k) and masked attention take, the GPU spends more time
between kernels than in them, even replayed from a CUDA graph. Each op here is one kernel:

- `rms_norm`: y = weight * x * rsqrt(mean(x^2) + eps), in fp32, rounded once (as glm2.RMSNorm).
- `rotary_qk_`: RoPE in place on the Q and K heads of the fused QKV projection's output (their
  heads are adjacent in each row), computed in fp32 (as glm2.apply_rotary).
- `paged_decode`: one query per head of each sequence against its pages of the K/V pool, split over
  the keys (flash-decoding): program (sequence, K/V group, split) scores its chunk for all H/G query
  heads of the group with one `tl.dot`, keeps a running max and sum, and a second kernel merges the
  splits. Each key's page comes from the sequence's page table and the number of keys from a device
  tensor, so the launch shape is fixed by the table's width (a CUDA graph can replay it) while the work
  follows the real length: chunks past the last key do nothing.

The torch code (glm2.py, models/attention.py `gathered`) is the reference each is tested against
(tests/test_gpu.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, D, stride_x, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=mask, other=0.).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.).to(tl.float32)
    tl.store(y_ptr + row.to(tl.int64) * D + cols, (w * (x * r)).to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    D = x.shape[-1]
    x2 = x.reshape(-1, D)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    _rms_norm_kernel[(x2.shape[0],)](x2, weight, y, D, x2.stride(0), eps, BLOCK=triton.next_power_of_2(D),
                                     num_warps=4)
    return y.view(x.shape)


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, HEADS, stride_tok, head_dim, PAIRS,
                   BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr):
    tok = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    pairs = tl.arange(0, BLOCK_P)
    c = tl.load(cos_ptr + tok * PAIRS + pairs, mask=pairs < PAIRS, other=1.)
    s = tl.load(sin_ptr + tok * PAIRS + pairs, mask=pairs < PAIRS, other=0.)
    ptr = x_ptr + tok.to(tl.int64) * stride_tok + heads[:, None] * head_dim + 2 * pairs[None, :]
    mask = (heads[:, None] < HEADS) & (pairs[None, :] < PAIRS)
    x0 = tl.load(ptr, mask=mask, other=0.)
    x1 = tl.load(ptr + 1, mask=mask, other=0.)
    a, b = x0.to(tl.float32), x1.to(tl.float32)
    tl.store(ptr, (a * c[None, :] - b * s[None, :]).to(x0.dtype), mask=mask)
    tl.store(ptr + 1, (b * c[None, :] + a * s[None, :]).to(x0.dtype), mask=mask)


def rotary_qk_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int) -> None:
    """Rotate, in place, the first `heads` heads of each row of qkv [b, s, >= heads * head_dim]: pairs
    (2i, 2i+1) for i < cos.shape[-1]; cos/sin [b, s, pairs] fp32."""
    b, s, width = qkv.shape
    rows = qkv.view(b * s, width)
    pairs = cos.shape[-1]
    cos, sin = cos.reshape(b * s, pairs).contiguous(), sin.reshape(b * s, pairs).contiguous()
    block_h = 16
    _rotary_kernel[(b * s, triton.cdiv(heads, block_h))](rows, cos, sin, heads, rows.stride(0), head_dim, pairs,
                                                         BLOCK_P=triton.next_power_of_2(pairs), BLOCK_H=block_h,
                                                         num_warps=4)


@triton.jit
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, table_ptr, keys_ptr, o_ptr, ml_ptr,
                         G, QH, D, CHUNK, SPLITS, stride_table, stride_page, sm_scale, IEEE: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    # IEEE: fp32 models multiply in full fp32, not the tensor cores' tf32
    bg = tl.program_id(0)          # sequence * G + group
    split = tl.program_id(1)
    seq = bg // G
    group = bg % G
    n_keys = tl.load(keys_ptr + seq)
    hs = tl.arange(0, BLOCK_H)
    ds = tl.arange(0, BLOCK_D)
    # The group's H/G query heads, as rows of one tile: q is [b, H, d], group g owns heads g*QH + i.
    q = tl.load(q_ptr + (bg * QH + hs[:, None]) * D + ds[None, :],
                mask=(hs[:, None] < QH) & (ds[None, :] < D), other=0.)
    m = tl.full((BLOCK_H,), float('-inf'), tl.float32)
    l = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, n_keys)
    for t0 in range(start, end, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        live = ts < end
        # Key j of this sequence lives in pool page table[seq, j]: one row [G, d] per page.
        pages = tl.load(table_ptr + seq.to(tl.int64) * stride_table + ts, mask=live, other=0)
        offs = pages[:, None].to(tl.int64) * stride_page + group * D + ds[None, :]
        kv_mask = live[:, None] & (ds[None, :] < D)
        k = tl.load(k_ptr + offs, mask=kv_mask, other=0.)
        v = tl.load(v_ptr + offs, mask=kv_mask, other=0.)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision='ieee') * sm_scale
        else:
            scores = tl.dot(q, tl.trans(k)) * sm_scale
        scores = tl.where(live[None, :], scores, float('-inf'))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)   # a row with nothing visible yet
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        l = l * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision='ieee')
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    out = (bg * SPLITS + split) * BLOCK_H + hs
    tl.store(o_ptr + out[:, None] * BLOCK_D + ds[None, :], acc)
    tl.store(ml_ptr + out * 2, m)
    tl.store(ml_ptr + out * 2 + 1, l)


@triton.jit
def _decode_merge_kernel(o_ptr, ml_ptr, y_ptr, QH, D, SPLITS,
                         BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    bg = tl.program_id(0)
    h = tl.program_id(1)
    ss = tl.arange(0, BLOCK_S)
    ds = tl.arange(0, BLOCK_D)
    row = (bg * SPLITS + ss) * BLOCK_H + h
    live = ss < SPLITS
    m = tl.load(ml_ptr + row * 2, mask=live, other=float('-inf'))
    l = tl.load(ml_ptr + row * 2 + 1, mask=live, other=0.)
    top = tl.max(m, axis=0)
    w = tl.where(m == float('-inf'), 0.0, tl.exp(m - top))   # empty splits weigh nothing
    o = tl.load(o_ptr + row[:, None] * BLOCK_D + ds[None, :], mask=live[:, None], other=0.)
    y = tl.sum(o * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(y_ptr + (bg * QH + h) * D + ds, y.to(y_ptr.dtype.element_ty), mask=ds < D)


def paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                 keys: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per sequence (a decode step) over the paged pool: q [b, H, d]; k_pool, v_pool [pages, G, d]
    (one layer); sequence i reads pages tables[i, :keys[i]] (int32, on the device). -> [b, H, d].

    Split-K: each (sequence, group) program covers one chunk of the table's width, and a second kernel
    merges the chunks' partial softmax sums, so a long context keeps every SM busy. Every size the grid
    depends on comes from the tables' shape, never from their values: a CUDA graph replays it as is."""
    b, heads, d = q.shape
    groups, width = k_pool.shape[1], tables.shape[1]
    assert k_pool.is_contiguous() and v_pool.is_contiguous() and tables.stride(1) == 1
    qh = heads // groups
    chunk = max(64, triton.next_power_of_2(width) // 64)   # at most 64 splits
    splits = triton.cdiv(width, chunk)
    block_h, block_d = max(16, triton.next_power_of_2(qh)), max(16, triton.next_power_of_2(d))
    q = q.contiguous()
    partial = torch.empty(b * groups * splits * block_h, block_d, dtype=torch.float32, device=q.device)
    ml = torch.empty(b * groups * splits * block_h, 2, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(b * groups, splits)](
        q, k_pool, v_pool, tables, keys, partial, ml, groups, qh, d, chunk, splits, tables.stride(0),
        k_pool.stride(0), scale, q.dtype == torch.float32,
        BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_T=64, num_warps=4)
    out = torch.empty(b, heads, d, dtype=q.dtype, device=q.device)
    _decode_merge_kernel[(b * groups, qh)](partial, ml, out, qh, d, splits, BLOCK_H=block_h, BLOCK_D=block_d,
                                           BLOCK_S=max(2, triton.next_power_of_2(splits)), num_warps=4)
    return out
