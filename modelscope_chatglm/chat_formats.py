"""Chat formats of the three generations (docs/formats.md §5): messages -> token ids, output -> reply.

A conversation is a list of messages {'role': 'system'|'user'|'assistant'|'observation',
'content': str, optional 'metadata', optional 'tools'}. The classic ChatGLM history, a list of
(query, response) pairs, converts to and from it.

Each generation's format is one `ChatFormat` object (GLM1Format, GLM2Format, GLM3Format) with two
methods: `encode(tokenizer, messages) -> ids` and `parse(tokenizer, output_ids, messages) -> (reply,
the assistant messages it adds)`. `families.py` says which generation uses which.
"""
from __future__ import annotations

import ast
import json
import re
from typing import Any, Dict, List, Tuple, Union

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


_CJK = '[\u4e00-\u9fff]'
_WIDE = ((',', '，'), ('!', '！'), (':', '：'), (';', '；'), (r'\?', '？'))


def glm1_response(text: str) -> str:
    text = text.strip().replace('[[训练时间]]', '2023年')
    # The ice_text model folds full-width punctuation to ASCII (NFKC); put it back next to CJK.
    for ascii_mark, wide in _WIDE:
        text = re.sub(rf'({_CJK}){ascii_mark}', rf'\1{wide}', text)
        text = re.sub(rf'{ascii_mark}({_CJK})', rf'{wide}\1', text)
    return text


# -- glm2: ChatGLM2-6B ---------------------------------------------------------------------------------
def glm2_prompt(query: str, pairs: List[Tuple[str, str]]) -> str:
    prompt = ''.join(f'[Round {i}]\n\n问：{q}\n\n答：{r}\n\n' for i, (q, r) in enumerate(pairs, start=1))
    return prompt + f'[Round {len(pairs) + 1}]\n\n问：{query}\n\n答：'


def glm2_response(text: str) -> str:
    return text.strip().replace('[[训练时间]]', '2023年')


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


def glm3_response(text: str, messages: List[Message]) -> Tuple[Union[str, dict], List[Message]]:
    """Split the decoded output into assistant messages; a message with metadata is a tool call.

    Returns (reply, new assistant messages). The reply is a string, or for a tool call
    {'name', 'parameters'} (tools declared in the system message) / {'name', 'content'}.
    """
    reply: Union[str, dict] = ''
    new: List[Message] = []
    has_tools = bool(messages) and messages[0]['role'] == 'system' and bool(messages[0].get('tools'))
    for piece in text.split('<|assistant|>'):
        metadata, content = piece.split('\n', 1) if '\n' in piece else ('', piece)
        if not metadata.strip():
            content = content.strip()
            new.append({'role': 'assistant', 'metadata': metadata, 'content': content})
            reply = content.replace('[[训练时间]]', '2023年')
        else:
            new.append({'role': 'assistant', 'metadata': metadata, 'content': content})
            name = metadata.strip()
            if has_tools:
                code = '\n'.join(content.split('\n')[1:-1])   # inside the ``` fence
                params = parse_tool_call(code)
                reply = {'name': name, 'parameters': params} if params is not None else \
                    {'name': name, 'content': content}
            else:
                reply = {'name': name, 'content': content}
    return reply, new


def parse_tool_call(code: str):
    """`tool_call(a=1, b="x")` -> {'a': 1, 'b': 'x'}, with JSON-able literals only; None if it is
    anything else.

    The official code `eval`s this text, which runs whatever the model wrote. We parse it, and treat it
    as hostile: the model's output can be steered by whatever the prompt contains.
    """
    try:
        tree = ast.parse(code.strip(), mode='eval')
        call = tree.body
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == 'tool_call'
                and not call.args):
            return None
        params = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg is not None}
        json.dumps(params)   # sets, complex numbers, bytes, non-str keys: not a tool call we can pass on
        return params
    except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
        return None


# -- the formats as objects ----------------------------------------------------------------------------
class ChatFormat:
    """How one generation turns a conversation into prompt ids and generated ids into a reply."""
    title = ''                            # the generation's name, for messages
    supports_system = False               # system prompt, tools, tool results (the observation role)
    reply_starts_with_metadata = False    # each reply message begins with a metadata line (ChatGLM3)

    def encode(self, tokenizer, messages: List[Message]) -> List[int]:
        raise NotImplementedError

    def wrap(self, tokenizer, ids: List[int]) -> List[int]:
        """A plain text's ids as a prompt: with the [gMASK]/sop tokens the model expects around them."""
        return tokenizer.prefix_ids + ids      # [gMASK] sop text

    def parse(self, tokenizer, output_ids: List[int], messages: List[Message]) \
            -> Tuple[Union[str, dict], List[Message]]:
        """-> (reply, the assistant messages it adds to the history). `messages`: the conversation
        before the reply's query."""
        raise NotImplementedError


class _PairsFormat(ChatFormat):
    """glm1/glm2: a text prompt of [Round N] question/answer pairs; the reply is plain text."""
    prompt = staticmethod(glm2_prompt)
    response = staticmethod(glm2_response)

    def encode(self, tokenizer, messages):
        pairs = to_pairs(messages, self.title)
        query = pairs.pop()[0]
        return self.wrap(tokenizer, tokenizer.encode(self.prompt(query, pairs)))

    def parse(self, tokenizer, output_ids, messages):
        reply = self.response(tokenizer.decode(output_ids))
        return reply, [{'role': 'assistant', 'content': reply}]


class GLM1Format(_PairsFormat):
    title = 'ChatGLM-6B'
    prompt = staticmethod(glm1_prompt)
    response = staticmethod(glm1_response)

    def wrap(self, tokenizer, ids):
        return ids + tokenizer.suffix_ids      # text [gMASK] <sop>


class GLM2Format(_PairsFormat):
    title = 'ChatGLM2-6B'


class GLM3Format(ChatFormat):
    title = 'ChatGLM3-6B'
    supports_system = True
    reply_starts_with_metadata = True

    def encode(self, tokenizer, messages):
        return glm3_ids(tokenizer, messages)

    def parse(self, tokenizer, output_ids, messages):
        if output_ids and output_ids[-1] in tokenizer.stop_ids:
            output_ids = output_ids[:-1]
        return glm3_response(tokenizer.decode(output_ids), messages)
