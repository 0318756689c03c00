"""Decode steps replayed from CUDA graphs (the runner's, as vLLM's CUDA-graph runner does it).

A decode step of a 28-layer model is ~600 small kernels; launched one by one from Python, the GPU
waits on the CPU between them. Captured once into a graph, a step is a single launch.

A graph replays fixed shapes and fixed addresses, so the runner captures the model's decode step
(`forward_tokens`, one token per sequence) once per batch bucket and table width, over buffers it owns:
before each replay it copies the step's inputs into them (token ids, positions, the page each new K/V
goes to, the page tables and their lengths). Buckets are batch sizes 1, 2, 4, 8, ... up to the engine's
max_batch: a batch of 5 replays the graph of 8, whose three padding rows read and write a scratch page
that no sequence owns. Table widths are powers of two from MIN_WIDTH: the split-K attention's grid
follows the width, its work each sequence's real length. Graphs share one memory pool.

Prompt chunks run eagerly (their shapes change every step), and so do models holding unmerged LoRA
adapters (a graph would freeze which adapter each row takes). capture=False runs the same fixed-shape
steps without capture: how the CPU tests check everything but the capture itself.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from ..models.kv_cache import KVPool, PagedKV

MIN_WIDTH = 256
captures = 0      # graphs captured in this process (the GPU tests check that graphs were used)


class GraphRunner:
    def __init__(self, model, pool: KVPool, max_batch: int, scratch_page: int, capture: bool = True):
        self.model, self.pool, self.scratch, self.capture = model, pool, scratch_page, capture
        self.buckets = [1]
        while self.buckets[-1] < max_batch:
            self.buckets.append(2 * self.buckets[-1])
        most, device = self.buckets[-1], model.device
        self.max_batch = most
        self.ids = torch.zeros(most, dtype=torch.long, device=device)
        self.positions = torch.zeros(most, dtype=torch.long, device=device)
        self.write = torch.full((most,), scratch_page, dtype=torch.long, device=device)
        self.keys = torch.ones(most, dtype=torch.int32, device=device)
        self.tables: Dict[int, torch.Tensor] = {}                       # width -> [most, width] page tables
        self.graphs: Dict[Tuple[int, int], Tuple[object, torch.Tensor]] = {}   # (bucket, width) -> graph, logits
        self.mempool = torch.cuda.graph_pool_handle() if capture else None

    def step(self, ids: List[int], positions: List[int], tables: List[torch.Tensor]) -> torch.Tensor:
        """One decode token per sequence: ids and positions of the new tokens, each sequence's whole page table
        (its last page is where the new K/V go). -> logits [n, V] (fp32)."""
        n = len(ids)
        bucket = next(b for b in self.buckets if b >= n)
        width = max(MIN_WIDTH, 1 << (max(len(t) for t in tables) - 1).bit_length())
        if width not in self.tables:
            self.tables[width] = torch.full((self.max_batch, width), self.scratch, dtype=torch.int32,
                                            device=self.model.device)
        host = torch.full((bucket, width), self.scratch, dtype=torch.int32)
        for row, table in enumerate(tables):
            host[row, :len(table)] = table
        self.tables[width][:bucket].copy_(host, non_blocking=True)
        pad = bucket - n
        self.ids[:bucket].copy_(torch.tensor(list(ids) + [0] * pad), non_blocking=True)
        self.positions[:bucket].copy_(torch.tensor(list(positions) + [0] * pad), non_blocking=True)
        self.write[:bucket].copy_(torch.tensor([int(t[-1]) for t in tables] + [self.scratch] * pad), non_blocking=True)
        self.keys[:bucket].copy_(torch.tensor([len(t) for t in tables] + [1] * pad, dtype=torch.int32),
                                 non_blocking=True)
        if not self.capture:
            return self._run(bucket, width)[:n]
        graph, logits = self.graphs.get((bucket, width)) or self._capture(bucket, width)
        graph.replay()
        return logits[:n].clone()      # (the next replay overwrites the graph's output)

    def _run(self, bucket: int, width: int) -> torch.Tensor:
        """The fixed-shape step over the buffers' first `bucket` rows."""
        kv = PagedKV(self.pool, self.write[:bucket], torch.arange(bucket + 1, dtype=torch.int32),
                     self.keys[:bucket], self.tables[width][:bucket])
        hidden = self.model.forward_tokens(self.ids[:bucket], self.positions[:bucket], kv)
        return self.model.logits(self.model.final_layernorm(hidden)).float()

    def _capture(self, bucket: int, width: int):
        global captures
        # Warm up on a side stream first (Triton compiles, cuBLAS picks its kernels, the allocator
        # settles), as capture requires. It computes this very step, so nothing is lost.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run(bucket, width)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool, capture_error_mode='thread_local'):
            logits = self._run(bucket, width)
        self.graphs[(bucket, width)] = (graph, logits)
        captures += 1
        return graph, logits
