"""The OpenAI chat-completions protocol (and the classic ChatGLM API) in ChatGLM terms: request bodies,
their conversion into a `ChatCall`, and the response, error and metrics bodies. No routes and no
engine: the HTTP app (server.py) uses it in one process, and the same app on Ray Serve (ray_app.py)."""
from __future__ import annotations

import json
import uuid
from dataclasses import replace
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from ..engine.scheduler import KVBudgetError
from ..errors import ContextLengthError, InputError
from .async_engine import ChatCall, QueueFull, ReplicaUnavailable, Result


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
    stream: StrictBool = False
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    max_tokens: Optional[StrictInt] = Field(default=None, ge=1)
    max_completion_tokens: Optional[StrictInt] = Field(default=None, ge=1)   # the newer name of max_tokens
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[StrictInt] = None
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    logit_bias: Optional[Dict[str, float]] = None
    tools: Optional[List[Dict[str, Any]]] = None
    tool_choice: Optional[Union[str, Dict[str, Any]]] = None
    n: StrictInt = Field(default=1, ge=1)
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[StrictInt] = Field(default=None, ge=0, le=20)
    cache_salt: Optional[str] = Field(default=None, min_length=1, max_length=256)   # vLLM's: a prefix cache of its own
    # Accepted at their defaults only: a client that asks for more is told so, never silently ignored.
    response_format: Optional[Dict[str, Any]] = None
    functions: Optional[List[Dict[str, Any]]] = None
    function_call: Optional[Union[str, Dict[str, Any]]] = None


class TextCompletionRequest(BaseModel):
    """OpenAI's (legacy) /v1/completions: a plain prompt to continue."""
    model_config = ConfigDict(extra='ignore')
    model: Optional[str] = None
    prompt: Union[str, List[str], List[int], List[List[int]]]
    stream: StrictBool = False
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    max_tokens: Optional[StrictInt] = Field(default=16, ge=0)      # OpenAI's default; 0 with echo: score the prompt
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[StrictInt] = None
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    logit_bias: Optional[Dict[str, float]] = None
    logprobs: Optional[StrictInt] = Field(default=None, ge=0, le=20)
    echo: StrictBool = False
    n: StrictInt = Field(default=1, ge=1)
    best_of: Optional[StrictInt] = Field(default=None, ge=1)
    suffix: Optional[str] = None
    cache_salt: Optional[str] = Field(default=None, min_length=1, max_length=256)


class ClassicRequest(BaseModel):
    model_config = ConfigDict(extra='ignore')
    prompt: str
    history: List[List[str]] = []
    max_length: Optional[StrictInt] = Field(default=None, ge=1)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    temperature: Optional[float] = Field(default=None, gt=0)


def _token_biases(logit_bias: Dict[str, float]) -> Dict[int, float]:
    """OpenAI's logit_bias (token ids as JSON object keys) -> {id: bias}; the range is checked with the
    other sampling parameters."""
    # Plain ASCII digits only: int() also reads ' 5 ', '1_0' and other scripts' digits ('٥').
    wrong = [token for token in logit_bias if not (token.isascii() and token.isdigit())]
    if wrong:
        raise InputError(f'logit_bias keys must be token ids written in ASCII digits, like "1234"; got {wrong[:5]}')
    return {int(token): bias for token, bias in logit_bias.items()}


# -- requests -> ChatCall ----------------------------------------------------------------------------------
MAX_STOP_STRINGS = 4      # OpenAI's limit; each is one automaton stepped over every character of the reply


def _text(content) -> str:
    if content is None:
        return ''
    if isinstance(content, str):
        return content
    kinds = sorted({str(part.get('type')) for part in content} - {'text'})
    if kinds:
        raise InputError(f'message content parts of type {kinds} cannot be read: ChatGLM models take text '
                         'only; send text parts or a string')
    return ''.join(str(part.get('text', '')) for part in content)


