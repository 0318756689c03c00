"""Which page of the K/V pool belongs to whom: page ids only, never the memory (the runner's KVPool holds
that, models/kv_cache.py). A page is one position's K/V in every layer.

`PagePool` hands out free pages and takes them back; `PageTable` is one sequence's pages in position
order. The scheduler owns both: it gives a sequence the pages its next tokens will fill before a forward,
and the prefix cache (prefix_cache.py) keeps the pages of finished and running sequences' prefixes, shared
between the page tables that read them.
"""
from __future__ import annotations

from typing import List, Sequence

import torch


class PagePool:
    def __init__(self, pages: int, reserved: int = 0):
        """pages in all; the first `reserved` are never handed out (a P-tuning prefix every table starts with,
        a scratch page)."""
        self.pages = pages
        self.reserved = list(range(reserved))
        # A stack of the free page ids (int32: a pool of millions of small pages costs 4 bytes each, not a
        # Python int each): the lowest pages on top, and a freed page is the next one handed out, so the
        # memory a CPU pool touches stays as small as the busiest moment needed.
        self._stack = torch.arange(pages - 1, reserved - 1, -1, dtype=torch.int32)
        self._top = pages - reserved

    @property
    def free(self) -> int:
        return self._top

    def take(self, n: int) -> List[int]:
        if n > self._top:
            raise MemoryError(f'{n} K/V pages asked for, {self._top} free')
        taken = self._stack[self._top - n:self._top].flip(0).tolist()
        self._top -= n
        return taken

    def give_back(self, pages: Sequence[int]):
        n = len(pages)
        if n:
            self._stack[self._top:self._top + n] = torch.as_tensor(list(pages), dtype=torch.int32).flip(0)
            self._top += n


class PageTable:
    """A sequence's pages in position order, kept as an int32 tensor that grows by doubling (the runner
    reads it as one: a long conversation's table is not rebuilt from a list at every step)."""

    def __init__(self, pages: Sequence[int] = ()):
        self._data = torch.empty(max(64, 2 * len(pages)), dtype=torch.int32)
        self.length = 0
        self.extend(pages)

    def __len__(self) -> int:
        return self.length

    def extend(self, pages: Sequence[int]):
        n = self.length + len(pages)
        if n > self._data.shape[0]:
            grown = torch.empty(2 * n, dtype=torch.int32)
            grown[:self.length] = self._data[:self.length]
            self._data = grown
        if len(pages):
            self._data[self.length:n] = torch.as_tensor(pages, dtype=torch.int32)
        self.length = n

    def tensor(self) -> torch.Tensor:
        """The pages as an int32 tensor (a view: valid until the table changes)."""
        return self._data[:self.length]

    def pages(self, start: int = 0, end: int = None) -> List[int]:
        return self._data[start:self.length if end is None else end].tolist()

    def truncate(self, length: int):
        self.length = min(self.length, length)

    def replace(self, start: int, pages: Sequence[int]):
        """Point positions start .. start + len(pages) at other pages (the prefix cache's copies of them)."""
        self._data[start:start + len(pages)] = torch.as_tensor(pages, dtype=torch.int32)
