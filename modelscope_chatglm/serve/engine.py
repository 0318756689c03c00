"""One model, many clients: a worker thread that runs chat turns one at a time.

HTTP handlers (async) submit a `Job` and read its events; the worker (a plain thread, so generation
never blocks the event loop) runs the turn and pushes events back onto the loop:
    ('delta', text) ... then ('done', Result) or ('error', exception)
Jobs queue in arrival order, so concurrent requests never share generation state. A job whose client
went away is cancelled between two tokens, which frees the worker for the next one.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field
from typing import List, Optional

from ..chat import ChatModel, ChatRequest, ChatTurn


@dataclass
class Result:
    response: object          # str, or a tool call dict (ChatGLM3)
    history: list
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str        # 'stop' | 'length' | 'cancelled'


@dataclass
class Job:
    request: ChatRequest      # validated and encoded by the handler (off the event loop)
    stop: List[str] = field(default_factory=list)
    loop: Optional[asyncio.AbstractEventLoop] = None
    events: Optional[asyncio.Queue] = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind, value):
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class QueueFull(Exception):
    """More jobs are waiting than the engine takes (`max_queue`)."""


class Engine:
    def __init__(self, chat: ChatModel, max_queue: int = 100):
        self.chat = chat
        self.max_queue = max_queue
        self.jobs: 'queue.Queue[Job]' = queue.Queue()
        self.current: Optional[Job] = None
        self.stats = {'completed': 0, 'cancelled': 0, 'failed': 0, 'active': 0}
        self.thread = threading.Thread(target=self._work, name='chatglm-engine', daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Job:
        if self.jobs.qsize() >= self.max_queue:
            raise QueueFull(f'the server is busy: {self.jobs.qsize()} requests are waiting (--max-queue '
                            f'{self.max_queue}); retry later')
        job.loop = asyncio.get_running_loop()
        job.events = asyncio.Queue()
        self.jobs.put(job)
        return job

    @property
    def queued(self) -> int:
        return self.jobs.qsize()

    def cancel_all(self):
        """Shutting down: the running job stops at its next token, queued ones never start."""
        while True:
            try:
                self.jobs.get_nowait().cancelled.set()
                self.stats['cancelled'] += 1
            except queue.Empty:
                break
        if self.current is not None:
            self.current.cancelled.set()

    def _work(self):
        while True:
            job = self.jobs.get()
            if job.cancelled.is_set():
                self.stats['cancelled'] += 1
                continue
            self.stats['active'] = 1
            self.current = job
            try:
                result = self._run(job)
                self.stats['cancelled' if result.finish_reason == 'cancelled' else 'completed'] += 1
                job.emit('done', result)
            except Exception as e:   # a bad request must not take the worker down
                self.stats['failed'] += 1
                job.emit('error', e)
            finally:
                self.stats['active'] = 0
                self.current = None

    def _run(self, job: Job) -> Result:
        turn = ChatTurn(self.chat, job.request)
        text, finish = '', None
        for delta in turn:
            if job.cancelled.is_set():
                finish = 'cancelled'
                break
            text += delta
            hit = _first_stop(text, job.stop)
            if hit is not None:   # an OpenAI `stop` string: cut the reply there
                if hit > len(text) - len(delta):
                    job.emit('delta', delta[:hit - (len(text) - len(delta))])
                text, finish = text[:hit], 'stop'
                break
            job.emit('delta', delta)
        response, history = turn.response, turn.history
        if finish == 'stop' and isinstance(response, str):
            response = text.strip()
            history = history[:-1] + [_with_reply(history[-1], response)]
        return Result(response, history, len(turn.request.input_ids), len(turn.output_ids),
                      finish or turn.finish_reason)


def _first_stop(text: str, stops: List[str]) -> Optional[int]:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _with_reply(last, reply):
    """The history's last entry with the reply cut at a stop string."""
    if isinstance(last, tuple):
        return (last[0], reply)
    return dict(last, content=reply)
