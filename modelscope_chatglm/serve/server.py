"""OpenAI-compatible HTTP routes (extra `[serve]`: FastAPI, uvicorn, sse-starlette) over an engine: one
`ChatModel` in this process (`create_app`, `serve`), or Ray Serve replicas (`create_app_over`, used by
ray_app.py). The request schemas are protocol.py's; a request becomes engine calls in calls.py, and its
results response bodies in responses.py (errors: errors.py, /metrics: metrics.py).

    GET  /health                 {"status": "ok", "model", running/queued sequences, KV cache use, ...}
    GET  /metrics                the same as Prometheus text, and per-request histograms (time to first
                                 token, inter-token and end-to-end latency, queue time, lengths) and
                                 finish reasons, also under vLLM's names (metrics.py)
    GET  /v1/models              the served model and the LoRA adapters it holds (`model` picks one)
    POST /v1/chat/completions    OpenAI chat completions, with `stream: true` as SSE chunks + [DONE];
                                 ChatGLM3 tools map to `tools` / `tool_calls`
    POST /v1/completions         OpenAI (legacy) completions: a plain prompt continued, no chat template
    POST /tokenize, /detokenize  vLLM's: the prompt ids a request would run (its count), and ids -> text
    POST /v1/load_lora_adapter   vLLM's: {"lora_name", "lora_path"}: a LoRA adapter served from now on;
    POST /v1/unload_lora_adapter {"lora_name"}: gone once the requests already using it have finished
                                 (both need --allow-runtime-adapters; without it they answer 404 naming it)
    POST /                       the classic ChatGLM API: {prompt, history, max_length, top_p,
                                 temperature} -> {response, history, status, time}

Bad requests get a 4xx with a message (422 for fields of the wrong type, 400 for content the model
cannot take, 413 for bodies over --max-body-bytes); the server keeps serving either way.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import time
import uuid
from typing import AsyncIterator, List, Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException

from ..adapters import AdapterNotFound
from ..chat import ChatModel
from ..engine.core import NoSuchAdapter
from ..errors import InputError
from .auth import api_keys
from .async_engine import AsyncEngine, Result
from .calls import chat_call, choice_calls, classic_call, completion_call, echo_text, scores_prompt, tokenize_call
from .errors import error_body, failure, rejection
from .metrics import MetricsExporter, combined, without_request_metrics
from .protocol import (ChatCompletionRequest, ClassicRequest, DetokenizeRequest, LoadLoRAAdapterRequest,
                       TextCompletionRequest, TokenizeRequest, UnloadLoRAAdapterRequest, ignoring_unknown_fields)
from .responses import ChatChunks, TextChunks, completion, completion_id, text_completion, usage


def _problem(error: dict) -> str:
    """One pydantic/FastAPI validation error as 'field: what is wrong'."""
    if error.get('type') == 'json_invalid':
        return f'the body is not valid JSON ({error.get("ctx", {}).get("error")} at character {error["loc"][-1]})'
    return f'{".".join(str(p) for p in error["loc"][1:]) or "body"}: {error["msg"]}'


def _error(status: int, message: str, kind: str = 'invalid_request_error', retry_after=None) -> JSONResponse:
    response = JSONResponse(status_code=status, content=error_body(message, kind))
    if retry_after is not None:
        response.headers['Retry-After'] = str(retry_after)
    return response


def _rejected(exc: Exception, accepted: bool = False) -> JSONResponse:
    """The error response for a request refused before it started, or one that failed after."""
    return _error(*(failure(exc) if accepted else rejection(exc)))


REPLICA_HEADER = 'x-chatglm-replica'   # which engine served a request (several under Ray Serve)
REQUEST_ID = re.compile(r'[A-Za-z0-9._:-]{1,128}')   # a client's X-Request-Id that may go into logs as it is
access_log = logging.getLogger('modelscope_chatglm.access')


def check_model_names(name: str, adapters) -> None:
    """A request's `model` picks the base or an adapter by name: an adapter named like the base could never
    be picked (the request would get the base)."""
    if name in adapters:
        raise ValueError(f'the adapter name {name!r} is the served model\'s name; name the adapter otherwise '
                         '(--adapter NAME=PATH, or lora_name of /v1/load_lora_adapter) or the model (--name)')


def _adapter_change_refused(exc: Exception) -> JSONResponse:
    """A load or unload of an adapter that did not happen: no such adapter or directory is a 404, a bad
    name or adapter (not a LoRA, made for another base, a P-tuning checkpoint, loaded already) a 400."""
    if isinstance(exc, (NoSuchAdapter, AdapterNotFound)):
        return _error(404, str(exc), 'not_found_error')
    if isinstance(exc, ValueError):   # InputError, CheckpointError, AdapterExists, AdapterFixed
        return _error(400, str(exc))
    return _rejected(exc, accepted=True)   # a replica that went away (503), or our fault (500)


# -- the app ---------------------------------------------------------------------------------------------
def create_app(chat: ChatModel, model_name: Optional[str] = None, max_body_bytes: int = 1 << 20,
               api_key: Optional[str] = None, max_queue: int = 100, max_batch: Optional[int] = None,
               kv_cache_bytes: Optional[int] = None, prefill_chunk: Optional[int] = None,
               max_logprobs: int = 20, allow_unknown_fields: bool = False,
               allow_runtime_adapters: bool = False) -> FastAPI:
    """The server over one model in this process.
    api_key: when set (a key, a comma-separated list, or a list), every route but /health and /metrics wants
    `Authorization: Bearer <key>` with one of the keys, and each key's requests share prefix-cache entries
    only with each other (a request's `cache_salt` narrows that to the requests that send the same salt).
    max_queue: requests that may wait for the model; more get a 503 with Retry-After.
    max_logprobs: the most alternatives per token a request may ask logprobs for (vLLM's --max-logprobs).
    allow_unknown_fields: drop body fields that are neither OpenAI's nor vLLM's instead of answering 400.
    max_batch, kv_cache_bytes, prefill_chunk: the settings of the model's engine (engine/scheduler.py).
    allow_runtime_adapters: vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's
    VLLM_ALLOW_RUNTIME_LORA_UPDATING); with it, a request's `model` must name the base or an adapter."""
    check_model_names(model_name or chat.name, list(chat.adapters))   # (before an engine thread starts)
    engine = AsyncEngine(chat, max_queue, max_batch, kv_cache_bytes, prefill_chunk)
    return create_app_over(engine, model_name, max_body_bytes, api_key, max_logprobs, allow_unknown_fields,
                           allow_runtime_adapters)


def create_app_over(backend, model_name: Optional[str] = None, max_body_bytes: int = 1 << 20,
                    api_key: Optional[str] = None, max_logprobs: int = 20,
                    allow_unknown_fields: bool = False, allow_runtime_adapters: bool = False) -> FastAPI:
    """The routes over a backend: an `AsyncEngine` here, or `ray_app.RayBackend` over Ray Serve replicas.
    A backend has model_name, adapters, `generate(ChatCall)` (the event stream of async_engine.py), `async
    stats_list()` (one dict per engine), `async tokenize(ChatCall, special_tokens)`, `async detokenize(ids)`,
    `async load_adapter(name, path)`, `async unload_adapter(name)` and `cancel_all()`."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        backend.cancel_all()   # shutting down (SIGTERM): nothing queued starts, running sequences stop

    app = FastAPI(title='modelscope-chatglm', version='1', lifespan=lifespan)
    name = model_name or backend.model_name
    check_model_names(name, backend.adapters)
    app.state.engine = backend

    keys = [key.encode() for key in api_keys(api_key)]

    @app.middleware('http')
    async def check_api_key(request: Request, call_next):
        if keys and request.url.path not in ('/health', '/metrics'):
            scheme, _, given = request.headers.get('authorization', '').partition(' ')
            given = given.strip().encode('utf-8', 'replace')
            matches = [hmac.compare_digest(given, key) for key in keys]   # (every key compared: no early exit)
            if scheme.lower() != 'bearer' or not any(matches):
                response = _error(401, 'missing or wrong API key: send the header "Authorization: Bearer <key>" '
                                       'with a key the server was started with (--api-key)', 'invalid_api_key')
                response.headers['WWW-Authenticate'] = 'Bearer'
                return response
            request.state.tenant = matches.index(True)   # each key's prefix cache is its own
        return await call_next(request)

    @app.middleware('http')
    async def limit_body(request: Request, call_next):
        length = request.headers.get('content-length')
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            return _error(413, f'request body of {length} bytes is over the limit of {max_body_bytes}')
        if request.method == 'POST' and length is None:   # chunked upload: count as it arrives
            body = bytearray()   # not bytes: `+=` on bytes copies the whole body at every chunk
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_body_bytes:
                    return _error(413, f'request body is over the limit of {max_body_bytes} bytes')
            request._body = bytes(body)
        return await call_next(request)

    @app.middleware('http')
    async def request_id(request: Request, call_next):
        """Outermost (added last): every response echoes the request's X-Request-Id (the client's, when it is
        a plain token, else a new one), and every request leaves one JSON line in the access log."""
        given = request.headers.get('x-request-id', '')
        rid = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        start = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as e:   # Starlette's 500 handler sits outside every middleware: answer it here
            response = _error(500, f'internal error ({type(e).__name__}: {e})', 'server_error')
        response.headers['X-Request-Id'] = rid
        access_log.info(json.dumps({'request_id': rid, 'method': request.method, 'path': request.url.path,
                                    'status': response.status_code, 'client': getattr(request.client, 'host', None),
                                    'ms_to_headers': round((time.perf_counter() - start) * 1e3, 1)}))
        return response

    @app.exception_handler(Exception)
    async def fault(request: Request, exc: Exception):
        # Whatever slipped past the checks above is our fault: say so in the OpenAI error shape.
        return _error(500, f'internal error ({type(exc).__name__}: {exc})', 'server_error')

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        unknown = ['.'.join(map(str, e['loc'][1:])) for e in errors if e.get('type') == 'extra_forbidden']
        if unknown and len(unknown) == len(errors):   # a field we do not implement: never dropped silently
            top = all('.' not in u for u in unknown)
            return _error(400, f'unknown field(s) {unknown}: not an option of the OpenAI API or of vLLM that this '
                               'server implements (docs/serving.md lists them); remove them' +
                               (', or start the server with --allow-unknown-fields to ignore them' if top else ''))
        problems = '; '.join(_problem(e) for e in errors)
        return _error(422, f'invalid request: {problems}')

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        # FastAPI's own: a body it could not parse, an unknown path, a wrong method. In our error shape,
        # saying what was wrong with the body where FastAPI only says that something was.
        cause, message = exc.__cause__, str(exc.detail)
        if isinstance(cause, UnicodeDecodeError):
            message = (f'the request body is not UTF-8 (byte {cause.object[cause.start:cause.start + 1]!r} at '
                       f'{cause.start}); send JSON encoded as UTF-8')
        elif isinstance(cause, RecursionError):
            message = 'the request body nests arrays or objects too deeply to parse; send a flatter JSON object'
        return _error(exc.status_code, message)

    @app.get('/health')
    async def health():
        engines = [without_request_metrics(stats) for stats in await backend.stats_list()]
        if len(engines) == 1 and not engines[0].get('replica'):
            return {'status': 'ok', 'model': name, **engines[0]}
        return {'status': 'ok', 'model': name, **combined(engines), 'replicas': engines}

    exporter = MetricsExporter(name)   # (a registry of this app's own: several apps may share a process)

    @app.get('/metrics')
    async def metrics():
        return Response(exporter.render(await backend.stats_list()), media_type=exporter.content_type)

    @app.get('/v1/models')
    async def models():
        base = {'id': name, 'object': 'model', 'created': 0, 'owned_by': 'modelscope-chatglm'}
        # LoRA adapters held over the base (--adapter NAME=PATH): a request's `model` picks one.
        return {'object': 'list', 'data': [base] + [dict(base, id=a, root=a, parent=name) for a in backend.adapters]}

    def pick_adapter(requested: Optional[str]) -> Optional[str]:
        """The adapter a request's `model` names; None = the base. Without adapters any name is the base
        (clients often send a fixed model name); with them, an unknown name is an error, not the base. So it
        is on a server that loads adapters while it serves, even while it holds none: a request for one not
        loaded yet, or unloaded, must not get the base model's reply."""
        if (not backend.adapters and not allow_runtime_adapters) or requested in (None, '', name):
            return None
        if requested in backend.adapters:
            return requested
        raise UnknownModel(f'model {requested!r} does not exist here; this server has {[name] + backend.adapters} '
                           '(GET /v1/models lists them)')

    async def respond(call_of, req, request: Request, whole, chunks):
        """Run one OpenAI request: call_of(req, adapter) -> ChatCall; whole(cid, created, model, results) ->
        the JSON body; chunks(cid, created, model, index) -> the SSE chunks of one choice (ChatChunks
        or TextChunks), `model` naming the adapter the request chose (or the base). Its `n` choices are n
        generations, streamed side by side."""
        try:
            adapter = pick_adapter(req.model)
        except UnknownModel as e:
            return _error(404, str(e), 'model_not_found')
        try:
            call = call_of(req, adapter)
            call.cache_scope = (getattr(request.state, 'tenant', None), req.cache_salt)
            asked = max(call.logprobs or 0, call.prompt_logprobs or 0)
            if asked > max_logprobs:
                raise InputError(f'{asked} alternatives per token asked for (top_logprobs / logprobs); this server '
                                 f'returns at most {max_logprobs} (--max-logprobs)')
            calls = choice_calls(call, req.n)
        except (InputError, ValueError) as e:
            return _error(400, str(e))
        streams = [backend.generate(c) for c in calls]
        # ('start', replica) or ('rejected', exception) from each; one refused choice refuses the request.
        # The first choice goes first: it alone is checked against the queue's limit, before its siblings
        # are queued (n choices take one place: more choices than --max-queue still run on an idle server).
        first = await asyncio.gather(streams[0].__anext__(), return_exceptions=True)
        firsts = first + list(await asyncio.gather(*(events.__anext__() for events in streams[1:]),
                                                   return_exceptions=True))
        refused = [first if isinstance(first, BaseException) else first[1] for first in firsts
                   if isinstance(first, BaseException) or first[0] == 'rejected']
        if refused:
            await asyncio.gather(*(events.aclose() for events in streams))   # the accepted ones leave
            return _rejected(refused[0])
        replica, model = firsts[0][1], adapter or name
        headers = {REPLICA_HEADER: replica} if replica else {}
        created, cid = int(time.time()), completion_id('cmpl' if call.completion else 'chatcmpl')
        if not req.stream:
            try:
                results = await _results(streams, request)
            except ClientGone:
                return _error(499, 'the client closed the connection')
            except Exception as e:   # the request was valid: a failure now is the server's
                return _rejected(e, accepted=True)
            # Built and serialized in a thread: 8,000 tokens with 20 logprobs each are ~15 MB of JSON.
            body = await asyncio.to_thread(lambda: json.dumps(whole(cid, created, model, results), ensure_ascii=False))
            return Response(body, media_type='application/json', headers=headers)

        async def stream():
            shapes = [chunks(cid, created, model, index) for index in range(len(streams))]
            events = _merged(streams)
            results = [None] * len(streams)
            logprobs = [[] for _ in streams]   # per choice, of the tokens since its last chunk: they go with the next
            try:
                for shape in shapes:
                    for chunk in shape.start():
                        yield chunk
                async for index, kind, value in events:
                    if kind == 'logprobs':
                        logprobs[index] += value
                    elif kind == 'prompt_logprobs':   # (a completion that echoes its prompt, scored)
                        for chunk in shapes[index].prompt(value):
                            yield chunk
                    elif kind == 'delta':
                        yield shapes[index].delta(value, logprobs[index])
                        logprobs[index] = []
                    elif kind == 'done':
                        results[index] = value
                        for chunk in shapes[index].done(value, logprobs[index]):
                            yield chunk
                        if all(results):
                            if req.stream_options and req.stream_options.include_usage:   # as OpenAI's
                                yield shapes[index].usage(usage(results))
                            break
                    else:
                        yield _stream_error(value)
                        break
            except Exception as e:   # a fault here: still end the stream with an error event
                yield _stream_error(e)
            finally:
                await events.aclose()   # the client is gone (or the stream ended): every choice leaves the batch
            yield '[DONE]'

        return EventSourceResponse(stream(), ping=15, headers=headers)

    async def tokenize(req, request: Request):
        """vLLM's: the prompt ids a chat (`messages`) or completions (`prompt`) request would run."""
        try:
            pick_adapter(req.model)   # (a name this server does not serve is the same 404 as a generation's)
        except UnknownModel as e:
            return _error(404, str(e), 'model_not_found')
        try:
            result = await backend.tokenize(await asyncio.to_thread(tokenize_call, req), req.add_special_tokens)
        except (InputError, ValueError) as e:   # (ContextLengthError is one: the request could not run either)
            return _error(400, str(e))
        return Response(await asyncio.to_thread(json.dumps, result), media_type='application/json')

    async def detokenize(req, request: Request):
        try:
            result = await backend.detokenize(req.tokens)
        except (InputError, ValueError) as e:
            return _error(400, str(e))
        return Response(await asyncio.to_thread(json.dumps, result, ensure_ascii=False), media_type='application/json')

    async def chat_completions(req, request: Request):
        return await respond(chat_call, req, request, completion, ChatChunks)

    async def completions(req, request: Request):
        echo, scored = echo_text(req), scores_prompt(req)
        return await respond(completion_call, req, request,
                             lambda cid, created, model, results: text_completion(cid, created, model, results, echo),
                             lambda cid, created, model, index: TextChunks(cid, created, model, echo, index, scored))

    # The body's schema is chosen here (strict, or dropping unknown fields), so it is set on the endpoints
    # as an object: this module's annotations are strings, which FastAPI resolves in its globals.
    for path, endpoint, schema in (('/v1/chat/completions', chat_completions, ChatCompletionRequest),
                                   ('/v1/completions', completions, TextCompletionRequest),
                                   ('/tokenize', tokenize, TokenizeRequest), ('/detokenize', detokenize, DetokenizeRequest)):
        endpoint.__annotations__['req'] = ignoring_unknown_fields(schema) if allow_unknown_fields else schema
        app.post(path)(endpoint)

    # -- adapters loaded and unloaded while serving: vLLM's routes, request and response shapes -------------
    def adapter_name(value: str) -> str:
        if not value.strip():
            raise InputError('lora_name must not be empty: it is the "model" requests send to pick the adapter')
        return value

    async def load_lora_adapter(req, request: Request):
        try:
            lora_name = adapter_name(req.lora_name)
            check_model_names(name, [lora_name])
            if not req.lora_path.strip():
                raise InputError('lora_path must name the adapter\'s directory (adapter_config.json and its weights)')
            # Shielded: a client that hangs up does not stop a load halfway (the lock of the next waits for it).
            await asyncio.shield(backend.load_adapter(lora_name, req.lora_path))
        except Exception as e:
            return _adapter_change_refused(e)
        return PlainTextResponse(f"Success: LoRA adapter '{lora_name}' added successfully.")

    async def unload_lora_adapter(req, request: Request):
        try:
            lora_name = adapter_name(req.lora_name)
            if lora_name == name:
                raise InputError(f'{name!r} is the served model, not an adapter; it cannot be unloaded')
            await asyncio.shield(backend.unload_adapter(lora_name))
        except Exception as e:
            return _adapter_change_refused(e)
        return PlainTextResponse(f"Success: LoRA adapter '{lora_name}' removed successfully.")

    async def runtime_adapters_off(request: Request):
        return _error(404, f'{request.url.path} is off on this server: start it with --allow-runtime-adapters (Ray '
                           'Serve settings: allow_runtime_adapters) to load and unload LoRA adapters while it serves',
                      'not_found_error')

    for path, endpoint, schema in (('/v1/load_lora_adapter', load_lora_adapter, LoadLoRAAdapterRequest),
                                   ('/v1/unload_lora_adapter', unload_lora_adapter, UnloadLoRAAdapterRequest)):
        if allow_runtime_adapters:
            endpoint.__annotations__['req'] = ignoring_unknown_fields(schema) if allow_unknown_fields else schema
        app.post(path)(endpoint if allow_runtime_adapters else runtime_adapters_off)

    @app.post('/')
    async def classic(req: ClassicRequest, request: Request):
        try:
            call = classic_call(req)
        except InputError as e:
            return _error(400, str(e))
        call.cache_scope = (getattr(request.state, 'tenant', None), None)
        events = backend.generate(call)
        kind, value = await events.__anext__()   # ('start', replica) or ('rejected', exception)
        if kind == 'rejected':
            return _rejected(value)
        try:
            result, = await _results([events], request)
        except ClientGone:
            return _error(499, 'the client closed the connection')
        except Exception as e:
            return _rejected(e, accepted=True)
        return JSONResponse({'response': result.response, 'history': [list(h) for h in result.history],
                             'status': 200, 'time': time.strftime('%Y-%m-%d %H:%M:%S')},
                            headers={REPLICA_HEADER: value} if value else {})

    return app


