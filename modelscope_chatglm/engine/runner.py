"""The model runner: executes what the scheduler planned, one forward at a time, and samples.

`execute(forward)` puts the new tokens of every part (a prompt chunk or one decode token of a sequence)
through the model in one pass (`forward_ragged`): the linears see all rows at once, and each layer's
attention is one call over every part's page table (models/attention.py). It then samples a token for each
part whose sequence is due one, and scores the prompt positions a request asked logprobs for. It returns a
`ForwardResult`; applying it to the sequences is the scheduler's (`Scheduler.update`).

On CUDA, a forward of decode tokens only is replayed from a CUDA graph captured for its batch bucket
(graphs.py); prompt chunks run eagerly, and so does every forward while the model holds LoRA adapters
(`adapters_changed`).

`KVAllocator` is the runner's side of memory: the K/V pool (models/kv_cache.py) whose pages the scheduler
hands out by number, so the scheduler never touches a tensor.
"""
from __future__ import annotations

import logging

import torch

from .. import adapters
from ..models.kv_cache import KVPool, PagedKV
from .graphs import GraphRunner
from .sampling import sample, token_logprobs
from .scheduler import Forward, ForwardResult

logger = logging.getLogger(__name__)


class KVAllocator:
    """The model's K/V pool, and what the scheduler may know of it."""

    def __init__(self, model, budget_bytes: int):
        self.model = model
        cfg = model.cfg
        self.device = model.device
        self.pre = cfg.pre_seq_len or 0
        self.dtype = model.dtype
        self.bytes_per_token = cfg.num_layers * 2 * model.kv_heads * cfg.head_dim * self.dtype.itemsize
        # Pages: the P-tuning prefix, a scratch page (the padding rows of a graphed step write there), then
        # the sequences'.
        self.scratch_page = self.pre
        self.reserved = self.pre + 1
        self.pages = max(self.reserved + 1, budget_bytes // self.bytes_per_token)
        self.pool = KVPool(cfg.num_layers, model.kv_heads, cfg.head_dim, self.pages, self.dtype, self.device)
        if self.pre:   # P-tuning v2: the learned prefix, in the pages every page table starts with
            with torch.no_grad():
                self.pool.hold_prefix(range(self.pre), model.prefix_kv())
        self.prefix_pages = torch.arange(self.pre, dtype=torch.int32)
        self.supports_prefix_reuse = model.supports_prefix_reuse
        self.adapters = adapters.adapter_names(model)

    def fits(self, model) -> bool:
        """Whether the pool made for the model as it was still fits it (`model.to(...)` casts or moves it)."""
        return model.dtype == self.dtype and model.device == self.device

    def start(self, fill):
        """A sequence's family state (models/base.py `start`; nothing runs)."""
        return self.model.start(fill)

    def keys(self, seq) -> torch.Tensor:
        """A running sequence's whole page table: the P-tuning prefix, then its own."""
        table = seq.table.tensor()
        return torch.cat([self.prefix_pages, table]) if self.pre else table

    def rows_keep_their_bits(self, rows: int) -> bool:
        return self.model.rows_keep_their_bits(rows)


class ModelRunner:
    def __init__(self, model, vocab_limit: int, kv_budget_bytes: int, max_batch: int):
        self.model = model
        self.vocab_limit = vocab_limit      # ids at or past it are padded embedding rows, not tokens
        self.kv = KVAllocator(model, kv_budget_bytes)
        # Decode steps from CUDA graphs: on CUDA, for a model with the fixed-shape step, unless turned off
        # (load(cuda_graphs=False)) or LoRA adapters are held unmerged.
        graphable = hasattr(model, 'forward_tokens') and getattr(model, 'cuda_graphs', False) and not self.kv.adapters
        self.graphs = (GraphRunner(model, self.kv.pool, max_batch, self.kv.scratch_page)
                       if graphable and model.device.type == 'cuda' else None)
        self._graphs_set_aside = None   # while adapters added at run time are held

    def adapters_changed(self):
        """The engine added or removed a LoRA adapter (between two steps). A graph would freeze which adapter
        each row takes, so decode steps run eagerly while the model holds any; once none is left, the graphs
        set aside replay again (they were captured on the same base weights, which an adapter never changes)."""
        self.kv.adapters = adapters.adapter_names(self.model)
        if self.kv.adapters and self.graphs is not None:
            self._graphs_set_aside, self.graphs = self.graphs, None
        elif not self.kv.adapters and self._graphs_set_aside is not None:
            self.graphs, self._graphs_set_aside = self._graphs_set_aside, None

    def execute(self, forward: Forward) -> ForwardResult:
        parts, scored = forward.parts, forward.scored
        try:
            if self.graphs is not None and forward.prompt_parts == 0 and len(parts) <= self.graphs.max_batch:
                logits = self.graphs.step([ids[0] for _, ids in parts], [len(seq.table) - 1 for seq, _ in parts],
                                          [self.kv.keys(seq) for seq, _ in parts])
            else:
                kv = PagedKV.build(self.kv.pool, [self.kv.keys(seq) for seq, _ in parts],
                                   [len(ids) for _, ids in parts])
                with adapters.rows([(seq.adapter, len(ids)) for seq, ids in parts]):
                    logits = self.model.forward_ragged(
                        [(seq.state, len(seq.table) - len(ids), ids) for seq, ids in parts], kv, every=scored)
        except Exception as e:   # a failing forward ends its sequences, never the engine
            logger.exception('forward failed; ending %d sequence(s)', len(parts))
            return ForwardResult(error=e)
        result = ForwardResult()
        offset = len(parts)   # each position of the scored prompt chunks follows the parts' last rows
        for row in scored:
            seq, ids = parts[row]
            result.prompt_logprobs[row] = self._score_prompt(seq, logits[offset:offset + len(ids)])
            offset += len(ids)
        due = [row for row in range(len(parts)) if forward.due(row)]
        if due:
            index = torch.tensor(due, device=logits.device)
            tokens, failures = sample(logits[index], [parts[row][0] for row in due], self.vocab_limit)
            for i, row in enumerate(due):
                if i in failures:   # NaN logits, or parameters that passed no validation: this sequence only
                    logger.warning('sampling failed; ending the sequence: %s', failures[i])
                    result.failures[row] = failures[i]
                    continue
                seq = parts[row][0]
                result.tokens[row] = tokens[i]
                if seq.logprobs is not None:
                    result.logprobs[row] = token_logprobs(logits[row:row + 1], [tokens[i]], seq.top_logprobs,
                                                          self.vocab_limit)[0]
        return result

    def _score_prompt(self, seq, logits: torch.Tensor) -> list:
        """The logprobs of the prompt tokens that a prompt chunk's logits [len, V] predict: its row j, at
        position prefilled + j, predicts the token after it."""
        first = len(seq.prompt_logprobs) + 1     # the next prompt position without a logprob
        start = first - seq.prefilled - 1        # its row in this chunk
        targets = seq.prompt[first:seq.prefilled + len(logits) + 1]
        if start >= 0 and targets:
            return token_logprobs(logits[start:start + len(targets)], targets, seq.top_prompt_logprobs,
                                  self.vocab_limit)
        return []
