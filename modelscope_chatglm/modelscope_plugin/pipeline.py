"""The ModelScope side: a Model, a Preprocessor and a Pipeline for `Tasks.chat`, over `ChatModel`.

    pipe = pipeline(task=Tasks.chat, model=...)
    pipe({'text': '你好', 'history': []})          -> {'response': ..., 'history': [(q, r), ...]}
    pipe({'messages': [{'role': 'user', 'content': '你好'}]}) -> history as role messages
    pipe(inputs, max_new_tokens=64, do_sample=False)     generation options at call time
    pipe([inputs1, inputs2, ...])                        a list: generated together (continuous batching)
    for delta in pipe.stream(inputs): ...                text deltas as they are generated

preprocess = validate + prompt + tokenize + truncate history (ChatPreprocessor),
forward = generate ids, postprocess = decode + family clean-up + history update.
ModelScope imports this module when it first builds one of our names (see __init__.py).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterator

from modelscope.models.base import TorchModel
from modelscope.models.builder import MODELS
from modelscope.pipelines.base import Pipeline
from modelscope.pipelines.builder import PIPELINES
from modelscope.preprocessors.base import Preprocessor
from modelscope.preprocessors.builder import PREPROCESSORS
from modelscope.utils.constant import Fields, Frameworks

from ..chat import ChatModel, ChatTurn
from ..errors import InputError
from ..engine.sampling import SamplingParams
from . import BUILTIN_MODELS, BUILTIN_PIPELINES, MODEL_NAME, PIPELINE_NAME, PREPROCESSOR_NAME, TASKS

GENERATION_KEYS = tuple(SamplingParams.__dataclass_fields__)
TURN_KEYS = ('system', 'tools', 'role', 'response_format', 'tool_choice')
INPUT_KEYS = ('text', 'history', 'messages') + TURN_KEYS
# ModelScope's built-in pipeline also read these from the input dict; accept them there too.
LEGACY_INPUT_KEYS = ('max_length', 'temperature', 'top_p', 'do_sample', 'num_beams')
HERE = os.path.dirname(os.path.abspath(__file__))


def _register(registry, names, cls, groups):
    for group in groups:
        for name in names:
            registry.register_module(group, module_name=name, module_cls=cls, force=True)


class ChatGLMForChat(TorchModel):
    """A ChatGLM model as a ModelScope `Model` (what `Model.from_pretrained` returns)."""

    def __init__(self, model_dir: str = None, chat_model: ChatModel = None, revision=None, dtype=None,
                 quantization_bit=None, device=None, adapter=None, adapter_revision=None, int8_activations=None,
                 **kwargs):
        super().__init__(model_dir or chat_model.model_dir)
        if chat_model is None:
            from ..loading import load
            chat_model = load(model_dir, revision=revision, device=_device(device), dtype=dtype,
                              quantization_bit=quantization_bit, adapter=adapter, adapter_revision=adapter_revision,
                              int8_activations=int8_activations)
        self.chat_model = chat_model
        self.model = chat_model.model            # registered as a submodule: .eval()/.to() reach it
        self.model_dir = chat_model.model_dir

    def forward(self, input_ids, **gen):
        """Generate for one prompt: -> {'output_ids': [...]} (ModelScope's Model.__call__ runs this)."""
        return {'output_ids': self.chat_model.generate(input_ids, **gen)}


class ChatPreprocessor(Preprocessor):
    """Chat input dict -> prompt ids (history truncated to the context window) + turn state."""

    def __init__(self, chat_model: ChatModel = None, model_dir: str = None, **kwargs):
        super().__init__(**{k: v for k, v in kwargs.items() if k == 'mode'})
        if chat_model is None:
            from ..loading import load
            chat_model = load(model_dir, device='cpu')
        self.chat_model = chat_model

    def __call__(self, data, **gen) -> Dict[str, Any]:
        query, history, turn = parse_input(data)
        request = self.chat_model.prepare(query, history, **{**turn, **gen})   # call options win
        return {'request': request}


class ChatPipeline(Pipeline):
    def __init__(self, model, preprocessor=None, device='gpu', revision=None, dtype=None,
                 quantization_bit=None, adapter=None, adapter_revision=None, int8_activations=None, **kwargs):
        """`model`: a hub id, a hub-layout directory, a YAML configuration (path or name), a
        `ChatModel` from `modelscope_chatglm.load`, or a `ChatGLMForChat`. `adapter`: a LoRA or P-tuning
        v2 checkpoint (directory or hub id) on top (see modelscope_chatglm.load)."""
        if isinstance(model, ChatModel):
            model = ChatGLMForChat(chat_model=model)
        elif isinstance(model, str):
            model = ChatGLMForChat(model, revision=revision or kwargs.get('model_revision'), dtype=dtype,
                                   quantization_bit=quantization_bit, device=device, adapter=adapter,
                                   adapter_revision=adapter_revision, int8_activations=int8_activations)
        elif not isinstance(model, ChatGLMForChat):
            raise TypeError(f'{PIPELINE_NAME} takes a model id, directory, configuration or loaded '
                            f'ChatGLM model, got {type(model).__name__}')
        self.chat_model: ChatModel = model.chat_model
        preprocessor = preprocessor or ChatPreprocessor(self.chat_model)
        # ModelScope reads a configuration.json for framework/task; ours stands in for directories
        # and configurations that have none.
        config_file = os.path.join(model.model_dir, 'configuration.json')
        if not os.path.exists(config_file):
            config_file = os.path.join(HERE, 'configuration.json')
        passthrough = {k: v for k, v in kwargs.items() if k in ('trust_remote_code',)}
        super().__init__(config_file=config_file, model=model, preprocessor=preprocessor,
                         device=_ms_device(self.chat_model), auto_collate=False, **passthrough)
        # The model is already where load() put it; stop ModelScope from moving it again.
        self._model_prepare = True

    def __call__(self, input, *args, **kwargs):
        if isinstance(input, list):
            return self.batch(input, **kwargs)
        return super().__call__(input, *args, **kwargs)

    def batch(self, inputs: list, **params) -> list:
        """Several chat inputs generated together (one continuous batch, not a loop); -> one output
        dict per input, in order. Greedy replies equal those of calling the pipeline on each."""
        for data in inputs:
            self._check_input(data)
        pre, _, _ = self._sanitize_parameters(**params)
        requests = [self.preprocess(data, **pre)['request'] for data in inputs]
        outputs = self.chat_model.generate_requests(requests)
        return [self.postprocess({'request': r, 'output_ids': ids}) for r, ids in zip(requests, outputs)]

    def _get_framework(self):
        return Frameworks.torch

    def _check_input(self, data):
        parse_input(data)   # raises InputError (a ValueError) naming the problem

    def _sanitize_parameters(self, **params):
        unknown = sorted(k for k in params if k not in GENERATION_KEYS + TURN_KEYS + ('num_beams',))
        if unknown:
            raise InputError(f'unknown pipeline argument(s) {unknown}; generation options are '
                             f'{sorted(GENERATION_KEYS)}')
        _check_beams(params.pop('num_beams', 1))
        return params, {}, {}

    def preprocess(self, inputs, **params):
        return self.preprocessor(inputs, **params)

    def forward(self, inputs: Dict[str, Any], **forward_params) -> Dict[str, Any]:
        """Generate the reply ids (through the chat model's KV cache: a follow-up turn only prefills
        what is new)."""
        turn = ChatTurn(self.chat_model, inputs['request'])
        for _ in turn:
            pass
        return {'request': inputs['request'], 'output_ids': turn.output_ids}

    def postprocess(self, inputs: Dict[str, Any], **kwargs) -> Dict[str, Any]:
        response, history = self.chat_model.respond(inputs['request'], inputs['output_ids'])
        return {'response': response, 'history': history}

    def stream(self, data, **params) -> 'ReplyStream':
        """Iterate for the text deltas of the reply as it is generated; afterwards the stream's
        `.last` (and the pipeline's, for the stream that finished last) is the final output dict."""
        self._check_input(data)
        pre, _, _ = self._sanitize_parameters(**params)
        return ReplyStream(self, ChatTurn(self.chat_model, self.preprocess(data, **pre)['request']))


class ReplyStream:
    """One streamed reply, an iterator of text deltas (it runs once, like a generator). Each stream
    keeps its own result in `.last`, so interleaved streams never mix."""

    def __init__(self, pipeline: 'ChatPipeline', turn: ChatTurn):
        self.last = None
        self._deltas = self._run(pipeline, turn)

    def __iter__(self) -> 'ReplyStream':
        return self

    def __next__(self) -> str:
        return next(self._deltas)

    def _run(self, pipeline, turn) -> Iterator[str]:
        yield from turn
        self.last = pipeline.last = {'response': turn.response, 'history': turn.history}


def parse_input(data):
    """Pipeline input -> (query, history, turn options: system/tools/role and generation options given in
    the dict), or InputError saying how to fix it."""
    if isinstance(data, str):
        return data, [], {}
    if not isinstance(data, dict):
        raise InputError(f'chat input must be a dict like {{"text": "你好", "history": []}}, '
                         f'got {type(data).__name__}')
    unknown = sorted(k for k in data if k not in INPUT_KEYS + LEGACY_INPUT_KEYS)
    if unknown:
        raise InputError(f'unknown input key(s) {unknown}; use "text" + "history" (+ "system", "tools", '
                         '"role"), or "messages"; pass generation options as pipeline keyword arguments')
    turn = {k: data[k] for k in TURN_KEYS if k in data}
    # Generation options in the input dict, where ModelScope's own ChatGLM pipelines read them.
    turn.update({k: data[k] for k in LEGACY_INPUT_KEYS if k in data and k != 'num_beams'})
    _check_beams(data.get('num_beams', 1))
    if 'messages' in data:
        if 'text' in data or 'history' in data:
            raise InputError('give either "messages" or "text" + "history", not both')
        messages = data['messages']
        if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
            raise InputError('"messages" must be a non-empty list of {"role", "content"} dicts')
        last = messages[-1]
        if last.get('role') not in ('user', 'observation'):
            raise InputError(f'the last message must come from the user (or be a tool "observation"), '
                             f'got role {last.get("role")!r}')
        turn['role'] = last['role']
        return last.get('content'), list(messages[:-1]), turn
    if 'text' not in data:
        raise InputError('chat input lacks "text": pass {"text": "your question", "history": []}')
    if not isinstance(data['text'], str):
        raise InputError(f'"text" must be a string, got {type(data["text"]).__name__}')
    history = data.get('history')
    if history is None:
        history = []
    if hasattr(history, 'tolist'):   # a tensor or array made by some collate step
        history = history.tolist()
    if not isinstance(history, (list, tuple)):
        raise InputError(f'"history" must be a list of (query, response) pairs, got '
                         f'{type(history).__name__}; pass [] to start a conversation')
    return data['text'], list(history), turn


def _check_beams(num_beams):
    if num_beams not in (None, 1):
        raise InputError(f'num_beams={num_beams}: beam search is not supported; use num_beams=1')


def _device(device):
    """ModelScope's default device 'gpu' means 'a GPU if there is one'."""
    return 'auto' if device in (None, 'gpu') else device


def _ms_device(chat_model: ChatModel) -> str:
    dev = chat_model.device
    return 'cpu' if dev.type == 'cpu' else f'gpu:{dev.index or 0}'


_register(MODELS, (MODEL_NAME,) + BUILTIN_MODELS, ChatGLMForChat, TASKS)
_register(PIPELINES, (PIPELINE_NAME,) + BUILTIN_PIPELINES, ChatPipeline, TASKS)
_register(PREPROCESSORS, (PREPROCESSOR_NAME,), ChatPreprocessor, (Fields.nlp,))