class ClientGone(Exception):
    pass


class UnknownModel(Exception):
    pass


def _stream_error(exc: Exception) -> str:
    """An SSE event that ends a stream whose generation failed."""
    _, message, kind, _ = failure(exc)
    return json.dumps(error_body(message, kind))


async def _merged(streams) -> AsyncIterator[Tuple[int, str, object]]:
    """The events of several engine streams (a request's choices) as they come, as (index, kind,
    value). It ends when they all have; closing it closes them all (their jobs leave the batch)."""
    queue = asyncio.Queue()   # (no bound of its own: each stream's events wait in an unbounded queue anyway)

    async def pump(index, events):
        try:
            async for kind, value in events:
                queue.put_nowait((index, kind, value))
        except Exception as e:   # a backend fault: this choice ends with it
            queue.put_nowait((index, 'error', e))
        finally:
            queue.put_nowait(None)   # this stream has ended

    pumps = [asyncio.ensure_future(pump(index, events)) for index, events in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            event = await queue.get()
            if event is None:
                open_streams -= 1
            else:
                yield event
    finally:
        for task in pumps:
            task.cancel()   # a pump's stream closes as it is cancelled: its job leaves the batch
        await asyncio.gather(*pumps, return_exceptions=True)
        await asyncio.gather(*(events.aclose() for events in streams))


async def _results(streams, request: Request) -> List[Result]:
    """The final Results of a request's event streams; ClientGone (and the streams closed) as soon as
    the client hangs up."""
    events = _merged(streams)
    gone = asyncio.ensure_future(_disconnect(request))
    results = [None] * len(streams)
    try:
        while not all(results):
            event = asyncio.ensure_future(events.__anext__())
            await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not event.done():
                event.cancel()   # the streams' own cleanup (cancelling their jobs) runs as this ends
                await asyncio.gather(event, return_exceptions=True)
                raise ClientGone()
            try:
                index, kind, value = event.result()
            except StopAsyncIteration:
                raise RuntimeError('the engine ended a reply without its result') from None
            if kind == 'done':
                results[index] = value
            elif kind == 'error':
                raise value
        return results
    finally:
        gone.cancel()
        await events.aclose()


async def _disconnect(request: Request):
    """Returns when the client closes the connection. (Request.is_disconnected polls with a zero
    timeout, which never sees the disconnect through the HTTP middlewares: wait for it instead.)"""
    while (await request.receive())['type'] != 'http.disconnect':
        pass


SHUTDOWN_GRACE_S = 3


def timed_http_protocol(header_timeout: float, max_connections: int):
    """uvicorn's HTTP/1.1 protocol with two bounds: a request's head (request line and headers) must arrive
    within `header_timeout` seconds of the connection, or of the previous response (a client that connects
    and sends nothing, or its headers a byte at a time, is disconnected), and a connection past
    `max_connections` open ones is closed at once (idle sockets held the server at its file-descriptor
    limit, where it stopped accepting and logged a traceback per attempt)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11(H11Protocol):
        _head_deadline = None

        def connection_made(self, transport):
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.close()
                return
            self._expect_head()

        def data_received(self, data):
            super().data_received(data)
            if self._head_deadline is not None and self.conn.their_state is not h11.IDLE:
                self._head_deadline.cancel()   # the head is in: the request runs as long as it needs
                self._head_deadline = None

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing():
                self._expect_head()   # (keep-alive: the next request's head has the same deadline)

        def connection_lost(self, exc):
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None
            super().connection_lost(exc)

        def _expect_head(self):
            if self._head_deadline is None:
                self._head_deadline = self.loop.call_later(header_timeout, self._head_too_slow)

        def _head_too_slow(self):
            self._head_deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return TimedH11


def raise_open_file_limit(wanted: int) -> int:
    """Let this process hold `wanted` descriptors if the hard limit allows (the soft limit is often 1,024);
    -> the soft limit now."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, ValueError, OSError):
        return wanted


def serve(chat: ChatModel, host: str = '127.0.0.1', port: int = 8000, max_body_bytes: int = 1 << 20,
          model_name: Optional[str] = None, api_key: Optional[str] = None, max_queue: int = 100,
          max_batch: Optional[int] = None, kv_cache_bytes: Optional[int] = None, prefill_chunk: Optional[int] = None,
          max_logprobs: int = 20, max_connections: int = 1000, header_timeout: float = 30.0,
          allow_unknown_fields: bool = False, allow_runtime_adapters: bool = False):
    import uvicorn
    # SIGTERM: stop accepting, give open requests SHUTDOWN_GRACE_S, then cancel them (their jobs stop
    # at the next token) and everything still queued.
    app = create_app(chat, model_name, max_body_bytes, api_key, max_queue, max_batch, kv_cache_bytes, prefill_chunk,
                     max_logprobs, allow_unknown_fields, allow_runtime_adapters)
    if allow_runtime_adapters:   # (as vLLM warns: any client that may send requests may load files from this machine)
        logging.getLogger(__name__).warning(
            'serving with --allow-runtime-adapters: every client with access (and an API key, if set) can load '
            'adapters from paths on this machine and unload them for everyone; use it where clients are trusted')

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # First end every stream with an error event and [DONE] and answer every waiting request with a
            # 503 (uvicorn only waits for open connections, then cuts them), then stop as uvicorn does.
            app.state.engine.shut_down()
            super().handle_exit(sig, frame)

    # Room for every allowed connection, the model's files and the engine's (the limit binds first).
    limit = raise_open_file_limit(max_connections + 256)
    max_connections = min(max_connections, max(16, limit - 256))
    if not access_log.handlers:   # one JSON line per request on stderr, in place of uvicorn's access line
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter('%(message)s'))
        access_log.addHandler(handler)
        access_log.setLevel(logging.INFO)
        access_log.propagate = False
    Server(uvicorn.Config(app, host=host, port=port, log_level='info', timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
                          http=timed_http_protocol(header_timeout, max_connections), access_log=False,
                          limit_concurrency=max_connections)).run()

