"""Chat formats of the three generations (docs/formats.md §5): messages -> token ids, output -> reply.

A conversation is a list of messages {'role': 'system'|'user'|'assistant'|'observation',
'content': str, optional 'metadata', optional 'tools'}. The classic ChatGLM history, a list of
(query, response) pairs, converts to and from it.

Each generation's format is one `ChatFormat` object (GLM1Format, GLM2Format, GLM3Format):
`encode(tokenizer, messages) -> ids`, and `reply_parser(messages)`, which reads the reply's text as it
is generated: `push(text) -> the visible text to show now`, `finish()`, then `reply()` -> a `Reply`
(text, tool calls, the assistant messages it adds). A whole reply is parsed by the same parser in one
push (`parse`), so what a stream shows is exactly the whole reply's text, however the text was cut
into deltas. `families.py` says which generation uses which.
"""
from __future__ import annotations

import abc
import ast
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from .errors import InputError

Message = Dict[str, Any]
ROLES = ('system', 'user', 'assistant', 'observation')


# -- history shapes -----------------------------------------------------------------------------------
def normalize_history(history) -> Tuple[List[Message], bool]:
    """-> (messages, given_as_pairs). Accepts [] / None, [(q, r), ...] or [{'role', 'content'}, ...]."""
    if history is None:
        return [], True
    if not isinstance(history, (list, tuple)):
        raise InputError(f'history must be a list of (query, response) pairs or of {{"role", "content"}} '
                         f'messages, got {type(history).__name__}; pass [] to start a conversation')
    messages, pairs = [], None
    for i, item in enumerate(history):
        if isinstance(item, dict):
            is_pair = False
            role, content = item.get('role'), item.get('content')
            if role not in ROLES:
                raise InputError(f'history[{i}] has role {role!r}; use one of {ROLES}')
            if not isinstance(content, (str, dict)):
                raise InputError(f'history[{i}]["content"] must be a string, got {type(content).__name__}')
            messages.append(dict(item))
        elif isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item):
            is_pair = True
            messages.append({'role': 'user', 'content': item[0]})
            messages.append({'role': 'assistant', 'content': item[1]})
        else:
            raise InputError(f'history[{i}] is {item!r}; each item must be a (query, response) pair of '
                             'strings or a {"role": ..., "content": ...} message')
        if pairs is not None and pairs != is_pair:
            raise InputError('history mixes (query, response) pairs and role messages; use one form')
        pairs = is_pair
    return messages, pairs is not False


def to_pairs(messages: List[Message], title: str) -> List[Tuple[str, str]]:
    """Messages -> (query, response) pairs, for the glm1/glm2 prompts that only know those."""
    pairs, query = [], None
    for m in messages:
        if m['role'] == 'system':
            raise InputError(f'{title} has no system role; put the instruction into the first query, '
                             'or use a ChatGLM3 model')
        if m['role'] == 'user':
            if query is not None:
                pairs.append((query, ''))
            query = m['content']
        elif m['role'] == 'assistant':
            pairs.append((query or '', _text(m['content'])))
            query = None
        else:
            raise InputError(f'{title} has no {m["role"]} role; only ChatGLM3 models take tool results')
    if query is not None:
        pairs.append((query, ''))
    return pairs


def _text(content) -> str:
    return content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)


def rounds(messages: List[Message]) -> List[List[Message]]:
    """Split history into rounds, the unit truncation drops: a round starts at each user message;
    a system message is a round of its own (truncation keeps it)."""
    out: List[List[Message]] = []
    for m in messages:
        if not out or m['role'] in ('system', 'user') or out[-1][0]['role'] == 'system':
            out.append([m])
        else:
            out[-1].append(m)
    return out


# -- glm1: ChatGLM-6B ---------------------------------------------------------------------------------
def glm1_prompt(query: str, pairs: List[Tuple[str, str]]) -> str:
    if not pairs:
        return query
    prompt = ''.join(f'[Round {i}]\n问：{q}\n答：{r}\n' for i, (q, r) in enumerate(pairs))
    return prompt + f'[Round {len(pairs)}]\n问：{query}\n答：'


_WIDE = {',': '，', '!': '！', ':': '：', ';': '；', '?': '？'}


def _is_cjk(char: Optional[str]) -> bool:
    return char is not None and '\u4e00' <= char <= '\u9fff'


# -- glm2: ChatGLM2-6B ---------------------------------------------------------------------------------
def glm2_prompt(query: str, pairs: List[Tuple[str, str]]) -> str:
    prompt = ''.join(f'[Round {i}]\n\n问：{q}\n\n答：{r}\n\n' for i, (q, r) in enumerate(pairs, start=1))
    return prompt + f'[Round {len(pairs) + 1}]\n\n问：{query}\n\n答：'


