"""The engine: one per model, and every surface is a client of it.

`chat()`, `stream_chat()`, `chat_batch()`, the ModelScope pipeline, the CLI, the web page, the HTTP
server and each Ray Serve replica all submit sequences to the same `LLMEngine`, the way vLLM's `LLM`
class and its server share one engine. A single user's turn is a batch of one; the next turn of a
conversation takes its history's K/V from the prefix cache, whoever asked.

A step is: the scheduler plans (scheduler.py), the runner executes each forward of the plan and samples
(runner.py), the scheduler applies what came back. One thread steps at a time (`_stepping`). Who steps:
- in a process that serves (`start_background()`), one engine thread, woken by new work;
- otherwise the callers themselves: a thread waiting for its sequences steps the engine, and every
  sequence in the batch advances, whoever submitted it (vLLM's `LLM.generate` drives its engine the
  same way). Two threads chatting at once take turns stepping and share each step.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable, Iterator, List, Optional

import torch

from .. import openmp
from .runner import ModelRunner
from .sampling import SamplingParams
from .scheduler import DEFAULT_MAX_BATCH, Scheduler, Sequence, default_kv_budget

logger = logging.getLogger(__name__)

IDLE_STEPS = 100     # steps in a row that ran nothing while work was queued: a bug, logged, then slowed


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

    def submit(self, prompt: List[int], params: SamplingParams, on_token: Optional[Callable] = None,
               on_finish: Optional[Callable] = None, adapter: Optional[str] = None,
               logprobs: Optional[int] = None, prompt_logprobs: Optional[int] = None, cache_scope=None) -> Sequence:
        """Queue a sequence (see Scheduler.submit); it advances as the engine steps."""
        return self.scheduler.submit(prompt, params, on_token, on_finish, adapter, logprobs, prompt_logprobs,
                                     cache_scope)

    def step(self) -> bool:
        """One iteration of the whole batch; -> whether anything ran."""
        with self._stepping, torch.inference_mode():
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
        """Let the batch make progress once: step it, or with a background engine, wait for its next step."""
        if self._thread is not None:
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

    @property
    def busy(self) -> bool:
        return self.scheduler.has_work()

    @property
    def stepping_in_background(self) -> bool:
        """Whether an engine thread steps it and is alive (a replica's health check)."""
        return self._thread is not None and self._thread.is_alive()
