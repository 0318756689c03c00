"""The first-generation ChatGLM-6B (GLM-6B block), in plain PyTorch (formats docs/formats.md §3.1).

Shapes: b = batch, s = new tokens in this call, t = all tokens the cache holds after it,
H = heads, d = head dim, D = hidden size, alpha = sqrt(2 * 28) (see RESIDUAL_ALPHA).

A block (DeepNorm-style; the residual is the *normalised* input, scaled):
    h = layernorm(x);   x = alpha * h + attention(h)
    m = layernorm(x);   y = alpha * m + mlp(m)          mlp = dense(gelu_tanh(dense(m)))

The prompt is `text [gMASK] <sop>`; the model sees the prefix before <sop> bidirectionally and what
follows causally. Positions are two-dimensional: the first half of every head is rotated by the token
position (frozen at the [gMASK] position from <sop> on), the second half by the block position
(0 before <sop>, then 1, 2, ...). Attention follows the reference numerics: q scaled by
1/(sqrt(d)*(l+1)), masked scores set to -10000, softmax in fp32 after multiplying back by (l+1).
The LM head is the word embedding (tied).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..model_config import ModelConfig
from . import kv_cache
from .base import linears_keep_row_bits, lm_head, ragged_logits
from .kv_cache import KVCache, Ragged


def rotary_tables(positions: torch.Tensor, rotary_dim: int):
    """positions [b, s] -> cos, sin [b, s, rotary_dim] (frequencies repeated for rotate-half)."""
    # The released model computed its frequencies in fp32 and stored them as fp16; it was trained
    # with those rounded values, so we round them the same way (then compute in fp32).
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    inv_freq = inv_freq.half().float().to(positions.device)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, s, H, n] with cos/sin [b, s, n]: x*cos + rotate_half(x)*sin (GPT-NeoX form)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def apply_2d_rotary(x, pos_tables, block_tables):
    """First half of each head by position, second half by block position."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([rotate_half(x1, *pos_tables), rotate_half(x2, *block_tables)], dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.coeff = float(layer + 1)   # the reference's query-key layer scaling
        # Rows are per-head interleaved: head h owns [q_h | k_h | v_h], 3*d rows.
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.num_heads * cfg.head_dim)
        self.dense = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size)

    def forward(self, x, pos_tables, block_tables, kv, visible):
        b, s, _ = x.shape
        q, k, v = self.query_key_value(x).view(b, s, self.num_heads, 3 * self.head_dim).chunk(3, dim=-1)
        q = apply_2d_rotary(q, pos_tables, block_tables)
        k = apply_2d_rotary(k, pos_tables, block_tables)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)    # [b, H, s, d]
        if isinstance(kv, Ragged):     # rows of several sequences: each attends over its own cache
            out = kv.attend(q, k, v, self.attend)
        else:
            out = self.attend(q, *kv.update(k, v), visible)
        return self.dense(out.transpose(1, 2).reshape(b, s, -1))

    def attend(self, q, k, v, visible):
        """q [b, H, s, d] over the cached k, v [b, H, t, d]; visible [b, 1, s, t] or None."""
        q = q / (math.sqrt(self.head_dim) * self.coeff)
        scores = q @ k.transpose(-1, -2)                                      # [b, H, s, t]
        if visible is not None:
            scores = scores.masked_fill(~visible, -10000.0)
        probs = torch.softmax(scores.float() * self.coeff, dim=-1).to(v.dtype)
        return probs @ v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size)
        self.dense_4h_to_h = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate='tanh'))


# alpha = sqrt(2 * 28). The released code builds every block with its default num_layers=28 instead of
# the config's value, so a checkpoint trained with it uses sqrt(56) whatever its depth (the same for
# the real 28-layer model).
RESIDUAL_ALPHA = math.sqrt(2 * 28)


class GLMBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.alpha = RESIDUAL_ALPHA
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.attention = SelfAttention(cfg, layer)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, pos_tables, block_tables, kv, visible):
        h = self.input_layernorm(x)
        x = self.alpha * h + self.attention(h, pos_tables, block_tables, kv, visible)
        m = self.post_attention_layernorm(x)
        return self.alpha * m + self.mlp(m)