# -- glm3: ChatGLM3-6B ---------------------------------------------------------------------------------
def glm3_ids(tokenizer, messages: List[Message]) -> List[int]:
    """[gMASK] sop, then <|role|> metadata \\n content per message, then <|assistant|> (docs/formats.md §4.3)."""
    ids = list(tokenizer.prefix_ids)
    for m in messages:
        content = _text(m['content'])
        if m['role'] == 'system' and m.get('tools'):
            content += '\n' + json.dumps(m['tools'], indent=4, ensure_ascii=False)
        ids += tokenizer.encode_message(m['role'], content, m.get('metadata', '') or '')
    return ids + [tokenizer['<|assistant|>']]


def parse_tool_call(code: str):
    """`tool_call(a=1, b="x")` -> {'a': 1, 'b': 'x'}, with JSON-able literals only (Python's, and JSON's
    true/false/null, which a call forced to follow a JSON schema writes); None if it is anything else.

    The official code `eval`s this text, which runs whatever the model wrote. We parse it, and treat it
    as hostile: the model's output can be steered by whatever the prompt contains.
    """
    try:
        tree = ast.parse(code.strip(), mode='eval')
        call = tree.body
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == 'tool_call'
                and not call.args):
            return None
        params = {kw.arg: ast.literal_eval(_python_literals(kw.value)) for kw in call.keywords if kw.arg is not None}
        # sets, complex numbers, bytes, non-str keys, inf and NaN (1E400 reads as inf): not a call to pass on
        json.dumps(params, allow_nan=False)
        return params
    except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
        return None


_JSON_WORDS = {'true': True, 'false': False, 'null': None}


def _python_literals(node: ast.AST) -> ast.AST:
    """The expression with JSON's true/false/null read as Python's True/False/None."""
    class Words(ast.NodeTransformer):
        def visit_Name(self, name):
            return ast.Constant(_JSON_WORDS[name.id]) if name.id in _JSON_WORDS else name
    return Words().visit(node)


# -- replies, read as they are generated ----------------------------------------------------------------
# A reply's text is cleaned up by stages, each a stream transform: push(text) -> the text it can settle
# now, finish() -> the rest. Each holds back only what a later character could still change, so its
# output does not depend on how its input was cut into pieces.
class _Strip:
    """str.strip(): leading whitespace dropped, trailing whitespace held until text follows it."""

    def __init__(self):
        self.started, self.spaces = False, ''

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ''
            self.started = True
        text = self.spaces + text
        body = text.rstrip()
        self.spaces = text[len(body):]
        return body

    def finish(self) -> str:
        return ''


def _held_prefix(text: str, word: str) -> int:
    """How long an end of `text` is that could begin `word` (the longest proper prefix of `word` that
    `text` ends with): what a stream must hold back until the next characters settle it."""
    return next((k for k in range(min(len(word) - 1, len(text)), 0, -1) if text.endswith(word[:k])), 0)


class _Replace:
    """str.replace(old, new), holding back an end of the text that could begin `old`."""

    def __init__(self, old: str, new: str):
        self.old, self.new, self.held = old, new, ''

    def push(self, text: str) -> str:
        text = (self.held + text).replace(self.old, self.new)
        keep = _held_prefix(text, self.old)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def finish(self) -> str:
        rest, self.held = self.held, ''
        return rest


class _WidePunctuation:
    """ChatGLM-6B's ice_text tokenizer folds full-width punctuation to ASCII (NFKC): put it back where a
    mark touches a CJK character on either side. A mark at the end waits for the character after it."""

    def __init__(self):
        self.before, self.held = None, ''

    def push(self, text: str) -> str:
        text, out = self.held + text, []
        for i, char in enumerate(text):
            if char in _WIDE:
                if i + 1 == len(text):   # its right neighbour is not known yet
                    self.held = char
                    return ''.join(out)
                if _is_cjk(self.before) or _is_cjk(text[i + 1]):
                    char = _WIDE[char]
            out.append(char)
            self.before = text[i]
        self.held = ''
        return ''.join(out)

    def finish(self) -> str:
        char, self.held = self.held, ''
        return _WIDE[char] if char and _is_cjk(self.before) else char


class _Stages:
    """Stages applied in order."""

    def __init__(self, *stages):
        self.stages = stages

    def push(self, text: str) -> str:
        for stage in self.stages:
            text = stage.push(text)
        return text

    def finish(self) -> str:
        text = ''
        for stage in self.stages:
            text = stage.push(text) + stage.finish()
        return text


TRAINING_DATE = ('[[训练时间]]', '2023年')   # a placeholder the official post-processing fills in


def _text_stages(*more) -> _Stages:
    """What the official post-processing does to reply text: strip, fill the training date; then `more`."""
    return _Stages(_Strip(), _Replace(*TRAINING_DATE), *more)