def to_conversation(req: ChatCompletionRequest):
    """-> (query, history as role messages, role of the query, system prompt, tools)."""
    messages = []
    for m in req.messages:
        if m.role == 'assistant' and m.tool_calls:
            # As the model wrote it: its text (if any), then one message per call.
            if _text(m.content):
                messages.append({'role': 'assistant', 'metadata': '', 'content': _text(m.content)})
            for tool_call in m.tool_calls:
                call = tool_call.function
                try:
                    args = json.loads(call.arguments or '{}')
                except (ValueError, RecursionError) as e:   # not JSON; an int past 4,300 digits; nesting too deep
                    raise InputError(f'tool call {call.name!r}: arguments are not JSON the server can read '
                                     f'({type(e).__name__}: {str(e)[:100]}); send them as a JSON object') from None
                if not isinstance(args, dict):
                    raise InputError(f'tool call {call.name!r}: arguments must be a JSON object, got '
                                     f'{call.arguments!r}')
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


def _unsupported(req: ChatCompletionRequest):
    """InputError for an OpenAI option that asks for something this server does not do."""
    if req.top_logprobs is not None and not req.logprobs:
        raise InputError('top_logprobs needs logprobs: true (as in the OpenAI API)')
    kind = (req.response_format or {}).get('type', 'text')
    if kind != 'text':
        raise InputError(f'response_format {kind!r} is not supported: replies are not constrained to JSON '
                         'here; leave out response_format and ask for JSON in the prompt')
    if req.functions or req.function_call:
        raise InputError('functions/function_call are the deprecated form of tools: send `tools` (ChatGLM3 '
                         'models call them)')
    if req.tool_choice not in (None, 'auto', 'none'):
        raise InputError(f'tool_choice {req.tool_choice!r} is not supported: a ChatGLM3 model decides itself '
                         'whether to call a tool; send "auto" or "none" (no tools offered)')


def generation_options(req) -> dict:
    options = {}
    if req.temperature is not None:
        if req.temperature == 0:
            options['do_sample'] = False
        else:
            options['temperature'] = req.temperature
    if req.top_p is not None:
        options['top_p'] = req.top_p
    max_tokens = getattr(req, 'max_tokens', None)
    if getattr(req, 'max_completion_tokens', None) is not None:
        if max_tokens is not None and max_tokens != req.max_completion_tokens:
            raise InputError(f'max_tokens={max_tokens} and max_completion_tokens={req.max_completion_tokens} '
                             'disagree; send one of them')
        max_tokens = req.max_completion_tokens
    if max_tokens is not None:
        options['max_new_tokens'] = max_tokens
    for name in ('frequency_penalty', 'presence_penalty'):
        if getattr(req, name, None) is not None:
            options[name] = getattr(req, name)
    if getattr(req, 'logit_bias', None):
        options['logit_bias'] = _token_biases(req.logit_bias)
    if getattr(req, 'seed', None) is not None:
        options['seed'] = req.seed
    if getattr(req, 'max_length', None) is not None:
        options['max_length'] = req.max_length
    return options


def _stops(req) -> List[str]:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise InputError(f'stop takes at most {MAX_STOP_STRINGS} strings (as in the OpenAI API), got '
                         f'{len(stops)}; send fewer')
    return stops


def chat_call(req: ChatCompletionRequest, adapter: Optional[str]) -> ChatCall:
    """An OpenAI request as one ChatGLM turn. Raises InputError for what the protocol rejects."""
    _unsupported(req)
    stops = _stops(req)
    query, history, role, system, tools = to_conversation(req)
    if req.tool_choice == 'none':
        tools = None   # as OpenAI: the model is not offered the tools
    options = dict(generation_options(req), role=role, system=system, tools=tools)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return ChatCall(query, history, options, stops, adapter, logprobs)


def _one_prompt(req: TextCompletionRequest):
    """The request's prompt: a string or token ids, or a list of one of those."""
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise InputError(f'{len(prompt)} prompts in one request: send one prompt per request')
        prompt = prompt[0]
    return prompt


def echo_text(req: TextCompletionRequest) -> str:
    """What `echo` puts before the completion: the prompt, when it came as text."""
    try:
        prompt = _one_prompt(req)
    except InputError:
        return ''   # (completion_call refuses the request)
    return prompt if req.echo and isinstance(prompt, str) else ''


