"""The server's client of the model's engine. `AsyncEngine.generate(call)` is what the HTTP routes see
of a model: an async stream of events for one conversation turn,
    ('start', replica id) or ('rejected', exception), then
    ('delta', text) ... then ('done', Result) or ('error', exception)
The deltas are the reply's visible text (a ChatGLM3 metadata line and a tool call's code are not text;
the call itself is in the Result). A call that asks for logprobs also gets ('logprobs', [TokenLogprob])
before each delta, for the tokens generated since the last (and before 'done', for the rest); one
that scores its prompt (a completion with prompt_logprobs) gets ('prompt_logprobs', [TokenLogprob])
once its prompt has run, before any of those.
The model's one engine (engine/core.py, the same that `chat()` uses) steps in an engine thread of its
own; each job's tokens become text through `ReplyDecoder` (chat.py), the same as a `stream_chat`, and
its events go back onto the event loop, so generation never blocks it. Validation and prompt building
run in a worker thread. A stream that is closed early (the client went away) cancels its job: the
sequence leaves the batch at the next step and its memory is free. On Ray Serve (ray_app.py) each
replica runs an AsyncEngine and the routes talk to them through `RayBackend`, which streams the same
events.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, List, Optional, Tuple, Union

from ..adapters import read_to_add
from ..chat import ChatModel, ChatRequest, CompletionRequest, ReplyDecoder
from ..engine.core import AdapterExists
from ..errors import InputError
from .metrics import REQUEST_METRICS, RequestMetrics

logger = logging.getLogger(__name__)


@dataclass
class ChatCall:
    """One conversation turn as the routes ask for it (plain data: on Ray it travels to a replica).
    With completion=True, `query` is a plain prompt to continue (text or token ids), no chat template."""
    query: Union[str, List[int]]
    history: list
    options: dict = field(default_factory=dict)   # ChatModel.prepare's keywords: generation options, role, ...
    stop: List[str] = field(default_factory=list)  # OpenAI stop strings
    adapter: Optional[str] = None                  # a LoRA adapter the model holds, by name
    logprobs: Optional[int] = None                 # report each token's logprob and this many alternatives
    completion: bool = False
    prompt_logprobs: Optional[int] = None          # the same for the prompt's tokens (a completion's)
    cache_scope: Optional[tuple] = None            # whose prefix-cache entries it may share (tenant, cache_salt)
    choice: int = 0                                # which of its request's n choices (only the first queues)
    n: int = 1                                     # how many choices its request has

    def conversation_key(self) -> str:
        """What stays the same over the turns of one conversation: its adapter, system prompt, tools
        and opening message. Routing on it sends every turn to the replica that holds its K/V."""
        first = self.history[0] if self.history else self.query
        if isinstance(first, dict):            # a role message
            first = first.get('content')
        elif isinstance(first, (tuple, list)):  # a (query, response) round
            first = first[0]
        opts = self.options
        return repr((self.adapter, self.cache_scope, opts.get('system'), opts.get('tools'), first))


@dataclass
class Result:
    response: object          # str, or a tool call dict (ChatGLM3): what chat() returns
    history: list
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str        # 'stop' | 'length' | 'cancelled'
    cached_tokens: int = 0    # prompt tokens whose K/V came from the prefix cache
    logprobs: Optional[List['TokenLogprob']] = None   # per generated token (a stop id's excluded)
    prompt_logprobs: Optional[List['TokenLogprob']] = None   # per token of the caller's prompt
    text: str = ''            # the reply's text, as streamed (a ChatGLM3 reply may have text and tool calls)
    tool_calls: List[dict] = field(default_factory=list)     # ChatGLM3's, each {'name', 'parameters' | 'content'}


# A token's bytes, its log-probability and its most likely alternatives [(bytes, logprob)]; a prompt's
# first token has neither (None, None): nothing comes before it.
TokenLogprob = Tuple[bytes, Optional[float], Optional[List[Tuple[bytes, float]]]]


@dataclass
class Job:
    request: Union[ChatRequest, CompletionRequest]   # validated and encoded off the event loop
    stop: List[str] = field(default_factory=list)
    loop: Optional[asyncio.AbstractEventLoop] = None
    events: Optional[asyncio.Queue] = None
    adapter: Optional[str] = None   # a LoRA adapter the model holds (the request's `model` names it)
    seq: object = None        # its engine Sequence once submitted
    decoder: Optional[ReplyDecoder] = None
    logprobs: Optional[int] = None
    token_logprobs: List[TokenLogprob] = field(default_factory=list)
    logprobs_sent: int = 0    # how many of token_logprobs went out with a delta
    prompt_logprobs: Optional[int] = None
    prompt_entries: Optional[List[TokenLogprob]] = None   # once its prompt has run
    cache_scope: Optional[tuple] = None
    choice: int = 0

    def emit(self, kind, value):
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def cancel(self):
        """The client is gone (or the stream ended): leave the batch at the next step."""
        if self.seq is not None:
            self.seq.cancel()


# Log-probabilities one response may carry: n choices x tokens x (1 + alternatives), and the same for a
# scored prompt. 16 choices of 2,000 tokens with 20 alternatives each were 52 MiB of JSON and 560 MiB of
# memory; this many entries are about 10 MB.
MAX_LOGPROB_ENTRIES = 1 << 17


def check_logprob_entries(call: ChatCall, request):
    """Refuse a request whose logprobs could not be sent in a response of bounded size."""
    entries = 0
    if call.logprobs is not None:
        entries += request.params.max_new_tokens * (call.logprobs + 1)
    if call.prompt_logprobs is not None:
        entries += len(request.input_ids) * (call.prompt_logprobs + 1)
    if entries * call.n > MAX_LOGPROB_ENTRIES:
        raise InputError(f'this request asks for up to {entries * call.n} log-probabilities (choices x tokens x '
                         f'(1 + alternatives)); a response carries at most {MAX_LOGPROB_ENTRIES}: ask for fewer '
                         'tokens (max_tokens), choices (n) or alternatives (top_logprobs / logprobs)')


class QueueFull(Exception):
    """More jobs are waiting than the engine takes (`max_queue`)."""


class ReplicaUnavailable(Exception):
    """The process that ran the model went away (a Ray Serve replica died): retry, another one serves."""


class ShuttingDown(ReplicaUnavailable):
    """The server got SIGTERM/SIGINT: what runs ends now, what waits never starts; retry elsewhere."""


# LoRA adapters loaded while serving, at most: each holds its weights in memory (vLLM bounds them too,
# --max-cpu-loras); a client that loads without unloading must not grow the server without bound.
MAX_RUNTIME_ADAPTERS = 32


def already_loaded(name: str) -> AdapterExists:
    """vLLM's answer to loading a name twice."""
    return AdapterExists(f"The lora adapter '{name}' has already been loaded; unload it first to load other "
                         'weights under that name')