@dataclass
class Reply:
    """A parsed reply. text: what a client shows (ChatGLM3: its text segments, joined by newlines);
    tool_calls: ChatGLM3's calls ({'name', 'parameters'}, or {'name', 'content'} when the code is no
    tool call we can read); messages: the assistant messages it adds to the history."""
    text: str
    tool_calls: List[dict] = field(default_factory=list)
    messages: List[Message] = field(default_factory=list)

    @property
    def response(self) -> Union[str, dict]:
        """What `chat()` returns: as the official code, the last message's: a tool call when the reply
        ends with one, else the text."""
        last = self.messages[-1] if self.messages else {}
        return self.tool_calls[-1] if self.tool_calls and (last.get('metadata') or '').strip() else self.text


def text_reply(text: str, with_metadata: bool) -> Reply:
    """A reply that is one text message (ChatGLM3's messages carry an empty metadata line)."""
    message = {'role': 'assistant', 'content': text}
    if with_metadata:
        message['metadata'] = ''
    return Reply(text, [], [message])


class ReplyParser(abc.ABC):
    """Reads one reply's text as it is generated: `push(delta) -> visible text now`, `finish() -> the
    rest`, then `reply()`."""

    @abc.abstractmethod
    def push(self, text: str) -> str: ...

    @abc.abstractmethod
    def finish(self) -> str: ...

    @abc.abstractmethod
    def reply(self) -> Reply: ...


class _PlainReplyParser(ReplyParser):
    """ChatGLM-6B and ChatGLM2-6B: the reply is text, cleaned up by stages."""

    def __init__(self, stages: _Stages):
        self.stages, self.text = stages, []

    def push(self, text: str) -> str:
        out = self.stages.push(text)
        self.text.append(out)
        return out

    def finish(self) -> str:
        out = self.stages.finish()
        self.text.append(out)
        return out

    def reply(self) -> Reply:
        return text_reply(''.join(self.text), with_metadata=False)


class GLM3ReplyParser(ReplyParser):
    """ChatGLM3: a reply is one or more messages, each `<|assistant|>`-separated and opening with a
    metadata line. An empty metadata line opens text (shown as it comes, stripped, its segments joined by
    a newline); a tool's name opens a call, whose code is never shown: it comes whole with `reply()`.
    A reply whose first line never ends is all text (as the official parser reads it)."""

    SEPARATOR = '<|assistant|>'

    def __init__(self, has_tools: bool, structured: bool = False):
        # structured: one message whose text is what its grammar matched, kept as it is (no clean-ups, and
        # '<|assistant|>' spelled inside a JSON string is text, not a separator)
        self.has_tools, self.structured = has_tools, structured
        self.held = ''            # an end of the text that may begin SEPARATOR
        self.messages: List[Message] = []
        self.texts: List[str] = []
        self.tool_calls: List[dict] = []
        self._new_segment()

    def _new_segment(self):
        self.metadata: Optional[str] = None    # None while the metadata line is still coming
        self.raw: List[str] = []               # the segment's text after its metadata line
        self.cleaner = None                    # a text segment's stages
        self.shown: List[str] = []             # what the cleaner let through
        self.showed = False                    # whether any of it was text

    def push(self, text: str) -> str:
        if self.structured:
            return self._feed(text)
        text = self.held + text
        out = []
        while True:
            at = text.find(self.SEPARATOR)
            if at < 0:
                break
            out.append(self._feed(text[:at]))
            out.append(self._end_segment())
            self._new_segment()
            text = text[at + len(self.SEPARATOR):]
        keep = _held_prefix(text, self.SEPARATOR)
        self.held = text[len(text) - keep:]
        out.append(self._feed(text[:len(text) - keep]))
        return ''.join(out)

    def finish(self) -> str:
        rest, self.held = self.held, ''
        return self._feed(rest) + self._end_segment()

    def reply(self) -> Reply:
        return Reply('\n'.join(self.texts), list(self.tool_calls), list(self.messages))

    def _feed(self, text: str) -> str:
        if self.metadata is None:
            self.raw.append(text)
            if '\n' not in text:
                return ''
            self.metadata, _, text = ''.join(self.raw).partition('\n')
            if self.structured:   # (its bytes keep the word-boundary space that decoding drops)
                self.metadata = self.metadata.lstrip(' ')
            self.raw = []
            if not self.metadata.strip():
                self.cleaner = _Stages(_Strip()) if self.structured else _text_stages()
        self.raw.append(text)
        return self._show(self.cleaner.push(text)) if self.cleaner else ''

    def _show(self, text: str) -> str:
        """A text segment's visible text, after a newline when an earlier segment showed text."""
        if text:
            if not self.showed and self.texts:
                text = '\n' + text
            self.showed = True
        self.shown.append(text)
        return text

    def _end_segment(self) -> str:
        if self.metadata is None:   # the first line never ended: the whole segment is text
            self.metadata, self.cleaner = '', _Stages(_Strip()) if self.structured else _text_stages()
            out = self._show(self.cleaner.push(''.join(self.raw)))
        else:
            out = ''
        content = ''.join(self.raw)
        if self.cleaner is not None:
            out += self._show(self.cleaner.finish())
            shown = ''.join(self.shown).lstrip('\n') if self.texts else ''.join(self.shown)
            if shown:
                self.texts.append(shown)
            self.messages.append({'role': 'assistant', 'metadata': self.metadata, 'content': content.strip()})
            return out
        self.messages.append({'role': 'assistant', 'metadata': self.metadata, 'content': content})
        name = self.metadata.strip()
        params = parse_tool_call('\n'.join(content.split('\n')[1:-1])) if self.has_tools else None  # inside the ``` fence
        self.tool_calls.append({'name': name, 'parameters': params} if params is not None else
                               {'name': name, 'content': content})
        return ''


