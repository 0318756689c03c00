"""What a structured reply must look like: OpenAI's `response_format` and `tool_choice` as a grammar.

The grammar is llguidance's Lark (engine/grammar.py compiles it and masks the sampler with it). It
covers the whole reply as the model writes it, so it knows the chat format:
- ChatGLM-6B / ChatGLM2-6B: the reply is the text itself;
- ChatGLM3-6B: a reply opens with a metadata line. An empty one opens text; a tool's name opens a
  call, written as the model was trained to write it:

      get_weather
      ```python
      tool_call(location="Paris", unit="celsius")
      ```

  A forced call (tool_choice "required" or a named function) is one such message, its keyword
  arguments following the tool's JSON schema: the properties in the schema's order, the required ones
  always, each value JSON of its property's schema (`%json`). The reply parser reads JSON's true, false
  and null as well as Python's literals (chat_formats.parse_tool_call).

The SentencePiece tokenizers may open a reply with a word-boundary space (a piece like '▁{'): each
grammar lets the reply start with one, which decoding drops.
"""
from __future__ import annotations

import json
import keyword
import re
from typing import List, Optional

from .errors import InputError

TOOL_NAME = re.compile(r'[A-Za-z0-9_-]{1,64}')   # OpenAI's rule for function names


def _literal(text: str) -> str:
    """A Lark string literal for `text`."""
    return json.dumps(text, ensure_ascii=False)


# JSON as Python's json.dumps writes it: ', ' and ': ', no other whitespace. Flexible whitespace let
# a model pad a reply with blanks until max_tokens (ChatGLM-6B has pieces of up to 80 spaces).
JSON_LAYOUT = {'whitespace_flexible': False, 'item_separator': ', ', 'key_separator': ': '}


def _json(schema: dict) -> str:
    """A Lark rule body that is JSON following `schema` (laid out as JSON_LAYOUT unless the schema's own
    llguidance options, "x-guidance", say otherwise)."""
    options = schema.get('x-guidance') if isinstance(schema.get('x-guidance'), dict) else {}
    return '%json ' + json.dumps(dict(schema, **{'x-guidance': dict(JSON_LAYOUT, **options)}), ensure_ascii=False)


