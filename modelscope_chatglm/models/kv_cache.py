"""A key/value cache allocated once and written in place.

The reference grows its cache by concatenation at every step (a copy of the whole cache per token).
Here K and V are each one buffer [layers, b, heads, capacity, d]; each layer's forward writes its new
positions into its own slice at `length` and reads the prefix [0, length + s). All layers append
during one forward, then `commit(s)` advances the shared length. A cache kept across chat turns is cut back with
`truncate` and grown with `reserve` (in blocks, so a conversation reallocates rarely).

An attention layer sees its own slice of the cache through a handle with one method,
`update(k, v) -> (all K, all V)`: `layer(i)` appends after the committed positions (eager forwards),
`at_slot(i, slot, width)` writes at a position held in a device tensor and always returns the first
`width` positions, so the shapes never change and a CUDA graph can replay the step.

A `KVSegment` is the K/V of a run of positions outside any cache (the prefix cache's unit, see
prefix_cache.py); `copy_prefix` starts a sequence's cache from segments others computed.
"""
from __future__ import annotations

import mmap
import math

import torch

# CPU buffers of this size or more come straight from the OS (see `new_buffer`).
MAPPED_BYTES = 1 << 20


def new_buffer(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Uninitialised memory for K/V. On the CPU a buffer of MAPPED_BYTES or more is an anonymous mapping
    of its own, returned to the OS when the tensor is freed. From glibc's allocator it would come from
    the heap once large blocks have been freed (its mmap threshold rises to their size), and caches of
    every size freed as requests finish, between the prefix cache's smaller copies that outlive them,
    fragment that heap: replaying the server's K/V allocations for 3,000 requests with a 2 GiB prefix
    cache, the process held 3.21-3.88 GiB from malloc against 2.11-2.26 mapped
    (benchmarks/bench_prefix_cache.py --replay). Private, so a forked process never shares our K/V.
    (Small buffers stay with malloc: each mapping counts against vm.max_map_count.)"""
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if torch.device(device).type != 'cpu' or nbytes < MAPPED_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE), dtype=dtype, count=count).view(shape)


class KVCache:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (num_layers, batch, num_kv_heads, capacity, head_dim)
        self._hold(new_buffer(shape, dtype, device), new_buffer(shape, dtype, device))
        self.length = 0          # positions filled and committed
        self.dtype = dtype

    def _hold(self, k_all: torch.Tensor, v_all: torch.Tensor):
        """All layers' K (and V) are one tensor [layers, b, heads, capacity, d]: copying positions between
        caches is one operation, not one per layer. self.k[layer] is a view of one layer."""
        self.k_all, self.v_all = k_all, v_all
        self.k, self.v = list(k_all.unbind(0)), list(v_all.unbind(0))
        self.capacity = k_all.shape[3]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [b, heads, s, d] after the committed positions; return this layer's full K, V."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise RuntimeError(f'KV cache overflow: {end} positions needed, {self.capacity} allocated')
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def layer(self, layer: int) -> '_Appender':
        return _Appender(self, layer)

    def at_slot(self, layer: int, slot: torch.Tensor, width: int) -> '_SlotWriter':
        return _SlotWriter(self.k[layer], self.v[layer], slot, width)

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
        grown = []
        for old in (self.k_all, self.v_all):
            new = new_buffer((*old.shape[:3], capacity, old.shape[4]), old.dtype, old.device)
            new[:, :, :, :self.length] = old[:, :, :, :self.length]
            grown.append(new)
        self._hold(*grown)

    def copy_prefix(self, segments: 'list[KVSegment]', start: int, length: int):
        """Fill positions [start, start + length) from `segments` (taken in order, the last one possibly
        longer than needed) and make them the filled ones: the K/V of a prefix another sequence
        computed."""
        end = start + length
        for segment in segments:
            n = min(segment.length, end - start)
            if n <= 0:
                break
            self.k_all[:, :, :, start:start + n] = segment.k[:, :, :, :n]
            self.v_all[:, :, :, start:start + n] = segment.v[:, :, :, :n]
            start += n
        if start != end:
            raise ValueError(f'the segments hold {length - (end - start)} positions, {length} asked for')
        self.length = end


class KVSegment:
    """The K/V of a run of consecutive positions, every layer: what the prefix cache keeps of a
    sequence. k and v are [layers, 1, heads, n, d]. `of(cache, start, end)` views a cache's positions
    (no copy); `clone()` gives them memory of their own."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    @classmethod
    def of(cls, cache: KVCache, start: int, end: int) -> 'KVSegment':
        return cls(cache.k_all[:, :, :, start:end], cache.v_all[:, :, :, start:end])

    @property
    def length(self) -> int:
        return self.k.shape[3]

    def slice(self, start: int, end: int) -> 'KVSegment':
        return KVSegment(self.k[:, :, :, start:end], self.v[:, :, :, start:end])

    def clone(self) -> 'KVSegment':
        return KVSegment(*(new_buffer(t.shape, t.dtype, t.device).copy_(t) for t in (self.k, self.v)))

    def nbytes(self) -> int:
        return (self.k.numel() + self.v.numel()) * self.k.element_size()


class _Appender:
    def __init__(self, cache: KVCache, layer: int):
        self.cache, self.index = cache, layer

    def update(self, k, v):
        return self.cache.append(self.index, k, v)


class _SlotWriter:
    """Writes one new position per sequence at `slot` (a 1-element long tensor on the cache's device);
    returns the first `width` positions. Positions past the slot hold stale or unset values: the
    attention mask hides them."""

    def __init__(self, k, v, slot, width):
        self.k, self.v, self.slot, self.width = k, v, slot, width

    def update(self, k, v):
        self.k.index_copy_(2, self.slot, k)
        self.v.index_copy_(2, self.slot, v)
        return self.k[:, :, :self.width], self.v[:, :, :self.width]


class Ragged:
    """The new rows of several sequences side by side in one [1, N] batch, each sequence with its own
    cache handle and attention mask. The linears of a block run on all N rows at once; attention is
    the one per-sequence step: `attend` splits the rows, appends each sequence's K/V to its cache and
    attends over that cache alone, so a sequence's result does not depend on its neighbours."""

    def __init__(self, handles, lengths, masks):
        self.handles, self.lengths, self.masks = handles, lengths, masks

    def attend(self, q, k, v, attend_fn):
        """q [1, heads, N, d], k/v [1, kv_heads, N, d] -> [1, heads, N, d]"""
        out, start = [], 0
        for handle, n, mask in zip(self.handles, self.lengths, self.masks):
            rows = slice(start, start + n)
            keys, values = handle.update(k[:, :, rows], v[:, :, rows])
            out.append(attend_fn(q[:, :, rows], keys, values, mask))
            start += n
        return torch.cat(out, dim=2)


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
