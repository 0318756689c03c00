"""The model runner: executes what the scheduler planned, one forward at a time, and samples.

`execute(forward)` puts the new tokens of every part (a prompt chunk or one decode token of a sequence)
through the model in one pass (`forward_ragged`: the linears see all rows at once, attention runs over
each sequence's own cache), then samples a token for each part whose sequence is due one, and scores
the prompt positions a request asked logprobs for. It returns a `ForwardResult`; applying it to the
sequences is the scheduler's (`Scheduler.update`).

On CUDA a decode step of a single sequence (one user chatting) is the model's static step
(`decode_static`) replayed from CUDA graphs (models/cuda_graphs.py): the same kernels, launched as one
graph instead of ~600 launches. Batched decode steps run eagerly for now. On a CPU the same static
step can run without capture (`static_decode`), which is how the tests check it.

`KVAllocator` is the runner's side of memory: it makes, grows and fills the caches the scheduler
budgets for, so the scheduler never touches a tensor.
"""
from __future__ import annotations

import logging
from typing import List

import torch

from .. import adapters
from ..models.cuda_graphs import decode_with_graphs
from .sampling import sample, token_logprobs
from .scheduler import Forward, ForwardResult

logger = logging.getLogger(__name__)


class KVAllocator:
    """What the scheduler may know and ask of a model's K/V memory."""

    def __init__(self, model):
        self.model = model
        cfg = model.cfg
        self.device = model.device
        self.pre = cfg.pre_seq_len or 0
        self.dtype = model.word_embeddings.weight.dtype
        self.bytes_per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * self.dtype.itemsize
        self.supports_prefix_reuse = model.supports_prefix_reuse
        self.adapters = adapters.adapter_names(model)

    def fits(self, model) -> bool:
        """Whether caches made for the model as it was still fit it (`model.to(...)` casts or moves it)."""
        return model.word_embeddings.weight.dtype == self.dtype and model.device == self.device

    def start(self, fill: List[int], room: int):
        """A sequence's decode state with room for `fill` and `room` more tokens (nothing runs)."""
        return self.model.start(fill, room)

    def grow(self, state, capacity: int):
        state.cache.reserve(capacity, block=1)

    def adopt_prefix(self, state, segments, keep: int):
        self.model.adopt_prefix(state, segments, keep)

    def rows_keep_their_bits(self, rows: int) -> bool:
        return self.model.rows_keep_their_bits(rows)


class ModelRunner:
    # Decode tokens a sequence runs eagerly before its steps are captured: a sequence's cache is memory of
    # its own, so its graphs are captured anew (and again when its cache grows); a short reply never pays.
    GRAPH_AFTER_TOKENS = 16

    def __init__(self, model, vocab_limit: int):
        self.model = model
        self.vocab_limit = vocab_limit      # ids at or past it are padded embedding rows, not tokens
        self.kv = KVAllocator(model)
        # A single sequence's decode step is the static, graph-capturable step where the model has one
        # (ChatGLM2/3) and no LoRA adapter is held unmerged (a graph would freeze which adapter its rows
        # take); on CUDA it is captured and replayed unless the model's cuda_graphs is off.
        self.static_decode = (model.device.type == 'cuda' and hasattr(model, 'decode_static')
                              and not self.kv.adapters)

    def execute(self, forward: Forward) -> ForwardResult:
        parts, scored = forward.parts, forward.scored
        try:
            if (self.static_decode and forward.prompt_parts == 0 and len(parts) == 1
                    and len(parts[0][0].output) >= self.GRAPH_AFTER_TOKENS):
                seq, ids = parts[0]
                capture = self.model.device.type == 'cuda' and self.model.cuda_graphs
                logits = decode_with_graphs(self.model, torch.tensor(ids, device=self.model.device), seq.state,
                                            capture=capture)
            else:
                with adapters.rows([(seq.adapter, len(ids)) for seq, ids in parts]):
                    logits = self.model.forward_ragged([(seq.state, ids) for seq, ids in parts], every=scored)
        except Exception as e:   # a failing forward ends its sequences, never the engine
            logger.exception('forward failed; ending %d sequence(s)', len(parts))
            return ForwardResult(error=e)
        result = ForwardResult()
        offset = len(parts)   # each position of the scored prompt chunks follows the parts' last rows
        for row in scored:
            seq, ids = parts[row]
            result.prompt_logprobs[row] = self._score_prompt(seq, logits[offset:offset + len(ids)])
            offset += len(ids)
        for row, (seq, _) in enumerate(parts):
            if not forward.due(row):
                continue
            try:
                token = sample(logits[row:row + 1], seq, self.vocab_limit)
            except Exception as e:   # NaN logits, or parameters that passed no validation: this sequence only
                logger.warning('sampling failed; ending the sequence: %s', e)
                result.failures[row] = e
                continue
            result.tokens[row] = token
            if seq.logprobs is not None:
                result.logprobs[row] = token_logprobs(logits[row:row + 1], [token], seq.top_logprobs,
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
