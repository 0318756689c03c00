"""OpenAI-compatible HTTP server over one `ChatModel` (extra `[serve]`: FastAPI, uvicorn, sse-starlette).

    GET  /health                 {"status": "ok", "model", running/queued sequences, KV cache use, ...}
    GET  /metrics                the same as Prometheus text (running and queued sequences, KV pool
                                 use, prefix-cache hit rate, tokens and tokens/s)
    GET  /v1/models              the served model and the LoRA adapters it holds (`model` picks one)
    POST /v1/chat/completions    OpenAI chat completions, with `stream: true` as SSE chunks + [DONE];
                                 ChatGLM3 tools map to `tools` / `tool_calls`
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
import time
import uuid
from typing import Any, Dict, List, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse

from ..chat import ChatModel
from ..errors import ContextLengthError, InputError
from ..batching import KVBudgetError
from .engine import Engine, Job, QueueFull, Result


# -- request bodies ------------------------------------------------------------------------------------
class ToolCallFunction(BaseModel):
    name: str
    arguments: str = '{}'


class ToolCall(BaseModel):
    id: Optional[str] = None
    type: Literal['function'] = 'function'
    function: ToolCallFunction


class Message(BaseModel):
    role: Literal['system', 'user', 'assistant', 'tool', 'function', 'observation']
    content: Optional[Union[str, List[Dict[str, Any]]]] = None
    tool_calls: Optional[List[ToolCall]] = None
    name: Optional[str] = None
    tool_call_id: Optional[str] = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra='ignore')
    model: Optional[str] = None
    messages: List[Message] = Field(min_length=1)
    stream: bool = False
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = None
    tools: Optional[List[Dict[str, Any]]] = None
    n: int = Field(default=1, ge=1)


class ClassicRequest(BaseModel):
    model_config = ConfigDict(extra='ignore')
    prompt: str
    history: List[List[str]] = []
    max_length: Optional[int] = Field(default=None, ge=1)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    temperature: Optional[float] = Field(default=None, gt=0)


# -- OpenAI messages <-> ChatGLM conversations ----------------------------------------------------------
MAX_STOP_STRINGS = 4      # OpenAI's limit; each stop string is searched in the reply after every token


def _text(content) -> str:
    if content is None:
        return ''
    if isinstance(content, str):
        return content
    return ''.join(part.get('text', '') for part in content if part.get('type') == 'text')


def to_conversation(req: ChatCompletionRequest):
    """-> (query, history as role messages, role of the query, system prompt, tools)."""
    messages = []
    for m in req.messages:
        if m.role == 'assistant' and m.tool_calls:
            call = m.tool_calls[0].function
            args = json.loads(call.arguments or '{}')
            if not isinstance(args, dict):
                raise InputError(f'tool call {call.name!r}: arguments must be a JSON object, got {call.arguments!r}')
            code = 'tool_call(' + ', '.join(f'{k}={v!r}' for k, v in args.items()) + ')'
            messages.append({'role': 'assistant', 'metadata': call.name, 'content': f'```python\n{code}\n```'})
        else:
            role = {'tool': 'observation', 'function': 'observation'}.get(m.role, m.role)
            messages.append({'role': role, 'content': _text(m.content)})
    last = messages.pop()
    if last['role'] not in ('user', 'observation'):
        raise InputError(f'the last message must come from the user or a tool, not {last["role"]!r}')
    tools = [t.get('function', t) for t in req.tools] if req.tools else None
    system = None
    if messages and messages[0]['role'] == 'system':
        system = messages.pop(0)['content']
    return last['content'], messages, last['role'], system, tools


def generation_options(req) -> dict:
    options = {}
    if req.temperature is not None:
        if req.temperature == 0:
            options['do_sample'] = False
        else:
            options['temperature'] = req.temperature
    if req.top_p is not None:
        options['top_p'] = req.top_p
    if getattr(req, 'max_tokens', None) is not None:
        options['max_new_tokens'] = req.max_tokens
    if getattr(req, 'seed', None) is not None:
        options['seed'] = req.seed
    return options


def _message(result: Result) -> dict:
    if isinstance(result.response, dict):   # a ChatGLM3 tool call
        args = result.response.get('parameters', {'content': result.response.get('content')})
        return {'role': 'assistant', 'content': None, 'tool_calls': [{
            'id': f'call_{uuid.uuid4().hex[:16]}', 'type': 'function',
            'function': {'name': result.response['name'], 'arguments': json.dumps(args, ensure_ascii=False)}}]}
    return {'role': 'assistant', 'content': result.response}


def _finish_reason(result: Result) -> str:
    return 'tool_calls' if isinstance(result.response, dict) else result.finish_reason


def _usage(result: Result) -> dict:
    return {'prompt_tokens': result.prompt_tokens, 'completion_tokens': result.completion_tokens,
            'total_tokens': result.prompt_tokens + result.completion_tokens,
            # as OpenAI reports prompt caching: the prompt tokens whose K/V the prefix cache held
            'prompt_tokens_details': {'cached_tokens': result.cached_tokens}}


def _error(status: int, message: str, kind: str = 'invalid_request_error') -> JSONResponse:
    return JSONResponse(status_code=status, content={'error': {'message': message, 'type': kind}})


# -- the app ---------------------------------------------------------------------------------------------
def create_app(chat: ChatModel, model_name: Optional[str] = None, max_body_bytes: int = 1 << 20,
               api_key: Optional[str] = None, max_queue: int = 100, max_batch: Optional[int] = None,
               kv_cache_bytes: Optional[int] = None, prefill_chunk: Optional[int] = None) -> FastAPI:
    """api_key: when set, every route but /health and /metrics wants `Authorization: Bearer <api_key>`.
    max_queue: requests that may wait for the model; more get a 503 with Retry-After.
    max_batch, kv_cache_bytes, prefill_chunk: the continuous-batching scheduler's (batching.py)."""
    engine = Engine(chat, max_queue, max_batch, kv_cache_bytes, prefill_chunk)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.cancel_all()   # shutting down (SIGTERM): nothing queued starts, running sequences stop

    app = FastAPI(title='modelscope-chatglm', version='1', lifespan=lifespan)
    name = model_name or chat.name
    app.state.engine = engine

    @app.middleware('http')
    async def check_api_key(request: Request, call_next):
        if api_key and request.url.path not in ('/health', '/metrics'):
            scheme, _, given = request.headers.get('authorization', '').partition(' ')
            if scheme.lower() != 'bearer' or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
                response = _error(401, 'missing or wrong API key: send the header "Authorization: Bearer <key>" '
                                       'with the key the server was started with (--api-key)', 'invalid_api_key')
                response.headers['WWW-Authenticate'] = 'Bearer'
                return response
        return await call_next(request)

    @app.middleware('http')
    async def limit_body(request: Request, call_next):
        length = request.headers.get('content-length')
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            return _error(413, f'request body of {length} bytes is over the limit of {max_body_bytes}')
        if request.method == 'POST' and length is None:   # chunked upload: count as it arrives
            body = b''
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_body_bytes:
                    return _error(413, f'request body is over the limit of {max_body_bytes} bytes')
            request._body = body
        return await call_next(request)

    @app.exception_handler(Exception)
    async def fault(request: Request, exc: Exception):
        # Whatever slipped past the checks above is our fault: say so in the OpenAI error shape.
        return _error(500, f'internal error ({type(exc).__name__}: {exc})', 'server_error')

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = '; '.join(f'{".".join(str(p) for p in e["loc"][1:]) or "body"}: {e["msg"]}' for e in exc.errors())
        return _error(422, f'invalid request: {problems}')

    @app.get('/health')
    async def health():
        return {'status': 'ok', 'model': name, **engine.stats()}

    @app.get('/metrics')
    async def metrics():
        return PlainTextResponse(prometheus_text(engine.stats(), name),
                                 media_type='text/plain; version=0.0.4; charset=utf-8')

    @app.get('/v1/models')
    async def models():
        base = {'id': name, 'object': 'model', 'created': 0, 'owned_by': 'modelscope-chatglm'}
        # LoRA adapters held over the base (--adapter NAME=PATH): a request's `model` picks one.
        return {'object': 'list', 'data': [base] + [dict(base, id=a, root=a, parent=name) for a in chat.adapters]}

    def pick_adapter(requested: Optional[str]) -> Optional[str]:
        """The adapter a request's `model` names; None = the base. Without adapters any name is the base
        (clients often send a fixed model name); with them, an unknown name is an error, not the base."""
        if not chat.adapters or requested in (None, '', name):
            return None
        if requested in chat.adapters:
            return requested
        raise UnknownModel(f'model {requested!r} does not exist here; this server has {[name] + chat.adapters} '
                           '(GET /v1/models lists them)')

    @app.post('/v1/chat/completions')
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        if req.n > 1:
            return _error(400, f'n={req.n}: one choice per request is supported; send {req.n} requests '
                               '(each with its own seed for different samples)')
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            return _error(400, f'stop takes at most {MAX_STOP_STRINGS} strings (as in the OpenAI API), got '
                               f'{len(stops)}; send fewer')
        try:
            adapter = pick_adapter(req.model)
        except UnknownModel as e:
            return _error(404, str(e), 'model_not_found')
        try:
            query, history, role, system, tools = to_conversation(req)
            options = dict(generation_options(req), role=role, system=system, tools=tools)
            # Validate and encode now (errors become a 400, not a broken stream), in a thread: a long
            # conversation takes real time to encode and must not stall the other clients.
            prepared = await asyncio.to_thread(chat.prepare, query, history, **options)
        except (InputError, ContextLengthError, ValueError, TypeError) as e:
            return _error(400, str(e))
        try:
            job = engine.submit(Job(prepared, stops, adapter=adapter))
        except QueueFull as e:
            return _busy(str(e))
        except KVBudgetError as e:
            return _error(400, str(e))
        created, cid = int(time.time()), f'chatcmpl-{uuid.uuid4().hex}'
        if not req.stream:
            try:
                result = await _wait(job, request)
            except ClientGone:
                return _error(499, 'the client closed the connection')
            except Exception as e:   # the request was valid: a failure now is the server's
                return _error(500, f'{type(e).__name__}: {e}', 'server_error')
            return {'id': cid, 'object': 'chat.completion', 'created': created, 'model': name,
                    'choices': [{'index': 0, 'message': _message(result), 'finish_reason': _finish_reason(result)}],
                    'usage': _usage(result)}

        def chunk(delta, finish=None, usage=None):
            body = {'id': cid, 'object': 'chat.completion.chunk', 'created': created, 'model': name,
                    'choices': [{'index': 0, 'delta': delta, 'finish_reason': finish}]}
            if usage is not None:
                body['usage'] = usage
            return json.dumps(body, ensure_ascii=False)

        async def events():
            # ChatGLM3 starts a reply with a metadata line: empty for text, the tool's name for a call.
            # Hold the text until that line is complete, and stream nothing of a tool call but the call.
            pending, mode = '', None if chat.format.reply_starts_with_metadata else 'text'
            try:
                yield chunk({'role': 'assistant', 'content': ''})
                while True:
                    kind, value = await job.events.get()
                    if kind == 'delta':
                        if mode is None:
                            pending += value
                            if '\n' not in pending:
                                continue
                            metadata, _, value = pending.partition('\n')
                            mode = 'tool' if metadata.strip() else 'text'
                            value = value.lstrip()
                        if mode == 'text' and value:
                            yield chunk({'content': value})
                    elif kind == 'done':
                        if mode is None and isinstance(value.response, str) and value.response:
                            # The metadata line never ended: the whole reply is text, none of it sent yet.
                            yield chunk({'content': value.response})
                        if isinstance(value.response, dict):
                            yield chunk({'tool_calls': [dict(_message(value)['tool_calls'][0], index=0)]})
                        yield chunk({}, _finish_reason(value), _usage(value))
                        yield '[DONE]'
                        return
                    else:
                        yield json.dumps({'error': {'message': str(value), 'type': 'server_error'}})
                        yield '[DONE]'
                        return
            finally:
                job.cancel()   # the client is gone (or the stream ended): leave the batch

        return EventSourceResponse(events(), ping=15)

    @app.post('/')
    async def classic(req: ClassicRequest, request: Request):
        options = generation_options(req)
        if req.max_length is not None:
            options['max_length'] = req.max_length
        history = [tuple(h) for h in req.history]
        if any(len(h) != 2 for h in history):
            return _error(400, 'history must be a list of [query, response] pairs')
        try:
            prepared = await asyncio.to_thread(chat.prepare, req.prompt, history, **options)
        except (InputError, ContextLengthError, ValueError, TypeError) as e:
            return _error(400, str(e))
        try:
            job = engine.submit(Job(prepared))
        except QueueFull as e:
            return _busy(str(e))
        except KVBudgetError as e:
            return _error(400, str(e))
        try:
            result = await _wait(job, request)
        except ClientGone:
            return _error(499, 'the client closed the connection')
        except Exception as e:
            return _error(500, f'{type(e).__name__}: {e}', 'server_error')
        return {'response': result.response, 'history': [list(h) for h in result.history], 'status': 200,
                'time': time.strftime('%Y-%m-%d %H:%M:%S')}

    return app