def scores_prompt(req: TextCompletionRequest) -> bool:
    """Whether the echoed prompt comes with its tokens' logprobs (how evaluation harnesses score text)."""
    return req.echo and req.logprobs is not None


def completion_call(req: TextCompletionRequest, adapter: Optional[str]) -> ChatCall:
    """An OpenAI completions request: its one prompt (text or token ids) to continue as it is."""
    stops = _stops(req)
    prompt = _one_prompt(req)
    if req.suffix:
        raise InputError('suffix (fill in the middle) is not supported: ChatGLM models only continue a prompt')
    if req.best_of not in (None, 1):
        raise InputError(f'best_of={req.best_of} is not supported; send several requests with different seeds')
    if req.echo and not isinstance(prompt, str):
        raise InputError('echo needs the prompt as text; send it as a string (or leave out echo)')
    if req.max_tokens == 0 and not req.echo:
        raise InputError('max_tokens=0 generates nothing: ask for at least 1 token, or send echo: true (with '
                         'logprobs to score the prompt)')
    return ChatCall(prompt, [], generation_options(req), stops, adapter, req.logprobs, completion=True,
                    prompt_logprobs=req.logprobs if scores_prompt(req) else None)


MAX_CHOICES = 16   # `n`: each choice is one sequence of the batch and one place in the queue


def choice_calls(call: ChatCall, n: int) -> List[ChatCall]:
    """The n calls that make a request's n choices: the same prompt (the scheduler prefills a long
    one once and the others take its K/V), each sampled on its own. With a seed, choice i samples
    with seed + i, so choice 0 is the reply of the same request with n=1 and every choice can be
    reproduced alone. (Greedy choices are all the same reply, as OpenAI's.)"""
    if not 1 <= n <= MAX_CHOICES:
        raise InputError(f'n={n}: at most {MAX_CHOICES} choices per request; send several requests for more')
    seed = call.options.get('seed')
    if seed is None or not 0 <= seed < 2 ** 63:   # (a seed out of range is refused by name on submission)
        return [replace(call, choice=i, n=n) for i in range(n)]
    return [replace(call, options=dict(call.options, seed=(seed + i) % 2 ** 63), choice=i, n=n) for i in range(n)]


def classic_call(req: ClassicRequest) -> ChatCall:
    history = [tuple(h) for h in req.history]
    if any(len(h) != 2 for h in history):
        raise InputError('history must be a list of [query, response] pairs')
    return ChatCall(req.prompt, history, generation_options(req))


# -- responses ---------------------------------------------------------------------------------------------
def completion_id(prefix: str = 'chatcmpl') -> str:
    return f'{prefix}-{uuid.uuid4().hex}'


def message(result: Result) -> dict:
    """The assistant message of a whole reply: its text (None when it has none) and its tool calls. A
    ChatGLM3 reply may have both: text, then a call, as the stream showed them."""
    calls = tool_calls(result)
    body = {'role': 'assistant', 'content': result.text if result.text or not calls else None}
    if calls:
        body['tool_calls'] = calls
    return body


def tool_calls(result: Result) -> List[dict]:
    """OpenAI's tool_calls of a result: each call's arguments as JSON (the code itself as `content`
    when it was no call we could read)."""
    return [{'id': f'call_{uuid.uuid4().hex[:16]}', 'type': 'function',
             'function': {'name': call['name'], 'arguments': json.dumps(
                 call['parameters'] if call.get('parameters') is not None else {'content': call.get('content')},
                 ensure_ascii=False)}}
            for call in result.tool_calls]


def finish_reason(result: Result) -> str:
    return 'tool_calls' if result.tool_calls else result.finish_reason


def usage(results: List[Result]) -> dict:
    """The usage of a request's choices: its prompt counted once (as OpenAI does), their tokens summed."""
    prompt, generated = results[0].prompt_tokens, sum(r.completion_tokens for r in results)
    return {'prompt_tokens': prompt, 'completion_tokens': generated, 'total_tokens': prompt + generated,
            # as OpenAI reports prompt caching: the prompt tokens whose K/V the prefix cache held (before
            # the request: its other choices take the prompt's K/V from the first)
            'prompt_tokens_details': {'cached_tokens': min(r.cached_tokens for r in results)}}


