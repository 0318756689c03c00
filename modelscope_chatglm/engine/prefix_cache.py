"""The prefix cache: which pages of the K/V pool hold which token prefixes, in a radix tree of token runs
(SGLang's RadixAttention), so that what many conversations share is computed and held once.

Each node holds a run of tokens and the pages holding their K/V (engine/kv_pages.py). The path from the
root to a node spells a prefix, and a node's pages hold its tokens' K/V after exactly that prefix: the
pages along a path, in order, are a page table for the tokens it spells. A 1,000-token system prompt that
50 conversations open with is one node with 50 children, and each conversation's page table starts
with that node's pages: nothing is copied, neither on a hit nor when a sequence's K/V are kept.

- `match(tokens)`: the longest cached prefix of `tokens`, its pages and the node where it ends (a node
  that the match leaves midway is split first, so the match always ends on a node).
- `insert(tokens, pages)`: the tree takes the pages of the part of `tokens` it did not hold yet; the
  caller gives back its own pages for the part it did (another sequence computed them meanwhile).
- `lock(node)` / `unlock(node)`: a running sequence locks the node its page table's cached prefix ends
  at, and with it every node above (SGLang's lock_ref): locked pages are never evicted.
- `evict(pages)`: give the least recently used unlocked leaves' pages back to the pool. A node is used
  whenever a match or an insert passes through it, so a shared prefix outlives the conversations that
  branch off it.

Running sequences insert each prompt chunk as it is computed, so a sequence that starts while another
is still prefilling the same system prompt takes the pages already done. Each namespace has a tree of
its own: a LoRA adapter's K/V differ from the base model's for the same tokens, and a server keeps each
tenant's (API key's, cache_salt's) prompts apart, since how much of a prompt is cached, or how fast it
comes back, would tell one client what another sent. `pages`, `locked` and `nodes` are
plain numbers: /health reads them from another thread.
"""
from __future__ import annotations

import heapq
import itertools
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

from .kv_pages import PagePool


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


class Node:
    __slots__ = ('tokens', 'pages', 'children', 'parent', 'last_used', 'lock_ref', 'in_tree')

    def __init__(self, tokens: List[int], pages: List[int], parent: Optional['Node'], last_used: int):
        self.tokens = tokens            # the run this node adds to its parent's prefix
        self.pages = pages              # the pages holding their K/V (empty at a root)
        self.children: Dict[int, 'Node'] = {}    # by the first token of the child's run
        self.parent = parent
        self.last_used = last_used
        self.lock_ref = 0               # running sequences whose cached prefix runs through this node
        self.in_tree = True


