"""The scheduler: which sequences run in the next step, with how many tokens each, in what memory.

It decides; it never runs the model (engine/runner.py does) and knows nothing of HTTP, threads beyond
one lock, devices or model families. Each step of the engine (engine/core.py) is
    plan = scheduler.schedule()            # a list of forwards: [(sequence, new token ids), ...]
    for forward in plan:
        result = runner.execute(forward)   # one forward pass, then a token for each sequence due one
        scheduler.update(forward, result)  # append the tokens, call the sequences' consumers, finish
`schedule()`:
  1. forgets cancelled sequences: their KV memory is free at once;
  2. admits waiting requests in arrival order while the batch has room and their K/V fit the memory
     budget (least recently used prefix-cache entries are evicted first; a request that does not fit
     waits, and so do the ones behind it). A new sequence starts from the longest prefix of its prompt
     whose K/V some finished or running sequence holds, and prefills only the rest;
  3. takes one decode token of every sequence past its prompt, and up to `prefill_chunk` prompt tokens
     of the oldest sequences still prefilling, so a long prompt is spread over several steps instead
     of freezing everyone else;
  4. puts them in one forward (the weights are streamed once for all rows) where that changes no row's
     bits (torch's matmuls choose their blocking by the shape); otherwise prompt chunks and decode
     tokens are two forwards.
Attention gives each query its own sums over its own keys (models/attention.py) and every other layer is
row-wise, so a sequence's tokens do not depend on its neighbours: a greedy or seeded reply is the same
alone and in a batch.

Memory: K/V live in one pool of pages (a page is one position, every layer; `--kv-cache-gb` sizes it),
handed out by `PagePool` (kv_pages.py). A sequence's page table lists its pages in position order: it
starts with the pages of the longest cached prefix of its prompt (shared, not copied), then takes a page
per new position as it is computed, so growing copies nothing. The prefix cache (prefix_cache.py, a radix
tree) keeps the pages of every prompt chunk as it is computed and of every finished sequence; a running
sequence locks the part of the tree its table starts with. When the pool runs short, the least recently
used unlocked prefix-cache leaves go first; then the most recently admitted sequence is preempted: its
computed prefix goes to the prefix cache and it goes back to the head of the queue, to continue from
what the cache still holds when there is room. A request is admitted only when its prompt and
GROW_TOKENS more positions fit, so a request that omits max_tokens does not hold a whole context window
of memory.

The scheduler deals in page ids only; the runner (runner.py) owns the pool's memory and reads the page
tables. `submit`, `cancel_all`, `snapshot` and `Sequence.cancel` may be called from any thread, the
rest from the thread that steps (or with the engine's stepping lock held). Tokens reach the caller through `on_token(seq, token)`, called in `update`.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence as Seq, Tuple

import torch

from ..errors import ContextLengthError
from . import grammar
from .kv_pages import PagePool, PageTable
from .prefix_cache import PrefixCache, common_prefix
from .sampling import SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 16
# Prompt tokens prefilled per step, by device: it bounds how long the other streams wait for their next
# token (on a 2-core CPU a full-size model prefills ~12 tokens/s), while big enough to keep the matrix
# units busy.
DEFAULT_PREFILL_CHUNK = {'cpu': 128, 'cuda': 1024}
MAX_TOP_LOGPROBS = 20     # OpenAI's limit on top_logprobs


class Sequence:
    """One generation: its prompt, sampling parameters, the tokens so far and where it stands."""

    def __init__(self, prompt: Seq[int], params: SamplingParams, on_token: Optional[Callable] = None,
                 on_finish: Optional[Callable] = None, adapter: Optional[str] = None,
                 logprobs: Optional[int] = None, prompt_logprobs: Optional[int] = None, cache_scope=None):
        self.prompt = list(prompt)
        self.params = params
        self.adapter = adapter      # a LoRA adapter held by the model (adapters.py); None = the base
        # Whose prefix cache it reads and feeds: its adapter's (other K/V for the same tokens), and within
        # that its scope's (a server's tenant and cache_salt: one client must not learn what another's
        # prompts were from what is cached).
        self.namespace = (adapter, cache_scope)
        # Both called on the stepping thread: on_token(seq, token) -> True to stop here (a stop string),
        # on_finish(seq) once finish_reason is set.
        self.on_token, self.on_finish = on_token, on_finish
        self.budget = params.new_token_budget(len(self.prompt))
        self.output: List[int] = []
        # With logprobs=k: per output token, (its logprob, its k most likely alternatives [(id, logprob)])
        self.logprobs: Optional[List[Tuple[float, List[Tuple[int, float]]]]] = None if logprobs is None else []
        self.top_logprobs = logprobs or 0
        # With prompt_logprobs=k: the same for each prompt token after the first, given those before it
        self.prompt_logprobs: Optional[List[Tuple[float, List[Tuple[int, float]]]]] = \
            None if prompt_logprobs is None else []
        self.top_prompt_logprobs = prompt_logprobs or 0
        self.finish_reason: Optional[str] = None   # 'stop' | 'length' | 'cancelled' | 'error'
        self.error: Optional[BaseException] = None
        # What goes through prefill before decoding: the prompt, or after a preemption the prompt and
        # all but the last generated token (that one is fed by the next decode step).
        self.fill = self.prompt
        self.prefilled = 0          # tokens of `fill` whose K/V are computed (or shared from the prefix cache)
        self.reused = 0             # of those, tokens whose pages came from the prefix cache
        self.state = None           # the model family's per-sequence state (models/base.py `start`), while running
        self.table: Optional[PageTable] = None   # its pages in position order, while running
        self.pending: List[int] = []   # pages taken at admission for the rest of `fill`, in position order
        self.node = None            # the prefix-cache node its table's first `cached` positions lead to (locked)
        self.cached = 0             # leading positions of its table that the prefix cache holds
        # When it came, joined the running batch (the first time), got its first and latest tokens, and
        # finished: time.monotonic(), None until then. A server's latency metrics read them (serve/metrics.py).
        self.arrival = time.monotonic()
        self.admitted: Optional[float] = None
        self.first_token_at: Optional[float] = None
        self.previous_token_at: Optional[float] = None   # the token before the latest (inter-token latency)
        self.last_token_at: Optional[float] = None
        self.finished_at: Optional[float] = None
        self.generator = None
        # Structured output: where the reply stands in its grammar (grammar.py), fed every drawn token
        self.matcher = params.grammar.matcher() if params.grammar is not None else None
        self._cancelled = False
        self._ids, self._ids_filled = None, 0   # prompt + output as a tensor, for the penalties

    def ids_tensor(self, device) -> torch.Tensor:
        """prompt + output as a [1, n] tensor. It grows with `output` by copying only the new tokens:
        building it from the lists at every token would cost time that grows with the reply."""
        n = len(self.prompt) + len(self.output)
        if self._ids is None or self._ids.device != torch.device(device) or self._ids.shape[1] < n:
            grown = torch.empty((1, max(2 * n, 256)), dtype=torch.long, device=device)
            if self._ids is not None and self._ids.device == grown.device:
                grown[:, :self._ids_filled] = self._ids[:, :self._ids_filled]
            else:
                self._ids_filled = 0
            self._ids = grown
        if self._ids_filled < n:
            start = self._ids_filled
            new = self.prompt[start:] + self.output[max(0, start - len(self.prompt)):]
            self._ids[0, start:n] = torch.tensor(new, dtype=torch.long)
            self._ids_filled = n
        return self._ids[:, :n]

    @property
    def scores_prompt(self) -> bool:
        """Whether the logprobs of its prompt are still to be worked out: then its prompt is prefilled
        from the start, not taken from the prefix cache, whose K/V come without logits."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt) - 1

    def cancel(self):
        """Stop at the next step; safe from any thread."""
        self._cancelled = True

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def running(self) -> bool:
        return self.table is not None

    def written_tokens(self) -> List[int]:
        """The tokens whose K/V this running sequence's pages hold (between steps: every page is written;
        the last output is not fed yet)."""
        return (self.prompt + self.output)[:len(self.table)]


