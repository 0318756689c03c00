"""`ChatModel`: a loaded ChatGLM model with its tokenizer, chat format and generation defaults.

This is the core API that every surface (ModelScope pipeline, CLI, web page, server) wraps. It knows
nothing of those surfaces. Every generation goes through the model's one engine (engine/core.py): a
single turn is a batch of one, and the next turn of a conversation takes its history's K/V from the
engine's prefix cache.
"""
from __future__ import annotations

import copy
import gc
import threading
from dataclasses import dataclass, replace
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from . import chat_formats, structured
from .chat_formats import Reply
from .engine.detokenize import ByteDeltas, StopStrings, TextDeltas, text_after
from .engine.sampling import SamplingParams
from .errors import ContextLengthError, InputError
from .families import get_family


# Tools are rendered into the prompt (json.dumps with indentation) and then tokenized, and schemas (tools',
# response_format's) are rendered into grammars: a 2 KB request of tools nested 900 deep cost 0.8 s and
# 175 MB before it was refused. Real schemas nest a few levels and hold tens of values; these bounds are
# checked before anything is rendered.
MAX_SCHEMA_DEPTH = 32
MAX_SCHEMA_VALUES = 20_000


def check_json_size(value, what: str, fix: str):
    """Refuse JSON that nests deeper than MAX_SCHEMA_DEPTH or holds more than MAX_SCHEMA_VALUES values (keys
    and values of every object, items of every list), without recursion."""
    stack, values = [(value, 1)], 0
    while stack:
        value, depth = stack.pop()
        values += 1
        if depth > MAX_SCHEMA_DEPTH:
            raise InputError(f'{what} nest more than {MAX_SCHEMA_DEPTH} levels deep; {fix}')
        if values > MAX_SCHEMA_VALUES:
            raise InputError(f'{what} hold more than {MAX_SCHEMA_VALUES} values; {fix}')
        if isinstance(value, dict):
            values += len(value)
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)


def check_tools(tools):
    """Refuse tools that are not a list of objects, or too deep or too big (check_json_size)."""
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise InputError('tools must be a list of objects (function definitions)')
    check_json_size(tools, 'tools', 'send fewer or smaller functions, or flatten their schemas')


