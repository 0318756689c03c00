"""The per-row ops of a GLM2/3 block on the CPU, one call each into the compiled kernels
(quantization/kernels/block_ops.c): the CPU twins of triton_ops.py's `rms_norm` and `rotary_qk_`, with the
same signatures, for fp32 and bf16 rows; `swiglu`, the MLP's silu(gate) * up; and `glm2_layers`, every
block of a forward with int8 activations in one call.

In torch, RMSNorm is eight small ops and RoPE about fifteen for q and k; a decode step pays microseconds
of dispatch for each, 28 layers over, with their code and data cold after the weights streamed through
the caches (measured: benchmarks/README.md, "Zen 4, after the block ops").
The math is glm2.py's (`rms_norm`, `apply_rotary`, MLP's silu(gate) * up), which tests/test_block_ops.py
holds these to: RoPE bit for bit, RMSNorm up to the order of its sum of squares, SwiGLU up to its exp.
"""
from __future__ import annotations

from typing import Optional

import torch

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


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of h [..., 2F] (gate the first half) -> [..., F]: glm2.py's MLP, in one call
    (block_ops.c's swiglu; its exp is ours, so the last bit can differ from torch's)."""
    shape, width = h.shape, h.shape[-1]
    h2 = h.reshape(-1, width).contiguous()
    s = torch.empty(h2.shape[0], width // 2, dtype=h.dtype)
    lib = load_library()
    (lib.swiglu_bf16 if h.dtype == torch.bfloat16 else lib.swiglu_f32)(h2.data_ptr(), h2.shape[0], width // 2,
                                                                       s.data_ptr(), torch.get_num_threads())
    return s.view(*shape[:-1], width // 2)


def _linears(block) -> tuple:
    """A GLMBlock's four linears, in the order of build.py's GLM2Layer."""
    attn, mlp = block.self_attention, block.mlp
    return attn.query_key_value, attn.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h


def _takes(block, x: torch.Tensor) -> bool:
    """Whether glm2_layers can run this GLMBlock for rows x as its modules would: the block as glm2.py
    writes it (GLMBlock.runs_as_written: no subclass, no module or forward replaced, no hooks, which would
    not run), its four linears QuantizedLinear with int8 activations (not an adapter's wrapper), and the
    shapes and layouts the C reads, as the modules would check them by failing."""
    linears = _linears(block)
    if not all(type(lin) is QuantizedLinear and lin.int8_activations and lin.weight.is_cpu
               and lin.bits == linears[0].bits for lin in linears):
        return False    # (first: a float model leaves here)
    if not block.runs_as_written():
        return False
    attn, norm1, norm2 = block.self_attention, block.input_layernorm, block.post_attention_layernorm
    heads, groups, d, width = attn.num_heads, attn.num_kv_heads, attn.head_dim, x.shape[-1]
    return (applies(x, norm1.weight, norm2.weight)
            and all(n.weight.shape == (width,) and n.weight.is_contiguous() for n in (norm1, norm2))
            and linears[0].in_features == width and linears[0].out_features == (heads + 2 * groups) * d
            and linears[1].in_features == heads * d and linears[1].out_features == width
            and linears[2].in_features == width and linears[2].out_features == 2 * linears[3].in_features
            and linears[3].out_features == width)


def _pool_takes(kv, x: torch.Tensor, blocks) -> bool:
    """Whether the C can read and write the forward's K/V as the modules would: KVPool's [layers, slots, G, d]
    for K and V alike, contiguous, x's dtype, on the CPU, a layer per block; a write slot (int64) per row."""
    pool, attn, n = kv.pool, blocks[0].self_attention, x.shape[1]
    return (pool.k.dtype == pool.v.dtype == x.dtype and pool.k.device.type == pool.v.device.type == 'cpu'
            and pool.k.shape == pool.v.shape and pool.k.is_contiguous() and pool.v.is_contiguous()
            and pool.k.shape[0] >= len(blocks) and pool.k.shape[2:] == (attn.num_kv_heads, attn.head_dim)
            and kv.write.dtype == torch.int64 and kv.write.is_contiguous() and kv.write.shape == (n,))


def _no_global_hooks() -> bool:
    """No forward hook registered for every module (torch.nn.modules.module.register_module_forward_hook)."""
    module = torch.nn.modules.module
    return not (getattr(module, '_global_forward_hooks', None) or getattr(module, '_global_forward_pre_hooks', None))


def _layer(block, dtype: torch.dtype, keep: list) -> GLM2Layer:
    """The C's view of a block (build.py's GLM2Layer); `keep` holds the fp32 scales and biases it points to."""
    attn, norm1, norm2 = block.self_attention, block.input_layernorm, block.post_attention_layernorm

    def operands(lin):
        scale, bias = lin.fp32_scale_and_bias()
        keep.extend((scale, bias))
        return X8Linear(lin.weight.data_ptr(), scale.data_ptr(), None if bias is None else bias.data_ptr(),
                        lin.out_features, lin.in_features, int(lin.lane_layout))
    linears = _linears(block)
    return GLM2Layer(linears[0].bits, int(dtype == torch.bfloat16), attn.num_heads, attn.num_kv_heads, attn.head_dim,
                     norm1.eps, norm2.eps, attn.head_dim ** -0.5, norm1.weight.data_ptr(), norm2.weight.data_ptr(),
                     *map(operands, linears))


def glm2_layers(blocks, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv) -> Optional[torch.Tensor]:
    """x [1, N, D] through every GLMBlock of `blocks` (glm2.py; block i holds layer i of the K/V pool) in
    one call, glm2_layers (block_ops.c: the same kernels in the same order as the blocks' modules, so the
    same bits); kv: the forward's PagedKV. None where it does not apply to every block (_takes) or the C
    declines, and the blocks run their modules one by one. Why: benchmarks/README.md, "All blocks in one
    call"."""
    if not (len(blocks) and all(_takes(block, x) for block in blocks) and _pool_takes(kv, x, blocks)
            and _no_global_hooks()):
        return None
    pool = kv.pool
    keep = []   # the fp32 scales and biases the call reads, alive until it returns
    layers = (GLM2Layer * len(blocks))(*(_layer(block, x.dtype, keep) for block in blocks))
    n, width, pairs = x.shape[1], x.shape[-1], cos.shape[-1]
    x0 = x.reshape(n, width).contiguous()
    cos, sin = cos.reshape(n, pairs).contiguous(), sin.reshape(n, pairs).contiguous()
    tables, pages = kv.kernel_tables()
    y = torch.empty_like(x0)
    lib = load_library()
    if not lib.glm2_layers(layers, len(blocks), x0.data_ptr(), n, cos.data_ptr(), sin.data_ptr(), pairs, *pages,
                           pool.k.data_ptr(), pool.v.data_ptr(), pool.k.shape[1], pool.k.stride(0),
                           kv.write.data_ptr(), y.data_ptr(), torch.get_num_threads()):
        return None
    return y.view(1, n, width)