class PrefixCache:
    def __init__(self, pool: PagePool):
        self.pool = pool
        self._roots: Dict[Hashable, Node] = {}     # one tree per namespace
        self._leaves: Dict[int, Node] = {}      # id(node) -> node
        # The leaves by last use, a heap of (last_used, tiebreak, node). An entry whose node has been used
        # since (or has grown children, left the tree, been locked) is stale and skipped when it comes up;
        # the heap is rebuilt from the leaves when stale entries outnumber them. So an eviction costs
        # log(leaves), not a scan of them all.
        self._heap: List[Tuple[int, int, Node]] = []
        self._clock = itertools.count(1)
        self._tiebreak = itertools.count()
        self.pages = 0      # pages the tree holds
        self.locked = 0     # of those, pages of locked nodes
        self.nodes = 0

    @property
    def evictable(self) -> int:
        return self.pages - self.locked

    def root(self, namespace: Hashable) -> Node:
        node = self._roots.get(namespace)
        if node is None:
            node = self._roots[namespace] = Node([], [], None, 0)
        return node

    def match(self, tokens: Sequence[int], namespace: Hashable = None) -> Tuple[int, List[int], Node]:
        """-> (n, pages, node): the first n tokens are cached, `pages` hold their K/V, and the path to
        `node` spells exactly them (the root when n = 0). Every node on the path counts as used."""
        node, n, pages = self.root(namespace), 0, []
        now = next(self._clock)
        while n < len(tokens):
            child = node.children.get(tokens[n])
            if child is None:
                break
            same = common_prefix(child.tokens, tokens[n:n + len(child.tokens)])
            self._use(child, now)
            if same < len(child.tokens):
                child = self._split(child, same)
            pages += child.pages
            n += same
            node = child
        return n, pages, node

    def insert(self, tokens: Sequence[int], pages: Sequence[int], namespace: Hashable = None) -> int:
        """Keep `pages` as the K/V of `tokens` (position i in pages[i]). -> how many leading tokens the tree
        held already: their pages in `pages` stay the caller's (duplicates, to give back or keep); the tree
        takes the rest."""
        now = next(self._clock)
        node, n = self.root(namespace), 0
        while n < len(tokens):
            child = node.children.get(tokens[n])
            if child is None:
                break
            same = common_prefix(child.tokens, tokens[n:n + len(child.tokens)])
            self._use(child, now)
            if same < len(child.tokens):
                child = self._split(child, same)   # the new tokens branch off inside this run
            n += same
            node = child
        if n < len(tokens) and node.parent is not None and not node.children:
            # The path ends at a leaf: it grows in place (a conversation's turns, a prompt's chunks stay one
            # node; whoever holds it locked holds the new pages too, until they finish).
            node.tokens = node.tokens + list(tokens[n:])
            node.pages = node.pages + list(pages[n:len(tokens)])
            self.pages += len(tokens) - n
            if node.lock_ref:
                self.locked += len(tokens) - n
        elif n < len(tokens):
            leaf = Node(list(tokens[n:]), list(pages[n:len(tokens)]), node, now)
            self._leaves.pop(id(node), None)   # (a root is never in it)
            node.children[leaf.tokens[0]] = leaf
            self._add_leaf(leaf)
            self.nodes += 1
            self.pages += len(leaf.pages)
        return n

    def lock(self, node: Node):
        while node.parent is not None:
            if node.lock_ref == 0:
                self.locked += len(node.pages)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: Node):
        while node.parent is not None:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.locked -= len(node.pages)
                if not node.children:
                    self._push(node)     # evictable again
            node = node.parent

    def evict(self, pages: int) -> int:
        """Give back at least `pages` pages (fewer when not that many are unlocked), least recently used
        leaves first; -> pages given back."""
        freed = 0
        while freed < pages and self._heap:
            used, _, leaf = heapq.heappop(self._heap)
            if not leaf.in_tree or leaf.children or leaf.lock_ref or used != leaf.last_used:
                continue
            del self._leaves[id(leaf)]
            leaf.in_tree = False
            parent = leaf.parent
            del parent.children[leaf.tokens[0]]
            if parent.parent is not None and not parent.children:
                self._add_leaf(parent)
            self.nodes -= 1
            self.pages -= len(leaf.pages)
            self.pool.give_back(leaf.pages)
            freed += len(leaf.pages)
        return freed

    def clear(self) -> int:
        """Evict every unlocked page; -> pages given back."""
        return self.evict(self.pages)

    def drop(self, which: Callable[[Hashable], bool]) -> int:
        """Forget the whole tree of every namespace for which `which(namespace)` is true and give its pages
        back (a LoRA adapter was removed: K/V its weights computed must never be reused, not even by an
        adapter of the same name loaded later); -> pages given back. No running sequence may hold a node
        of them: its page table would keep pages the pool hands out again."""
        gone = [namespace for namespace in self._roots if which(namespace)]
        nodes, stack = [], [child for namespace in gone for child in self._roots[namespace].children.values()]
        while stack:
            node = stack.pop()
            nodes.append(node)
            stack.extend(node.children.values())
        if any(node.lock_ref for node in nodes):
            raise RuntimeError('a running sequence holds K/V of a prefix-cache namespace being dropped')
        for namespace in gone:
            del self._roots[namespace]
        freed = 0
        for node in nodes:
            node.in_tree = False          # (its entries left in the eviction heap are skipped)
            self._leaves.pop(id(node), None)
            self.pool.give_back(node.pages)
            freed += len(node.pages)
        self.nodes -= len(nodes)
        self.pages -= freed
        return freed

    def _use(self, node: Node, now: int):
        node.last_used = now
        if not node.children:             # a leaf: its place in the eviction order moves
            self._push(node)

    def _add_leaf(self, node: Node):
        self._leaves[id(node)] = node
        self._push(node)

    def _push(self, node: Node):
        if len(self._heap) > 2 * len(self._leaves) + 64:
            self._heap = [(leaf.last_used, next(self._tiebreak), leaf) for leaf in self._leaves.values()]
            heapq.heapify(self._heap)
        heapq.heappush(self._heap, (node.last_used, next(self._tiebreak), node))

    def _split(self, node: Node, at: int) -> Node:
        """Cut `node`'s run after `at` tokens: a new node above it takes the head (and the same locks:
        whoever locked `node` passed through it), `node` keeps the tail and its children, so a sequence
        holding `node` still holds the same path. -> the head. No K/V moves: the pages are split."""
        head = Node(node.tokens[:at], node.pages[:at], node.parent, node.last_used)
        head.lock_ref = node.lock_ref
        node.parent.children[head.tokens[0]] = head
        node.tokens, node.pages, node.parent = node.tokens[at:], node.pages[at:], head
        head.children = {node.tokens[0]: node}
        self.nodes += 1
        return head
