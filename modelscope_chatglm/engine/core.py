"""The engine: one per model, and every surface is a client of it.

`chat()`, `stream_chat()`, `chat_batch()`, the ModelScope pipeline, the CLI, the web page, the HTTP
server and each Ray Serve replica all submit sequences to the same `LLMEngine`, the way vLLM's `LLM`
class and its server share one engine. A single user's turn is a batch of one; the next turn of a
conversation takes its history's K/V from the prefix cache, whoever asked.

A step is: the scheduler plans (scheduler.py), the runner executes each forward of the plan and samples
(runner.py), the scheduler applies what came back. One thread steps at a time (`_stepping`). The model
itself changes only between two steps: a LoRA adapter added or removed while serving (`add_adapter`,
`remove_adapter`) is applied at the start of a step, or by its caller while no step runs. Who steps:
- in a process that serves (`start_background()`), one engine thread, woken by new work;
- otherwise the callers themselves: a thread waiting for its sequences steps the engine, and every
  sequence in the batch advances, whoever submitted it (vLLM's `LLM.generate` drives its engine the
  same way). Two threads chatting at once take turns stepping and share each step.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Callable, Iterator, List, Optional, Tuple

import torch

from .. import adapters, openmp
from .runner import ModelRunner
from .sampling import SamplingParams
from .scheduler import DEFAULT_MAX_BATCH, Scheduler, Sequence, default_kv_budget

logger = logging.getLogger(__name__)

IDLE_STEPS = 100     # steps in a row that ran nothing while work was queued: a bug, logged, then slowed


class AdapterExists(ValueError):
    """The model holds an adapter of that name already (or is still removing one of that name)."""


class NoSuchAdapter(LookupError):
    """The model holds no adapter of that name."""


class LLMEngine:
    def __init__(self, model, vocab_limit: int, max_batch: Optional[int] = None,
                 kv_cache_bytes: Optional[int] = None, prefill_chunk: Optional[int] = None):
        budget = kv_cache_bytes if kv_cache_bytes is not None else default_kv_budget(model.device)
        max_batch = DEFAULT_MAX_BATCH if max_batch is None else max_batch
        self.runner = ModelRunner(model, vocab_limit, budget, max_batch)
        self.scheduler = Scheduler(self.runner.kv, max_batch, prefill_chunk)
        self._stepping = threading.Lock()
        self._stepped = threading.Condition()      # notified after every step (callers of a background engine wait on it)
        self._thread: Optional[threading.Thread] = None
        self._stopped = False
        self._idle_steps = 0
        # Changes to the model (adapters added or removed), each with the future its caller waits on: run
        # between two steps (`_between_steps`).
        self._changes: List[Tuple[Callable[[], bool], Future]] = []
        self._changes_lock = threading.Lock()
        # Which adapters a request may pick (scheduler.adapters) changes under this lock, and every submit
        # holds it: a sequence is either queued before its adapter leaves (and finishes first), or refused.
        self._roster = threading.Lock()
        self._leaving = set()      # adapters no request may pick any more, whose sequences still run

    def submit(self, prompt: List[int], params: SamplingParams, on_token: Optional[Callable] = None,
               on_finish: Optional[Callable] = None, adapter: Optional[str] = None,
               logprobs: Optional[int] = None, prompt_logprobs: Optional[int] = None, cache_scope=None) -> Sequence:
        """Queue a sequence (see Scheduler.submit); it advances as the engine steps."""
        with self._roster:
            return self.scheduler.submit(prompt, params, on_token, on_finish, adapter, logprobs, prompt_logprobs,
                                         cache_scope)

    def step(self) -> bool:
        """One iteration of the whole batch; -> whether anything ran."""
        with self._stepping, torch.inference_mode():
            self._apply_changes()
            forwards = self.scheduler.schedule()
            done = 0
            try:
                for forward in forwards:
                    self.scheduler.update(forward, self.runner.execute(forward))
                    done += 1
            except BaseException as e:   # Ctrl-C mid-step: a forward may have written K/V its tokens never got
                interrupted = [seq for forward in forwards[done:] for seq, _ in forward.parts]
                self.scheduler.abort(interrupted, RuntimeError(
                    f'generation was interrupted ({type(e).__name__} in the step this sequence was part of); '
                    'ask again'))
                raise
        with self._stepped:
            self._stepped.notify_all()
        self._idle_steps = 0 if forwards or not self.scheduler.has_work() else self._idle_steps + 1
        if self._idle_steps == IDLE_STEPS:
            logger.error('the scheduler has work it cannot run: %s', self.scheduler.snapshot())
        if self._idle_steps >= IDLE_STEPS:   # never a busy loop beside the sequences that still run
            time.sleep(0.01)
        return bool(forwards)

    def advance(self):
        """Let the batch make progress once: step it, or with a background engine, wait for its next step.
        (An engine thread that has died no longer steps: then the caller does, instead of waiting forever.)"""
        if self.stepping_in_background:
            with self._stepped:
                self._stepped.wait(0.05)
        else:
            self.step()

    def run_until_done(self, seqs: List[Sequence]):
        """Advance until every one of `seqs` has finished."""
        while not all(s.finished for s in seqs):
            self.advance()

    def stream(self, seq_of: Callable[[Callable], Sequence]) -> Iterator[int]:
        """The tokens of one sequence as they come. `seq_of(on_token)` submits it with the callback
        given. Closing the iterator early cancels the sequence and frees its memory at once."""
        tokens: 'deque[int]' = deque()
        seq = seq_of(lambda _, token: tokens.append(token))
        try:
            while True:
                finished = seq.finished   # (read first: an engine thread may add the last token meanwhile)
                while tokens:
                    yield tokens.popleft()
                if finished:
                    break
                self.advance()
            if seq.error is not None:
                raise seq.error
        finally:
            self.release([seq])

    def release(self, seqs: List[Sequence]):
        """Cancel whichever of `seqs` are unfinished and free their memory now if no step is running
        (else the next step does). Never waits for the stepping lock: this runs in `finally` blocks and
        from the garbage collector, possibly inside a step."""
        unfinished = [seq for seq in seqs if not seq.finished]
        for seq in unfinished:
            seq.cancel()
        if unfinished and self._thread is None and self._stepping.acquire(blocking=False):
            try:
                self.scheduler.drop_cancelled()
            finally:
                self._stepping.release()

    # -- serving: one engine thread steps --------------------------------------------------------------
    def start_background(self):
        """Step from an engine thread of its own from now on (a server: the event loop never computes)."""
        if self._thread is not None:
            return
        openmp.release_workers()          # the engine thread computes from now on; see there
        self._thread = threading.Thread(target=self._work, name='chatglm-engine', daemon=True)
        self._thread.start()

    def _work(self):
        while not self._stopped:
            if not self.scheduler.wait_for_work(timeout=0.5):
                continue
            try:
                self.step()
            except Exception:   # a bug in scheduling: log it, keep serving
                logger.exception('engine step failed')
                time.sleep(0.1)

    def stop(self):
        """End the engine thread (when one runs) and forget the prefix cache: the engine is replaced."""
        self._stopped = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.clear_prefix_cache()

    def clear_prefix_cache(self) -> int:
        """Forget the prefix cache's entries (those no running sequence uses); -> K/V bytes freed."""
        with self._stepping:
            return self.scheduler.clear_prefix_cache() * self.scheduler.bytes_per_token

    # -- LoRA adapters added and removed while the engine serves ------------------------------------------
    @property
    def adapters(self) -> List[str]:
        """The LoRA adapters a request may pick by name."""
        return list(self.scheduler.adapters)

    def add_adapter(self, name: str, lora: 'adapters.LoRA'):
        """Hold `lora` (adapters.read_to_add) beside the model's linears under `name`, unmerged: requests
        may pick it once this returns. The model changes between two steps, never under a forward, and
        whatever the prefix cache kept under that name before is dropped. Raises AdapterExists."""
        model = self.runner.model

        def attach() -> bool:
            with self._roster:
                if name in self.scheduler.adapters or name in self._leaving:
                    raise AdapterExists(f'the model holds an adapter named {name!r} already' +
                                        (' (it is being removed; add it again once that is done)'
                                         if name in self._leaving else ''))
                try:
                    adapters.attach(model, lora, name, model.dtype, model.device, default=False)
                except BaseException:   # (out of memory halfway): no layer keeps a part of it
                    adapters.detach(model, name)
                    raise
                self._forget_cached(name)
                self.runner.adapters_changed()
                self.scheduler.adapters = sorted(self.scheduler.adapters + [name])
            return True
        self._between_steps(attach)

    def remove_adapter(self, name: str):
        """Refuse new requests for the adapter `name` at once; once the sequences queued with it before have
        finished, drop its weights and the prefix cache's K/V computed with them (between two steps).
        Blocks until then. Raises NoSuchAdapter."""
        with self._roster:
            if name not in self.scheduler.adapters:
                raise NoSuchAdapter(f'no adapter named {name!r}; this model holds {self.scheduler.adapters or "none"}')
            self.scheduler.adapters = [a for a in self.scheduler.adapters if a != name]
            self._leaving.add(name)

        def detach() -> bool:
            self.scheduler.drop_cancelled()    # (a cancelled sequence no longer counts)
            with self.scheduler.lock:
                if any(seq.adapter == name for seq in itertools.chain(self.scheduler.waiting, self.scheduler.running)):
                    return False               # not yet: tried again at the next step
            adapters.detach(self.runner.model, name)
            self._forget_cached(name)
            self.runner.adapters_changed()
            with self._roster:
                self._leaving.discard(name)
            return True
        self._between_steps(detach)

    def _forget_cached(self, adapter: str):
        """Drop the prefix cache's K/V computed with `adapter` (a sequence's namespace is (adapter, cache
        scope): Sequence.namespace)."""
        if self.scheduler.prefix_cache is not None:
            self.scheduler.prefix_cache.drop(lambda namespace: namespace[0] == adapter)

    def _between_steps(self, change: Callable[[], bool]):
        """Run `change()` while no step runs, as often as it returns False (not yet: after the next step
        again); raise what it raises. It may change the model's modules, which a forward must never see
        half-changed. The thread that steps runs it at the start of its next step (so a busy engine thread
        cannot starve it); while no step runs, this thread does."""
        done = Future()
        with self._changes_lock:
            self._changes.append((change, done))
        while not done.done():
            if self._stepping.acquire(blocking=False):
                try:
                    self._apply_changes()
                finally:
                    self._stepping.release()
            if not done.done():
                with self._stepped:
                    self._stepped.wait(0.05)
        done.result()

    def _apply_changes(self):
        """(Holding the stepping lock.) Run the queued changes; one that is not done yet stays queued."""
        with self._changes_lock:
            pending, self._changes = self._changes, []
        later = []
        with torch.inference_mode():
            for change, done in pending:
                try:
                    if change():
                        done.set_result(None)
                    else:
                        later.append((change, done))
                except BaseException as e:
                    done.set_exception(e)
        if later:
            with self._changes_lock:
                self._changes[:0] = later

    @property
    def busy(self) -> bool:
        return self.scheduler.has_work()

    @property
    def stepping_in_background(self) -> bool:
        """Whether an engine thread steps it and is alive (a replica's health check)."""
        return self._thread is not None and self._thread.is_alive()
