"""The per-row ops of a GLM2/3 block on the CPU, one call each into the compiled kernels
(quantization/kernels/block_ops.c): the CPU twins of triton_ops.py's `rms_norm` and `rotary_qk_`, with the
same signatures, for fp32 and bf16 rows.

In torch, RMSNorm is eight small ops and RoPE about fifteen for q and k; a decode step pays microseconds
of dispatch for each, 28 layers over, with their code and data cold after the weights streamed through
the caches (measured: benchmarks/README.md, "Zen 4, after the block ops").
The math is glm2.py's (`rms_norm`, `apply_rotary`), which tests/test_block_ops.py holds these to: RoPE
bit for bit, RMSNorm up to the order of its sum of squares.
"""
from __future__ import annotations

import torch

from ..quantization.build import load_library


def applies(*tensors: torch.Tensor) -> bool:
    """Whether these CPU kernels take the tensors: fp32 or bf16 alike, on the CPU, no autograd to record,
    and a compiled library (else glm2.py runs its torch code)."""
    dtype = tensors[0].dtype
    if dtype not in (torch.float32, torch.bfloat16) or any(t.dtype != dtype or t.device.type != 'cpu' for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return load_library() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x * rsqrt(mean(x^2) + eps) over the last dim, in fp32, rounded once to x's dtype."""
    shape, width = x.shape, x.shape[-1]
    x2 = x.reshape(-1, width)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype)
    lib = load_library()
    kernel = lib.rms_norm_bf16 if x.dtype == torch.bfloat16 else lib.rms_norm_f32
    kernel(x2.data_ptr(), x2.stride(0), x2.shape[0], width, w.data_ptr(), eps, y.data_ptr(), width,
           torch.get_num_threads())
    return y.view(shape)


def rotary_qk_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int) -> None:
    """Rotate, in place, the first `heads` heads of each row of qkv [b, s, >= heads * head_dim] (contiguous):
    pairs (2i, 2i+1) for i < cos.shape[-1]; cos/sin [b, s, pairs] fp32."""
    b, s, width = qkv.shape
    pairs = cos.shape[-1]
    cos, sin = cos.reshape(b * s, pairs).contiguous(), sin.reshape(b * s, pairs).contiguous()
    lib = load_library()
    kernel = lib.rotary_bf16 if qkv.dtype == torch.bfloat16 else lib.rotary_f32
    kernel(qkv.data_ptr(), width, b * s, heads, head_dim, cos.data_ptr(), sin.data_ptr(), pairs)
