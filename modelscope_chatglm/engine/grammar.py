"""Structured output: a grammar's token mask, applied in the sampler (extra `[structured]`: llguidance).

A reply that must follow a grammar (a JSON schema, a forced tool call: structured.py writes them as
llguidance Lark) gets a matcher: the grammar's parser state over the bytes the reply has so far. Before
each token the matcher says which tokens of the vocabulary can come next (a bitmask, one bit per token),
the sampler sends every other token's logit to -inf, and the token drawn is fed back to the matcher.
A reply whose grammar is complete ends there (`finished`), with no stop token to sample.

Why llguidance: benchmarks/bench_structured_output.py times it against xgrammar and outlines-core on a
64K SentencePiece vocabulary (numbers: benchmarks/README.md, "Structured output engines"). It compiles a
schema in milliseconds (outlines-core's regex index takes seconds for any JSON object), has no
dependencies of its own (xgrammar needs transformers and triton), and its grammars embed JSON schemas in
a larger grammar (`%json {...}`), which a forced ChatGLM3 tool call needs.

The vocabulary is the tokenizer's own bytes per token (`token_bytes`): a SentencePiece piece with its
word-boundary mark as a space, a byte-fallback piece its byte. Special and control tokens are marked
special (llguidance never lets a grammar's text produce them), so ChatGLM3's role tokens cannot appear
inside a JSON string. Compiling a grammar is done once per grammar text and cached (`Grammars`); each
reply starts from a copy of the compiled matcher.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import torch

from ..errors import InputError

MAX_GRAMMARS = 64   # compiled grammars kept (each a few hundred KB for a typical schema)
TRIAL_TOKENS = 8    # tokens a new grammar is walked through when compiled (Grammar)


class GrammarError(InputError):
    """The grammar engine cannot go on with a request's schema (its limits, or a way the vocabulary cannot
    spell): the client's to simplify, even once the request runs."""


def _llguidance():
    try:
        import llguidance
        import llguidance.torch   # noqa: F401 (the batched mask fill)
    except ImportError:
        raise InputError('structured output (response_format json_object/json_schema, tool_choice required or a '
                         'named function) needs llguidance: pip install "modelscope-chatglm[structured]"') from None
    return llguidance