def response_schema(response_format) -> Optional[dict]:
    """OpenAI's response_format -> the JSON schema the reply must follow, or None for free text."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise InputError(f'response_format must be an object like {{"type": "json_object"}}, got {response_format!r}'[:300])
    kind = response_format.get('type', 'text')
    if kind == 'text':
        return None
    if kind == 'json_object':
        return {'type': 'object'}
    if kind == 'json_schema':
        spec = response_format.get('json_schema')
        schema = spec.get('schema') if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InputError('response_format json_schema needs {"type": "json_schema", "json_schema": {"name": ..., '
                             '"schema": {...}}}: the schema (a JSON object) is missing')
        return schema
    raise InputError(f'response_format type {kind!r} is not one of "text", "json_object", "json_schema"')


def _tool_function(tool) -> dict:
    """A tool's function definition: OpenAI's {"type": "function", "function": {...}} or the bare function."""
    function = tool.get('function', tool) if isinstance(tool, dict) else None
    if not isinstance(function, dict):
        raise InputError(f'each tool is {{"type": "function", "function": {{"name": ..., "parameters": {{...}}}}}}, got '
                         f'{tool!r}'[:300])
    return function


def forced_tools(tools: Optional[list], tool_choice) -> Optional[List[dict]]:
    """The functions a reply must call one of (tool_choice "required" or a named function), or None when
    the model may answer in text ("auto", or no choice)."""
    if tool_choice in (None, 'auto', 'none'):
        return None
    if not tools:
        raise InputError(f'tool_choice {tool_choice!r} needs tools to choose from; send tools (ChatGLM3 models call them)')
    functions = [_tool_function(t) for t in tools]
    if tool_choice == 'required':
        return functions
    function = tool_choice.get('function') if isinstance(tool_choice, dict) else None
    name = function.get('name') if isinstance(function, dict) else None
    if not (isinstance(tool_choice, dict) and tool_choice.get('type') == 'function' and isinstance(name, str)):
        raise InputError('tool_choice must be "auto", "none", "required" or {"type": "function", "function": '
                         f'{{"name": ...}}}}, got {tool_choice!r}'[:300])
    chosen = [f for f in functions if f.get('name') == name]
    if not chosen:
        raise InputError(f'tool_choice names {name!r}, which is not among the tools sent '
                         f'({[f.get("name") for f in functions]})'[:300])
    return chosen


def _arguments(function: dict) -> str:
    """Lark for a call's keyword arguments: `a=<json>, b=<json>` in the schema's property order, the
    required ones always, the others optional."""
    params = function.get('parameters') or {}
    if not isinstance(params, dict):
        raise InputError(f'tool {function.get("name")!r}: parameters must be a JSON schema object')
    tool = function.get('name')
    properties = params.get('properties') or {}
    if not isinstance(properties, dict):
        raise InputError(f'tool {tool!r}: parameters.properties must be an object')
    required = params.get('required') or []
    if not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
        raise InputError(f'tool {tool!r}: parameters.required must be a list of property names, got {required!r}'[:300])
    missing = [r for r in required if r not in properties]
    if missing:
        raise InputError(f'tool {tool!r}: parameters.required names {missing} that are not among its properties; '
                         'describe them under properties to force this tool'[:300])
    for name in properties:
        if not name.isidentifier() or keyword.iskeyword(name):
            raise InputError(f'tool {tool!r}: the parameter {name!r} cannot be a keyword argument of a '
                             'ChatGLM3 tool call (it is not a Python identifier); rename it to force this tool')
    # Each argument is checked against its property's schema alone: it takes the definitions that
    # "$ref"s point to with it (pydantic writes nested models as {"$ref": "#/$defs/City"}).
    definitions = {key: params[key] for key in ('$defs', 'definitions') if isinstance(params.get(key), dict)}
    items = [(f'{_literal(name + "=")} ({_json(dict(schema, **definitions) if isinstance(schema, dict) else {})})',
              name in required) for name, schema in properties.items()]
    return _ordered(items)


def _ordered(items) -> str:
    """Lark for the items in order, comma-separated, each optional unless required."""
    if not items:
        return '""'
    first_required = next((i for i, (_, needed) in enumerate(items) if needed), None)
    if first_required is None:   # every item optional: which one comes first decides where the commas go
        starts = [f'{items[i][0]}' + ''.join(f' (", " {rule})?' for rule, _ in items[i + 1:]) for i in range(len(items))]
        return '(' + ' | '.join(f'({s})' for s in starts) + ')?'
    head = [rule for rule, _ in items[:first_required]]   # optional items before the first required one
    parts = ''.join(f' ({rule} ", ")?' for rule in head)
    parts += ' ' + items[first_required][0]
    for rule, needed in items[first_required + 1:]:
        parts += f' ", " {rule}' if needed else f' (", " {rule})?'
    return parts.strip()


def reply_grammar(chat_format, response_format=None, tools=None, tool_choice=None) -> Optional[str]:
    """The grammar of a reply, or None when it is free. The reply is text following the response_format's
    schema, or (ChatGLM3, tools offered) a call of one of the tools: forced by tool_choice, or with "auto"
    and a response_format either one, the call's arguments following its tool's schema."""
    schema = response_schema(response_format)
    forced = forced_tools(tools, tool_choice)
    if schema is None and forced is None:
        return None
    branches = []
    if forced is None and schema is not None:
        branches.append(chat_format.text_opening + ' ' + _json(schema))
    calls = forced if forced is not None else (
        [_tool_function(t) for t in tools] if tools and tool_choice != 'none' and chat_format.supports_system else [])
    if calls and not chat_format.supports_system:
        raise InputError(f'{chat_format.title} does not call tools; use a ChatGLM3 model')
    for function in calls:
        name = function.get('name')
        if not (isinstance(name, str) and TOOL_NAME.fullmatch(name)):
            raise InputError(f'tool names must match [A-Za-z0-9_-]{{1,64}} (as in the OpenAI API), got {name!r}'[:200])
        branches.append(f'" "? {_literal(name)} {chat_format.tool_opening} "```python\\ntool_call(" '
                        f'{_arguments(function)} ")\\n```"')
    return 'start: ' + ' | '.join(f'({b})' for b in branches) + '\n'
