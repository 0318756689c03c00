"""Decode steps replayed from CUDA graphs.

One decode step of a 28-layer model is about 600 small kernels. Launched one by one from Python, the
GPU waits on the CPU between them; captured once into a CUDA graph, a step is a single launch.

A graph replays fixed shapes and fixed addresses, so the captured step is `GLM2Model.decode_static`:
the new K/V go to a cache position held in a device tensor (`slot`), and attention reads a fixed
window of the cache through a mask. The window is the smallest power of two, at least MIN_WIDTH,
that covers the positions written so far (capped at the cache's capacity): a short reply never reads
the whole cache. Each window width gets its own graph, captured the first time it is needed (at most
log2(capacity / MIN_WIDTH) + 2 graphs per cache), all sharing one memory pool.

The graphs belong to one `DecodeState`, because they hold its cache buffers' addresses; when the
cache is reallocated (`KVCache.reserve`, as a conversation outgrows it) they are captured again.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_WIDTH = 256
captures = 0      # graphs captured in this process (the tests check that graphs were used)


class GraphedDecoder:
    """capture=False runs the same static steps eagerly: how the CPU tests check their math."""

    def __init__(self, model, state, capture: bool = True):
        cache, device = state.cache, model.device
        self.capture = capture
        batch = state.next_position.shape[0]
        # The graphs' inputs: the step copies new values into these before each replay.
        self.ids = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        # Cache positions a query may see at all: everything but left padding. Positions past the
        # slot are hidden by decode_static itself.
        self.key_ok = torch.ones(batch, cache.capacity, dtype=torch.bool, device=device)
        if state.padding is not None:
            pre = model.cfg.pre_seq_len or 0
            self.key_ok[:, pre:pre + state.padding.shape[1]] = state.padding
        # The window reads positions nothing has written yet. The mask gives them weight 0, but
        # 0 * NaN is NaN in P @ V, and fresh memory can hold NaN patterns: zero them once.
        for buffers in (cache.k, cache.v):
            for layer in buffers:
                layer[:, :, cache.length:].zero_()
        self.buffers = self._buffers(cache)
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.graphs = {}          # window width -> (graph, its logits output)

    @staticmethod
    def _buffers(cache):
        return cache.k[0].data_ptr(), cache.capacity

    def fits(self, state, capture: bool) -> bool:
        return self._buffers(state.cache) == self.buffers and capture == self.capture

    def step(self, model, next_ids: torch.Tensor, state) -> torch.Tensor:
        cache = state.cache
        slot = cache.length
        if slot >= cache.capacity:
            raise RuntimeError(f'KV cache overflow: {slot + 1} positions needed, {cache.capacity} allocated')
        width = min(cache.capacity, max(MIN_WIDTH, 1 << slot.bit_length()))   # > slot
        self.ids.copy_(next_ids)
        self.positions.copy_(state.next_position)
        self.slot.fill_(slot)
        if self.capture:
            graph, logits = self.graphs.get(width) or self._capture(model, cache, width)
            graph.replay()
        else:
            logits = model.decode_static(self.ids, self.positions, cache, self.slot, self.key_ok[:, :width])
        cache.commit(1)
        state.next_position = state.next_position + 1
        if state.padding is not None:
            state.padding = F.pad(state.padding, (0, 1), value=True)
        # The output lives in the graphs' pool: hand out a copy that the next replay cannot touch.
        return logits.clone()

    def _capture(self, model, cache, width: int):
        global captures
        key_ok = self.key_ok[:, :width]

        def run():
            return model.decode_static(self.ids, self.positions, cache, self.slot, key_ok)

        # Warm up on a side stream first (Triton compiles, cuBLAS and SDPA pick their kernels, the
        # allocator settles), as capture requires. It computes this very step, so nothing is lost.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode='thread_local'):
            logits = run()
        self.graphs[width] = (graph, logits)
        captures += 1
        return graph, logits


def decode_with_graphs(model, next_ids: torch.Tensor, state, capture: bool = True) -> torch.Tensor:
    """A decode step of the sequences of `state` (engine/runner.py's step for one sequence on CUDA): feed
    next_ids [b], -> next logits [b, V] (fp32). capture=False runs the same static step without graphs."""
    if state.graphs is None or not state.graphs.fits(state, capture):
        state.graphs = GraphedDecoder(model, state, capture)
    return state.graphs.step(model, next_ids, state)
