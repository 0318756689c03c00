"""The per-row ops of a GLM2/3 block on the CPU, one call each into the compiled kernels
(quantization/kernels/block_ops.c): the CPU twins of triton_ops.py's `rms_norm` and `rotary_qk_`, with the
same signatures, for fp32 and bf16 rows; and `glm2_block`, a whole block with int8 activations in two calls.

In torch, RMSNorm is eight small ops and RoPE about fifteen for q and k; a decode step pays microseconds
of dispatch for each, 28 layers over, with their code and data cold after the weights streamed through
the caches (measured: benchmarks/README.md, "Zen 4, after the block ops").
The math is glm2.py's (`rms_norm`, `apply_rotary`), which tests/test_block_ops.py holds these to: RoPE
bit for bit, RMSNorm up to the order of its sum of squares.
"""
from __future__ import annotations

import ctypes
from typing import Optional

import torch
import torch.nn.functional as F

from ..quantization.build import GLM2Layer, X8Linear, load_library
from ..quantization.linear import QuantizedLinear


def applies(*tensors: torch.Tensor) -> bool:
    """Whether these CPU kernels take the tensors: fp32 or bf16 alike, on the CPU, no autograd to record,
    and a compiled library (else glm2.py runs its torch code)."""
    dtype = tensors[0].dtype
    if dtype not in (torch.float32, torch.bfloat16):
        return False
    for t in tensors:   # a loop, not any(...): a decode step asks this ~90 times a token
        if t.dtype != dtype or not t.is_cpu or (t.requires_grad and torch.is_grad_enabled()):
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


def glm2_block(block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv) -> Optional[torch.Tensor]:
    """x [1, N, D] through a whole GLMBlock (glm2.py) in two calls, glm2_attention_half and glm2_mlp_half
    (block_ops.c: the same kernels in the same order as the block's modules, so the same bits), with
    torch's silu(gate) * up between them, as MLP computes it. None where they do not apply, and the block
    runs its modules one by one: its four linears must be QuantizedLinear with int8 activations (not an
    adapter's wrapper), no module of the block may have hooks (they would not run), x fp32 or bf16 on
    the CPU with no autograd, the K/V pool of x's dtype and the attention GLM2's own (kv: the layer's
    _LayerKV handle). Why: benchmarks/README.md, "One call per half block"."""
    attn, mlp = block.self_attention, block.mlp
    linears = (attn.query_key_value, attn.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h)
    if not all(type(lin) is QuantizedLinear and lin.int8_activations and lin.weight.is_cpu
               and lin.bits == linears[0].bits for lin in linears):
        return None     # (first: a float model leaves here)
    norm1, norm2 = block.input_layernorm, block.post_attention_layernorm
    paged, pool = kv.kv, kv.kv.pool
    heads, groups, d, width = attn.num_heads, attn.num_kv_heads, attn.head_dim, x.shape[-1]
    if (kv.attend_fallback is not None or pool.dtype != x.dtype or pool.device.type != 'cpu'
            or not applies(x, norm1.weight, norm2.weight)
            or any(m._forward_hooks or m._forward_pre_hooks for m in (block, attn, mlp, norm1, norm2, *linears))
            # the shapes the C reads from the struct, as the modules would check them by failing
            or linears[0].in_features != width or linears[0].out_features != (heads + 2 * groups) * d
            or linears[1].in_features != heads * d or linears[1].out_features != width
            or linears[2].in_features != width or linears[2].out_features != 2 * linears[3].in_features
            or linears[3].out_features != width):
        return None
    keep = []   # the fp32 scales and biases the call reads, alive until it returns

    def operands(lin):
        scale, bias = lin.fp32_scale_and_bias()
        keep.extend((scale, bias))
        return X8Linear(lin.weight.data_ptr(), scale.data_ptr(), None if bias is None else bias.data_ptr(),
                        lin.out_features, lin.in_features, int(lin.lane_layout))
    layer = GLM2Layer(linears[0].bits, int(x.dtype == torch.bfloat16), heads, groups, d, norm1.eps, norm2.eps,
                      d ** -0.5, norm1.weight.data_ptr(), norm2.weight.data_ptr(), *map(operands, linears))
    n, pairs = x.shape[1], cos.shape[-1]
    x0 = x.reshape(n, width).contiguous()
    cos, sin = cos.reshape(n, pairs).contiguous(), sin.reshape(n, pairs).contiguous()
    tables, pages = paged.kernel_tables()
    k_pool, v_pool = pool.k[kv.index], pool.v[kv.index]     # [slots, G, d], contiguous
    x1 = torch.empty_like(x0)
    gu = torch.empty(n, linears[2].out_features, dtype=x.dtype)
    lib, threads = load_library(), torch.get_num_threads()
    if not lib.glm2_attention_half(ctypes.byref(layer), x0.data_ptr(), n, cos.data_ptr(), sin.data_ptr(), pairs,
                                   *pages, k_pool.data_ptr(), v_pool.data_ptr(), k_pool.shape[0],
                                   paged.write.data_ptr(), x1.data_ptr(), gu.data_ptr(), threads):
        return None
    gate, up = gu.chunk(2, dim=-1)
    s = F.silu(gate) * up
    y = torch.empty_like(x0)
    if not lib.glm2_mlp_half(ctypes.byref(layer), s.data_ptr(), x1.data_ptr(), n, y.data_ptr(), threads):
        return None
    return y.view(1, n, width)
