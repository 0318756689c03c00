"""The ChatGLM2-6B / ChatGLM3-6B transformer, in plain PyTorch (formats docs/formats.md §3.2).

Shapes: b = batch, s = new tokens in this call, t = all tokens the cache holds after it,
H = query heads, G = key/value groups (multi-query attention), d = head dim, D = hidden size.
Tensors are batch-first here ([b, s, D]); the reference is sequence-first, which changes nothing.

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

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import CausalBias, causal_lower_right

from ..model_config import ModelConfig
from ..triton_support import optional
from . import kv_cache
from .base import linears_keep_row_bits, lm_head, ragged_logits
from .kv_cache import KVCache, KVSegment, Ragged


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and (ops := optional('models.triton_ops')) is not None:
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

    def forward(self, x, cos, sin, kv, attn_mask):
        b, s, _ = x.shape
        qkv = self.query_key_value(x)
        if qkv.is_cuda and (ops := optional('models.triton_ops')) is not None:
            # Q and K heads are adjacent in each row: rotate them all in place, in one kernel.
            ops.rotary_qk_(qkv, cos, sin, self.num_heads + self.num_kv_heads, self.head_dim)
            q, k, v = (t.view(b, s, -1, self.head_dim) for t in qkv.split(self.split_sizes, dim=-1))
        else:
            q, k, v = qkv.split(self.split_sizes, dim=-1)
            q = apply_rotary(q.view(b, s, self.num_heads, self.head_dim), cos, sin)
            k = apply_rotary(k.view(b, s, self.num_kv_heads, self.head_dim), cos, sin)
            v = v.view(b, s, self.num_kv_heads, self.head_dim)
        # The cache keeps the compact G-group K/V (post-RoPE): [b, G, t, d].
        if isinstance(kv, Ragged):     # rows of several sequences: each attends over its own cache
            out = kv.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attend)
        else:
            k, v = kv.update(k.transpose(1, 2), v.transpose(1, 2))
            out = attend(q.transpose(1, 2), k, v, attn_mask)           # [b, H, s, d]
        return self.dense(out.transpose(1, 2).reshape(b, s, -1))


def attend(q, k, v, attn_mask):
    """Softmax attention of q [b, H, s, d] over the G-group k, v [b, G, t, d] -> [b, H, s, d].

    attn_mask: None (no padding: causal when s > 1 and nothing is cached, else all visible), a
    lower-right `CausalBias` (a chunk after cached positions), a bool [b, 1, s, t] (True = may attend;
    padding), or a `DecodeWindow` (the static decode step)."""
    b, heads, s, d = q.shape
    groups = k.shape[1]
    if isinstance(attn_mask, DecodeWindow):
        if q.is_cuda and (ops := optional('models.triton_ops')) is not None:
            out = ops.decode_attention(q.reshape(b, heads, d), k, v, attn_mask.slot, attn_mask.key_ok)
            return out.view(b, heads, 1, d)
        attn_mask = attn_mask.mask()
    if attn_mask is None or isinstance(attn_mask, CausalBias):   # causal, lower-right
        if (out := compiled_attention(q, k, v)) is not None:
            return out
    if isinstance(attn_mask, CausalBias):
        if not q.is_cuda:
            attn_mask = causal_mask(s, k.shape[2] - s, q.device)
        else:
            # The fused kernels take a lower-right causal bias but not grouped K/V: expand the groups.
            k, v = (t.repeat_interleave(heads // groups, dim=1) for t in (k, v))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    if s == 1:
        # One query per head (decode): the H/G heads of a group read the same K/V, so lay them out as
        # H/G query rows of G heads. Plain SDPA then needs neither expanded K/V nor `enable_gqa`, which
        # on CPU in bf16 takes a slow path: 567 against 41 us per call at 160 cached positions, 3.4
        # against 0.19 ms at 1,000 (16 bf16 sequences' decode step spent 247 of its 926 ms there).
        out = F.scaled_dot_product_attention(q.view(b, groups, heads // groups, d), k, v, attn_mask=attn_mask)
        return out.reshape(b, heads, 1, d)
    if attn_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)


def causal_mask(s, past, device) -> torch.Tensor:
    """[s, past + s] bool: query i (after `past` cached positions) may attend keys 0 .. past + i."""
    q = torch.arange(past, past + s, device=device)[:, None]
    k = torch.arange(past + s, device=device)[None, :]
    return k <= q


def compiled_attention(q, k, v) -> Optional[torch.Tensor]:
    """Causal (lower-right) attention of one bf16 sequence on the CPU kernel (quant_kernels.c
    `attend_bf16`): q [1, H, s, d] with each position's heads side by side, as the QKV projection
    leaves them; k, v [1, G, t, d] views of the cache. -> [1, H, s, d], or None where the kernel does
    not apply (another device or dtype, a batch, autograd, a build without AVX512-BF16): then SDPA.

    Prompt chunks run 2.0-4.9x faster than torch's bf16 SDPA on a Zen 4, decode steps 1.3-1.8x
    (benchmarks/bench_attention.py), and a query's result depends only on the keys it sees: a prompt
    gets the same bits prefilled whole, in chunks, or after a prefix-cache hit."""
    b, heads, s, d = q.shape
    if (q.device.type != 'cpu' or b != 1 or not q.dtype == k.dtype == v.dtype == torch.bfloat16
            or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            or q.stride(-1) != 1 or q.stride(1) != d
            or any(t.stride(-1) != 1 or t.stride(-2) != d for t in (k, v))):
        return None
    from ..quantization.build import load_library
    lib = load_library()
    if lib is None or not lib.isa.endswith('-bf16'):
        return None
    out = torch.empty(1, s, heads, d, dtype=torch.bfloat16)
    if not lib.attend_bf16(q.data_ptr(), q.stride(2), s, heads, k.shape[1], d, k.data_ptr(), k.stride(1),
                           v.data_ptr(), v.stride(1), k.shape[2], out.data_ptr(), d ** -0.5,
                           torch.get_num_threads()):
        return None
    return out.transpose(1, 2)


@dataclass
class DecodeWindow:
    """One query per sequence over the first `width` cache positions: those at or before `slot` (a
    1-element device tensor) where key_ok [b, width] is True. All shapes fixed, values on the device."""
    slot: torch.Tensor
    key_ok: torch.Tensor

    def mask(self) -> torch.Tensor:
        """The same as a bool mask [b, 1, 1, width]."""
        width = self.key_ok.shape[1]
        return (self.key_ok & (torch.arange(width, device=self.key_ok.device) <= self.slot))[:, None, None, :]


class MLP(nn.Module):
    """SwiGLU: the first half of dense_h_to_4h is the gate, the second half the value."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, 2 * cfg.ffn_hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.self_attention = SelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv, attn_mask):
        x = x + self.self_attention(self.input_layernorm(x), cos, sin, kv, attn_mask)
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

    # -- forward -----------------------------------------------------------------------------------
    def new_cache(self, batch: int, max_tokens: int) -> KVCache:
        """A KV cache for `max_tokens` positions, holding the P-tuning prefix if there is one."""
        return kv_cache.allocate(self.cfg, self.cfg.num_kv_heads, batch, max_tokens, self.word_embeddings.weight.dtype,
                                 self.device, self.prefix_encoder)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: KVCache,
                key_padding: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run `input_ids` [b, s] through the blocks, appending their K/V to `cache`.

        position_ids [b, s]: RoPE positions. key_padding [b, t] (bool, True = real token) covers every
        position the cache will hold after this call, the P-tuning prefix excluded; None = no padding.
        Returns the final hidden states [b, s, D] (after the final norm).
        """
        b, s = input_ids.shape
        x = self.word_embeddings(input_ids)
        cos, sin = self.rotary(position_ids)
        attn_mask = self._attention_mask(b, s, cache.length, key_padding, x.device)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.layer(i), attn_mask)
        cache.commit(s)
        return self.final_layernorm(x)

    def decode_static(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, slot: torch.Tensor,
                      key_ok: torch.Tensor) -> torch.Tensor:
        """One new token per sequence, written at cache position `slot` (a 1-element long tensor);
        attends over the first key_ok.shape[1] cache positions, those with key_ok [b, width] True and
        at or before the slot. -> next logits [b, V] (fp32).

        Every shape is fixed by (batch, width) and every changing value lives in a device tensor, so
        this is the step that CUDA graphs capture (cuda_graphs.py). It does not commit: the caller
        advances cache.length."""
        x = self.word_embeddings(ids[:, None])
        cos, sin = self.rotary(positions[:, None])
        window = DecodeWindow(slot, key_ok)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.at_slot(i, slot, key_ok.shape[1]), window)
        return self.logits(self.final_layernorm(x)[:, -1]).float()

    def _attention_mask(self, b, s, past, key_padding, device) -> Optional[torch.Tensor]:
        """[b, 1, s, past+s] bool, True = may attend; None when causal order alone decides."""
        pre = self.cfg.pre_seq_len or 0
        if key_padding is None or bool(key_padding.all()):
            if s == 1 or past == pre == 0:
                return None
            return causal_lower_right(s, past + s)   # attend() picks the kernel that takes it
        t = past + s
        visible = torch.ones(b, t, dtype=torch.bool, device=device)
        visible[:, pre:] = key_padding.to(device)
        mask = causal_mask(s, past, device)[None] & visible[:, None, :]
        # A padding query row would see no key at all (NaN); let it see everything, as the reference
        # does. Its output is never used.
        mask |= ~visible[:, past:, None]
        return mask[:, None]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return lm_head(hidden, self.output_layer.weight)

    @property
    def device(self) -> torch.device:
        return self.word_embeddings.weight.device

    supports_prefix_reuse = True   # causal attention: the K/V of a prefix do not depend on what follows
    cuda_graphs = True             # decode steps on CUDA replay captured graphs (cuda_graphs.py)

    # -- the engine (engine/runner.py): sequences of their own lengths side by side -------------------
    def start(self, prompt, max_new_tokens: int) -> 'DecodeState':
        """The decode state of one sequence with room for the prompt and max_new_tokens; nothing runs yet."""
        return DecodeState(self.new_cache(1, len(prompt) + max_new_tokens), None,
                           torch.zeros(1, dtype=torch.long, device=self.device))

    def adopt_prefix(self, state: 'DecodeState', segments: List[KVSegment], keep: int):
        """Start a fresh `state` from K/V other sequences computed: the first `keep` positions that
        `segments` hold, in order (after the P-tuning prefix, which the state already has)."""
        state.cache.copy_prefix(segments, self.cfg.pre_seq_len or 0, keep)
        state.next_position = torch.full((1,), keep, dtype=torch.long, device=self.device)

    def rows_keep_their_bits(self, rows: int) -> bool:
        return linears_keep_row_bits(self.layers, rows, self.word_embeddings.weight.dtype)

    def forward_ragged(self, parts, every=()) -> torch.Tensor:
        """New tokens of several sequences in one forward: parts = [(one sequence's state, ids [s]), ...].
        The linears see every row at once (the weights are read once for all), attention runs per
        sequence over its own cache. -> logits of each part's last token [n, V] (fp32), then those of
        every position of the parts in `every` (base.ragged_logits)."""
        device = self.device
        lengths = [len(ids) for _, ids in parts]
        ids = torch.cat([torch.as_tensor(ids, dtype=torch.long) for _, ids in parts]).to(device)[None]
        positions = torch.cat([st.next_position + torch.arange(n, device=device)
                               for (st, _), n in zip(parts, lengths)])[None]
        masks = [self._attention_mask(1, n, st.cache.length, None, device) for (st, _), n in zip(parts, lengths)]
        x = self.word_embeddings(ids)
        cos, sin = self.rotary(positions)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, Ragged([st.cache.layer(i) for st, _ in parts], lengths, masks), None)
        for (st, _), n in zip(parts, lengths):
            st.cache.commit(n)
            st.next_position = st.next_position + n
        return ragged_logits(self, x[0], lengths, every)

    def full_logits(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Logits at every position [b, s, V] (fp32), for scoring and parity tests."""
        positions, padding = positions_and_padding(input_ids, attention_mask)
        cache = self.new_cache(input_ids.shape[0], input_ids.shape[1])
        return self.logits(self(input_ids, positions, cache, padding)).float()


@dataclass
class DecodeState:
    cache: KVCache
    padding: Optional[torch.Tensor]      # [b, t] bool, True = real token; None = no padding
    next_position: torch.Tensor          # [b] RoPE position of the next token
    graphs: Optional[object] = None      # cuda_graphs.GraphedDecoder of this cache, once captured


def positions_and_padding(input_ids, attention_mask):
    """RoPE positions count real tokens only: left padding gets 0, then 0, 1, 2, ... (as the
    reference tokenizer pads position_ids)."""
    b, s = input_ids.shape
    if attention_mask is None or bool(attention_mask.all()):
        return torch.arange(s, device=input_ids.device).expand(b, s), None
    mask = attention_mask.to(input_ids.device).bool()
    return (mask.long().cumsum(-1) - 1).clamp(min=0), mask