class GrammarVocabulary:
    """The tokens of one tokenizer as llguidance sees them: bytes per token id, specials marked."""

    def __init__(self, tokenizer, vocab_width: int):
        llg = _llguidance()
        tokens: List[bytes] = []
        special: List[int] = []
        specials = set(getattr(tokenizer, 'special_tokens', {})) | set(tokenizer.special_ids.values()) | {
            tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
        for i in range(vocab_width):   # (ids past the tokenizer's: padded embedding rows, never text)
            text = tokenizer.token_bytes(i) if i < tokenizer.vocab_size else b''
            if i in specials or not text:
                # (a control piece, an image token of ChatGLM-6B, a role token of ChatGLM3: no text a
                # grammar may spell; 0xFF never starts UTF-8, which is how llguidance marks them)
                tokens.append(b'\xff<special_%d>' % i)
                special.append(i)
            else:
                tokens.append(text)
        eos = tokenizer.eos_id

        def wrapped(tokenize):
            """What llguidance.TokenizerWrapper reads: the tokens, and how text is tokenized."""
            class Wrapped:
                eos_token_id, bos_token_id = eos, None
                special_token_ids = special

                def __call__(self, data: bytes) -> List[int]:
                    return tokenize(data)
            Wrapped.tokens = tokens
            return llg.TokenizerWrapper(Wrapped())

        # llguidance tokenizes the text a grammar forces (a tool's name, a JSON key) and allows the first
        # token of that as the mask: its tokenization must be one the vocabulary has, with no
        # SentencePiece word-boundary space put before it. Greedy longest match over these very tokens
        # is one (a first LLTokenizer gives it).
        greedy = llg.LLTokenizer(wrapped(lambda data: []))
        self.tokenizer = llg.LLTokenizer(
            wrapped(lambda data: greedy.greedy_tokenize(data.decode('utf-8', 'ignore'))))
        self.tokens = tokens   # bytes per id, specials marked
        self.eos = eos   # what llguidance allows once a reply is complete (the sampler puts the request's stops instead)
        self.width = vocab_width   # the model's logits (its embedding may have more rows than the tokenizer has ids)


class Grammar:
    """A compiled grammar: each reply takes a fresh matcher from it."""

    def __init__(self, text: str, vocabulary: GrammarVocabulary):
        llg = _llguidance()
        self.text, self.vocabulary = text, vocabulary
        self._start = llg.LLMatcher(vocabulary.tokenizer, text, log_level=0)
        if self._start.is_error():
            raise InputError(f'the grammar cannot be used: {self._start.get_error()[:300]}')
        # Some limits (items per parser row) only show once tokens come: walk a few now, so that such a
        # schema is refused with its request instead of failing once it runs (Matcher.advance says so then).
        trial = self.matcher()
        for _ in range(TRIAL_TOKENS):
            if trial.finished:
                break
            allowed = allowed_tokens([trial], 'cpu')[0].nonzero()
            if not len(allowed) or not trial.matcher.consume_token(int(allowed[0])):
                why = trial.matcher.get_error()[:300] or 'no token can start it'
                raise GrammarError(f'the grammar engine cannot follow this schema: {why}; simplify it')

    def matcher(self) -> 'Matcher':
        return Matcher(self._start.deep_copy(), self.vocabulary)

    def __repr__(self):
        return f'Grammar({self.text[:60]!r}...)'


class Matcher:
    """One reply's place in its grammar."""

    def __init__(self, matcher, vocabulary: GrammarVocabulary):
        self.matcher, self.vocabulary = matcher, vocabulary

    def advance(self, token: int):
        """Feed the token the sampler drew (always one the mask allowed)."""
        if not self.matcher.consume_token(token):   # (its mask allowed the token: the engine hit a limit)
            raise GrammarError(f'the grammar engine cannot go on with this schema: {self.matcher.get_error()[:200]}; '
                               'simplify it')

    @property
    def accepting(self) -> bool:
        """The reply so far is complete (it may still go on, e.g. a JSON number's next digit)."""
        return self.matcher.is_accepting()

    @property
    def finished(self) -> bool:
        """The reply is complete and the grammar allows nothing more."""
        return self.matcher.is_stopped()


class Grammars:
    """A tokenizer's compiled grammars, by grammar text (least recently used dropped past MAX_GRAMMARS).
    Compiling takes from under a millisecond to a second for a big schema: callers compile while a request
    is prepared, off the serving event loop."""

    def __init__(self, tokenizer, vocab_width: int):
        self._make_vocabulary = lambda: GrammarVocabulary(tokenizer, vocab_width)
        self._vocabulary: Optional[GrammarVocabulary] = None
        self._compiled: 'OrderedDict[str, Grammar]' = OrderedDict()
        self._lock = threading.Lock()

    @property
    def vocabulary(self) -> GrammarVocabulary:
        with self._lock:
            if self._vocabulary is None:
                self._vocabulary = self._make_vocabulary()   # (about a second per 100K tokens, once)
            return self._vocabulary

    def compile(self, text: str) -> Grammar:
        with self._lock:
            grammar = self._compiled.get(text)
            if grammar is not None:
                self._compiled.move_to_end(text)
                return grammar
        grammar = Grammar(text, self.vocabulary)   # (outside the lock: other grammars need not wait)
        with self._lock:
            self._compiled[text] = grammar
            while len(self._compiled) > MAX_GRAMMARS:
                self._compiled.popitem(last=False)
        return grammar


# -- the sampler's side ------------------------------------------------------------------------------
_EXECUTOR = None


def _executor():
    """llguidance's thread pool for computing several rows' masks at once (made on first use)."""
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = _llguidance().LLExecutor()
    return _EXECUTOR


_BYTE_PENALTIES = {}


def _byte_penalties(device) -> torch.Tensor:
    """[256, 8]: for each byte of a bitmask, the 8 tokens' additive penalty (0 allowed, -inf not)."""
    if device not in _BYTE_PENALTIES:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
        _BYTE_PENALTIES[device] = torch.zeros(256, 8).masked_fill_(bits == 0, float('-inf')).to(device)
    return _BYTE_PENALTIES[device]


def token_bitmask(matchers: Sequence[Matcher]) -> torch.Tensor:
    """The tokens each matcher allows next: one bit per token (little-endian), [len(matchers), words] int32."""
    width = matchers[0].vocabulary.width
    bitmask = torch.empty((len(matchers), (width + 31) // 32), dtype=torch.int32)
    _llguidance().torch.fill_next_token_bitmask_par(_executor(), [(m.matcher, i) for i, m in enumerate(matchers)],
                                                    bitmask)
    return bitmask


def penalties(bitmask: torch.Tensor, width: int, device) -> torch.Tensor:
    """A bitmask as additive logit penalties [n, width] on `device`: 0 where allowed, -inf elsewhere. (A
    table lookup per byte and one add: masked_fill with a bool mask this scattered ran 10x slower on CPU.)"""
    table = _byte_penalties(torch.device(device))
    rows = bitmask.to(device).view(torch.uint8).reshape(-1).long()
    return table.index_select(0, rows).reshape(bitmask.shape[0], -1)[:, :width]


def allowed_tokens(matchers: Sequence[Matcher], device) -> torch.Tensor:
    """The tokens each matcher allows next, as a bool tensor [len(matchers), vocabulary width]."""
    return penalties(token_bitmask(matchers), matchers[0].vocabulary.width, device) == 0


def mask_logits(logits: torch.Tensor, rows: List[int], matchers: List[Matcher],
                stops: List[Sequence[int]]) -> Dict[int, BaseException]:
    """Send the logits of tokens the grammar does not allow to -inf, in place, for `rows` (each with its
    matcher and its request's stop ids, which a complete reply may end with). -> {row: why it has no
    token}: a grammar with no way on (a mask with nothing allowed)."""
    bitmask = token_bitmask(matchers)
    penalty = penalties(bitmask, logits.shape[-1], logits.device)
    anything = bitmask.ne(0).any(dim=1).tolist()
    failures = {}
    for i, (row, matcher) in enumerate(zip(rows, matchers)):
        ends = [t for t in stops[i] if t < logits.shape[-1]]
        if matcher.accepting:   # a complete reply may end with the request's own stop ids (and only those)
            penalty[i, matcher.vocabulary.eos] = float('-inf')
            penalty[i, ends] = 0.0
        else:                   # an unfinished one may not: a stop_token_ids entry that is text (',') waits
            penalty[i, ends] = float('-inf')
        if not bool(torch.isfinite(penalty[i]).any()):
            failures[row] = GrammarError('the grammar allows no token here (the vocabulary cannot spell what it '
                                         'requires next, or stop_token_ids take it); simplify the schema')
    index = torch.tensor(rows, device=logits.device)
    logits.index_add_(0, index, penalty)
    return failures


def advance(matcher: Matcher, token: int, stops) -> bool:
    """Feed a drawn token (a stop id ends the reply and is not the grammar's); -> whether the grammar is
    complete and allows nothing more (the reply ends here)."""
    if token in stops:
        return True
    matcher.advance(token)
    return matcher.finished

