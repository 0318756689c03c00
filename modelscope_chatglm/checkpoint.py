"""Read (and write) the weights of a hub-layout model directory, one shard at a time (docs/formats.md §2).

Layouts understood, in order of preference:
    model.safetensors.index.json + model-0000i-of-0000n.safetensors
    model.safetensors
    pytorch_model.bin.index.json + pytorch_model-0000i-of-0000n.bin
    pytorch_model.bin

`load_weights` copies each tensor straight into an already-allocated parameter of the target dtype
and device, so peak memory is the final model plus one (memory-mapped) shard. Pickles are opened
with `weights_only=True`. Every failure names the file and what to do about it. `write_weights` writes
the same layouts (the tiny test checkpoints, `export`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import os
import sys
import zipfile
from collections import defaultdict
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from .errors import CheckpointError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The hub's weight files, by format: (single file, shard name pattern, index), in the order we read them.
WEIGHT_LAYOUTS = {
    'safetensors': ('model.safetensors', 'model-{:05d}-of-{:05d}.safetensors', 'model.safetensors.index.json'),
    'bin': ('pytorch_model.bin', 'pytorch_model-{:05d}-of-{:05d}.bin', 'pytorch_model.bin.index.json'),
}


def is_weight_file(name: str) -> bool:
    """Whether a file name is one of the weight files or indexes of WEIGHT_LAYOUTS."""
    return name.endswith(('.safetensors', '.bin', '.safetensors.index.json', '.bin.index.json'))


def weight_files(model_dir: str) -> Tuple[List[str], Dict[str, str]]:
    """The shard paths of a model directory and the index's key -> file map ({} without an index)."""
    for single_name, _, index_name in WEIGHT_LAYOUTS.values():
        index_path = os.path.join(model_dir, index_name)
        if os.path.exists(index_path):
            try:
                with open(index_path, encoding='utf-8') as f:
                    weight_map = json.load(f)['weight_map']
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f'{index_path} is corrupt ({e!r}); download it again') from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not os.path.exists(os.path.join(model_dir, s))]
            if missing:
                raise CheckpointError(
                    f'{os.path.join(model_dir, missing[0])} is missing ({len(missing)} of {len(shards)} '
                    f'shards named by {index_name} are absent); the download is incomplete, fetch it again')
            return [os.path.join(model_dir, s) for s in shards], weight_map
        single = os.path.join(model_dir, single_name)
        if os.path.exists(single):
            return [single], {}
    raise CheckpointError(
        f'no weights in {model_dir}: expected model.safetensors[.index.json] or '
        'pytorch_model.bin[.index.json]; download the full model repository')


def read_shard(path: str) -> Dict[str, torch.Tensor]:
    """All tensors of one shard, on CPU, memory-mapped where the format allows."""
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            return load_file(path, device='cpu')
        # Zip-format pickles (torch >= 1.6) can be memory-mapped; legacy ones cannot.
        mmap = zipfile.is_zipfile(path)
        return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except Exception as e:   # safetensors, zipfile and pickle each raise their own types
        size = os.path.getsize(path)
        raise CheckpointError(f'{path} could not be read ({type(e).__name__}: {e}); the file '
                              f'({size} bytes) is truncated or corrupt, download it again') from None


def iter_checkpoint(model_dir: str) -> Iterator[Tuple[str, Dict[str, torch.Tensor]]]:
    """(shard path, tensors) for each shard; the caller drops a shard before the next is read."""
    shards, _ = weight_files(model_dir)
    for path in shards:
        yield path, read_shard(path)


class _PageReleaser:
    """Drop the pages of a memory-mapped shard tensor once it has been copied (Linux).

    A mapped shard stays resident while it is open, which would add a whole shard (~2 GB for the hub's
    ChatGLM files) to the peak memory of loading. `madvise(MADV_DONTNEED)` on a consumed tensor's bytes
    releases them at once. The mapping is private and read-only to us, so a later touch simply
    re-reads the file: releasing is always safe, at worst useless."""

    MADV_DONTNEED = 4

    def __init__(self):
        self.madvise = None
        if sys.platform.startswith('linux'):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6', use_errno=True)
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                self.madvise = libc.madvise
            except (OSError, AttributeError):
                pass

    def __call__(self, tensor: torch.Tensor):
        if self.madvise is None or tensor.device.type != 'cpu' or tensor.numel() == 0:
            return
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        page = mmap.PAGESIZE
        start, end = start // page * page, -(-end // page) * page
        self.madvise(start, end - start, self.MADV_DONTNEED)


