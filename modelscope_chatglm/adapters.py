"""Fine-tuned ChatGLM: LoRA adapters and P-tuning v2 checkpoints on a base model.

What the fine-tuning tools write:
- LoRA (peft: ChatGLM3's finetune_demo, ms-swift): a directory with `adapter_config.json` and
  `adapter_model.safetensors` (older peft: `adapter_model.bin`), keys like
  `base_model.model.transformer.encoder.layers.0.self_attention.query_key_value.lora_A.weight`
  (A [r, in], B [out, r]); target modules among query_key_value, dense, dense_h_to_4h, dense_4h_to_h.
- P-tuning v2 (THUDM's `ptuning/main.py`): `checkpoint-N/` with a `pytorch_model.bin` that holds only
  `transformer.prefix_encoder.*` and a `config.json` carrying `pre_seq_len` (and `prefix_projection`).

LoRA is applied as peft defines it, delta W = (B @ A) * scaling with scaling = lora_alpha / r (rsLoRA:
lora_alpha / sqrt(r); `rank_pattern` / `alpha_pattern` per module). `fan_in_fan_out` is for Conv1D
layers (GPT-2) stored [in, out]; ChatGLM's targets are nn.Linear, for which peft turns it off with a
warning, and so do we:
- merged while loading (`merge_transform`): W + delta W, in fp32, before the weight is cast to the model
  dtype or quantized, so quantize-on-load quantizes the fine-tuned weights;
- unmerged (`LoRALinear`): y = base(x) + scaling * (x @ A^T) @ B^T next to the base linear, for a
  pre-quantized base and for serving several adapters over one base, where each row of a batch takes
  its own sequence's adapter (`rows`). A server may add and remove these while it serves
  (`read_to_add`, then `attach` / `detach`, which only the engine calls: between two steps).
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .errors import CheckpointError

logger = logging.getLogger(__name__)

LORA_TARGETS = ('query_key_value', 'dense', 'dense_h_to_4h', 'dense_4h_to_h')
LORA_FILES = ('adapter_model.safetensors', 'adapter_model.bin')


@dataclass
class LoRAWeights:
    A: torch.Tensor          # [r, in]
    B: torch.Tensor          # [out, r]
    scaling: float


@dataclass
class LoRA:
    path: str
    modules: Dict[str, LoRAWeights]     # our module path ('layers.0.self_attention.query_key_value') ->

    def delta(self, module: str) -> torch.Tensor:
        """delta W [out, in] in fp32, as peft's merge computes it."""
        w = self.modules[module]
        return (w.B.float() @ w.A.float()) * w.scaling


@dataclass
class PTuning:
    path: str
    pre_seq_len: int
    prefix_projection: bool
    weights: Dict[str, torch.Tensor] = field(repr=False)    # hub keys 'transformer.prefix_encoder.*'


def parse_specs(values: Optional[Sequence[str]], several: bool):
    """`[NAME=]PATH` strings (the CLI's --adapter values, a Ray deployment's `adapter` list) -> load()'s
    `adapter`: None, one PATH (applied to the model), or {NAME: PATH} (served side by side; several=True,
    the server only). A value that exists as a path is a PATH even if it holds '='."""
    if not values:
        return None
    named, plain = {}, []
    for value in values:
        name, sep, path = value.partition('=')
        if sep and not os.path.exists(value) and (not name or not path):
            raise ValueError(f'--adapter {value!r}: write NAME=PATH, both parts non-empty (or a PATH alone)')
        if sep and '/' not in name and os.sep not in name and not os.path.exists(value):
            if name in named:
                raise ValueError(f'--adapter {name}= is given twice; each adapter needs a name of its own')
            named[name] = path
        else:
            plain.append(value)
    if plain and (named or len(plain) > 1):
        raise ValueError('give one --adapter PATH (applied to the model), or --adapter NAME=PATH for each of '
                         'several adapters served side by side')
    if named and not several:
        raise ValueError('NAME=PATH adapters are for serve (a request picks one by name); give one --adapter PATH')
    return plain[0] if plain else named


class AdapterNotFound(CheckpointError):
    """No adapter directory at that path (nor a hub repository of that id)."""