# -- the formats as objects ----------------------------------------------------------------------------
class ChatFormat(abc.ABC):
    """How one generation turns a conversation into prompt ids and generated text into a reply."""
    title = ''                            # the generation's name, for messages
    supports_system = False               # system prompt, tools, tool results (the observation role)
    # How a text reply opens, as a grammar (structured.py): a word-boundary space SentencePiece may put first
    text_opening = '" "?'
    tool_opening = None   # how a tool call's code follows its name (ChatGLM3 only)

    @abc.abstractmethod
    def encode(self, tokenizer, messages: List[Message]) -> List[int]: ...

    def wrap(self, tokenizer, ids: List[int]) -> List[int]:
        """A plain text's ids as a prompt: with the [gMASK]/sop tokens the model expects around them."""
        return tokenizer.prefix_ids + ids      # [gMASK] sop text

    @abc.abstractmethod
    def reply_parser(self, messages: List[Message], structured: bool = False) -> ReplyParser:
        """A parser for the reply to `messages` (the conversation before the reply's query); structured: the
        reply follows a grammar, and its text must reach the caller as the grammar had it."""

    def text_reply(self, text: str) -> Reply:
        """A reply that is this text alone (a reply cut at a stop string, or one still streaming)."""
        return text_reply(text, with_metadata=self.supports_system)

    def parse(self, tokenizer, output_ids: List[int], messages: List[Message], structured: bool = False) -> Reply:
        """A whole reply: generated ids, without the id that ended it (ChatModel.respond leaves out the
        request's stop id) -> Reply. A structured reply's text is the bytes its grammar matched."""
        if structured:
            from .engine.detokenize import structured_text   # (here: the engine package imports torch)
            text = structured_text(tokenizer, output_ids)
        else:
            text = tokenizer.decode(output_ids)
        return self.parse_text(text, messages, structured)

    def parse_text(self, text: str, messages: List[Message], structured: bool = False) -> Reply:
        """A whole reply's text -> Reply: the stream parser, given the text in one piece."""
        parser = self.reply_parser(messages, structured)
        parser.push(text)
        parser.finish()
        return parser.reply()


class _PairsFormat(ChatFormat):
    """glm1/glm2: a text prompt of [Round N] question/answer pairs; the reply is plain text."""
    prompt = staticmethod(glm2_prompt)

    def encode(self, tokenizer, messages):
        pairs = to_pairs(messages, self.title)
        query = pairs.pop()[0]
        return self.wrap(tokenizer, tokenizer.encode(self.prompt(query, pairs)))

    def reply_parser(self, messages, structured=False):
        return _PlainReplyParser(_Stages(_Strip()) if structured else _text_stages())


class GLM1Format(_PairsFormat):
    title = 'ChatGLM-6B'
    prompt = staticmethod(glm1_prompt)

    def wrap(self, tokenizer, ids):
        return ids + tokenizer.suffix_ids      # text [gMASK] <sop>

    def reply_parser(self, messages, structured=False):
        return _PlainReplyParser(_Stages(_Strip()) if structured else _text_stages(_WidePunctuation()))


class GLM2Format(_PairsFormat):
    title = 'ChatGLM2-6B'


class GLM3Format(ChatFormat):
    title = 'ChatGLM3-6B'
    supports_system = True
    # an empty metadata line, then the content: '▁' '\n' '▁' as the prompt encodes a message (metadata and
    # content each start a SentencePiece text)
    text_opening = '" "? "\\n" " "?'
    tool_opening = '"\\n" " "?'   # after a tool's name: the same line break

    def encode(self, tokenizer, messages):
        return glm3_ids(tokenizer, messages)

    def reply_parser(self, messages, structured=False):
        has_tools = bool(messages) and messages[0]['role'] == 'system' and bool(messages[0].get('tools'))
        return GLM3ReplyParser(has_tools, structured)
