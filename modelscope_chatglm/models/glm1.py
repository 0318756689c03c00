"""The first-generation ChatGLM-6B (GLM-6B block), in plain PyTorch (formats docs/formats.md §3.1).

Shapes: N = the new tokens of every sequence in one forward (their rows side by side, batch 1),
H = heads, d = head dim, D = hidden size, alpha = sqrt(2 * 28) (see RESIDUAL_ALPHA).

A block (DeepNorm-style; the residual is the *normalised* input, scaled):
    h = layernorm(x);   x = alpha * h + attention(h)
    m = layernorm(x);   y = alpha * m + mlp(m)          mlp = dense(gelu_tanh(dense(m)))

The prompt is `text [gMASK] <sop>`; the model sees the prefix before <sop> bidirectionally and what
follows causally. Positions are two-dimensional: the first half of every head is rotated by the token
position (frozen at the [gMASK] position from <sop> on), the second half by the block position
(0 before <sop>, then 1, 2, ...). Attention scales q by 1/(sqrt(d)*(l+1)) and the scores back by (l+1)
before the softmax, as the reference does; the CPU kernel leaves masked keys out, the torch fallback
(fp16, GPU) sets their scores to -10000 as the reference (the same softmax either way).
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
from .base import linears_keep_row_bits, lm_head, ragged_logits, score_whole


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

    def forward(self, x, pos_tables, block_tables, kv):
        """x [1, N, D]: the new rows of every part of a forward; kv: this layer's handle on the K/V pool
        (its page tables say which keys each query sees: the prompt before <sop> both ways)."""
        b, n, _ = x.shape
        q, k, v = self.query_key_value(x).view(b, n, self.num_heads, 3 * self.head_dim).chunk(3, dim=-1)
        q = apply_2d_rotary(q, pos_tables, block_tables)[0]
        k = apply_2d_rotary(k, pos_tables, block_tables)[0]
        # The reference's scaling: q / (sqrt(d) (l + 1)), then the scores times (l + 1) before the softmax.
        q = q / (math.sqrt(self.head_dim) * self.coeff)
        out = kv.attend(q.contiguous(), k, v[0], self.coeff)             # [N, H, d]
        return self.dense(out.reshape(b, n, -1))

    def attend(self, q, k, v, visible):
        """The reference's numerics, where the compiled kernel does not run (fp16, other devices): q
        [1, H, s, d] (already scaled) over k, v [1, H, t, d]; visible [s, t]."""
        scores = (q @ k.transpose(-1, -2)).masked_fill(~visible, -10000.0)   # [1, H, s, t]
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

    def forward(self, x, pos_tables, block_tables, kv):
        h = self.input_layernorm(x)
        x = self.alpha * h + self.attention(h, pos_tables, block_tables, kv)
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
class PromptShape:
    """Where a sequence's prompt has its <sop> and [gMASK]: its positions follow from them."""
    sop_index: int               # the prompt before it is attended both ways
    mask_position: int           # rotary position of [gMASK], used from <sop> on


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

    @staticmethod
    def hub_key(name: str) -> str:
        """Our parameter name -> the hub's state-dict key: the inverse of `checkpoint_key` (export)."""
        return 'transformer.' + name

    @property
    def device(self) -> torch.device:
        return self.word_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.final_layernorm.weight.dtype

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return lm_head(hidden, self.word_embeddings.weight)   # the tied head, as a [V, D] linear

    @property
    def kv_heads(self) -> int:
        return self.cfg.num_heads

    def prefix_kv(self) -> torch.Tensor:
        """P-tuning v2: the prefix encoder's output as [layers, 2 (k, v), H, pre_seq_len, d]."""
        cfg = self.cfg
        prefix = self.prefix_encoder().view(cfg.pre_seq_len, cfg.num_layers, 2, cfg.num_heads, cfg.head_dim)
        return prefix.permute(1, 2, 3, 0, 4)

    # -- the engine (engine/runner.py) ----------------------------------------------------------------
    def start(self, prompt) -> PromptShape:
        """Where the prompt's <sop> and [gMASK] are. Its first part in `forward_ragged` must be the whole
        prompt: the prefix before <sop> is attended both ways, so it cannot be prefilled in chunks."""
        cfg, ids = self.cfg, list(prompt)
        mask_id = cfg.gmask_token_id if cfg.gmask_token_id in ids else cfg.mask_token_id
        if cfg.bos_token_id not in ids or mask_id not in ids:
            raise ValueError('a ChatGLM-6B prompt must contain [gMASK] (or [MASK]) and <sop>; build it with '
                             'model.build_inputs() or tokenizer.encode(text) + [gMASK, <sop>]')
        return PromptShape(ids.index(cfg.bos_token_id), ids.index(mask_id))

    def rows_keep_their_bits(self, rows: int) -> bool:
        return linears_keep_row_bits(self.layers, rows, self.dtype)

    def forward_ragged(self, parts, kv, every=()) -> torch.Tensor:
        """New tokens of several sequences in one forward: parts = [(PromptShape, past, ids), ...], each
        either its whole prompt (past = 0) or one decode token; kv: the forward's PagedKV. The family's
        pieces are its 2D positions and the prompt's bidirectional prefix (each prompt part's queries see
        at least the keys before <sop>). -> logits of each part's last token [n, V] (fp32), then those of
        every position of the parts in `every`."""
        pre = self.cfg.pre_seq_len or 0
        positions, blocks, min_keys = [], [], []
        for shape, past, ids in parts:
            n = len(ids)
            if past == 0:
                index = torch.arange(n)
                before_sop = index < shape.sop_index
                positions.append(torch.where(before_sop, index, shape.mask_position))
                blocks.append(torch.where(before_sop, 0, index - shape.sop_index + 1))
                min_keys.append(pre + shape.sop_index)
            else:
                if n != 1:
                    raise ValueError('after its prompt, a ChatGLM-6B sequence takes one token per step')
                positions.append(torch.tensor([shape.mask_position]))
                blocks.append(torch.tensor([past - shape.sop_index + 1]))
                min_keys.append(0)
        kv.min_keys = torch.tensor(min_keys, dtype=torch.int32)
        device = self.device
        ids = torch.cat([torch.as_tensor(list(ids), dtype=torch.long) for _, _, ids in parts]).to(device)[None]
        x = self.word_embeddings(ids).to(self.dtype)   # stored as the checkpoint's fp16 when quantized
        pos_tables = rotary_tables(torch.cat(positions).to(device)[None], self.rotary_dim)
        block_tables = rotary_tables(torch.cat(blocks).to(device)[None], self.rotary_dim)
        for i, layer in enumerate(self.layers):
            x = layer(x, pos_tables, block_tables, kv.layer(i, layer.attention.attend))
        return ragged_logits(self, x[0], [len(ids) for _, _, ids in parts], every)

    def full_logits(self, input_ids, attention_mask):
        """Logits at every position [b, s, V] (fp32) of left-padded prompts, for parity tests."""
        return score_whole(self, input_ids, attention_mask)
