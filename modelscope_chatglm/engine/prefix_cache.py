"""The prefix cache: K/V of finished sequences in a radix tree of token runs (SGLang's RadixAttention
layout), so that what many conversations share is held once.

Each node holds a run of tokens and the K/V of their positions (`KVSegment`). The path from the root
to a node spells a prefix, and a node's K/V are those of its tokens after exactly that prefix, so any
path's segments, in order, are the K/V of the tokens it spells. A 1,000-token system prompt that 50
conversations open with is one node with 50 children, not 50 copies.

- `match(tokens)`: the longest cached prefix of `tokens` and the segments holding its K/V.
- `insert(tokens, kv)`: keep a finished sequence's K/V. Only the part past the longest cached prefix is
  copied; a node whose run the new tokens leave midway is split in two first.
- `evict_oldest()`: drop the least recently used leaf. A node is used whenever a match or an insert
  passes through it, so a shared prefix outlives the conversations that branch off it.

Each LoRA adapter has a tree of its own: its K/V differ from the base model's for the same tokens.
`nbytes` and `nodes` are plain numbers: /health reads them from another thread.
"""
from __future__ import annotations

import heapq
import itertools
from typing import Dict, List, Optional, Sequence, Tuple

from ..models.kv_cache import KVSegment


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists (slices compare in C: a binary search
    over them beats a Python loop over the tokens)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:      # a[:lo] == b[:lo]; the answer is in [lo, hi]
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class _Node:
    __slots__ = ('tokens', 'kv', 'children', 'parent', 'last_used', 'in_tree')

    def __init__(self, tokens: List[int], kv: Optional[KVSegment], parent: Optional['_Node'], last_used: int):
        self.tokens = tokens            # the run this node adds to its parent's prefix
        self.kv = kv                    # their K/V (None at a root)
        self.children: Dict[int, '_Node'] = {}    # by the first token of the child's run
        self.parent = parent
        self.last_used = last_used
        self.in_tree = True


class PrefixCache:
    def __init__(self):
        self._roots: Dict[Optional[str], _Node] = {}
        self._leaves: Dict[int, _Node] = {}      # id(node) -> node
        # The leaves by last use, a heap of (last_used, tiebreak, node). An entry whose node has been
        # used since (or has grown children, or left the tree) is stale and skipped when it comes up;
        # the heap is rebuilt from the leaves when stale entries outnumber them. So an eviction costs
        # log(leaves), not a scan of them all: freeing room for one long prompt among many short
        # cached ones evicts thousands of leaves.
        self._heap: List[Tuple[int, int, _Node]] = []
        self._clock = itertools.count(1)
        self._tiebreak = itertools.count()
        self.nbytes = 0
        self.nodes = 0

    def match(self, tokens: Sequence[int], adapter: Optional[str] = None) -> Tuple[int, List[KVSegment]]:
        """-> (n, segments): the first n tokens are cached, and the segments (in order, the last one
        possibly longer than needed) hold their K/V. Every node on the path counts as used."""
        node, n, segments = self._roots.get(adapter), 0, []
        now = next(self._clock)
        while node is not None and n < len(tokens):
            child = node.children.get(tokens[n])
            if child is None:
                break
            same = common_prefix(child.tokens, tokens[n:n + len(child.tokens)])
            self._use(child, now)
            segments.append(child.kv)
            n += same
            if same < len(child.tokens):
                break
            node = child
        return n, segments

    def insert(self, tokens: Sequence[int], kv: KVSegment, adapter: Optional[str] = None) -> int:
        """Keep the K/V of `tokens` (kv: their positions, e.g. a view of a finished sequence's cache;
        what is kept is copied). -> bytes added."""
        if not tokens:
            return 0
        now = next(self._clock)
        node = self._roots.get(adapter)
        if node is None:
            node = self._roots[adapter] = _Node([], None, None, now)
        n = 0
        while n < len(tokens):
            child = node.children.get(tokens[n])
            if child is None:
                break
            same = common_prefix(child.tokens, tokens[n:n + len(child.tokens)])
            self._use(child, now)
            if n + same == len(tokens):
                return 0                  # all of it is held already
            if same < len(child.tokens):
                self._split(child, same)  # the new tokens branch off inside this run
            n += same
            node = child
        leaf = _Node(list(tokens[n:]), kv.slice(n, len(tokens)).clone(), node, now)
        self._leaves.pop(id(node), None)  # (a root is never in it: it holds nothing)
        node.children[leaf.tokens[0]] = leaf
        self._add_leaf(leaf)
        self.nodes += 1
        added = leaf.kv.nbytes()
        self.nbytes += added
        return added

    def evict_oldest(self) -> int:
        """Drop the least recently used leaf; -> bytes freed (0 when the cache is empty)."""
        while self._heap:
            used, _, leaf = heapq.heappop(self._heap)
            if leaf.in_tree and not leaf.children and used == leaf.last_used:
                break
        else:
            return 0
        del self._leaves[id(leaf)]
        leaf.in_tree = False
        parent = leaf.parent
        del parent.children[leaf.tokens[0]]
        if parent.parent is not None and not parent.children:
            self._add_leaf(parent)
        self.nodes -= 1
        freed = leaf.kv.nbytes()
        self.nbytes -= freed
        return freed

    def _use(self, node: _Node, now: int):
        node.last_used = now
        if not node.children:             # a leaf: its place in the eviction order moves
            self._push(node)

    def _add_leaf(self, node: _Node):
        self._leaves[id(node)] = node
        self._push(node)

    def _push(self, node: _Node):
        if len(self._heap) > 2 * len(self._leaves) + 64:
            self._heap = [(leaf.last_used, next(self._tiebreak), leaf) for leaf in self._leaves.values()]
            heapq.heapify(self._heap)
        heapq.heappush(self._heap, (node.last_used, next(self._tiebreak), node))

    def _split(self, node: _Node, at: int):
        """Cut `node`'s run after `at` tokens: it keeps the head, a new child takes the rest and the
        children. Both halves are copied, so that either frees its own memory when evicted (at most one
        node's K/V per insert: never more than the finished sequence itself)."""
        head, tail = node.kv.slice(0, at).clone(), node.kv.slice(at, len(node.tokens)).clone()
        rest = _Node(node.tokens[at:], tail, node, node.last_used)
        rest.children = node.children
        for child in rest.children.values():
            child.parent = rest
        node.tokens, node.kv, node.children = node.tokens[:at], head, {rest.tokens[0]: rest}
        if self._leaves.pop(id(node), None) is not None:
            self._add_leaf(rest)
        self.nodes += 1