class PrefixEncoder(nn.Module):
    """P-tuning v2: a learned K/V prefix of `pre_seq_len` tokens for every layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        kv_size = cfg.num_layers * 2 * cfg.hidden_size
        if cfg.prefix_projection:
            self.embedding = nn.Embedding(cfg.pre_seq_len, cfg.hidden_size)
            self.trans = nn.Sequential(nn.Linear(cfg.hidden_size, cfg.hidden_size), nn.Tanh(),
                                       nn.Linear(cfg.hidden_size, kv_size))
        else:
            self.embedding = nn.Embedding(cfg.pre_seq_len, kv_size)
            self.trans = None

    def forward(self) -> torch.Tensor:
        """-> [pre_seq_len, layers * 2 * heads * d]"""
        prefix = self.embedding.weight
        return prefix if self.trans is None else self.trans(prefix)


@dataclass
class DecodeState:
    cache: KVCache
    padding: torch.Tensor        # [b, t] bool, True = real token
    sop_index: torch.Tensor      # [b] index of <sop> in the (padded) row
    mask_position: torch.Tensor  # [b] rotary position of [gMASK] (unpadded), used from <sop> on
    length: int                  # tokens in each (padded) row so far


class GLM1Model(nn.Module):
    """Implements models/base.py's CausalLM."""
    # The four linears of each block that int8/int4 checkpoints quantize (relative to a GLMBlock).
    QUANTIZED_LINEARS = ('attention.query_key_value', 'attention.dense', 'mlp.dense_h_to_4h', 'mlp.dense_4h_to_h')
    # The prompt before <sop> is attended bidirectionally: its K/V change whenever it grows.
    supports_prefix_reuse = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(cfg, i) for i in range(cfg.num_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.prefix_encoder = PrefixEncoder(cfg) if cfg.pre_seq_len else None
        self.rotary_dim = cfg.head_dim // 2

    @staticmethod
    def checkpoint_key(key: str) -> Optional[str]:
        if key.endswith('rotary_emb.inv_freq'):
            return None       # recomputed; the reference ignores the stored copy too
        if key == 'lm_head.weight':
            return None       # tied to the word embedding (transformers ties them on load)
        return key[len('transformer.'):] if key.startswith('transformer.') else key

    @property
    def device(self) -> torch.device:
        return self.word_embeddings.weight.device

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return lm_head(hidden, self.word_embeddings.weight)   # the tied head, as a [V, D] linear

    def new_cache(self, batch: int, max_tokens: int) -> KVCache:
        return kv_cache.allocate(self.cfg, self.cfg.num_heads, batch, max_tokens, self.word_embeddings.weight.dtype,
                                 self.device, self.prefix_encoder)

    def forward(self, input_ids, positions, block_positions, cache: KVCache, visible) -> torch.Tensor:
        """input_ids/positions/block_positions [b, s]; visible [b, 1, s, t] bool (True = may attend,
        the P-tuning prefix included) or None for all-visible. Returns final hidden states [b, s, D]."""
        x = self.word_embeddings(input_ids)
        pos_tables = rotary_tables(positions, self.rotary_dim)
        block_tables = rotary_tables(block_positions, self.rotary_dim)
        for i, layer in enumerate(self.layers):
            x = layer(x, pos_tables, block_tables, cache.layer(i), visible)
        cache.commit(input_ids.shape[1])
        return self.final_layernorm(x)

    # -- prompt structure ---------------------------------------------------------------------------
    def _structure(self, input_ids, attention_mask):
        """Per row: padding mask, <sop> index, [gMASK] position (unpadded), 2D positions."""
        cfg = self.cfg
        b, s = input_ids.shape
        padding = torch.ones(b, s, dtype=torch.bool, device=input_ids.device) if attention_mask is None \
            else attention_mask.to(input_ids.device).bool()
        pad_len = (~padding).sum(dim=1)
        sop_index, mask_position = [], []
        for row, ids in enumerate(input_ids.tolist()):
            mask_id = cfg.gmask_token_id if cfg.gmask_token_id in ids else cfg.mask_token_id
            if cfg.bos_token_id not in ids or mask_id not in ids:
                raise ValueError('a ChatGLM-6B prompt must contain [gMASK] (or [MASK]) and <sop>; '
                                 'build it with model.build_inputs() or tokenizer.encode(text) + '
                                 '[gMASK, <sop>]')
            sop_index.append(ids.index(cfg.bos_token_id))
            mask_position.append(ids.index(mask_id) - int(pad_len[row]))
        sop_index = torch.tensor(sop_index, device=input_ids.device)
        mask_position = torch.tensor(mask_position, device=input_ids.device)
        index = torch.arange(s, device=input_ids.device)[None, :]
        before_sop = index < sop_index[:, None]
        positions = torch.where(before_sop, index - pad_len[:, None], mask_position[:, None])
        block_positions = torch.where(before_sop, torch.zeros_like(index), index - sop_index[:, None] + 1)
        positions = positions.masked_fill(~padding, 0)
        block_positions = block_positions.masked_fill(~padding, 0)
        return padding, sop_index, mask_position, positions, block_positions

    def _prefill_visibility(self, padding, sop_index):
        """[b, 1, s, pre+s]: key u is visible to query t iff u is real and (u < <sop> or u <= t)."""
        b, s = padding.shape
        pre = self.cfg.pre_seq_len or 0
        index = torch.arange(s, device=padding.device)
        causal = index[None, :] <= index[:, None]                              # [s(query), s(key)]
        prefix_part = index[None, None, :] < sop_index[:, None, None]          # [b, 1, s(key)]
        visible = (causal[None] | prefix_part) & padding[:, None, :]
        visible |= ~padding[:, :, None]   # padding rows: see everything (their output is unused)
        if pre:
            visible = torch.cat([torch.ones(b, s, pre, dtype=torch.bool, device=padding.device), visible], 2)
        return visible[:, None]

    # -- the engine (engine/runner.py) ----------------------------------------------------------------
    def start(self, prompt, max_new_tokens: int) -> DecodeState:
        """The decode state of one sequence; its first part in `forward_ragged` must be the whole prompt
        (the prefix before <sop> is attended bidirectionally, so it cannot be prefilled in chunks)."""
        ids = torch.as_tensor([list(prompt)], dtype=torch.long, device=self.device)
        padding, sop_index, mask_position, _, _ = self._structure(ids, None)
        return DecodeState(self.new_cache(1, ids.shape[1] + max_new_tokens), padding, sop_index, mask_position, 0)

    def adopt_prefix(self, state, segments, keep: int):
        raise NotImplementedError('ChatGLM-6B cannot reuse cached K/V across prompts: its prompt prefix is '
                                  'attended bidirectionally, so the K/V of a prefix change as the prompt grows')

    def rows_keep_their_bits(self, rows: int) -> bool:
        return linears_keep_row_bits(self.layers, rows, self.word_embeddings.weight.dtype)

    def forward_ragged(self, parts, every=()) -> torch.Tensor:
        """New tokens of several sequences in one forward: parts = [(one sequence's state, ids), ...], each
        either its whole prompt (the state is fresh) or one decode token. The linears see all rows at
        once; attention runs per sequence. -> logits of each part's last token [n, V] (fp32)."""
        if every:
            raise ValueError('ChatGLM-6B attends its prompt in both directions: its positions have no '
                             'next-token logits to score a prompt with')
        device = self.device
        lengths, positions, blocks, masks = [], [], [], []
        for state, ids in parts:
            ids = torch.as_tensor([list(ids)], dtype=torch.long, device=device)
            if state.length == 0:
                padding, sop_index, _, pos, block = self._structure(ids, None)
                masks.append(self._prefill_visibility(padding, sop_index))
            else:
                if ids.shape[1] != 1:
                    raise ValueError('after its prompt, a ChatGLM-6B sequence takes one token per step')
                pos = state.mask_position[:, None]
                block = (state.length - state.sop_index + 1)[:, None]
                masks.append(None)
            lengths.append(ids.shape[1])
            positions.append(pos)
            blocks.append(block)
        ids = torch.cat([torch.as_tensor(list(ids), dtype=torch.long) for _, ids in parts]).to(device)[None]
        x = self.word_embeddings(ids)
        pos_tables = rotary_tables(torch.cat(positions, dim=1), self.rotary_dim)
        block_tables = rotary_tables(torch.cat(blocks, dim=1), self.rotary_dim)
        for i, layer in enumerate(self.layers):
            x = layer(x, pos_tables, block_tables, Ragged([st.cache.layer(i) for st, _ in parts], lengths, masks),
                      None)
        for (state, _), n in zip(parts, lengths):
            state.cache.commit(n)
            state.length += n
        return ragged_logits(self, x[0], lengths)

    def full_logits(self, input_ids, attention_mask):
        padding, sop_index, _, positions, block_positions = self._structure(input_ids, attention_mask)
        cache = self.new_cache(input_ids.shape[0], input_ids.shape[1])
        visible = self._prefill_visibility(padding, sop_index)
        return self.logits(self(input_ids, positions, block_positions, cache, visible)).float()
