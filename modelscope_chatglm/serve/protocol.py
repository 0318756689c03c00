"""The request bodies of the OpenAI chat-completions and completions APIs and of the classic ChatGLM API,
as pydantic schemas: what FastAPI validates a body against (a field of the wrong type is a 422).

Only the schemas. Beside them: what a request asks the engine to run (`calls.py`), the response bodies
and stream chunks (`responses.py`), error bodies (`errors.py`) and /metrics (`metrics.py`); the routes
that use them all are server.py's (in one process, and on Ray Serve through ray_app.py).
"""
from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt


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


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra='forbid')
    include_usage: StrictBool = False   # a last chunk with empty choices and the request's usage
    continuous_usage_stats: Literal[False] = False   # vLLM's usage in every chunk: not done here


class OpenAIRequest(BaseModel):
    """What both OpenAI APIs share, with vLLM's extra sampling parameters. A field that is neither is
    refused by name (server.py: a 400), unless the server runs with --allow-unknown-fields."""
    model_config = ConfigDict(extra='forbid')
    model: Optional[str] = None
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[StrictInt] = None
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    logit_bias: Optional[Dict[str, float]] = None
    n: StrictInt = Field(default=1, ge=1)
    user: Optional[str] = None          # OpenAI's end-user id: accepted, not used
    cache_salt: Optional[str] = Field(default=None, min_length=1, max_length=256)   # vLLM's: a prefix cache of its own
    # vLLM's extra sampling parameters
    top_k: Optional[StrictInt] = Field(default=None, ge=-1)          # -1 or 0: off
    min_p: Optional[float] = Field(default=None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(default=None, gt=0)
    stop_token_ids: Optional[List[StrictInt]] = Field(default=None, max_length=1024)
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = Field(default=0, ge=0)
    skip_special_tokens: StrictBool = True


class ChatCompletionRequest(OpenAIRequest):
    messages: List[Message] = Field(min_length=1)
    max_tokens: Optional[StrictInt] = Field(default=None, ge=1)
    max_completion_tokens: Optional[StrictInt] = Field(default=None, ge=1)   # the newer name of max_tokens
    tools: Optional[List[Dict[str, Any]]] = None
    tool_choice: Optional[Union[str, Dict[str, Any]]] = None
    parallel_tool_calls: Optional[StrictBool] = None   # honoured: a ChatGLM3 reply makes one call at a time
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[StrictInt] = Field(default=None, ge=0, le=20)
    # Accepted at their defaults only: a client that asks for more is told so, never silently ignored.
    response_format: Optional[Dict[str, Any]] = None
    functions: Optional[List[Dict[str, Any]]] = None
    function_call: Optional[Union[str, Dict[str, Any]]] = None


class TextCompletionRequest(OpenAIRequest):
    """OpenAI's (legacy) /v1/completions: a plain prompt to continue."""
    prompt: Union[str, List[str], List[int], List[List[int]]]
    max_tokens: Optional[StrictInt] = Field(default=16, ge=0)      # OpenAI's default; 0 with echo: score the prompt
    logprobs: Optional[StrictInt] = Field(default=None, ge=0, le=20)
    echo: StrictBool = False
    best_of: Optional[StrictInt] = Field(default=None, ge=1)
    suffix: Optional[str] = None


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a completions `prompt`, or chat `messages` (and `tools`) encoded as
    /v1/chat/completions encodes them."""
    model_config = ConfigDict(extra='forbid')
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[List[Message]] = Field(default=None, min_length=1)
    tools: Optional[List[Dict[str, Any]]] = None
    add_special_tokens: StrictBool = True     # a prompt: the model's [gMASK] sop around the text
    add_generation_prompt: StrictBool = True  # messages: a ChatGLM prompt always opens the assistant's turn


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra='forbid')
    model: Optional[str] = None
    tokens: List[StrictInt] = Field(max_length=1_000_000)


class LoadLoRAAdapterRequest(BaseModel):
    """vLLM's POST /v1/load_lora_adapter (serve --allow-runtime-adapters)."""
    model_config = ConfigDict(extra='forbid')
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(BaseModel):
    """vLLM's POST /v1/unload_lora_adapter."""
    model_config = ConfigDict(extra='forbid')
    lora_name: str
    lora_int_id: Optional[StrictInt] = None   # vLLM's, accepted and not used: adapters go by name here


def ignoring_unknown_fields(schema):
    """The schema with unknown fields dropped instead of refused (serve --allow-unknown-fields)."""
    return type(schema.__name__, (schema,), {'model_config': ConfigDict(extra='ignore'), '__doc__': schema.__doc__})


class ClassicRequest(BaseModel):
    # The classic ChatGLM API (the official api.py): its clients send what they like; it reads its fields.
    model_config = ConfigDict(extra='ignore')
    prompt: str
    history: List[List[str]] = []
    max_length: Optional[StrictInt] = Field(default=None, ge=1)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    temperature: Optional[float] = Field(default=None, gt=0)