class KVBudgetError(ContextLengthError):
    """A request whose K/V alone exceed the whole K/V pool."""


@dataclass
class Forward:
    """One forward pass of a step: parts = [(sequence, new token ids), ...], the first `prompt_parts`
    of them prompt chunks, the rest one decode token each."""
    parts: List[Tuple[Sequence, List[int]]]
    prompt_parts: int

    @property
    def scored(self) -> List[int]:
        """The prompt chunks whose every position's logits are wanted (a prompt being scored)."""
        return [row for row, (seq, _) in enumerate(self.parts[:self.prompt_parts]) if seq.scores_prompt]

    def due(self, row: int) -> bool:
        """Whether part `row` ends where its sequence's next token is to be sampled: a decode token,
        or the last chunk of a prompt (not one coming back after a preemption, whose next token is
        known, nor a prompt only scored)."""
        seq, ids = self.parts[row]
        if row >= self.prompt_parts:
            return True
        return seq.prefilled + len(ids) == len(seq.fill) and not seq.output and seq.budget > 0


@dataclass
class ForwardResult:
    """What the runner computed for a Forward. error: the forward failed (every part ends). Per part
    (by row): tokens[row] the sampled token (rows not due have none), logprobs[row] its (logprob,
    alternatives), prompt_logprobs[row] a scored chunk's entries, failures[row] why its sampling
    failed."""
    error: Optional[BaseException] = None
    tokens: Dict[int, int] = field(default_factory=dict)
    logprobs: Dict[int, tuple] = field(default_factory=dict)
    prompt_logprobs: Dict[int, list] = field(default_factory=dict)
    failures: Dict[int, BaseException] = field(default_factory=dict)