class ChatModel:
    def __init__(self, model, tokenizer, config, model_dir: str, context_length: Optional[int] = None,
                 generation: Optional[dict] = None, name: Optional[str] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.family = config.family                   # its name: 'glm1' | 'glm2' | 'glm3'
        family = get_family(self.family)
        self.format = family.chat_format              # prompt ids in, reply out (chat_formats.py)
        self.model_dir = model_dir
        self.name = name or model_dir
        self.context_length = min(context_length or config.seq_length, config.seq_length)
        defaults = SamplingParams(stop_ids=tuple(tokenizer.stop_ids), **family.generation_defaults)
        self.defaults = SamplingParams.from_kwargs(defaults, **(generation or {}))
        from .adapters import adapter_names
        self.adapters = adapter_names(model)   # LoRA adapters held unmerged, selectable per request
        self._grammars = None                # compiled structured-output grammars (made on first use)
        self._engine = None                  # made on first use (or by configure_engine)
        self._engine_settings: dict = {}
        self._engine_lock = threading.Lock()

    def __repr__(self):
        return (f'ChatModel({self.name!r}, family={self.family}, device={self.device}, '
                f'dtype={self.dtype}, context_length={self.context_length}{self._quantization()})')

    def _quantization(self) -> str:
        """', int4 blocks, int8 activations' and the like, for the repr (what the CLI prints when loaded)."""
        from .quantization import QuantizedLinear
        linear = next((m for m in self.model.modules() if isinstance(m, QuantizedLinear)), None)
        if linear is None:
            return ''
        return f', int{linear.bits} blocks' + (', int8 activations' if linear.int8_activations else '')

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # -- raw model access ---------------------------------------------------------------------------
    def logits(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Float logits [batch, seq, vocab] for ids [batch, seq] (or [seq]); left padding = mask 0."""
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        mask = None if attention_mask is None else torch.as_tensor(attention_mask).reshape(ids.shape)
        with torch.inference_mode():
            return self.model.full_logits(ids.to(self.device), mask)

    def sampling(self, **gen) -> SamplingParams:
        params = SamplingParams.from_kwargs(self.defaults, **gen)
        for name, ids in (('logit_bias', params.logit_bias), ('stop_token_ids', params.stop_token_ids)):
            beyond = sorted(t for t in ids if t >= self.tokenizer.vocab_size)
            if beyond:
                raise ValueError(f'{name} names token ids {beyond[:5]} beyond the vocabulary '
                                 f'({self.tokenizer.vocab_size} tokens)')
        return params

    def grammar(self, text: str):
        """A grammar (llguidance Lark) compiled over this model's vocabulary, for SamplingParams.grammar;
        compiled once per text and cached. structured.py writes them for response_format and tool_choice."""
        if self._grammars is None:
            from .engine.grammar import Grammars
            self._grammars = Grammars(self.tokenizer, self.model.cfg.vocab_size)
        return self._grammars.compile(text)

    def generate(self, input_ids, max_new_tokens: Optional[int] = None, **gen) -> List[int]:
        """New token ids of one sequence (the stop id included when reached)."""
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1).tolist()
        return self.generate_batch([ids], max_new_tokens=max_new_tokens, **gen)[0]

    def stream_tokens(self, input_ids, **gen) -> Iterator[int]:
        """The new token ids of one sequence as they are generated (the stop id included when reached).
        Bad arguments raise here, not at the first token; closing the iterator early ends the generation."""
        params = self.sampling(**gen)
        prompt = self._check_prompts([input_ids])[0]
        engine = self.engine
        return engine.stream(lambda on_token: engine.submit(prompt, params, on_token))

    def generate_batch(self, prompts_ids: Sequence[Sequence[int]], **gen) -> List[List[int]]:
        """Several prompts generated side by side in the engine's batch; one list of new ids per prompt.
        Each equals what the prompt alone gives (a seed seeds each sequence alike)."""
        params = self.sampling(**gen)
        return self._run([(p, params) for p in self._check_prompts(prompts_ids)])

    def _check_prompts(self, prompts) -> List[List[int]]:
        """Prompts as lists of ids (lists, tensors or arrays of token ids), each non-empty and in the vocabulary."""
        out = []
        for p in prompts:
            ids = torch.as_tensor(p, dtype=torch.long).reshape(-1).tolist()
            if not ids or not all(0 <= i < self.model.cfg.vocab_size for i in ids):
                raise InputError(f'each prompt is a non-empty list of token ids below {self.model.cfg.vocab_size}, '
                                 f'got {str(p)[:80]}')
            out.append(ids)
        return out

    def _run(self, jobs) -> List[List[int]]:
        """[(prompt ids, params), ...] through the engine, all at once -> their output ids."""
        engine = self.engine
        seqs = []
        try:
            for prompt, params in jobs:
                seqs.append(engine.submit(prompt, params))
            engine.run_until_done(seqs)
        finally:   # (interrupted: leave nothing running)
            engine.release(seqs)
        for seq in seqs:
            if seq.error is not None:
                raise seq.error
        return [s.output for s in seqs]

    # -- the engine ----------------------------------------------------------------------------------
    @property
    def engine(self):
        """The engine every generation of this model goes through (engine/core.py), made on first use
        with the defaults; `configure_engine` sets its batch size, KV budget and prefill chunk."""
        with self._engine_lock:
            if self._engine is None or (not self._engine.runner.kv.fits(self.model) and not self._engine.busy):
                # (first use; or the model was cast or moved since: its cached K/V would not do)
                self._drop_engine()
                self._engine = self.new_engine(**self._engine_settings)
            return self._engine

    def configure_engine(self, max_batch: Optional[int] = None, kv_cache_bytes: Optional[int] = None,
                         prefill_chunk: Optional[int] = None):
        """Replace the engine with one of these settings (a server does this before it serves)."""
        with self._engine_lock:
            if self._engine is not None and (self._engine.busy or self._engine.stepping_in_background):
                raise RuntimeError('this model is generating or being served; configure its engine before the '
                                   'first request (to serve one checkpoint twice, load it twice)')
            self._drop_engine()
            self._engine_settings = dict(max_batch=max_batch, kv_cache_bytes=kv_cache_bytes, prefill_chunk=prefill_chunk)
            self._engine = self.new_engine(**self._engine_settings)
            return self._engine

    def _drop_engine(self):
        """Stop the engine and free its K/V pool before another is made: the default pool is sized by the
        memory free at that moment (on a GPU half of it), which the old pool would still hold."""
        if self._engine is None:
            return
        self._engine.stop()
        self._engine = None
        gc.collect()
        if self.model.device.type == 'cuda':
            torch.cuda.empty_cache()

    def clear_cache(self):
        """Forget every finished conversation's cached K/V (the engine keeps them, up to its KV budget, so
        that a returning conversation prefills only its new turn)."""
        if self._engine is not None:
            self._engine.clear_prefix_cache()

    def new_engine(self, max_batch: Optional[int] = None, kv_cache_bytes: Optional[int] = None,
                   prefill_chunk: Optional[int] = None):
        """An engine of its own over this model (tests and benchmarks compare settings side by side)."""
        from .engine import LLMEngine
        return LLMEngine(self.model, self.tokenizer.vocab_size, max_batch, kv_cache_bytes, prefill_chunk)

    # -- chat ---------------------------------------------------------------------------------------
    def build_inputs(self, query: str, history=None, role: str = 'user', system: Optional[str] = None,
                     tools: Optional[list] = None) -> List[int]:
        """The ids the model sees for one chat turn (no truncation)."""
        messages, _ = self._conversation(query, history, role, system, tools)
        return self._encode(messages)

    def chat(self, query: str, history=None, **kwargs) -> Tuple[Union[str, dict], list]:
        """One turn: -> (response, history with this turn appended)."""
        response, new_history = '', history
        for response, new_history in self.stream_chat(query, history, **kwargs):
            pass
        return response, new_history

    def stream_chat(self, query: str, history=None, **kwargs) -> Iterator[Tuple[Union[str, dict], list]]:
        """Yield (response so far, history with this turn) as tokens arrive."""
        turn = self.turn(query, history, **kwargs)
        last = None
        for _ in turn:
            last = turn.response
            yield turn.response, turn.history
        if last is None or turn.response != last:
            # The end of the reply produced no visible delta (e.g. a stop token, or the last bytes of
            # a character cut off by max_new_tokens): the final state still counts.
            yield turn.response, turn.history

    def turn(self, query: str, history=None, **kwargs) -> 'ChatTurn':
        """A turn to iterate for text deltas (what servers stream); see `ChatTurn`."""
        return ChatTurn(self, self.prepare(query, history, **kwargs))

    def prepare(self, query: str, history=None, role: str = 'user', system: Optional[str] = None,
                tools: Optional[list] = None, truncate_query: bool = False, response_format: Optional[dict] = None,
                tool_choice=None, **gen) -> 'ChatRequest':
        """Validate a turn, build its prompt ids (dropping the oldest rounds that do not fit) and
        resolve its sampling parameters. `respond` turns the generated ids into the reply.
        A query that alone does not fit is an error, or with truncate_query=True loses its beginning.
        response_format ({'type': 'json_object'} or {'type': 'json_schema', 'json_schema': {'schema': ...}})
        and tool_choice ('auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}) are
        OpenAI's: the reply is held to them by a grammar (structured.py)."""
        if tool_choice == 'none':
            tools = None   # as OpenAI: the model is not offered the tools
        messages, as_pairs = self._conversation(query, history, role, system, tools)
        params = self.sampling(**gen)
        check_json_size(response_format, 'response_format schemas', 'flatten or shorten the schema')
        text = structured.reply_grammar(self.format, response_format, tools, tool_choice)
        if text is not None:
            params = replace(params, grammar=self.grammar(text))
        ids, params = self._fit(messages, params, truncate_query)
        return ChatRequest(ids, params, messages, as_pairs, history)

    def prepare_completion(self, prompt: Union[str, Sequence[int]], **gen) -> 'CompletionRequest':
        """A plain prompt to continue, without the chat template (OpenAI's /v1/completions): text gets
        the model's [gMASK]/sop tokens around it, token ids are taken as they are. Never truncated."""
        text_start = 0
        if isinstance(prompt, str):
            text = self.tokenizer.encode(prompt)
            ids = self.format.wrap(self.tokenizer, text)
            if ids[len(ids) - len(text):] == text:   # the model's own tokens go before the text (ChatGLM2/3)
                text_start = len(ids) - len(text)
        elif isinstance(prompt, (list, tuple)) and prompt and all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.tokenizer.vocab_size for i in prompt):
            ids = list(prompt)
        else:
            raise InputError(f'a prompt is a string or a non-empty list of token ids below {self.tokenizer.vocab_size}, '
                             f'got {str(prompt)[:80]}')
        try:
            self.model.start(ids)   # the family's own check (ChatGLM-6B: [gMASK] and <sop> in the prompt)
        except ValueError as e:
            raise InputError(str(e)) from None
        params = self.sampling(**gen)
        limit = self.context_length if params.max_length is None else min(self.context_length, params.max_length)
        room = limit - len(ids)
        asked = params.max_new_tokens
        if room < (1 if asked is None else asked) or room < 0:   # (0 new tokens: a prompt only scored)
            raise ContextLengthError(
                f'the prompt is {len(ids)} tokens and {1 if asked is None else asked} more are asked for, but '
                f'the context window is {limit}; shorten the prompt or ask for fewer tokens')
        return CompletionRequest(ids, replace(params, max_new_tokens=room if asked is None else asked), text_start)

    def respond(self, request: Union['ChatRequest', 'CompletionRequest'], output_ids: List[int]) \
            -> Tuple[Union[str, dict], list]:
        """Generated ids -> (post-processed response, history with this turn appended); a completion's
        response is the text its ids add after the prompt (a stop id left out), with no history."""
        ids = output_ids[:-1] if output_ids and output_ids[-1] in request.params.stops else output_ids
        if isinstance(request, CompletionRequest):
            return text_after(self.tokenizer, request.input_ids, ids), []
        return self.conclude(request, self.format.parse(self.tokenizer, ids, request.messages[:-1],
                                                        request.params.grammar is not None))

    def conclude(self, request: 'ChatRequest', reply: Reply) -> Tuple[Union[str, dict], list]:
        """A parsed reply -> (response, history with this turn appended, in the form it was given)."""
        if request.as_pairs:
            pairs = [tuple(p) for p in (request.history or [])]
            return reply.response, pairs + [(request.messages[-1]['content'], reply.text)]
        return reply.response, copy.deepcopy(request.messages) + reply.messages

    # -- many at once -------------------------------------------------------------------------------
    def chat_batch(self, queries: Sequence[Union[str, dict]], **gen) -> List[Tuple[Union[str, dict], list]]:
        """Several turns generated together: each item is a query string or a dict of `chat` arguments
        ({'query', 'history', 'system', 'tools', 'role'}); gen = generation options for all.
        -> [(response, history), ...] in order. Greedy replies equal what `chat` gives one by one."""
        requests = []
        for item in queries:
            turn = {'query': item} if isinstance(item, str) else dict(item)
            if not isinstance(turn.get('query'), str):
                raise InputError(f'chat_batch takes query strings or dicts with a "query" string, got {item!r}')
            requests.append(self.prepare(**turn, **gen))
        return [self.respond(r, ids) for r, ids in zip(requests, self.generate_requests(requests))]

    def generate_requests(self, requests: Sequence['ChatRequest']) -> List[List[int]]:
        """The reply ids of prepared turns, generated side by side in the engine's batch."""
        return self._run([(r.input_ids, r.params) for r in requests])

    # -- internals ----------------------------------------------------------------------------------
    def _conversation(self, query, history, role, system, tools):
        if not isinstance(query, str):
            raise InputError(f'the query must be a string, got {type(query).__name__}')
        if role not in ('user', 'observation'):
            raise InputError(f'role must be "user" or "observation" (a tool result), got {role!r}')
        messages, as_pairs = chat_formats.normalize_history(history)
        if (system is not None or tools) and not (messages and messages[0]['role'] == 'system'):
            if not self.format.supports_system:
                raise InputError(f'{self.format.title} has no system prompt or tools; use a ChatGLM3 model')
            head = {'role': 'system', 'content': system or ''}
            if tools:
                head['tools'] = tools
            messages.insert(0, head)
            as_pairs = False
        for message in messages:
            if message.get('tools'):
                check_tools(message['tools'])
        return messages + [{'role': role, 'content': query}], as_pairs

    def _encode(self, messages) -> List[int]:
        return self.format.encode(self.tokenizer, messages)

    def _fit(self, messages, params: SamplingParams, truncate_query: bool = False):
        """Encode, dropping the oldest rounds until prompt + reply fit the context window."""
        limit = self.context_length if params.max_length is None else min(self.context_length, params.max_length)
        reserve = params.max_new_tokens if params.max_new_tokens is not None else 1
        if reserve >= limit:
            raise ContextLengthError(f'max_new_tokens={reserve} leaves no room for the prompt in the {limit}-token '
                                     f'context window; ask for fewer new tokens')
        budget = limit - reserve
        history, current = chat_formats.rounds(messages[:-1]), messages[-1:]
        droppable = [i for i, r in enumerate(history) if r[0]['role'] != 'system']

        def encode(dropped: int, last):
            gone = set(droppable[:dropped])
            return self._encode([m for i, r in enumerate(history) if i not in gone for m in r] + last)

        dropped, ids = 0, encode(0, current)
        if len(ids) > budget and droppable:
            # Every dropped round shortens the prompt: bisect for the fewest drops that fit (O(log n)
            # encodes of the conversation, not one per dropped round).
            low, dropped = 0, len(droppable)          # dropping `low` rounds is too few
            ids = encode(dropped, current)
            if len(ids) <= budget:
                while dropped - low > 1:
                    middle = (low + dropped) // 2
                    attempt = encode(middle, current)
                    if len(attempt) <= budget:
                        dropped, ids = middle, attempt
                    else:
                        low = middle
        while len(ids) > budget:
            if not (truncate_query and current[0]['content']):
                raise ContextLengthError(
                    f'the prompt is {len(ids)} tokens but only {budget} fit ({limit} context tokens minus '
                    f'{reserve} reserved for the reply); shorten the query (or pass truncate_query=True)'
                    + (' or system prompt' if len(droppable) < len(history) else '')
                    + (', lower max_new_tokens' if params.max_new_tokens else '')
                    + f', or raise max_length (at most {self.config.seq_length} for this model)')
            # Keep the end of the query (usually the actual question) and cut its beginning.
            query_ids = self.tokenizer.encode(current[0]['content'])
            cut = min(len(query_ids), len(ids) - budget + 1)
            current = [dict(current[0], content=self.tokenizer.decode(query_ids[cut:]))]
            ids = encode(dropped, current)
        new_tokens = limit - len(ids)
        if params.max_new_tokens is not None:
            new_tokens = min(new_tokens, params.max_new_tokens)
        return ids, replace(params, max_new_tokens=new_tokens)


@dataclass
class CompletionRequest:
    input_ids: List[int]          # the prompt
    params: SamplingParams        # max_new_tokens fitted to the context window
    text_start: int = 0           # where the caller's own tokens begin (after the [gMASK] sop put before them)


@dataclass
class ChatRequest:
    input_ids: List[int]          # the prompt, after truncation
    params: SamplingParams        # max_new_tokens already fitted to the context window
    messages: list                # the conversation including the new query
    as_pairs: bool                # return history as (query, response) pairs
    history: Any                  # the history as the caller gave it


class ReplyDecoder:
    """A reply's tokens -> the text a client sees, as they come: decoded a window at a time, parsed by
    the chat format (ChatGLM3's metadata lines and tool calls are not text), cut at OpenAI stop strings.
    Every surface streams through it, and its final `reply()` is what the stream showed."""

    def __init__(self, chat: ChatModel, request: Union['ChatRequest', 'CompletionRequest'], stop: Sequence[str] = ()):
        self.chat, self.request = chat, request
        self.completion = isinstance(request, CompletionRequest)
        # A completion's text continues its prompt; a chat reply starts a text of its own; a structured
        # reply is the bytes its grammar matched.
        if request.params.grammar is not None:
            self.deltas = ByteDeltas(chat.tokenizer)
        else:
            self.deltas = TextDeltas(chat.tokenizer, request.input_ids if self.completion else ())
        self.parser = None if self.completion else chat.format.reply_parser(request.messages[:-1],
                                                                             request.params.grammar is not None)
        self.stops = StopStrings(stop)
        self.stop_ids = request.params.stops
        # vLLM's min_tokens: stop strings are looked for in the text from the min_tokens-th token on
        self.unchecked = request.params.min_tokens
        self.tokens = 0
        self.sent: List[str] = []

    def push(self, token: int) -> str:
        """The visible text this token adds (often '': held back, or not text)."""
        if token in self.stop_ids or self.stops.hit:
            return ''
        self.tokens += 1
        return self._through(self.deltas.push(token))

    def finish(self) -> str:
        """The rest, once generation has ended (an incomplete character at the end, as U+FFFD)."""
        text = self.deltas.flush() if not self.stops.hit else ''
        if self.parser is not None:
            text = self.parser.push(text) + self.parser.finish()
        out = self.stops.push(text) + self.stops.flush() if self.tokens >= self.unchecked else text
        self.sent.append(out)
        return out

    @property
    def stopped(self) -> bool:
        """Whether a stop string ended the reply."""
        return self.stops.hit

    def _through(self, text: str) -> str:
        if self.parser is not None:
            text = self.parser.push(text)
        out = self.stops.push(text) if self.tokens >= self.unchecked else text
        self.sent.append(out)
        return out

    def reply(self) -> Reply:
        """The reply as streamed (after `finish`): cut at a stop string if one was hit."""
        text = ''.join(self.sent)
        if self.stops.hit and not self.completion:
            text = text.strip()   # (what a reply is without a stop string: stripped)
        if self.parser is None or self.stops.hit:
            return self.chat.format.text_reply(text)
        return self.parser.reply()

    def result(self) -> Tuple[Union[str, dict], list]:
        """(response, history), as `ChatModel.respond` gives them."""
        if self.completion:
            return ''.join(self.sent), []
        return self.chat.conclude(self.request, self.reply())


class ChatTurn:
    """One generation in progress. Iterating it yields text deltas of the reply; meanwhile and after,
    `.response` is the reply so far and `.history` the updated history. Closing the iteration early
    (a generator's close, Ctrl-C) ends the generation and frees its memory."""

    def __init__(self, chat: ChatModel, request: ChatRequest):
        self.chat, self.request = chat, request
        self.output_ids: List[int] = []
        self.finish_reason: Optional[str] = None
        self.decoder = ReplyDecoder(chat, request)
        self._final: Optional[Tuple[Union[str, dict], list]] = None
        self._so_far = (-1, None)      # (deltas seen, (response, history) then): read twice per delta

    @property
    def response(self) -> Union[str, dict]:
        return self._replied()[0]

    @property
    def history(self) -> list:
        return self._replied()[1]

    def _replied(self):
        if self._final is not None:
            return self._final
        sent = self.decoder.sent
        if self._so_far[0] != len(sent):
            self._so_far = (len(sent), self.chat.conclude(self.request, self.chat.format.text_reply(''.join(sent))))
        return self._so_far[1]

    def __iter__(self) -> Iterator[str]:
        engine = self.chat.engine
        request = self.request
        seq = None

        def submit(on_token):
            nonlocal seq
            seq = engine.submit(request.input_ids, request.params, on_token)
            return seq

        for token in engine.stream(submit):
            self.output_ids.append(token)
            delta = self.decoder.push(token)
            if delta:
                yield delta
        self.finish_reason = seq.finish_reason
        rest = self.decoder.finish()
        self._final = self.decoder.result()
        if rest:
            yield rest
