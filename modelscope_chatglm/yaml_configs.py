"""YAML configurations (the files in `configuration/`): which checkpoint, and how to run it.

    name: chatglm2-6b
    model: ZhipuAI/chatglm2-6b        # hub id, or a local directory in the hub layout
    revision: master
    family: glm2                      # glm1 | glm2 | glm3 (detected from the files when omitted)
    device: auto                      # auto | cpu | cuda | cuda:N
    dtype: {cpu: float32, cuda: float16}   # or one dtype for every device
    context_length: 8192              # prompt + reply budget; oldest rounds are dropped beyond it
    quantization_bit: null            # 8 or 4 quantizes the GLM blocks on load
    int8_activations: false           # CPU, quantized: false = exact kernels (default: int8 activations)
    generation: {do_sample: true, top_p: 0.8, temperature: 0.8}
    adapter: ./my-lora                # optional: a LoRA or P-tuning v2 checkpoint on top (or {name: path})

A configuration is named by its path, or by its file name without `.yaml` (`chatglm2-6b`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

KEYS = ('name', 'model', 'revision', 'family', 'device', 'dtype', 'context_length', 'quantization_bit',
        'int8_activations', 'generation', 'description', 'adapter', 'adapter_revision')


@dataclass
class Configuration:
    name: str
    model: str
    revision: Optional[str] = None
    family: Optional[str] = None
    device: str = 'auto'
    dtype: Union[str, Dict[str, str], None] = None
    context_length: Optional[int] = None
    quantization_bit: Optional[int] = None
    int8_activations: Optional[bool] = None
    generation: Dict[str, object] = field(default_factory=dict)
    description: str = ''
    adapter: Union[str, Dict[str, str], None] = None   # a LoRA / P-tuning directory or hub id (adapters.py)
    adapter_revision: Optional[str] = None
    path: Optional[str] = None


def search_dirs() -> List[str]:
    """The installed copy (package data) and, in a source checkout, the repository's folder."""
    here = os.path.dirname(os.path.abspath(__file__))
    dirs = [os.path.join(here, 'configuration'), os.path.join(os.path.dirname(here), 'configuration')]
    extra = os.environ.get('MODELSCOPE_CHATGLM_CONFIG_PATH')
    return ([extra] if extra else []) + [d for d in dirs if os.path.isdir(d)]


def available() -> Dict[str, str]:
    """name -> path of every configuration found."""
    found: Dict[str, str] = {}
    for d in search_dirs():
        for f in sorted(os.listdir(d)):
            if f.endswith(('.yaml', '.yml')):
                found.setdefault(os.path.splitext(f)[0], os.path.join(d, f))
    return found


def find(spec: str) -> Optional[str]:
    """Path of the configuration `spec` names (a .yaml path or a bare name), else None."""
    if not isinstance(spec, str):
        return None
    if spec.endswith(('.yaml', '.yml')):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f'configuration file {spec} does not exist; '
                                    f'known configurations: {sorted(available())}')
        return spec
    if os.path.sep in spec or '/' in spec or os.path.exists(spec):
        return None   # a directory or a hub id
    return available().get(spec)


MAX_BYTES = 1 << 20    # a configuration is a few lines


def _load(path: str) -> dict:
    """The file's mapping. Aliases (*name) are refused: a few lines of nested aliases expand to billions of
    values once anything walks them (44 s and 1.7 GB before a TypeError), and a configuration needs none."""
    import yaml

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.events.AliasEvent):
                mark = self.peek_event().start_mark
                raise ValueError(f'{path}, line {mark.line + 1}: YAML aliases (*name) are not used in '
                                 'configurations; write the value out')
            return super().compose_node(parent, index)

    if os.path.getsize(path) > MAX_BYTES:
        raise ValueError(f'{path}: {os.path.getsize(path)} bytes; a configuration is a few lines (at most {MAX_BYTES})')
    with open(path, encoding='utf-8') as f:
        try:
            data = yaml.load(f, Loader=NoAliases) or {}
        except yaml.YAMLError as e:
            raise ValueError(f'{path}: not valid YAML ({e})') from None
    if not isinstance(data, dict):
        raise ValueError(f'{path}: a configuration is a YAML mapping, got {type(data).__name__}')
    return data


def _check(path: str, data: dict):
    """Each key's type and range, named in the error (a wrong one gave a TypeError deep in loading, or a
    model that loaded broken)."""
    def wrong(key, what):
        raise ValueError(f'{path}: {key} must be {what}, got {data[key]!r}'[:300])

    def is_int(value):
        return isinstance(value, int) and not isinstance(value, bool)

    for key in ('name', 'model', 'device', 'description'):
        if key in data and not isinstance(data[key], str):
            wrong(key, 'a string')
    for key in ('revision', 'adapter_revision'):
        if data.get(key) is not None and not isinstance(data[key], (str, int)):
            wrong(key, 'a string')
    if data.get('family') not in (None, 'glm1', 'glm2', 'glm3'):
        wrong('family', 'glm1, glm2 or glm3')
    if data.get('context_length') is not None and not (is_int(data['context_length']) and data['context_length'] >= 1):
        wrong('context_length', 'a whole number of tokens, at least 1')
    if data.get('quantization_bit') not in (None, 4, 8) or isinstance(data.get('quantization_bit'), bool):
        wrong('quantization_bit', '4, 8 or null')
    if data.get('int8_activations') not in (None, True, False):
        wrong('int8_activations', 'true or false')
    for key in ('dtype', 'adapter'):
        value = data.get(key)
        if value is not None and not isinstance(value, str) and not (
                isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
            wrong(key, 'a string, or a mapping of strings')
    generation = data.get('generation')
    if generation is not None and not (isinstance(generation, dict) and all(
            isinstance(k, str) and (isinstance(v, (str, int, float, bool)) or v is None or (
                isinstance(v, list) and all(isinstance(i, (str, int, float)) for i in v)))
            for k, v in generation.items())):
        wrong('generation', 'a mapping of generation options (do_sample, top_p, temperature, ...) to values')


def read(path: str) -> Configuration:
    data = _load(path)
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ValueError(f'{path}: unknown key(s) {unknown}; valid keys are {list(KEYS)}')
    if 'model' not in data:
        raise ValueError(f'{path}: the key "model" (a hub id or a model directory) is required')
    _check(path, data)
    data.setdefault('name', os.path.splitext(os.path.basename(path))[0])
    model = str(data['model'])
    here = os.path.dirname(os.path.abspath(path))
    if model.startswith(('./', '../')):   # relative directories are relative to the YAML file
        data['model'] = os.path.normpath(os.path.join(here, model))
    adapter = data.get('adapter')
    if isinstance(adapter, str) and adapter.startswith(('./', '../')):
        data['adapter'] = os.path.normpath(os.path.join(here, adapter))
    elif isinstance(adapter, dict):
        data['adapter'] = {k: os.path.normpath(os.path.join(here, v)) if str(v).startswith(('./', '../')) else v
                           for k, v in adapter.items()}
    return Configuration(path=path, **data)