class ClientGone(Exception):
    pass


class UnknownModel(Exception):
    pass


async def _wait(job: Job, request: Request) -> Result:
    """The job's result; ClientGone (and the job cancelled) as soon as the client hangs up."""
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        while True:
            event = asyncio.ensure_future(job.events.get())
            await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not event.done():
                event.cancel()
                raise ClientGone()
            kind, value = event.result()
            if kind == 'done':
                return value
            if kind == 'error':
                raise value
    finally:
        gone.cancel()
        job.cancel()


async def _disconnect(request: Request):
    """Returns when the client closes the connection. (Request.is_disconnected polls with a zero
    timeout, which never sees the disconnect through the HTTP middlewares: wait for it instead.)"""
    while (await request.receive())['type'] != 'http.disconnect':
        pass


def _busy(message: str) -> JSONResponse:
    response = _error(503, message, 'server_busy')
    response.headers['Retry-After'] = '5'
    return response


# name -> (Prometheus type, help) of what /metrics reports, from Engine.stats().
METRICS = {
    'running': ('gauge', 'sequences in the running batch'),
    'waiting': ('gauge', 'requests waiting to join the batch'),
    'max_batch': ('gauge', 'most sequences decoded together (--max-batch)'),
    'kv_budget_bytes': ('gauge', 'memory for K/V of running sequences and the prefix cache (--kv-cache-gb)'),
    'kv_reserved_bytes': ('gauge', 'K/V memory reserved by running sequences'),
    'kv_prefix_cache_bytes': ('gauge', 'K/V memory held by the prefix cache'),
    'prefix_cache_entries': ('gauge', 'finished sequences whose K/V the prefix cache keeps'),
    'prefix_cache_hit_rate': ('gauge', 'share of prompt tokens taken from the prefix cache'),
    'prompt_tokens': ('counter', 'prompt tokens of admitted requests'),
    'cached_prompt_tokens': ('counter', 'prompt tokens whose K/V came from the prefix cache'),
    'generated_tokens': ('counter', 'tokens generated'),
    'completed': ('counter', 'requests finished by a stop or their length'),
    'cancelled': ('counter', 'requests cancelled (client gone, shutdown)'),
    'failed': ('counter', 'requests that failed in the engine'),
    'preempted': ('counter', 'sequences preempted (memory freed, prefilled again) for lack of KV memory'),
    'steps': ('counter', 'scheduler iterations'),
    'tokens_per_second': ('gauge', 'generated tokens per second over the last steps'),
}


