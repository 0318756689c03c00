"""Paged K/V: one pool of cache rows for every sequence, and the handle a forward's attention writes and
reads it through.

`KVPool` holds K and V of every layer as [layers, pages, G, d]: a page is one position of one sequence
(pages of one token, as SGLang's token pool; a sequence's pages need not be adjacent). Which pages a
sequence owns is the engine's business (engine/kv_pages.py hands out page ids, the prefix cache shares
them): the pool only holds the numbers. A sequence's page table lists its pages in position order, so a
prompt prefix that many sequences share is the same pages in each table and is never copied; a sequence
that grows takes one more page and copies nothing.

`PagedKV` is one forward's view of the pool: the new tokens' pages (where their K/V go) and each part's
page table (which keys its queries read). Each attention layer holds its handle, `kv.layer(i)`, and
calls `attend(q, k, v)`: the new K/V are written to their pages, then one attention call covers every
part of the forward, prompt chunks and decode tokens alike (models/attention.py).

P-tuning v2 prefixes are pages too: `KVPool.hold_prefix` writes the learned K/V once into pages that every
page table starts with.
"""
from __future__ import annotations

import functools
import math
import mmap
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from . import attention


def new_buffer(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Memory for the pool. On the CPU an anonymous private mapping: its pages are only backed once
    written (the pool is sized for the whole K/V budget, and the page allocator hands out the lowest
    pages first, so an idle server holds what its busiest moment used), and a forked process never
    shares our K/V."""
    count = math.prod(shape)
    if torch.device(device).type != 'cpu' or count == 0:
        # (unwritten pages are never read: a page table lists only pages written before the attention)
        return torch.empty(shape, dtype=dtype, device=device)
    nbytes = count * dtype.itemsize
    return torch.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE), dtype=dtype, count=count).view(shape)


class KVPool:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, pages: int, dtype: torch.dtype, device):
        shape = (num_layers, pages, num_kv_heads, head_dim)
        self.k, self.v = new_buffer(shape, dtype, device), new_buffer(shape, dtype, device)
        self.pages, self.dtype, self.device = pages, dtype, torch.device(device)
        self.bytes_per_page = 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize

    def hold_prefix(self, pages: Sequence[int], kv: torch.Tensor):
        """Write a P-tuning prefix: kv [layers, 2 (k, v), G, pre_seq_len, d] into `pages`."""
        index = torch.as_tensor(list(pages), dtype=torch.long, device=self.device)
        for layer in range(self.k.shape[0]):
            self.k[layer].index_copy_(0, index, kv[layer, 0].transpose(0, 1).to(self.dtype))
            self.v[layer].index_copy_(0, index, kv[layer, 1].transpose(0, 1).to(self.dtype))

    def gather(self, pages: Sequence[int]) -> 'tuple[torch.Tensor, torch.Tensor]':
        """K, V of `pages`, every layer: [layers, n, G, d] copies (for inspection; a forward never gathers)."""
        index = torch.as_tensor(list(pages), dtype=torch.long, device=self.device)
        return self.k.index_select(1, index), self.v.index_select(1, index)


@dataclass
class PagedKV:
    """The K/V side of one forward over the pool.

    Part p has rows[p] .. rows[p + 1] - 1 of the forward's new tokens and reads the first keys[p] pages
    of its row of `tables` (the P-tuning prefix, the sequence's cached positions, then the new ones; the
    rest of the row is padding, never read); each query sees its causal share of them, at least
    min_keys[p] (ChatGLM-6B's bidirectional prompt; None = causal only). write[r] is the page of new
    token r. `tables` and `keys` live where the pool does (the kernels read them); `rows` on the CPU. A
    CUDA-graph step keeps all of them in fixed buffers (engine/graphs.py)."""
    pool: KVPool
    write: torch.Tensor               # [N] long: new token r's page
    rows: torch.Tensor                # [P + 1] int32, CPU
    keys: torch.Tensor                # [P] int32
    tables: torch.Tensor              # [P, W] int32: row p = part p's page table, padded
    min_keys: Optional[torch.Tensor] = None   # [P] int32
    host_keys: Optional[List[int]] = None     # keys, on the host (the torch fallback reads them without a sync)

    @classmethod
    def build(cls, pool: KVPool, tables: List[torch.Tensor], new: List[int],
              min_keys: Optional[List[int]] = None) -> 'PagedKV':
        """tables[p]: part p's whole page table (int32, its last new[p] pages are where its new tokens go)."""
        rows = torch.zeros(len(tables) + 1, dtype=torch.int32)
        rows[1:] = torch.tensor(new, dtype=torch.int32).cumsum(0)
        keys = torch.tensor([len(t) for t in tables], dtype=torch.int32)
        padded = torch.nn.utils.rnn.pad_sequence(tables, batch_first=True) if tables else torch.zeros(0, 1, dtype=torch.int32)
        write = torch.cat([t[len(t) - n:] for t, n in zip(tables, new)]).to(dtype=torch.long)
        device = pool.device
        return cls(pool, write.to(device), rows, keys.to(device), padded.to(device),
                   None if min_keys is None else torch.tensor(min_keys, dtype=torch.int32, device=device),
                   [len(t) for t in tables])

    @functools.cached_property
    def key_start(self) -> torch.Tensor:
        """[P] int64: where row p of `tables` starts (the CPU kernel's offsets; one tensor for all layers)."""
        return torch.arange(self.parts, dtype=torch.int64) * self.tables.shape[1]

    def kernel_tables(self):
        """The page tables as the CPU attention kernel reads them (attention.c's nparts, rows, keys,
        min_keys, slots, key_start) -> (tables, those arguments): hold `tables` until the call returns."""
        tables = self.tables.contiguous()
        min_keys = None if self.min_keys is None else self.min_keys.data_ptr()
        return tables, (self.parts, self.rows.data_ptr(), self.keys.data_ptr(), min_keys, tables.data_ptr(),
                        self.key_start.data_ptr())

    @property
    def parts(self) -> int:
        return self.keys.shape[0]

    @property
    def decode_only(self) -> bool:
        """Every part is one new token (a decode step)."""
        return int(self.rows[-1]) == self.parts

    def layer(self, index: int, attend_fallback: Optional[Callable] = None) -> '_LayerKV':
        return _LayerKV(self, index, attend_fallback)


class _LayerKV:
    """One layer's handle on the pool for one forward (gpt-fast's KVCache.update, paged)."""

    def __init__(self, kv: PagedKV, index: int, attend_fallback):
        self.kv, self.index, self.attend_fallback = kv, index, attend_fallback

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q [N, H, d], k/v [N, G, d] of the forward's new tokens -> [N, H, d]: k and v are written to
        their pages, then every query attends over its part's keys."""
        pool = self.kv.pool
        pool.k[self.index].index_copy_(0, self.kv.write, k.to(pool.dtype))
        pool.v[self.index].index_copy_(0, self.kv.write, v.to(pool.dtype))
        return attention.paged(q, pool.k[self.index], pool.v[self.index], self.kv, scale, self.attend_fallback)