def logprobs_body(entries) -> dict:
    """Token log-probabilities in OpenAI's `choices[].logprobs` form. A token's text is its bytes as
    UTF-8, a byte that is part of a character shown escaped ('\\xe4'); `bytes` has them exactly."""
    def token(raw: bytes, logprob: float) -> dict:
        return {'token': raw.decode('utf-8', 'backslashreplace'), 'logprob': logprob, 'bytes': list(raw)}
    return {'content': [dict(token(raw, logprob), top_logprobs=[token(b, p) for b, p in top])
                        for raw, logprob, top in entries]}


def completion(cid: str, created: int, model: str, results: List[Result]) -> dict:
    choices = []
    for index, result in enumerate(results):
        choice = {'index': index, 'message': message(result), 'finish_reason': finish_reason(result)}
        if result.logprobs is not None:
            choice['logprobs'] = logprobs_body(result.logprobs)
        choices.append(choice)
    return {'id': cid, 'object': 'chat.completion', 'created': created, 'model': model,
            'choices': choices, 'usage': usage(results)}


class ChatChunks:
    """The SSE chunks of one choice of a streamed chat completion (chat.completion.chunk)."""

    def __init__(self, cid: str, created: int, model: str, index: int = 0):
        self.head = {'id': cid, 'object': 'chat.completion.chunk', 'created': created, 'model': model}
        self.index = index

    def _chunk(self, delta: dict, finish=None, usage_=None, logprobs=None) -> str:
        choice = {'index': self.index, 'delta': delta, 'finish_reason': finish}
        if logprobs:
            choice['logprobs'] = logprobs_body(logprobs)
        body = dict(self.head, choices=[choice])
        if usage_ is not None:
            body['usage'] = usage_
        return json.dumps(body, ensure_ascii=False)

    def start(self) -> List[str]:
        return [self._chunk({'role': 'assistant', 'content': ''})]

    def delta(self, text: str, logprobs) -> str:
        return self._chunk({'content': text}, logprobs=logprobs)

    def done(self, result: Result, logprobs, usage_: Optional[dict]) -> List[str]:
        """The choice's last chunks; usage_ goes with the request's last choice to finish."""
        chunks = []
        if result.tool_calls:   # ChatGLM3's: they come whole, once the reply has ended
            chunks.append(self._chunk({'tool_calls': [dict(call, index=i) for i, call in enumerate(tool_calls(result))]}))
        return chunks + [self._chunk({}, finish_reason(result), usage_, logprobs)]


# -- /v1/completions ---------------------------------------------------------------------------------
class TextOffsets:
    """Where each token begins in a completion's text (the older API's `text_offset`), token after
    token. Offsets count the text's characters, not the token strings' lengths: a character whose
    bytes several tokens hold is one character, and each of those tokens begins where it does (their
    token strings are escapes like '\\xe4'). Bytes that never make a character are one U+FFFD each in
    the text, as SentencePiece decodes them, and a token that begins inside them points at where they
    begin. The walk follows UTF-8's rules for which bytes may continue a character, as SentencePiece's
    decoder does."""

    def __init__(self, start: int = 0):
        self.at = start            # characters of the text so far
        self.pending = b''         # the bytes of a character not complete yet

    def __call__(self, raws: List[bytes]) -> List[int]:
        offsets = []
        for raw in raws:
            for i, byte in enumerate(raw):
                if self.pending and not self._continues(byte):
                    self.at += len(self.pending)   # a broken character: each of its bytes a U+FFFD
                    self.pending = b''
                if i == 0:
                    offsets.append(self.at)
                self._take(byte)
            if not raw:
                offsets.append(self.at)
        return offsets

    # After these lead bytes the second byte has a narrower range (no overlong forms, no surrogates,
    # nothing past U+10FFFF); any other continuation byte is 0x80-0xBF.
    SECOND_BYTE = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}

    def _continues(self, byte: int) -> bool:
        low, high = self.SECOND_BYTE.get(self.pending[0], (0x80, 0xBF)) if len(self.pending) == 1 else (0x80, 0xBF)
        return low <= byte <= high

    def _take(self, byte: int):
        if self.pending:
            self.pending += bytes([byte])
        elif 0xC2 <= byte <= 0xF4:
            self.pending = bytes([byte])   # a lead byte: 2, 3 or 4 bytes to come
        else:
            self.at += 1                   # ASCII, or a byte no character starts with (U+FFFD)
        lead = self.pending[:1]
        if lead and len(self.pending) == (2 if lead[0] < 0xE0 else 3 if lead[0] < 0xF0 else 4):
            self.at += 1                   # the character is complete
            self.pending = b''


