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
