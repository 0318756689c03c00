"""YAML configurations (the files in `configuration/`): which checkpoint, and how to run it.

    name: chatglm2-6b
    model: ZhipuAI/chatglm2-6b        # hub id, or a local directory in the hub layout
    revision: master
    family: glm2                      # glm1 | glm2 | glm3 (detected from the files when omitted)
    device: auto                      # auto | cpu | cuda | cuda:N
    dtype: {cpu: float32, cuda: float16}   # or one dtype for every device
    context_length: 8192              # prompt + reply budget; oldest rounds are dropped beyond it
    quantization_bit: null            # 8 or 4 quantizes the GLM blocks on load
    int8_activations: false           # CPU: quantized blocks use int8 activations (faster, ~0.5% per layer)
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


def read(path: str) -> Configuration:
    import yaml
    with open(path, encoding='utf-8') as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f'{path}: a configuration is a YAML mapping, got {type(data).__name__}')
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ValueError(f'{path}: unknown key(s) {unknown}; valid keys are {list(KEYS)}')
    if 'model' not in data:
        raise ValueError(f'{path}: the key "model" (a hub id or a model directory) is required')
    if data.get('int8_activations') not in (None, True, False):
        raise ValueError(f'{path}: int8_activations is true or false, got {data["int8_activations"]!r}')
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