class Scheduler:
    GROW_TOKENS = 256      # room for new tokens a sequence is admitted with (it takes pages as it goes)
    SHARED_WAIT = 64       # a prompt sharing this many uncomputed tokens with an older one waits for its K/V

    def __init__(self, kv, max_batch: int = DEFAULT_MAX_BATCH, prefill_chunk: Optional[int] = None):
        """kv: the runner's KVAllocator (its pool's size in pages, what a page costs, the model's traits)."""
        if not (isinstance(max_batch, int) and max_batch >= 1):
            raise ValueError(f'max_batch must be an integer >= 1, got {max_batch!r}')
        if prefill_chunk is None:
            prefill_chunk = DEFAULT_PREFILL_CHUNK.get(kv.device.type, DEFAULT_PREFILL_CHUNK['cpu'])
        if not (isinstance(prefill_chunk, int) and prefill_chunk >= 1):
            raise ValueError(f'prefill_chunk must be an integer >= 1, got {prefill_chunk!r}')
        self.kv = kv
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.pre = kv.pre                          # P-tuning prefix positions every page table starts with
        self.bytes_per_token = kv.bytes_per_token
        self.pages = PagePool(kv.pages, reserved=kv.reserved)   # (the P-tuning prefix's and a scratch page)
        self.budget = kv.pages * self.bytes_per_token
        # ChatGLM-6B attends its prompt bidirectionally: a prefix's K/V change as the prompt grows.
        self.prefix_cache = PrefixCache(self.pages) if kv.supports_prefix_reuse else None
        self.adapters = kv.adapters                # LoRA adapters a request may pick
        self.waiting: 'deque[Sequence]' = deque()
        self.running: List[Sequence] = []
        self.lock = threading.Lock()
        self.work = threading.Condition(self.lock)
        self.stats: Dict[str, float] = dict(prompt_tokens=0, cached_prompt_tokens=0, generated_tokens=0,
                                            steps=0, completed=0, cancelled=0, failed=0, preempted=0)

    # -- from any thread ----------------------------------------------------------------------------
    def submit(self, prompt: Seq[int], params: SamplingParams, on_token: Optional[Callable] = None,
               on_finish: Optional[Callable] = None, adapter: Optional[str] = None,
               logprobs: Optional[int] = None, prompt_logprobs: Optional[int] = None, cache_scope=None) -> Sequence:
        """Queue a generation. logprobs=k (0-20) records the model's log-probability of each output
        token and of its k most likely alternatives in `seq.logprobs`; prompt_logprobs=k the same for
        each prompt token but the first in `seq.prompt_logprobs` (then max_new_tokens may be 0: the
        prompt is only scored). cache_scope (any hashable): sequences share prefix-cache entries only
        within one scope."""
        if not prompt:
            raise ValueError('a prompt needs at least one token')
        if adapter is not None and adapter not in self.adapters:
            raise ValueError(f'no adapter named {adapter!r}; this model holds {self.adapters or "none"}')
        params.validate()   # the door for every caller: bad parameters fail here, not inside a step
        for name, value in (('logprobs', logprobs), ('prompt_logprobs', prompt_logprobs)):
            if value is not None and not (isinstance(value, int) and 0 <= value <= MAX_TOP_LOGPROBS):
                raise ValueError(f'{name} must be the number of alternatives to report, 0 to {MAX_TOP_LOGPROBS}, '
                                 f'got {value!r}')
        if prompt_logprobs is not None and not self.kv.supports_prefix_reuse:
            raise ValueError('ChatGLM-6B attends its prompt in both directions, so its prompt tokens have no '
                             'left-to-right log-probabilities; ask for the logprobs of generated tokens only')
        seq = Sequence(prompt, params, on_token, on_finish, adapter, logprobs, prompt_logprobs, cache_scope)
        # Pages it may fill: its prompt and every new token but the last (never fed back). The pool's pages
        # but the reserved ones (the P-tuning prefix, the scratch page) can hold them.
        need = len(seq.prompt) + max(seq.budget - 1, 0)
        usable = self.pages.pages - len(self.pages.reserved)
        if need > usable:
            raise KVBudgetError(
                f'this request needs {self.kv_bytes(need) / 2**20:.1f} MiB of KV cache ({len(seq.prompt)} prompt + '
                f'{seq.budget} new tokens) but the KV cache holds {self.kv_bytes(usable) / 2**20:.1f} MiB; ask '
                f'for fewer new tokens (max_tokens) or give it more memory (--kv-cache-gb)')
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.kv.device).manual_seed(params.seed)
        with self.work:
            self.waiting.append(seq)
            self.work.notify_all()
        return seq

    def kv_bytes(self, tokens: int) -> int:
        return (self.pre + tokens) * self.bytes_per_token

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def wait_for_work(self, timeout: Optional[float] = None) -> bool:
        with self.work:
            return self.work.wait_for(self.has_work, timeout)

    def cancel_all(self):
        with self.lock:
            seqs = list(self.waiting) + list(self.running)
        for seq in seqs:
            seq.cancel()

    def snapshot(self) -> Dict[str, float]:
        """Counters and gauges for /health and /metrics."""
        cached = self.prefix_cache.pages if self.prefix_cache else 0
        usable = self.pages.pages - len(self.pages.reserved)
        running = usable - self.pages.free - cached
        # Pages that running sequences hold, their shared prefix-cache pages included; what the cache
        # could evict counts as free (vLLM's kv_cache_usage). (Read from another thread: clamped.)
        in_use = running + (self.prefix_cache.locked if self.prefix_cache else 0)
        prompt = self.stats['prompt_tokens']
        return dict(self.stats, running=len(self.running), waiting=len(self.waiting), max_batch=self.max_batch,
                    kv_budget_bytes=self.budget, kv_reserved_bytes=running * self.bytes_per_token,
                    kv_cache_usage=min(max(in_use / usable, 0.0), 1.0) if usable else 0.0,
                    kv_prefix_cache_bytes=cached * self.bytes_per_token,
                    prefix_cache_entries=self.prefix_cache.nodes if self.prefix_cache else 0,
                    prefix_cache_hit_rate=self.stats['cached_prompt_tokens'] / prompt if prompt else 0.0)

    def abort(self, seqs: List[Sequence], error: BaseException):
        """End `seqs` with an error now, their K/V unkept (a step was interrupted midway: their caches
        may hold positions their tokens never got)."""
        for seq in seqs:
            if not seq.finished:
                seq.error = error
                self._finish(seq, 'error', keep_cache=False)

    # -- the stepping thread: deciding ---------------------------------------------------------------
    def schedule(self) -> List[Forward]:
        """The next step's forwards (empty when nothing can run). Every part's pages are in its sequence's
        table when this returns: the runner writes their K/V."""
        self.drop_cancelled()
        self._admit()
        decoding = [(s, [s.output[-1]]) for s in self._with_pages(
            [s for s in self.running if s.output and not s.finished and s.prefilled == len(s.fill)])]
        prefill = self._prefill_parts()
        self.stats['steps'] += 1
        rows = sum(len(ids) for _, ids in prefill) + len(decoding)
        if prefill and decoding and self.kv.rows_keep_their_bits(rows):
            return [Forward(prefill + decoding, len(prefill))]
        return [f for f in (Forward(prefill, len(prefill)), Forward(decoding, 0)) if f.parts]

    def drop_cancelled(self):
        """Finish cancelled sequences now: their pages are free at once."""
        with self.lock:
            for seq in [s for s in self.waiting if s._cancelled]:
                self.waiting.remove(seq)
                self._finish(seq, 'cancelled', keep_cache=False)
        for seq in [s for s in self.running if s._cancelled]:
            self._finish(seq, 'cancelled', keep_cache=False)

    def _admit(self):
        while len(self.running) < self.max_batch:
            with self.lock:
                if not self.waiting:
                    return
                seq = self.waiting[0]
                keep, pages, node = self._longest_prefix(seq)
                if self.prefix_cache is not None:
                    self.prefix_cache.lock(node)     # (before making room: its pages must stay)
                # Pages for what it prefills (taken now), and room for GROW_TOKENS more (decode steps take
                # a page each; when none is left, the newest sequence is preempted).
                fill = len(seq.fill) - keep
                headroom = max(0, min(self.GROW_TOKENS, len(seq.prompt) + seq.budget - 1 - len(seq.fill)))
                if not self._make_room(fill + headroom):
                    if self.prefix_cache is not None:
                        self.prefix_cache.unlock(node)
                    return   # it waits for running sequences to finish; so do the ones behind it
                self.waiting.popleft()
                seq.pending = self.pages.take(fill)
            self._start(seq, keep, pages, node)

    def _make_room(self, pages: int) -> bool:
        """Evict prefix-cache leaves until `pages` pages are free; -> whether they are."""
        short = pages - self.pages.free
        if short > 0 and self.prefix_cache is not None:
            self.prefix_cache.evict(short)
        return self.pages.free >= pages

    def _with_pages(self, seqs: List[Sequence]) -> List[Sequence]:
        """The decoding sequences (oldest first), each with a page for its next position; when the pool has
        none left, the newest running sequence is preempted (which may be one of `seqs`: then it is left
        out)."""
        ready = []
        for seq in seqs:
            while seq.running and not self._make_room(1):
                self._preempt(self.running[-1])
            if seq.running:
                seq.table.extend(self.pages.take(1))
                ready.append(seq)
        return ready

    def _preempt(self, seq: Sequence):
        """Give back a running sequence's pages and queue it first again. What it computed goes to the
        prefix cache first: coming back, it continues from whatever of it is still there."""
        logger.info('K/V pool full: preempting a sequence of %d tokens (it continues later)',
                    len(seq.prompt) + len(seq.output))
        self._release(seq, keep_cache=True)
        seq.fill = seq.prompt + seq.output[:-1]
        seq.prefilled = seq.reused = 0
        self.stats['preempted'] += 1
        with self.lock:
            self.waiting.appendleft(seq)

    def _start(self, seq: Sequence, keep: int, pages: List[int], node):
        if seq.admitted is None:
            seq.admitted = time.monotonic()
        if seq.fill is seq.prompt:    # (a preempted sequence coming back is not new)
            self.stats['prompt_tokens'] += len(seq.prompt)
            self.stats['cached_prompt_tokens'] += keep
        ended = None
        if seq.budget == 0 and not seq.scores_prompt:
            ended = 'length'      # nothing to generate, nothing to score
        else:
            try:
                seq.state = self.kv.start(seq.fill)
            except Exception as e:   # e.g. a ChatGLM-6B prompt without [gMASK]/<sop>
                seq.error, ended = e, 'error'
        if ended is not None:
            if self.prefix_cache is not None:
                self.prefix_cache.unlock(node)
            self.pages.give_back(seq.pending)
            seq.pending = []
            self._finish(seq, ended, keep_cache=False)
            return
        seq.table, seq.node, seq.cached, seq.prefilled, seq.reused = PageTable(pages[:keep]), node, keep, keep, keep
        self.running.append(seq)

    def _longest_prefix(self, seq: Sequence):
        """(n, pages, node): the longest prefix of seq.fill that the prefix cache holds, at least one
        token short of it (the last one's logits give the next token); node (to lock) ends a path at
        least that long. (0, [], None) without a prefix cache."""
        if self.prefix_cache is None:
            return 0, [], None
        if len(seq.fill) < 2 or seq.scores_prompt:
            return 0, [], self.prefix_cache.root(seq.namespace)
        n, pages, node = self.prefix_cache.match(seq.fill, seq.namespace)
        return min(n, len(seq.fill) - 1), pages, node

    def _adopt_longer_prefix(self, seq: Sequence):
        """A sequence whose table holds only prefix-cache pages (nothing computed of its own, or all of it
        already handed to the tree) takes a longer cached prefix if one has appeared since (an older
        sequence prefilled the system prompt they share)."""
        if self.prefix_cache is None or seq.prefilled != seq.cached or len(seq.table) != seq.cached:
            return
        keep, pages, node = self._longest_prefix(seq)
        if keep <= seq.cached:
            return
        self.prefix_cache.lock(node)
        self.prefix_cache.unlock(seq.node)
        self.pages.give_back(seq.pending[:keep - seq.cached])   # (those positions need no pages of their own now)
        del seq.pending[:keep - seq.cached]
        if seq.fill is seq.prompt:
            self.stats['cached_prompt_tokens'] += keep - seq.cached
        seq.table, seq.node, seq.cached, seq.prefilled, seq.reused = PageTable(pages[:keep]), node, keep, keep, keep

    def _prefill_parts(self):
        """Prompt chunks of the oldest sequences still prefilling, up to prefill_chunk tokens in all
        (a ChatGLM-6B prompt goes whole: its prefix is attended bidirectionally), each with its pages.

        Before its first chunk runs, a sequence takes the longest cached prefix of its prompt; one whose
        prompt shares a long prefix (SHARED_WAIT tokens or more) with an older sequence that has not
        computed it yet waits for it, so a system prompt that 8 new conversations share is prefilled once.
        A chunk's pages are the ones its sequence took when it was admitted."""
        parts, tokens, ahead = [], 0, []
        for seq in self.running:
            if len(seq.fill) == seq.prefilled or seq.finished:
                continue
            self._adopt_longer_prefix(seq)
            left = len(seq.fill) - seq.prefilled
            if self._waits_for(seq, ahead):
                ahead.append(seq)
                continue
            ahead.append(seq)
            room = self.prefill_chunk - tokens
            if room <= 0:
                break
            n = left if not self.kv.supports_prefix_reuse else min(left, room)
            if parts and n > room:
                break
            seq.table.extend(seq.pending[:n])
            del seq.pending[:n]
            parts.append((seq, seq.fill[seq.prefilled:seq.prefilled + n]))
            tokens += n
        return parts

    def _waits_for(self, seq: Sequence, ahead: List[Sequence]) -> bool:
        if self.prefix_cache is None or seq.scores_prompt:   # (it could not take the K/V it waited for)
            return False
        for other in ahead:
            if other.namespace != seq.namespace:
                continue
            shared = common_prefix(other.fill, seq.fill)
            if shared - seq.prefilled >= self.SHARED_WAIT and other.prefilled < shared:
                return True
        return False

    # -- the stepping thread: applying what a forward computed ---------------------------------------
    def update(self, forward: Forward, result: ForwardResult):
        """Advance the forward's sequences by what the runner computed: prompt positions filled, a
        token appended where one was due, consumers told, finished sequences finished."""
        if result.error is not None:   # a failing forward ends its sequences, never the scheduler
            for seq, _ in forward.parts:
                seq.error = result.error
                self._finish(seq, 'error', keep_cache=False)
            return
        for row, entries in result.prompt_logprobs.items():
            forward.parts[row][0].prompt_logprobs += entries
        for row, (seq, ids) in enumerate(forward.parts):
            if seq.finished:
                continue
            if row < forward.prompt_parts:
                seq.prefilled += len(ids)
                self._cache_prefix(seq)   # a later sequence with the same prompt start shares these pages
                if seq.prefilled == len(seq.fill) and not seq.output and seq.budget == 0:
                    self._finish(seq, 'length')   # a prompt only scored
                    continue
            if row in result.failures:
                seq.error = result.failures[row]
                self._finish(seq, 'error', keep_cache=False)
            elif row in result.tokens:
                self._append(seq, result.tokens[row], result.logprobs.get(row))

    def _append(self, seq: Sequence, token: int, logprob):
        now = time.monotonic()
        if seq.first_token_at is None:
            seq.first_token_at = now
        seq.previous_token_at, seq.last_token_at = seq.last_token_at, now
        seq.output.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        self.stats['generated_tokens'] += 1
        stop_here = False
        if seq.matcher is not None:
            try:
                stop_here = grammar.advance(seq.matcher, token, seq.params.stops)   # complete: nothing may follow
            except grammar.GrammarError as e:
                seq.error = e
                self._finish(seq, 'error', keep_cache=False)
                return
        if seq.on_token is not None:
            try:
                stop_here = seq.on_token(seq, token) or stop_here
            except Exception as e:   # the consumer failed: end this sequence only
                seq.error = e
                self._finish(seq, 'error', keep_cache=False)
                return
        if stop_here or token in seq.params.stops:
            self._finish(seq, 'stop')
        elif len(seq.output) >= seq.budget:
            self._finish(seq, 'length')

    def _finish(self, seq: Sequence, reason: str, keep_cache: bool = True):
        if seq.finished:
            return
        seq.finish_reason = reason
        seq.finished_at = time.monotonic()
        if seq.running:
            self._release(seq, keep_cache)
        key = {'stop': 'completed', 'length': 'completed', 'cancelled': 'cancelled', 'error': 'failed'}[reason]
        self.stats[key] += 1
        if seq.on_finish is not None:
            try:
                seq.on_finish(seq)
            except Exception:
                logger.exception('on_finish failed')

    def _release(self, seq: Sequence, keep_cache: bool):
        """Give a running sequence's pages back: with keep_cache, what it computed goes to the prefix cache
        (the next turn of its conversation, or another request with the same start, prefills only what is
        new); the rest go back to the pool."""
        self.running.remove(seq)
        if keep_cache:
            self._cache_prefix(seq)
        self.pages.give_back(seq.table.pages(seq.cached) + seq.pending)
        seq.pending = []
        if self.prefix_cache is not None and seq.node is not None:
            self.prefix_cache.unlock(seq.node)
        seq.table, seq.node, seq.cached, seq.state = None, None, 0, None

    def _cache_prefix(self, seq: Sequence):
        """Hand the pages of a running sequence's written positions to the prefix cache (it keeps using
        them: they are locked for it). Positions another sequence's pages already hold there are pointed
        at those, and its own copies given back."""
        if self.prefix_cache is None or len(seq.table) <= seq.cached:
            return
        tokens = seq.written_tokens()
        known = self.prefix_cache.insert(tokens, seq.table.pages(), seq.namespace)
        n, pages, node = self.prefix_cache.match(tokens, seq.namespace)
        self.prefix_cache.lock(node)
        if seq.node is not None:
            self.prefix_cache.unlock(seq.node)
        if known > seq.cached:
            self.pages.give_back(seq.table.pages(seq.cached, known))
            seq.table.replace(seq.cached, pages[seq.cached:known])
        seq.node, seq.cached = node, n

    def clear_prefix_cache(self) -> int:
        """Forget every prefix-cache entry no running sequence uses; -> pages freed. (On the stepping
        thread, or holding the engine's stepping lock.)"""
        return self.prefix_cache.clear() if self.prefix_cache is not None else 0


def default_kv_budget(device: torch.device) -> int:
    """Memory for K/V when none is given: a quarter of the available memory (at most 16 GiB) on a CPU,
    half of the free GPU memory on CUDA."""
    if device.type == 'cuda':
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return int(min(available_memory() // 4, 16 << 30))


def available_memory() -> int:
    """Bytes the kernel could give us: MemAvailable counts the page cache it would drop (just after
    loading a model from disk, "free" memory is mostly page cache and far too small a measure)."""
    try:
        with open('/proc/meminfo', encoding='ascii') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30
