"""A request body -> the `ChatCall`s the engine runs: OpenAI chat messages as a ChatGLM conversation
(system prompt, tools, earlier tool calls), a completions prompt, the classic API's prompt and history,
with their generation options, stop strings and logprobs, and one call per choice (`n`). InputError for
what the protocol refuses (server.py answers it with a 400).
"""
from __future__ import annotations

import json
from dataclasses import replace
from typing import Dict, List, Optional

from ..errors import InputError
from .async_engine import ChatCall
from .protocol import ChatCompletionRequest, ClassicRequest, TextCompletionRequest, TokenizeRequest

MAX_STOP_STRINGS = 4      # OpenAI's limit; each is one automaton stepped over every character of the reply


def _token_biases(logit_bias: Dict[str, float]) -> Dict[int, float]:
    """OpenAI's logit_bias (token ids as JSON object keys) -> {id: bias}; the range is checked with the
    other sampling parameters."""
    # Plain ASCII digits only: int() also reads ' 5 ', '1_0' and other scripts' digits ('٥').
    wrong = [token for token in logit_bias if not (token.isascii() and token.isdigit())]
    if wrong:
        raise InputError(f'logit_bias keys must be token ids written in ASCII digits, like "1234"; got {wrong[:5]}')
    return {int(token): bias for token, bias in logit_bias.items()}


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
    if req.functions or req.function_call:
        raise InputError('functions/function_call are the deprecated form of tools: send `tools` (ChatGLM3 '
                         'models call them)')


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
    # vLLM's extra sampling parameters (the classic API has none of them)
    if getattr(req, 'top_k', None) is not None:
        options['top_k'] = max(req.top_k, 0)   # vLLM's -1 and 0 both mean off (our 0)
    for name in ('min_p', 'repetition_penalty'):
        if getattr(req, name, None) is not None:
            options[name] = getattr(req, name)
    if getattr(req, 'stop_token_ids', None):
        options['stop_token_ids'] = tuple(req.stop_token_ids)
    if getattr(req, 'ignore_eos', False):
        options['ignore_eos'] = True
    if getattr(req, 'min_tokens', 0):
        options['min_tokens'] = req.min_tokens
    if getattr(req, 'skip_special_tokens', True) is False:
        raise InputError('skip_special_tokens=false is not supported: replies are text without the model\'s '
                         'special tokens; leave it out (or true)')
    return options


def _check_stream_options(req):
    if req.stream_options is not None and not req.stream:
        raise InputError('stream_options needs stream: true (as in the OpenAI API); leave it out of a request '
                         'that is not streamed')


def _stops(req) -> List[str]:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise InputError(f'stop takes at most {MAX_STOP_STRINGS} strings (as in the OpenAI API), got '
                         f'{len(stops)}; send fewer')
    return stops


def chat_call(req: ChatCompletionRequest, adapter: Optional[str]) -> ChatCall:
    """An OpenAI request as one ChatGLM turn. Raises InputError for what the protocol rejects."""
    _unsupported(req)
    _check_stream_options(req)
    stops = _stops(req)
    query, history, role, system, tools = to_conversation(req)
    options = dict(generation_options(req), role=role, system=system, tools=tools)
    # Structured output (ChatModel.prepare holds the reply to them with a grammar; "none" hides the tools)
    if req.response_format is not None:
        options['response_format'] = req.response_format
    if req.tool_choice is not None:
        options['tool_choice'] = req.tool_choice
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
    _check_stream_options(req)
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


def tokenize_call(req: TokenizeRequest) -> ChatCall:
    """/tokenize: the call whose prompt ids /v1/chat/completions (messages) or /v1/completions (prompt) would
    run, so its count is that request's usage.prompt_tokens. No generation options: nothing runs."""
    if (req.prompt is None) == (req.messages is None):
        raise InputError('send either prompt (as /v1/completions takes it) or messages (as /v1/chat/completions)')
    if not req.add_generation_prompt:
        raise InputError('add_generation_prompt=false is not supported: a ChatGLM prompt always ends by opening '
                         "the assistant's turn; leave it out")
    if req.prompt is not None:
        return ChatCall(req.prompt, [], {}, [], None, completion=True)
    chat = ChatCompletionRequest(messages=req.messages, tools=req.tools)
    return chat_call(chat, None)


def classic_call(req: ClassicRequest) -> ChatCall:
    history = [tuple(h) for h in req.history]
    if any(len(h) != 2 for h in history):
        raise InputError('history must be a list of [query, response] pairs')
    return ChatCall(req.prompt, history, generation_options(req))
