"""A key/value cache allocated once and written in place.

The reference grows its cache by concatenation at every step (a copy of the whole cache per token).
Here each layer owns one [b, heads, capacity, d] buffer for K and one for V; a forward writes its new
positions at `length` and reads the prefix [0, length + s). All layers append during one forward,
then `commit(s)` advances the shared length. A cache kept across chat turns is cut back with
`truncate` and grown with `reserve` (in blocks, so a conversation reallocates rarely).
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (batch, num_kv_heads, capacity, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity = capacity
        self.length = 0          # positions filled and committed
        self.dtype = dtype

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [b, heads, s, d] after the committed positions; return this layer's full K, V."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise RuntimeError(f'KV cache overflow: {end} positions needed, {self.capacity} allocated')
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def commit(self, s: int):
        self.length += s

    def truncate(self, length: int):
        """Forget every position from `length` on (the buffers are reused)."""
        self.length = min(self.length, length)

    def reserve(self, capacity: int, block: int = 1024):
        """Make room for `capacity` positions, keeping the filled ones."""
        if capacity <= self.capacity:
            return
        capacity = -(-capacity // block) * block
        for buffers in (self.k, self.v):
            for layer, old in enumerate(buffers):
                new = old.new_empty(old.shape[0], old.shape[1], capacity, old.shape[3])
                new[:, :, :self.length] = old[:, :, :self.length]
                buffers[layer] = new
        self.capacity = capacity

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def prefix_to_kv(prefix: torch.Tensor, num_layers: int, num_heads: int, head_dim: int, batch: int):
    """P-tuning v2: the prefix encoder's [pre_seq_len, layers * 2 * heads * d] output, laid out as the
    reference splits it, -> [layers, 2 (k, v), b, heads, pre_seq_len, d]."""
    prefix = prefix.view(prefix.shape[0], num_layers, 2, num_heads, head_dim)
    return prefix.permute(1, 2, 3, 0, 4)[:, :, None].expand(-1, -1, batch, -1, -1, -1)


def allocate(cfg, num_heads: int, batch: int, max_tokens: int, dtype, device, prefix_encoder=None) -> KVCache:
    """A cache for `max_tokens` positions per sequence; with P-tuning, its first positions hold the
    learned prefix (as already-rotated keys and values, which is how the reference feeds it)."""
    pre = cfg.pre_seq_len or 0
    cache = KVCache(cfg.num_layers, batch, num_heads, pre + max_tokens, cfg.head_dim, dtype, device)
    if pre:
        kv = prefix_to_kv(prefix_encoder(), cfg.num_layers, num_heads, cfg.head_dim, batch).to(dtype)
        for layer in range(cfg.num_layers):
            cache.append(layer, kv[layer, 0], kv[layer, 1])
        cache.commit(pre)
    return cache
