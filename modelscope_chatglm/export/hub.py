"""A loaded model -> a hub-layout directory (docs/formats.md §1, §2): what `export()` writes.

The weights are the model's own parameters under the hub's names (the model's `hub_key`, the inverse of
the `checkpoint_key` the loader reads them with); quantized linears are already THUDM's int8 / packed
int4 `weight` + `weight_scale` (quantization/linear.py keeps the hub's layout in its state dict). Beside
them, what the hub files hold and no loader reads: the rotary `inv_freq` buffers and ChatGLM-6B's
`lm_head.weight`, a copy of the embedding it is tied to.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict

import torch

from ..checkpoint import is_weight_file, split_shards, write_weights
from ..loading import DTYPES
from ..quantization import QuantizedLinear


def write(chat, out_dir: str, weights_format: str, max_shard_bytes: int) -> None:
    """Write `chat` (a ChatModel) into the empty directory `out_dir`."""
    tensors = hub_tensors(chat.model, chat.config)
    source_dtype = DTYPES.get(chat.config.torch_dtype, torch.float32)
    dtypes = {key: stored_dtype(t, source_dtype) for key, t in tensors.items()}
    sizes = {key: t.numel() * dtypes[key].itemsize for key, t in tensors.items()}
    write_weights(out_dir, split_shards(sizes, max_shard_bytes), lambda key: tensors[key].to(dtypes[key]),
                  weights_format)
    # config.json's torch_dtype is what transformers (and the reference) build the model in: the widest dtype
    # stored, so that they get every value exactly too (a merged LoRA makes it float32).
    widest = max((d for d in dtypes.values() if d.is_floating_point), key=lambda d: d.itemsize)
    with open(os.path.join(out_dir, 'config.json'), 'w', encoding='utf-8') as f:
        json.dump(hub_config(chat, str(widest).removeprefix('torch.')), f, indent=2, ensure_ascii=False)
    source_dir = chat.model_dir
    for name in sorted(os.listdir(source_dir)):
        # The tokenizer, tokenizer_config.json, ModelScope's configuration.json, generation_config.json and
        # whatever else the repository ships (its code, its README); not its weights, nor hidden files
        # (a hub cache's markers).
        path = os.path.join(source_dir, name)
        if os.path.isfile(path) and name != 'config.json' and not name.startswith('.') and not is_weight_file(name):
            shutil.copy(path, out_dir)


def hub_tensors(net, config) -> Dict[str, torch.Tensor]:
    """Every tensor of the hub's files for the loaded model `net`: hub key -> tensor as loaded."""
    tensors = {net.hub_key(name): t for name, t in net.state_dict().items()}
    # Never read (the loaders recompute or tie them), written because the hub's files hold them
    # (docs/formats.md §2.1, §2.3): inv_freq as the reference's rotary module computes it, in the checkpoint's
    # dtype, and ChatGLM-6B's separate copy of the embedding as its head.
    dim = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    inv_freq = inv_freq.to(DTYPES.get(config.torch_dtype, torch.float32))
    if config.family == 'glm1':
        tensors.update({f'transformer.layers.{i}.attention.rotary_emb.inv_freq': inv_freq
                        for i in range(config.num_layers)})
        tensors['lm_head.weight'] = net.word_embeddings.weight
    else:
        tensors['transformer.rotary_pos_emb.inv_freq'] = inv_freq
    return tensors


def stored_dtype(t: torch.Tensor, checkpoint_dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor is written in: the checkpoint's where that holds the loaded values exactly (every
    tensor of a plain ChatGLM2/3 checkpoint), float32 where it does not (weights a LoRA was merged into,
    and the int8/int4 scales quantized from them; a P-tuning prefix trained in fp32; ChatGLM-6B's
    LayerNorms, fp32 in the hub's files too). Integer tensors (quantized weights) stay as they are."""
    if not t.is_floating_point() or t.dtype == checkpoint_dtype:
        return t.dtype
    return checkpoint_dtype if torch.equal(t.to(checkpoint_dtype).to(t.dtype), t) else t.dtype


def hub_config(chat, torch_dtype: str) -> dict:
    """The source's config.json with what the export changed: the dtype, the quantization, a P-tuning prefix."""
    config = dict(chat.config.raw, torch_dtype=torch_dtype)
    bits = next((m.bits for m in chat.model.modules() if isinstance(m, QuantizedLinear)), 0)
    if bits or 'quantization_bit' in config:
        config['quantization_bit'] = bits
    if bits and chat.config.family == 'glm1':
        config['quantization_embeddings'] = False    # (the int4/int8 repos say so; "-qe" quantized them too)
    if chat.config.pre_seq_len:
        config.update(pre_seq_len=chat.config.pre_seq_len, prefix_projection=chat.config.prefix_projection)
    return config
