"""The response bodies of the OpenAI APIs, from the engine's `Result`s: whole chat completions and
completions, and the server-sent-event chunks of streamed ones (a `ChatChunks` / `TextChunks` per
choice), with usage, tool calls and token logprobs in each API's form.
"""
from __future__ import annotations

import json
import uuid
from typing import List

from .async_engine import Result


# -- /v1/chat/completions ----------------------------------------------------------------------------
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


class _Chunks:
    """What the chunks of both APIs share: their head, and the usage chunk."""
    head: dict

    def usage(self, usage_: dict) -> str:
        """stream_options.include_usage: the last chunk, no choices, the request's usage (as OpenAI's)."""
        return json.dumps(dict(self.head, choices=[], usage=usage_), ensure_ascii=False)


class ChatChunks(_Chunks):
    """The SSE chunks of one choice of a streamed chat completion (chat.completion.chunk)."""

    def __init__(self, cid: str, created: int, model: str, index: int = 0):
        self.head = {'id': cid, 'object': 'chat.completion.chunk', 'created': created, 'model': model}
        self.index = index

    def _chunk(self, delta: dict, finish=None, logprobs=None) -> str:
        choice = {'index': self.index, 'delta': delta, 'finish_reason': finish}
        if logprobs:
            choice['logprobs'] = logprobs_body(logprobs)
        return json.dumps(dict(self.head, choices=[choice]), ensure_ascii=False)

    def start(self) -> List[str]:
        return [self._chunk({'role': 'assistant', 'content': ''})]

    def delta(self, text: str, logprobs) -> str:
        return self._chunk({'content': text}, logprobs=logprobs)

    def done(self, result: Result, logprobs) -> List[str]:
        """The choice's last chunks."""
        chunks = []
        if result.tool_calls:   # ChatGLM3's: they come whole, once the reply has ended
            chunks.append(self._chunk({'tool_calls': [dict(call, index=i) for i, call in enumerate(tool_calls(result))]}))
        return chunks + [self._chunk({}, finish_reason(result), logprobs)]


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


class TextChunks(_Chunks):
    """The SSE chunks of one choice of a streamed completion (text_completion objects, as OpenAI
    sends them)."""

    def __init__(self, cid: str, created: int, model: str, echo: str = '', index: int = 0,
                 scores_prompt: bool = False):
        self.head = {'id': cid, 'object': 'text_completion', 'created': created, 'model': model}
        self.echo, self.offsets, self.index = echo, TextOffsets(len(echo)), index
        self.scores_prompt = scores_prompt   # the echo waits for its tokens' logprobs (`prompt`)

    def _chunk(self, text: str, logprobs=None, finish=None) -> str:
        choice = {'index': self.index, 'text': text, 'finish_reason': finish,
                  'logprobs': text_logprobs(logprobs, self.offsets) if logprobs else None}
        return json.dumps(dict(self.head, choices=[choice]), ensure_ascii=False)

    def start(self) -> List[str]:
        return [self._chunk(self.echo)] if self.echo and not self.scores_prompt else []

    def prompt(self, entries) -> List[str]:
        """The echo with its tokens' logprobs, once the prompt has run."""
        self.offsets = TextOffsets()
        return [self._chunk(self.echo, as_echoed(entries, self.echo))]

    def delta(self, text: str, logprobs) -> str:
        return self._chunk(text, logprobs)

    def done(self, result: Result, logprobs) -> List[str]:
        return [self._chunk('', logprobs, result.finish_reason)]