def text_logprobs(entries, offsets: TextOffsets) -> dict:
    """Log-probabilities in the completions API's older form. A prompt's first token has no logprob
    and no alternatives (None), as in OpenAI's."""
    raws = [raw for raw, _, _ in entries]
    return {'tokens': [raw.decode('utf-8', 'backslashreplace') for raw in raws],
            'token_logprobs': [logprob for _, logprob, _ in entries],
            'top_logprobs': [None if top is None else {b.decode('utf-8', 'backslashreplace'): p for b, p in top}
                             for _, _, top in entries],
            'text_offset': offsets(raws)}


def as_echoed(entries, echo: str):
    """A scored prompt's entries as they spell the echoed text. SentencePiece encodes a text with a
    space before it (its dummy prefix) that the text does not have, so the first token's string loses
    it: then the tokens join to the echo, and the offsets point into it."""
    if entries and b''.join(raw for raw, _, _ in entries) == b' ' + echo.encode('utf-8', 'surrogatepass'):
        raw, logprob, top = entries[0]
        return [(raw[1:], logprob, top)] + list(entries[1:])
    return entries


def _choice_logprobs(result: Result, echo: str):
    """A completion choice's logprobs: the echoed prompt's tokens first, when it was scored."""
    if result.logprobs is None:
        return None
    if result.prompt_logprobs is not None:
        return text_logprobs(as_echoed(result.prompt_logprobs, echo) + result.logprobs, TextOffsets())
    return text_logprobs(result.logprobs, TextOffsets(len(echo)))


def text_completion(cid: str, created: int, model: str, results: List[Result], echo: str = '') -> dict:
    choices = [{'index': index, 'text': echo + result.response, 'finish_reason': result.finish_reason,
                'logprobs': _choice_logprobs(result, echo)}
               for index, result in enumerate(results)]
    return {'id': cid, 'object': 'text_completion', 'created': created, 'model': model,
            'choices': choices, 'usage': usage(results)}


class TextChunks:
    """The SSE chunks of one choice of a streamed completion (text_completion objects, as OpenAI
    sends them)."""

    def __init__(self, cid: str, created: int, model: str, echo: str = '', index: int = 0,
                 scores_prompt: bool = False):
        self.head = {'id': cid, 'object': 'text_completion', 'created': created, 'model': model}
        self.echo, self.offsets, self.index = echo, TextOffsets(len(echo)), index
        self.scores_prompt = scores_prompt   # the echo waits for its tokens' logprobs (`prompt`)

    def _chunk(self, text: str, logprobs=None, finish=None, usage_=None) -> str:
        choice = {'index': self.index, 'text': text, 'finish_reason': finish,
                  'logprobs': text_logprobs(logprobs, self.offsets) if logprobs else None}
        body = dict(self.head, choices=[choice])
        if usage_ is not None:
            body['usage'] = usage_
        return json.dumps(body, ensure_ascii=False)

    def start(self) -> List[str]:
        return [self._chunk(self.echo)] if self.echo and not self.scores_prompt else []

    def prompt(self, entries) -> List[str]:
        """The echo with its tokens' logprobs, once the prompt has run."""
        self.offsets = TextOffsets()
        return [self._chunk(self.echo, as_echoed(entries, self.echo))]

    def delta(self, text: str, logprobs) -> str:
        return self._chunk(text, logprobs)

    def done(self, result: Result, logprobs, usage_: Optional[dict]) -> List[str]:
        return [self._chunk('', logprobs, result.finish_reason, usage_)]