class AdapterFixed(ValueError):
    """An adapter the server was started with (--adapter NAME=PATH) cannot be unloaded while it serves."""

    @classmethod
    def named(cls, name: str) -> 'AdapterFixed':
        return cls(f'the adapter {name!r} was given at start (--adapter {name}=PATH); it is served until the server '
                   'restarts without it (only adapters loaded through /v1/load_lora_adapter can be unloaded)')


Event = Tuple[str, object]


class AsyncEngine:
    def __init__(self, chat: ChatModel, max_queue: int = 100, max_batch: Optional[int] = None,
                 kv_cache_bytes: Optional[int] = None, prefill_chunk: Optional[int] = None, replica: str = ''):
        self.chat = chat
        self.replica = replica            # a name for this engine among several (Ray Serve replicas)
        self.model_name = chat.name
        self.fixed_adapters = frozenset(chat.adapters)   # given at start: served until the server stops
        self.adapter_paths = {}           # name -> path of each adapter loaded while serving (load_adapter)
        self._adapter_changes = asyncio.Lock()   # one load or unload at a time
        self.max_queue = max_queue
        self.engine = chat.configure_engine(max_batch, kv_cache_bytes, prefill_chunk)
        self.scheduler = self.engine.scheduler
        self.started = time.time()
        self._jobs = {}                   # id -> job, submitted and not finished: told when the server shuts down
        self._jobs_lock = threading.Lock()
        self._closing = False
        self._rate = deque(maxlen=1024)   # (time, generated tokens) at recent tokens: tokens/s
        self._rate_lock = threading.Lock()  # (appended on the engine thread, read for /metrics on the loop's)
        self.request_metrics = RequestMetrics(chat.context_length)   # latency histograms, finish reasons
        self.engine.start_background()

    async def generate(self, call: ChatCall) -> AsyncIterator[Event]:
        """The events of one turn (see the module docstring). Closing the stream cancels the job."""
        try:
            # Validating and encoding a long conversation takes real time: not on the event loop.
            job = self.submit(await asyncio.to_thread(self._job, call))
        except Exception as e:   # InputError, ContextLengthError, QueueFull, KVBudgetError, ...
            yield 'rejected', e
            return
        try:
            yield 'start', self.replica
            while True:
                kind, value = await job.events.get()
                yield kind, value
                if kind in ('done', 'error'):
                    return
        finally:
            job.cancel()   # the consumer is gone (or the stream ended): leave the batch

    def _request(self, call: ChatCall):
        """The call's prompt ids and sampling parameters (ChatModel.prepare*), validated."""
        if call.completion:
            return self.chat.prepare_completion(call.query, **call.options)
        return self.chat.prepare(call.query, call.history, **call.options)

    def _job(self, call: ChatCall) -> Job:
        """Validate and encode a call (in a worker thread: a long conversation, or 1 MB of stop
        strings to index, takes real time)."""
        request = self._request(call)
        check_logprob_entries(call, request)
        # (StopStrings indexes the stop strings here, off the event loop: 1 MB of them takes real time)
        return Job(request, call.stop, adapter=call.adapter, logprobs=call.logprobs,
                   decoder=ReplyDecoder(self.chat, request, call.stop), prompt_logprobs=call.prompt_logprobs,
                   cache_scope=call.cache_scope, choice=call.choice)

    async def tokenize(self, call: ChatCall, special_tokens: bool = True) -> dict:
        """/tokenize: the prompt ids the call would run (vLLM's response shape), encoded off the event loop.
        A completions prompt without special_tokens is the text's own ids."""
        def encode():
            if call.completion and not special_tokens:
                return self.chat.tokenizer.encode(call.query)
            return self._request(call).input_ids
        ids = list(await asyncio.to_thread(encode))
        return {'count': len(ids), 'max_model_len': self.chat.context_length, 'tokens': ids}

    async def detokenize(self, ids: List[int]) -> dict:
        vocab = self.chat.tokenizer.vocab_size
        wrong = [i for i in ids if not 0 <= i < vocab][:5]
        if wrong:
            raise InputError(f'token ids must be in [0, {vocab}), got {wrong}')
        return {'prompt': await asyncio.to_thread(self.chat.tokenizer.decode, ids)}

    async def stats_list(self) -> List[dict]:
        return [self.stats()]

    def submit(self, job: Job) -> Job:
        """Raises QueueFull, or KVBudgetError for a request that can never fit. A request's n choices take
        one place in the queue: only its first is checked (the routes submit it before the others)."""
        if self._closing:
            raise ShuttingDown('the server is shutting down; retry the request')
        waiting = len(self.scheduler.waiting)
        if job.choice == 0 and waiting >= self.max_queue:
            raise QueueFull(f'the server is busy: {waiting} requests are waiting (--max-queue '
                            f'{self.max_queue}); retry later')
        job.loop = asyncio.get_running_loop()
        job.events = asyncio.Queue()
        job.decoder = job.decoder or ReplyDecoder(self.chat, job.request, job.stop)

        def on_token(seq, token):
            self.request_metrics.token(seq)
            self._send_prompt_logprobs(job, seq)
            if token in job.decoder.stop_ids:
                return False
            if seq.logprobs is not None:
                job.token_logprobs.append(self._token_logprob(token, *seq.logprobs[-1]))
            self._send(job, job.decoder.push(token))
            with self._rate_lock:
                self._rate.append((time.monotonic(), self.scheduler.stats['generated_tokens']))
            return job.decoder.stopped

        def on_finish(seq):
            self.request_metrics.finished(seq, self._finish(job, seq))

        with self._jobs_lock:
            self._jobs[id(job)] = job
        job.seq = self.engine.submit(job.request.input_ids, job.request.params, on_token, on_finish, job.adapter,
                                     job.logprobs, job.prompt_logprobs, job.cache_scope)
        return job

    def shut_down(self):
        """SIGTERM/SIGINT (on the event loop's thread): every job still running or waiting ends now with an
        error (a stream then sends its error event and [DONE]; a waiting request gets a 503), and nothing new
        is taken."""
        self._closing = True
        error = ShuttingDown('the server is shutting down; retry the request')
        with self._jobs_lock:
            jobs, self._jobs = list(self._jobs.values()), {}
        for job in jobs:
            job.emit('error', error)
            job.cancel()

    def stats(self) -> dict:
        snap = self.scheduler.snapshot()
        snap.update(queued=snap['waiting'], active=snap['running'], tokens_per_second=self.tokens_per_second(),
                    uptime_seconds=time.time() - self.started, replica=self.replica)
        snap[REQUEST_METRICS] = self.request_metrics.snapshot()   # (plain data: it travels from a Ray replica)
        return snap

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last tokens (up to 1,024, within the last 30 s)."""
        now = time.monotonic()
        with self._rate_lock:
            recent = [(t, n) for t, n in self._rate if now - t < 30]
        if len(recent) < 2:
            return 0.0
        (t0, n0), (t1, n1) = recent[0], recent[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def cancel_all(self):
        """Shutting down: running sequences stop at the next step, queued ones never start."""
        self.scheduler.cancel_all()

    # -- LoRA adapters loaded and unloaded while serving (serve --allow-runtime-adapters) --------------------
    @property
    def adapters(self) -> List[str]:
        """The LoRA adapters a request's `model` may name now."""
        return self.engine.adapters

    async def load_adapter(self, name: str, path: str):
        """Read the LoRA adapter at `path` in a worker thread (seconds for a big one; never on the event
        loop) and have the engine hold it under `name` from its next step on. Raises AdapterExists,
        adapters.AdapterNotFound, CheckpointError (not a LoRA, made for another base, a P-tuning checkpoint)."""
        async with self._adapter_changes:
            await asyncio.to_thread(self.load_adapter_sync, name, path)

    def load_adapter_sync(self, name: str, path: str):
        """load_adapter, blocking (a Ray replica's constructor, taking the adapters loaded before it started)."""
        if name in self.adapters:   # (before reading: a clash is told at once)
            raise already_loaded(name)
        if len(self.adapter_paths) >= MAX_RUNTIME_ADAPTERS:
            raise ValueError(f'{MAX_RUNTIME_ADAPTERS} adapters are loaded at run time already, the most this server '
                             f'holds ({sorted(self.adapter_paths)}); unload one first')
        self.engine.add_adapter(name, read_to_add(path, self.chat.model))
        self.adapter_paths[name] = path
        self.chat.adapters = self.adapters

    async def unload_adapter(self, name: str):
        """New requests for the adapter get a 404 at once; those already accepted finish with it; then its
        weights and cached K/V go. Returns when they have. Raises AdapterFixed, engine.core.NoSuchAdapter."""
        if name in self.fixed_adapters:
            raise AdapterFixed.named(name)
        async with self._adapter_changes:
            await asyncio.to_thread(self.engine.remove_adapter, name)
            self.adapter_paths.pop(name, None)
            self.chat.adapters = self.adapters

    # -- on the engine thread -------------------------------------------------------------------------
    def _send(self, job: Job, text: str):
        if text:
            self._send_logprobs(job)
            job.emit('delta', text)

    @staticmethod
    def _send_logprobs(job: Job):
        if len(job.token_logprobs) > job.logprobs_sent:
            job.emit('logprobs', job.token_logprobs[job.logprobs_sent:])
            job.logprobs_sent = len(job.token_logprobs)

    def _token_logprob(self, token: int, logprob: float, top) -> TokenLogprob:
        as_bytes = self.chat.tokenizer.token_bytes
        return as_bytes(token), logprob, [(as_bytes(i), p) for i, p in top]

    def _send_prompt_logprobs(self, job: Job, seq):
        """Once its prompt has run: the logprobs of the caller's prompt tokens (not of the [gMASK] sop
        put before a text), the first token's None where nothing comes before it."""
        if seq.prompt_logprobs is None or seq.scores_prompt or job.prompt_entries is not None:
            return   # (not asked for; cancelled before its prompt ran through; sent already)
        prompt = seq.prompt
        job.prompt_entries = [
            self._token_logprob(prompt[p], *seq.prompt_logprobs[p - 1]) if p else
            (self.chat.tokenizer.token_bytes(prompt[0]), None, None)
            for p in range(getattr(job.request, 'text_start', 0), len(prompt))]
        job.emit('prompt_logprobs', job.prompt_entries)

    def _finish(self, job: Job, seq) -> str:
        """Send the job's last events; -> how it ended, as its client is told ('stop' | 'length' |
        'cancelled' | 'error')."""
        with self._jobs_lock:
            self._jobs.pop(id(job), None)
        if seq.error is not None:
            job.emit('error', seq.error)
            return 'error'
        self._send_prompt_logprobs(job, seq)   # (a prompt only scored: no token came)
        try:
            if seq.finish_reason != 'cancelled':
                self._send(job, job.decoder.finish())
            if isinstance(job.request, ChatRequest):
                reply = job.decoder.reply()
                response, history = self.chat.conclude(job.request, reply)
            else:
                reply, (response, history) = None, job.decoder.result()
        except Exception as e:   # parsing the model's output must never take the engine down
            job.emit('error', e)
            return 'error'
        finish = 'stop' if job.decoder.stopped else seq.finish_reason
        self._send_logprobs(job)
        job.emit('done', Result(response, history, len(job.request.input_ids), len(seq.output), finish,
                                seq.reused, job.token_logprobs if job.logprobs is not None else None,
                                job.prompt_entries, ''.join(job.decoder.sent),
                                reply.tool_calls if reply is not None else []))
        return finish
