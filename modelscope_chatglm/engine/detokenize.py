"""From generated token ids to the text a client sees: deltas that never change once sent, the text a
completion adds after its prompt, and OpenAI's stop strings."""
from __future__ import annotations

import logging
from typing import List, Sequence

logger = logging.getLogger(__name__)


class ByteDeltas:
    """A structured reply's text: exactly the bytes its grammar matched (`tokenizer.token_bytes` of each
    token), as UTF-8. Decoding would differ where the grammar cannot see it (ChatGLM-6B turns '<n>' spelled
    piece by piece into a newline); the text a client parses as JSON must be what the grammar allowed."""

    def __init__(self, tokenizer):
        import codecs
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder('utf-8')('replace')

    def push(self, token: int) -> str:
        return self.decoder.decode(self.tokenizer.token_bytes(token))

    def flush(self) -> str:
        return self.decoder.decode(b'', final=True)


def structured_text(tokenizer, ids: Sequence[int]) -> str:
    """The whole text of a structured reply's ids (ByteDeltas, in one piece)."""
    deltas = ByteDeltas(tokenizer)
    return ''.join(map(deltas.push, ids)) + deltas.flush()


class TextDeltas:
    """Turn a growing list of token ids into text deltas: never text that a later token could still
    change, and at a cost per token that does not grow with the reply.

    Each push decodes a window of the latest tokens, not the whole reply (whose cost per token grows with
    the reply: bench_streaming_text.py). `start` is the window's first token, `sent` the part of
    the window's text already sent. The end of the text that more tokens could still change is held
    back (`tokenizer.unsettled_chars`: the bytes of an unfinished character, a half-spelled ChatGLM-6B
    placeholder). Once the window has grown to 2 x CONTEXT tokens it moves up to its last CONTEXT:
    those stay as context because decoding a slice drops the leading space of its first piece, and
    every difference that makes lies in text already sent.

    `context`: tokens the text continues (the end of a completion's prompt), counted as sent. Without
    it the ids are read as the start of a text, whose first piece's leading space decoding drops.
    """

    CONTEXT = 16   # more tokens than any held tail spans ('<|blank_80|' spelled a character at a time is 11)

    def __init__(self, tokenizer, context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids: List[int] = list(context)[-self.CONTEXT:] if context else []
        self.start = 0
        self.sent = tokenizer.decode(self.ids)

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids[self.start:])
        settled = len(text) - self.tokenizer.unsettled_chars(text)
        delta = self._send(text, settled)
        if len(self.ids) - self.start >= 2 * self.CONTEXT:
            self._move_window(held=text[max(settled, len(self.sent)):])
        return delta

    def flush(self) -> str:
        """What is still held back once generation has ended (an unfinished character, as U+FFFD)."""
        text = self.tokenizer.decode(self.ids[self.start:])
        return self._send(text, len(text))

    def _send(self, text: str, end: int) -> str:
        if not text.startswith(self.sent):
            # Text already sent changed: the tokenizer's unsettled_chars missed a case. It cannot be
            # taken back; send what follows it, and the final reply (decoded whole) is right.
            logger.warning('streamed text changed after it was sent (%r -> %r); the stream may differ '
                           'from the final reply', self.sent[-20:], text[max(0, len(self.sent) - 20):])
        if end <= len(self.sent):
            return ''
        delta, self.sent = text[len(self.sent):end], text[:end]
        return delta

    def _move_window(self, held: str):
        start = len(self.ids) - self.CONTEXT
        text = self.tokenizer.decode(self.ids[start:])
        # The held tail (its tokens are all in the shorter window) must come out the same; if it does
        # not, keep the longer window for now.
        if text.endswith(held):
            self.start, self.sent = start, text[:len(text) - len(held)]


def text_after(tokenizer, context: Sequence[int], ids: Sequence[int]) -> str:
    """The text `ids` add after the tokens `context` (the end of a prompt they continue): what
    decode(context + ids) has beyond decode(context). Decoded alone, ids read as the start of a text,
    and SentencePiece drops the leading space of a text's first piece (the space its encoder puts
    before every text); after a prompt that space is real: 'is' + ' Paris', not 'isParis'."""
    context = list(context)[-TextDeltas.CONTEXT:] if context else []
    before, whole = tokenizer.decode(context), tokenizer.decode(context + list(ids))
    # (A context ending in half a character decodes differently once ids complete it: then ids alone.)
    return whole[len(before):] if whole.startswith(before) else tokenizer.decode(ids)


class StopStrings:
    """Cut streamed text at the first stop string (OpenAI's `stop`), never sending a part of one.

    The text is fed a delta at a time, and an end of it that could begin a stop string is held back
    until the next delta settles it. The reply ends at the first stop string to appear in full; it is
    cut where that string begins. Each stop string is matched as a Knuth-Morris-Pratt automaton over the
    characters as they come, so a token costs the same however long the reply or the stop strings are
    (searching the whole reply for each stop string after every token did not).
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self._fallback = [_kmp_fallback(s) for s in self.stops]
        self._matched = [0] * len(self.stops)   # per stop string: how much of it the text ends with
        self.held = ''                          # received, not sent: it may begin a stop string
        self.hit = False

    def push(self, delta: str) -> str:
        """The text to send now. Once a stop string is complete, the text before it, then `hit` is set
        and nothing more is sent."""
        if self.hit or not self.stops:
            return '' if self.hit else delta
        text = self.held + delta
        for i, char in enumerate(delta, start=len(self.held) + 1):   # i: the text's length so far
            complete = 0
            for k, stop in enumerate(self.stops):
                n, fallback = self._matched[k], self._fallback[k]
                while n and stop[n] != char:
                    n = fallback[n - 1]
                n += stop[n] == char
                if n == len(stop):
                    complete, n = max(complete, n), fallback[n - 1]
                self._matched[k] = n
            if complete:
                self.hit, self.held = True, ''
                return text[:i - complete]
        keep = max(self._matched)
        self.held = text[len(text) - keep:] if keep else ''
        return text[:len(text) - keep]

    def flush(self) -> str:
        """The held-back text, once the reply has ended without a stop string."""
        rest, self.held = ('' if self.hit else self.held), ''
        return rest


def _kmp_fallback(s: str) -> List[int]:
    """fallback[j]: the length of the longest proper prefix of s[:j + 1] that is also its suffix."""
    fallback, n = [0] * len(s), 0
    for j in range(1, len(s)):
        while n and s[j] != s[n]:
            n = fallback[n - 1]
        n += s[j] == s[n]
        fallback[j] = n
    return fallback