def resolve(path: str, revision: Optional[str] = None) -> str:
    """A local adapter directory as it is; a hub id through ModelScope's snapshot_download."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise CheckpointError(f'adapter {path} is a file; pass the directory that holds adapter_config.json '
                              '(LoRA) or config.json + pytorch_model.bin (P-tuning checkpoint-N)')
    if path.count('/') != 1 or path.startswith(('/', '.')):
        raise AdapterNotFound(f'adapter {path!r}: no such directory (and not a hub id like "OWNER/NAME")')
    from modelscope.hub.snapshot_download import snapshot_download
    try:
        return snapshot_download(path, revision=revision or 'master')
    except Exception as e:   # offline, a typo in a local path, a private repo...
        raise AdapterNotFound(f'adapter {path!r} is not a local directory, and fetching it as a hub id failed '
                              f'({type(e).__name__}: {e}); check the path') from e


def is_ptuning(path: str) -> bool:
    """A P-tuning v2 checkpoint-N (config.json with pre_seq_len + pytorch_model.bin), not a LoRA."""
    if os.path.exists(os.path.join(path, 'adapter_config.json')):
        return False
    try:
        with open(os.path.join(path, 'config.json'), encoding='utf-8') as f:
            return bool(json.load(f).get('pre_seq_len'))
    except (OSError, ValueError):
        return False


def read(path: str, model) -> LoRA:
    """The LoRA adapter in the directory `path` for `model` (a built, not yet loaded architecture),
    checked against the model's shapes. Errors name the file and the tensor."""
    if not os.path.exists(os.path.join(path, 'adapter_config.json')):
        raise CheckpointError(
            f'{path} is not an adapter: expected adapter_config.json + adapter_model.safetensors|.bin (LoRA from '
            'peft or ms-swift) or config.json with pre_seq_len + pytorch_model.bin (a P-tuning v2 checkpoint-N)')
    return _read_lora(path, model)


def read_to_add(path: str, model, revision: Optional[str] = None) -> LoRA:
    """The LoRA adapter at `path` (a directory or a hub id), read and checked as load() reads one, to add
    beside a model that is already serving (`LLMEngine.add_adapter`). A P-tuning checkpoint cannot be added
    so: its learned prefix opens every sequence's K/V, so it changes the whole model, not a side path."""
    local = resolve(path, revision)
    if is_ptuning(local):
        raise CheckpointError(f'{path} is a P-tuning v2 checkpoint: its prefix changes the whole model (every '
                              'sequence starts with it), so it cannot be added beside the running one; load it at '
                              'start instead (--adapter PATH), or add a LoRA adapter')
    lora = read(local, model)
    # In the model's dtype and on its device here, in the caller's (worker) thread: attaching then only
    # links tensors, under the lock every new request takes.
    for w in lora.modules.values():
        w.A, w.B = (t.to(model.device, model.dtype).contiguous() for t in (w.A, w.B))
    return lora