def error_body(message_: str, kind: str = 'invalid_request_error') -> dict:
    return {'error': {'message': message_, 'type': kind}}


RETRY_AFTER_S = 5


def rejection(exc: Exception):
    """A refused or failed request -> (HTTP status, message, OpenAI error type, Retry-After or None).
    The one table from the engine's exceptions to the protocol's errors."""
    if isinstance(exc, QueueFull):
        return 503, str(exc), 'server_busy', RETRY_AFTER_S
    if isinstance(exc, ReplicaUnavailable):
        return 503, str(exc), 'server_unavailable', RETRY_AFTER_S
    if isinstance(exc, (InputError, ContextLengthError, KVBudgetError, ValueError, TypeError)):
        return 400, str(exc), 'invalid_request_error', None
    # The request was valid: a failure now is the server's.
    return 500, f'{type(exc).__name__}: {exc}', 'server_error', None


def failure(exc: Exception):
    """Like `rejection`, for a request that was accepted and then failed: never the client's fault."""
    status, message_, kind, retry_after = rejection(exc)
    if status < 500:
        return 500, f'{type(exc).__name__}: {exc}', 'server_error', None
    return status, message_, kind, retry_after


# -- metrics -----------------------------------------------------------------------------------------------
# name -> (Prometheus type, help) of what /metrics reports, from AsyncEngine.stats().
METRICS = {
    'running': ('gauge', 'sequences in the running batch'),
    'waiting': ('gauge', 'requests waiting to join the batch'),
    'max_batch': ('gauge', 'most sequences decoded together (--max-batch)'),
    'kv_budget_bytes': ('gauge', 'memory for K/V of running sequences and the prefix cache (--kv-cache-gb)'),
    'kv_reserved_bytes': ('gauge', 'K/V memory reserved by running sequences'),
    'kv_prefix_cache_bytes': ('gauge', 'K/V memory held by the prefix cache'),
    'prefix_cache_entries': ('gauge', 'token runs (radix-tree nodes) whose K/V the prefix cache keeps'),
    'prefix_cache_hit_rate': ('gauge', 'share of prompt tokens taken from the prefix cache'),
    'prompt_tokens': ('counter', 'prompt tokens of admitted requests'),
    'cached_prompt_tokens': ('counter', 'prompt tokens whose K/V came from the prefix cache'),
    'generated_tokens': ('counter', 'tokens generated'),
    'completed': ('counter', 'requests finished by a stop or their length'),
    'cancelled': ('counter', 'requests cancelled (client gone, shutdown)'),
    'failed': ('counter', 'requests that failed in the engine'),
    'preempted': ('counter', 'sequences preempted (memory freed, prefilled again) for lack of KV memory'),
    'steps': ('counter', 'scheduler iterations'),
    'tokens_per_second': ('gauge', 'generated tokens per second over the last tokens (up to 1,024, within 30 s)'),
}


def _label_value(text: str) -> str:
    return '"' + text.replace('\\', '\\\\').replace('"', '\\"').replace('\n', '\\n') + '"'


def prometheus_text(engines: List[dict], model: str) -> str:
    """Prometheus text for one engine's stats, or one series per replica (labelled by its id)."""
    lines = []
    for key, (kind, text) in METRICS.items():
        metric = f'chatglm_{key}' + ('_total' if kind == 'counter' else '')
        lines += [f'# HELP {metric} {text}', f'# TYPE {metric} {kind}']
        for stats in engines:
            labels = f'model={_label_value(model)}'
            if stats.get('replica'):
                labels += f',replica={_label_value(stats["replica"])}'
            lines.append(f'{metric}{{{labels}}} {float(stats[key])!r}')
    return '\n'.join(lines) + '\n'


def combined(engines: List[dict]) -> dict:
    """Several replicas' stats as one: counts and memory add up, the hit rate is recomputed."""
    total = {key: sum(s[key] for s in engines) for key in METRICS if key != 'prefix_cache_hit_rate'}
    total['prefix_cache_hit_rate'] = (total['cached_prompt_tokens'] / total['prompt_tokens']
                                      if total['prompt_tokens'] else 0.0)
    total.update(queued=total['waiting'], active=total['running'])
    return total