def load_weights(model: torch.nn.Module, model_dir: str, map_key: Callable[[str], Optional[str]],
                 progress: Optional[Callable[[int, int, str], None]] = None,
                 transform: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None,
                 required: Optional[Callable[[str], bool]] = None) -> None:
    """Fill every parameter of `model` from the checkpoint in `model_dir`.

    map_key: hub key -> parameter name (None = a key the model ignores). A float weight arriving for a
    quantized module (one with `load_float_weight`, int8 parameters) is quantized on the spot: the
    float matrix exists for one tensor at a time, never for the whole model.
    progress(done, total, path) is called after each shard.
    transform(name, tensor) -> tensor, if given, runs on each tensor first (a LoRA merged while loading).
    required(name): the parameters this checkpoint must fill (default: all; a P-tuning prefix comes
    from its own checkpoint).
    """
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    release = _PageReleaser()
    filled = set()
    unexpected = defaultdict(list)
    shards, weight_map = weight_files(model_dir)
    for done, (path, tensors) in enumerate(iter_checkpoint(model_dir), start=1):
        mapped = path.endswith('.bin') and zipfile.is_zipfile(path)   # read_shard memory-maps these
        for key, tensor in tensors.items():
            name = map_key(key)
            if name is None:
                continue
            param = params.get(name)
            if param is None:
                unexpected[path].append(key)
                continue
            source = tensor
            if transform is not None:
                tensor = transform(name, tensor)
            owner_name, _, leaf = name.rpartition('.')
            owner = modules.get(owner_name)
            if leaf == 'weight' and hasattr(owner, 'load_float_weight') and tensor.dtype in FLOAT_DTYPES:
                _check_quantizable(path, key, tensor, owner)
                owner.load_float_weight(tensor)
                filled.update((name, owner_name + '.weight_scale'))
            else:
                _check_tensor(path, key, tensor, param)
                with torch.no_grad():
                    param.copy_(tensor)
                filled.add(name)
            if mapped:
                release(source)
        del tensors
        if progress is not None:
            progress(done, len(shards), path)
    missing = [n for n in params if n not in filled and (required is None or required(n))]
    if missing:
        hint = ''
        if weight_map:
            files = sorted({weight_map.get(k) for k in weight_map if map_key(k) in missing} - {None})
            hint = f' (the index places them in {files})' if files else ''
        raise CheckpointError(
            f'{model_dir} lacks {len(missing)} weights the model needs, e.g. {missing[:3]}{hint}; '
            'the checkpoint is incomplete or belongs to a different model or config.json')
    if unexpected:
        path, keys = next(iter(unexpected.items()))
        raise CheckpointError(f'{path} holds weights this model does not have, e.g. {keys[:3]}; '
                              'config.json does not match the weights (wrong variant?)')


def _check_quantizable(path: str, key: str, tensor: torch.Tensor, module):
    expected = (module.out_features, module.in_features)
    if tuple(tensor.shape) != expected:
        raise CheckpointError(f'{path}: {key} has shape {tuple(tensor.shape)} but config.json implies '
                              f'{expected}; the weights and config.json are from different models')


def _check_tensor(path: str, key: str, tensor: torch.Tensor, param: torch.Tensor):
    if tensor.shape != param.shape:
        raise CheckpointError(f'{path}: {key} has shape {tuple(tensor.shape)} but config.json implies '
                              f'{tuple(param.shape)}; the weights and config.json are from different models')
    if param.dtype in FLOAT_DTYPES and tensor.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f'{path}: {key} is stored as {tensor.dtype}, expected a float16/bfloat16/'
                              'float32 weight; the file is corrupt or a quantized checkpoint whose '
                              'config.json lacks quantization_bit')
    if param.dtype == torch.int8 and tensor.dtype != torch.int8:
        raise CheckpointError(f'{path}: {key} is stored as {tensor.dtype}, expected quantized int8 weights '
                              '(config.json says quantization_bit); the checkpoint is not pre-quantized')


# -- writing the same layouts --------------------------------------------------------------------------------
def split_shards(sizes: Dict[str, int], max_shard_bytes: int) -> List[List[str]]:
    """Keys in their order, cut into shards of at most `max_shard_bytes` (sizes: key -> bytes; a tensor
    larger than the limit is a shard of its own)."""
    shards, current, filled = [], [], 0
    for key, size in sizes.items():
        if current and filled + size > max_shard_bytes:
            shards.append(current)
            current, filled = [], 0
        current.append(key)
        filled += size
    return shards + [current] if current else shards


def write_weights(out_dir: str, shards: List[List[str]], tensor: Callable[[str], torch.Tensor],
                  fmt: str = 'safetensors') -> List[str]:
    """Write the keys of `shards` (lists of keys; `tensor(key)` gives each, asked for one shard at a time) as the
    hub does: one shard is the single file (model.safetensors / pytorch_model.bin), several are numbered
    files plus the index that maps each key to its file. -> the file names written."""
    if fmt not in WEIGHT_LAYOUTS:
        raise ValueError(f'unknown weight format {fmt!r}; use one of {list(WEIGHT_LAYOUTS)}')
    single, pattern, index_name = WEIGHT_LAYOUTS[fmt]
    names = [single] if len(shards) == 1 else [pattern.format(n, len(shards)) for n in range(1, len(shards) + 1)]
    weight_map, total = {}, 0
    for name, keys in zip(names, shards):
        tensors, storages = {}, set()
        for key in keys:
            t = _standalone(tensor(key))
            if t.untyped_storage().data_ptr() in storages:   # the same tensor under two keys (a tied copy)
                t = t.clone()
            storages.add(t.untyped_storage().data_ptr())
            tensors[key] = t
        path = os.path.join(out_dir, name)
        if fmt == 'safetensors':
            from safetensors.torch import save_file
            save_file(tensors, path, metadata={'format': 'pt'})   # (transformers asks for the 'format')
        else:
            torch.save(tensors, path)
        weight_map.update(dict.fromkeys(keys, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    if len(shards) > 1:
        with open(os.path.join(out_dir, index_name), 'w', encoding='utf-8') as f:
            json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
        names.append(index_name)
    return names


def _standalone(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor that owns its storage: torch.save writes a view's whole storage (and safetensors
    refuses tensors that share one)."""
    t = t.detach().contiguous()
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()
