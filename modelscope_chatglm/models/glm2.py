"""The ChatGLM2-6B / ChatGLM3-6B transformer, in plain PyTorch (formats docs/formats.md §3.2).

Shapes: N = the new tokens of every sequence in one forward (their rows side by side, batch 1),
H = query heads, G = key/value groups (multi-query attention), d = head dim, D = hidden size.
Tensors are batch-first here ([1, N, D]); the reference is sequence-first, which changes nothing.

A block is pre-norm:
    x = x + attention(rmsnorm(x))
    x = x + swiglu_mlp(rmsnorm(x))
Attention is multi-query with G groups: query head h reads K/V group h // (H/G). RoPE rotates the
first half of each head (d/2 dims) as interleaved pairs; the second half passes through.

Module names follow the hub checkpoints (`self_attention.query_key_value`, `mlp.dense_h_to_4h`, ...)
so that a state-dict key maps to a parameter by dropping the `transformer.`/`encoder.`/`embedding.`
prefixes (see `checkpoint_key`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..model_config import ModelConfig
from ..triton_support import optional
from . import cpu_ops
from .base import linears_keep_row_bits, lm_head, ragged_logits, score_whole


def fused_ops(*tensors: torch.Tensor):
    """RMSNorm and RoPE (and on the CPU SwiGLU) as one call each for the tensors' device: Triton kernels on
    CUDA (triton_ops.py), the compiled kernels on the CPU (cpu_ops.py); None where neither applies, and the torch code below runs.
    A decode step is mostly these small ops between the linears: one call each instead of a dozen."""
    if tensors[0].is_cuda:
        return optional('models.triton_ops')
    return cpu_ops if cpu_ops.applies(*tensors) else None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (ops := fused_ops(x, self.weight)) is not None:
            return ops.rms_norm(x, self.weight, self.eps)     # the same math, one kernel
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Mean of squares in fp32 whatever the model dtype, as the reference does.
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return (weight * (x * torch.rsqrt(variance + eps))).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin of position * theta_i for the rotated half of each head, computed in fp32."""

    def __init__(self, rotary_dim: int, base: float, position_divisor: float):
        super().__init__()
        self.rotary_dim, self.base, self.position_divisor = rotary_dim, base, position_divisor

    def forward(self, position_ids: torch.Tensor):
        """position_ids [b, s] -> cos, sin [b, s, rotary_dim/2] in fp32."""
        # theta_i = base^(-2i/rotary_dim), written as the reference does so fp32 tables agree bit
        # for bit. 32 numbers: recomputing them per call costs nothing and keeps no buffer to load.
        steps = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=position_ids.device)
        theta = 1.0 / (self.base ** (steps / self.rotary_dim))
        positions = position_ids.to(torch.float32) / self.position_divisor
        angles = positions[..., None] * theta
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, s, heads, d]; rotate dims [0, 2*cos.size(-1)) as pairs (x[2i], x[2i+1])."""
    rot = 2 * cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    pairs = x_rot.float().unflatten(-1, (rot // 2, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)
    return torch.cat([rotated.to(x.dtype), x_pass], dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        # Rows of the fused projection: [Q for all heads | K for all groups | V for all groups].
        self.query_key_value = nn.Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.add_qkv_bias)
        self.dense = nn.Linear(q_size, cfg.hidden_size, bias=False)
        self.split_sizes = (q_size, kv_size, kv_size)

    def forward(self, x, cos, sin, kv):
        """x [1, N, D]: the new rows of every part of a forward; kv: this layer's handle on the K/V pool."""
        b, n, _ = x.shape
        qkv = self.query_key_value(x)
        if (ops := fused_ops(qkv)) is not None:
            # Q and K heads are adjacent in each row: rotate them all in place, in one kernel.
            qkv = qkv.contiguous()
            ops.rotary_qk_(qkv, cos, sin, self.num_heads + self.num_kv_heads, self.head_dim)
            q, k, v = (t.view(n, -1, self.head_dim) for t in qkv[0].split(self.split_sizes, dim=-1))
        else:
            q, k, v = qkv.split(self.split_sizes, dim=-1)
            q = apply_rotary(q.view(b, n, self.num_heads, self.head_dim), cos, sin)[0]
            k = apply_rotary(k.view(b, n, self.num_kv_heads, self.head_dim), cos, sin)[0]
            v = v.view(n, self.num_kv_heads, self.head_dim)
        # The pool keeps the compact G-group K/V (post-RoPE).
        out = kv.attend(q, k, v, self.head_dim ** -0.5)          # [N, H, d]
        return self.dense(out.reshape(b, n, -1))


class MLP(nn.Module):
    """SwiGLU: the first half of dense_h_to_4h is the gate, the second half the value."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, 2 * cfg.ffn_hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        h = self.dense_h_to_4h(x)
        if (ops := fused_ops(h)) is not None and hasattr(ops, 'swiglu'):   # (the CPU's; Triton has none)
            return self.dense_4h_to_h(ops.swiglu(h))   # the same math, one kernel
        gate, up = h.chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.self_attention = SelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.mlp = MLP(cfg)

    def runs_as_written(self) -> bool:
        """Whether this block computes what this file writes: its own classes (no subclass, no module
        replaced), no forward replaced on an instance, no hooks. cpu_ops.glm2_layers, which runs the same
        math in C and would skip all of those, asks."""
        if not (type(self) is GLMBlock and type(self.self_attention) is SelfAttention and type(self.mlp) is MLP
                and type(self.input_layernorm) is RMSNorm and type(self.post_attention_layernorm) is RMSNorm):
            return False
        return not any(m._forward_hooks or m._forward_pre_hooks or 'forward' in vars(m) for m in self.modules())

    def forward(self, x, cos, sin, kv):
        # The definition. block_ops.c's glm2_layers runs these modules' kernels in this order (GLM2Model.
        # forward_tokens; tests/test_block_ops.py holds it to their bits): a change here is a change there.
        x = x + self.self_attention(self.input_layernorm(x), cos, sin, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class PrefixEncoder(nn.Module):
    """P-tuning v2: a learned K/V prefix of `pre_seq_len` tokens for every layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        kv_size = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim
        self.embedding = nn.Embedding(cfg.pre_seq_len, kv_size)
        self.trans = nn.Sequential(nn.Linear(kv_size, cfg.hidden_size), nn.Tanh(),
                                   nn.Linear(cfg.hidden_size, kv_size)) if cfg.prefix_projection else None

    def forward(self) -> torch.Tensor:
        """-> [pre_seq_len, layers * 2 * heads * d]"""
        prefix = self.embedding.weight
        return prefix if self.trans is None else self.trans(prefix)