def _read_lora(path: str, model) -> LoRA:
    with open(os.path.join(path, 'adapter_config.json'), encoding='utf-8') as f:
        config = json.load(f)
    kind = str(config.get('peft_type', '')).upper()
    if kind != 'LORA':
        raise CheckpointError(f'{path}/adapter_config.json: peft_type {kind or None!r} is not supported; '
                              'supported are LoRA adapters (peft, ms-swift) and P-tuning v2 checkpoints')
    for key, allowed, why in (('use_dora', (None, False), 'DoRA'), ('bias', (None, 'none'), 'trained biases'),
                              ('modules_to_save', (None, []), 'fully trained modules')):
        if config.get(key) not in allowed:
            raise CheckpointError(f'{path}/adapter_config.json: {key}={config[key]!r} ({why}) is not supported; '
                                  'train a plain LoRA adapter, or merge it with peft and load the merged model')
    weights_file = next((os.path.join(path, n) for n in LORA_FILES if os.path.exists(os.path.join(path, n))), None)
    if weights_file is None:
        raise CheckpointError(f'{path} has adapter_config.json but no {" or ".join(LORA_FILES)}')
    from .checkpoint import read_shard
    tensors = read_shard(weights_file)
    pairs: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(r'(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight', key)
        if match is None:
            raise CheckpointError(f'{weights_file}: {key} is not a LoRA weight (expected ...lora_A.weight / '
                                  '...lora_B.weight)')
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    params = dict(model.named_modules())
    r_default, alpha = config.get('r', 8), config.get('lora_alpha', 8)
    modules = {}
    for hub_module, ab in pairs.items():
        if set(ab) != {'A', 'B'}:
            raise CheckpointError(f'{weights_file}: {hub_module} has lora_{"".join(ab)} but not its pair')
        target = hub_module.rsplit('.', 1)[-1]
        name = model.checkpoint_key(hub_module + '.weight')
        module = params.get(name[:-len('.weight')]) if name else None
        if target not in LORA_TARGETS or module is None:
            raise CheckpointError(f'{weights_file}: {hub_module}.lora_A.weight targets {hub_module!r}, which is not '
                                  f'one of the GLM block linears {list(LORA_TARGETS)} of this model; the adapter was '
                                  'made for another architecture')
        A, B = ab['A'], ab['B']
        out_f, in_f = module.out_features, module.in_features
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != in_f or B.shape[0] != out_f or A.shape[0] != B.shape[1]:
            raise CheckpointError(
                f'{weights_file}: {hub_module}.lora_A.weight {tuple(A.shape)} / lora_B.weight {tuple(B.shape)} do not '
                f'fit the base model\'s {target} [{module.out_features}, {module.in_features}]; the adapter was '
                'made for another base model')
        r = A.shape[0]
        a = _pattern(config.get('alpha_pattern') or {}, hub_module, alpha)
        if r != _pattern(config.get('rank_pattern') or {}, hub_module, r_default):
            raise CheckpointError(f'{weights_file}: {hub_module} has rank {r} but adapter_config.json says '
                                  f'{_pattern(config.get("rank_pattern") or {}, hub_module, r_default)}')
        scaling = a / math.sqrt(r) if config.get('use_rslora') else a / r
        modules[name[:-len('.weight')]] = LoRAWeights(A, B, scaling)
    if not modules:
        raise CheckpointError(f'{weights_file} holds no LoRA weights')
    if config.get('fan_in_fan_out'):
        logger.warning('%s/adapter_config.json sets fan_in_fan_out, which is for Conv1D layers; ChatGLM\'s '
                       'target modules are torch.nn.Linear, so it is ignored (as peft does)', path)
    return LoRA(path, modules)