def prometheus_text(stats: dict, model: str) -> str:
    label = '{model="' + model.replace('\\', '\\\\').replace('"', '\\"').replace('\n', '\\n') + '"}'
    lines = []
    for key, (kind, text) in METRICS.items():
        metric = f'chatglm_{key}' + ('_total' if kind == 'counter' else '')
        lines += [f'# HELP {metric} {text}', f'# TYPE {metric} {kind}', f'{metric}{label} {float(stats[key])!r}']
    return '\n'.join(lines) + '\n'


SHUTDOWN_GRACE_S = 3


def serve(chat: ChatModel, host: str = '127.0.0.1', port: int = 8000, max_body_bytes: int = 1 << 20,
          model_name: Optional[str] = None, api_key: Optional[str] = None, max_queue: int = 100,
          max_batch: Optional[int] = None, kv_cache_bytes: Optional[int] = None, prefill_chunk: Optional[int] = None):
    import uvicorn
    # SIGTERM: stop accepting, give open requests SHUTDOWN_GRACE_S, then cancel them (their jobs stop
    # at the next token) and everything still queued.
    app = create_app(chat, model_name, max_body_bytes, api_key, max_queue, max_batch, kv_cache_bytes, prefill_chunk)
    uvicorn.run(app, host=host, port=port,
                log_level='info', timeout_graceful_shutdown=SHUTDOWN_GRACE_S)

