"""Attention of a forward's new rows over the paged K/V pool (models/kv_cache.py), one call per layer.

Every part of a forward (a prompt chunk, or one decode token, of one sequence) reads its own page table;
query i of a part of s rows sees its first max(keys - (s - 1 - i), min_keys) keys. Where it runs:
  - CPU, fp32 or bf16: the compiled kernel (`attend_f32` / `attend_bf16`, quantization/kernels/attention.c
    and attention_avx512_bf16.c), every part in one call. A query's result depends only on its q and the
    keys it sees, never on the chunk, the batch or the thread count around it: a greedy reply is the same
    prefilled whole or in chunks, alone or batched.
  - CUDA, a step of decode tokens only: the Triton paged split-K kernel (triton_ops.paged_decode).
  - Anything else (prompt chunks on a GPU, fp16 on a CPU, no compiler): each part's keys gathered from
    the pool and torch's SDPA, or the family's own `fallback(q, k, v, visible)` (ChatGLM-6B's numerics).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..triton_support import optional


def paged(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, kv, scale: float,
          fallback: Optional[Callable] = None) -> torch.Tensor:
    """q [N, H, d] of a forward's new tokens over one layer's pool k_pool, v_pool [pages, G, d]
    (already holding the new K/V) -> [N, H, d]. kv: the forward's PagedKV (its parts and page tables)."""
    if q.device.type == 'cpu':
        out = compiled(q, k_pool, v_pool, kv, scale)
        if out is not None:
            return out
    elif q.is_cuda and fallback is None and kv.decode_only and (ops := optional('models.triton_ops')) is not None:
        return ops.paged_decode(q, k_pool, v_pool, kv.tables, kv.keys, scale)
    return gathered(q, k_pool, v_pool, kv, scale, fallback)


def compiled(q, k_pool, v_pool, kv, scale) -> Optional[torch.Tensor]:
    """The CPU kernel, or None where it does not apply (another dtype, autograd, no compiler)."""
    n, heads, d = q.shape
    groups = k_pool.shape[1]
    if (q.dtype not in (torch.float32, torch.bfloat16) or not q.dtype == k_pool.dtype == v_pool.dtype
            or (torch.is_grad_enabled() and q.requires_grad) or q.stride(2) != 1 or q.stride(1) != d
            or not (k_pool.is_contiguous() and v_pool.is_contiguous())):
        return None
    from ..quantization.build import load_library
    lib = load_library()
    if lib is None:
        return None
    kernel = lib.attend_f32 if q.dtype == torch.float32 else lib.attend_bf16
    out = torch.empty(n, heads, d, dtype=q.dtype)
    tables, pages = kv.kernel_tables()
    if not kernel(q.data_ptr(), q.stride(0), *pages, k_pool.data_ptr(), v_pool.data_ptr(), groups * d,
                  heads, groups, d, scale, out.data_ptr(), torch.get_num_threads()):
        return None
    return out


def gathered(q, k_pool, v_pool, kv, scale, fallback=None) -> torch.Tensor:
    """Part by part: its keys gathered from the pool, then SDPA (or the family's `fallback`)."""
    out = torch.empty_like(q)
    heads, groups = q.shape[1], k_pool.shape[1]
    keys = kv.host_keys if kv.host_keys is not None else kv.keys.tolist()
    min_keys = kv.min_keys.tolist() if kv.min_keys is not None else None
    for p in range(kv.parts):
        r0, r1, n = int(kv.rows[p]), int(kv.rows[p + 1]), keys[p]
        pages = kv.tables[p, :n].to(dtype=torch.long)
        k, v = (pool.index_select(0, pages).transpose(0, 1)[None] for pool in (k_pool, v_pool))   # [1, G, n, d]
        s = r1 - r0
        visible = causal_mask(s, n - s, q.device)
        if min_keys is not None:
            visible[:, :min_keys[p]] = True
        qp = q[r0:r1].transpose(0, 1)[None]                                                     # [1, H, s, d]
        if fallback is not None:
            o = fallback(qp, k, v, visible)
        else:
            k, v = (t.repeat_interleave(heads // groups, dim=1) for t in (k, v))
            o = F.scaled_dot_product_attention(qp, k, v, attn_mask=visible, scale=scale)
        out[r0:r1] = o[0].transpose(0, 1)
    return out


def causal_mask(s: int, past: int, device) -> torch.Tensor:
    """[s, past + s] bool: query i (after `past` earlier keys) may attend keys 0 .. past + i."""
    q = torch.arange(past, past + s, device=device)[:, None]
    k = torch.arange(past + s, device=device)[None, :]
    return k <= q