class GLM2Model(nn.Module):
    """Token ids in, hidden states or logits out; implements models/base.py's CausalLM. Generation
    lives in the engine (engine/)."""

    # The four linears of each block that int8/int4 checkpoints quantize (relative to a GLMBlock).
    QUANTIZED_LINEARS = ('self_attention.query_key_value', 'self_attention.dense',
                         'mlp.dense_h_to_4h', 'mlp.dense_4h_to_h')

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg.head_dim // 2, cfg.rope_base, cfg.rope_position_divisor)
        self.layers = nn.ModuleList(GLMBlock(cfg) for _ in range(cfg.num_layers))
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.output_layer = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.prefix_encoder = PrefixEncoder(cfg) if cfg.pre_seq_len else None

    # -- checkpoint mapping -------------------------------------------------------------------------
    @staticmethod
    def checkpoint_key(key: str) -> Optional[str]:
        """Hub state-dict key -> our parameter name; None for keys the forward never reads."""
        if key.endswith('rotary_pos_emb.inv_freq'):
            return None     # the table is recomputed from the config (docs/formats.md §2.3)
        for prefix in ('transformer.encoder.', 'transformer.embedding.', 'transformer.'):
            if key.startswith(prefix):
                return key[len(prefix):]
        return key

    @staticmethod
    def hub_key(name: str) -> str:
        """Our parameter name -> the hub's state-dict key: the inverse of `checkpoint_key` (export)."""
        if name.startswith('word_embeddings.'):
            return 'transformer.embedding.' + name
        if name.startswith(('layers.', 'final_layernorm.')):
            return 'transformer.encoder.' + name
        return 'transformer.' + name      # output_layer, prefix_encoder

    # -- forward -----------------------------------------------------------------------------------
    def forward_ragged(self, parts, kv, every=()) -> torch.Tensor:
        """New tokens of several sequences in one forward: parts = [(state, past, ids), ...], each part's
        ids [s] following `past` positions of its sequence; kv: the forward's PagedKV (each part's page
        table, the new tokens' pages). The linears see every row at once (the weights are read once for
        all), each layer's attention is one call over every part. -> logits of each part's last token
        [n, V] (fp32), then those of every position of the parts in `every` (base.ragged_logits)."""
        lengths = [len(ids) for _, _, ids in parts]
        ids = torch.cat([torch.as_tensor(ids, dtype=torch.long) for _, _, ids in parts])
        positions = torch.cat([torch.arange(past, past + n) for (_, past, _), n in zip(parts, lengths)])
        hidden = self.forward_tokens(ids.to(self.device), positions.to(self.device), kv)
        return ragged_logits(self, hidden, lengths, every)

    def forward_tokens(self, ids: torch.Tensor, positions: torch.Tensor, kv) -> torch.Tensor:
        """ids, positions [N] (on the model's device) of a forward's new rows -> the last block's output
        [N, D]. Tensor operations only on a GPU: with fixed shapes, the step a CUDA graph captures
        (engine/graphs.py). On the CPU, quantized blocks may all run in one C call (cpu_ops.glm2_layers)."""
        x = self.word_embeddings(ids[None]).to(self.dtype)   # stored as the checkpoint's fp16 when quantized
        cos, sin = self.rotary(positions[None])
        if x.is_cpu and (y := cpu_ops.glm2_layers(self.layers, x, cos, sin, kv)) is not None:
            return y[0]   # every block in one call: the modules' kernels in their order (cpu_ops.py)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv.layer(i))
        return x[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return lm_head(hidden, self.output_layer.weight)

    @property
    def device(self) -> torch.device:
        return self.word_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.final_layernorm.weight.dtype

    supports_prefix_reuse = True   # causal attention: the K/V of a prefix do not depend on what follows
    cuda_graphs = True             # on CUDA the engine may replay decode steps from graphs (loading.py sets it)

    @property
    def kv_heads(self) -> int:
        return self.cfg.num_kv_heads

    def start(self, prompt):
        """A sequence's state: nothing beyond its positions, which the engine counts."""
        return None

    def prefix_kv(self) -> torch.Tensor:
        """P-tuning v2: the prefix encoder's output as [layers, 2 (k, v), G, pre_seq_len, d] (already-rotated
        keys and values, which is how the reference feeds it)."""
        cfg = self.cfg
        prefix = self.prefix_encoder().view(cfg.pre_seq_len, cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim)
        return prefix.permute(1, 2, 3, 0, 4)

    def rows_keep_their_bits(self, rows: int) -> bool:
        return linears_keep_row_bits(self.layers, rows, self.dtype)

    def full_logits(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Logits at every position [b, s, V] (fp32) of left-padded prompts, for scoring and parity tests."""
        return score_whole(self, input_ids, attention_mask)