def _pattern(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern: a key matches a module whose name ends with it."""
    for key, value in patterns.items():
        if re.match(rf'(.*\.)?{key}$', module):
            return value
    return default


def read_ptuning(path: str) -> PTuning:
    from .checkpoint import read_shard
    with open(os.path.join(path, 'config.json'), encoding='utf-8') as f:
        config = json.load(f)
    file = os.path.join(path, 'pytorch_model.bin')
    if not os.path.exists(file):
        raise CheckpointError(f'{path} is a P-tuning checkpoint without its pytorch_model.bin')
    weights = read_shard(file)
    other = [k for k in weights if '.prefix_encoder.' not in f'.{k}']
    if other:
        raise CheckpointError(f'{file} holds more than a prefix encoder (e.g. {other[:2]}): it is a full model, '
                              'not a P-tuning checkpoint; load it as the model instead')
    return PTuning(path, int(config['pre_seq_len']), bool(config.get('prefix_projection', False)), weights)


def with_prefix(config, ptuning: PTuning):
    """The base model's config with the checkpoint's prefix (pre_seq_len, prefix_projection)."""
    import dataclasses
    for key in ('pre_seq_len', 'prefix_projection'):
        base, ours = getattr(config, key), getattr(ptuning, key)
        if base and base != ours:
            raise CheckpointError(f'{ptuning.path}/config.json sets {key}={ours!r} but the base model\'s config.json '
                                  f'already has {key}={base!r}; use the base model the checkpoint was trained on')
    return dataclasses.replace(config, pre_seq_len=ptuning.pre_seq_len, prefix_projection=ptuning.prefix_projection)


def load_prefix(model, ptuning: PTuning):
    """Copy the checkpoint's prefix encoder into `model` (built with its pre_seq_len/prefix_projection)."""
    file = os.path.join(ptuning.path, 'pytorch_model.bin')
    params = {n: p for n, p in model.named_parameters() if n.startswith('prefix_encoder.')}
    filled = set()
    for key, tensor in ptuning.weights.items():
        name = model.checkpoint_key(key)
        if name not in params:
            raise CheckpointError(f'{file}: {key} does not fit a prefix encoder with prefix_projection='
                                  f'{ptuning.prefix_projection} (config.json); the config and the weights disagree')
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise CheckpointError(
                f'{file}: {key} has shape {tuple(tensor.shape)} but config.json (pre_seq_len={ptuning.pre_seq_len}, '
                f'prefix_projection={ptuning.prefix_projection}) and the base model imply {tuple(params[name].shape)}; '
                'the checkpoint was trained on another base model or its config.json is not its own')
        with torch.no_grad():
            params[name].copy_(tensor)
        filled.add(name)
    missing = sorted(set(params) - filled)
    if missing:
        raise CheckpointError(f'{file} lacks {missing} (config.json says prefix_projection='
                              f'{ptuning.prefix_projection}); the config and the weights disagree')


# -- LoRA merged while loading -----------------------------------------------------------------------------
def merge_transform(lora: LoRA):
    """A load_weights transform: the base weight of each adapted linear, plus delta W, in fp32.
    `.merged` lists what it touched (the loader checks that every adapted linear came by)."""
    merged = set()

    def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
        module = name[:-len('.weight')] if name.endswith('.weight') else None
        if module not in lora.modules:
            return tensor
        merged.add(module)
        return tensor.float() + lora.delta(module)
    transform.merged = merged
    return transform


def check_merged(transform, lora: LoRA):
    left = sorted(set(lora.modules) - transform.merged)
    if left:
        raise CheckpointError(f'{lora.path}: the base checkpoint has no weight for {left[:3]}; the adapter was made '
                              'for another base model')


# -- LoRA unmerged: a side path next to the base linear ----------------------------------------------------
# Which adapter each row of the current forward takes: [(adapter name, rows), ...] in row order, set by
# the batching scheduler around a forward of several sequences. A name of None (and no assignment at all)
# means the layer's default: the model's own unnamed adapter if it has one, else the base alone.
_ROWS: contextvars.ContextVar = contextvars.ContextVar('lora_rows', default=None)


@contextlib.contextmanager
def rows(assignment: Sequence[Tuple[Optional[str], int]]):
    token = _ROWS.set(list(assignment))
    try:
        yield
    finally:
        _ROWS.reset(token)


class LoRALinear(nn.Module):
    """A base linear (float or quantized) with LoRA adapters beside it, unmerged:
        y = base(x) + scaling * (x @ A^T) @ B^T
    Several adapters can share one base; `default` is the one rows take outside `rows(...)` (the unnamed
    adapter '' of a model loaded with one unmerged adapter; None: the base alone)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.adapters: Dict[str, Tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.default: Optional[str] = None

    def add(self, name: str, weights: LoRAWeights, dtype, device):
        self.adapters[name] = (weights.A.to(device, dtype).contiguous(), weights.B.to(device, dtype).contiguous(),
                               weights.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        assignment = _ROWS.get()
        if assignment is None:
            return y if self.default is None else y + self._side(x, self.default)
        flat_x, flat_y, start = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), 0
        for name, n in assignment:
            name = self.default if name is None else name
            if name is not None and name in self.adapters:
                flat_y[start:start + n] += self._side(flat_x[start:start + n], name)
            start += n
        return y

    def _side(self, x, name):
        A, B, scaling = self.adapters[name]
        return (x.to(A.dtype) @ A.T @ B.T * scaling).to(x.dtype)


def attach(model, lora: LoRA, name: str, dtype: torch.dtype, device, default: bool):
    """Put `lora` beside the model's linears, unmerged, under `name` (the wrappers are shared by every
    adapter attached to the model)."""
    for module_path, weights in lora.modules.items():
        parent_path, _, leaf = module_path.rpartition('.')
        parent = model.get_submodule(parent_path)
        layer = getattr(parent, leaf)
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear(layer)
            setattr(parent, leaf, layer)
        layer.add(name, weights, dtype, device)
        if default:
            layer.default = name


def detach(model, name: str) -> None:
    """Take the adapter `name` away from the model's linears (the wrappers stay: other adapters may share
    them, and without adapters a wrapper is the base linear alone)."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.adapters.pop(name, None)


def adapter_names(model) -> List[str]:
    """The named adapters attached to `model` (a single unnamed one, '', is the model's own)."""
    names = set()
    for module in model.modules():
        if isinstance(module, LoRALinear):
            names |= set(module.adapters)
    return sorted(names - {''})
