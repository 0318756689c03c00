"""A checkpoint's `config.json` -> `ModelConfig`, and which generation (family) a directory holds.

Not to be confused with our YAML configurations (`yaml_configs.py`, the files in `configuration/`) or
ModelScope's `configuration.json` (`modelscope_plugin/`). The hub ships one `config.json` schema per
generation, and the same keys mean different things across generations (docs/formats.md §1). This
module turns the file into a small, explicit `ModelConfig` that the model code reads, and decides
which family a directory holds:

- glm1: ChatGLM-6B (`position_encoding_2d`, `inner_hidden_size`, `ice_text.model`)
- glm2: ChatGLM2-6B / -32K (`multi_query_attention`, `padded_vocab_size`)
- glm3: ChatGLM3-6B / -32K: the glm2 architecture, told apart by its tokenizer's role tokens
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

from .errors import CheckpointError


@dataclass
class ModelConfig:
    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    head_dim: int
    num_kv_heads: int           # glm2/3: multi-query groups; glm1: == num_heads
    ffn_hidden_size: int
    vocab_size: int             # rows of the embedding (padded)
    seq_length: int             # positions the model was built for
    layernorm_epsilon: float = 1e-5
    add_qkv_bias: bool = True
    # RoPE scaling. The key `rope_ratio` has two meanings (docs/formats.md §1.5): ChatGLM2-32K divides
    # the positions by it, ChatGLM3-32K multiplies the RoPE base by it. We store the resolved numbers.
    rope_position_divisor: float = 1.0
    rope_base: float = 10000.0
    pre_seq_len: Optional[int] = None
    prefix_projection: bool = False
    quantization_bit: int = 0
    torch_dtype: str = ''          # config.json's, '' when it does not say
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    # glm1 only
    bos_token_id: Optional[int] = None
    mask_token_id: Optional[int] = None
    gmask_token_id: Optional[int] = None
    raw: dict = field(default_factory=dict, repr=False)


def read_json(path: str) -> dict:
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f'{path} is missing: a ChatGLM model directory needs it '
                              '(download the full model repo, or point at the right directory)') from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f'{path} is not valid JSON ({e}); the file is corrupt, download it again') from None


def detect_family(model_dir: str, cfg: dict) -> str:
    """glm1 / glm2 / glm3 from the files of a hub-layout directory."""
    if cfg.get('position_encoding_2d') or 'inner_hidden_size' in cfg \
            or os.path.exists(os.path.join(model_dir, 'ice_text.model')):
        return 'glm1'
    if not (cfg.get('multi_query_attention') or 'padded_vocab_size' in cfg):
        raise CheckpointError(
            f'{os.path.join(model_dir, "config.json")} does not describe a ChatGLM model '
            '(no multi_query_attention/padded_vocab_size for ChatGLM2/3, no position_encoding_2d for ChatGLM-6B)')
    # v2 and v3 share config keys; v3's tokenizer has role tokens. The hub repos ship the tokenizer
    # code and (in later revisions) a chat template, either of which names them.
    for name in ('tokenization_chatglm.py', 'tokenizer_config.json'):
        path = os.path.join(model_dir, name)
        if os.path.exists(path):
            with open(path, encoding='utf-8', errors='replace') as f:
                if '<|user|>' in f.read():
                    return 'glm3'
    name_or_path = str(cfg.get('_name_or_path', '')).lower()
    if 'chatglm3' in name_or_path:
        return 'glm3'
    return 'glm2'


def glm2_config(cfg: dict, family) -> ModelConfig:
    """config.json of a ChatGLM2/3 checkpoint; `family` is its `families.Family` record."""
    try:
        num_heads = cfg['num_attention_heads']
        rope_ratio = float(cfg.get('rope_ratio') or 1.0)
        return ModelConfig(
            family=family.name,
            num_layers=cfg['num_layers'],
            hidden_size=cfg['hidden_size'],
            num_heads=num_heads,
            head_dim=cfg.get('kv_channels') or cfg['hidden_size'] // num_heads,
            num_kv_heads=cfg['multi_query_group_num'] if cfg.get('multi_query_attention') else num_heads,
            ffn_hidden_size=cfg['ffn_hidden_size'],
            vocab_size=cfg.get('padded_vocab_size') or cfg['vocab_size'],
            seq_length=cfg.get('seq_length', 2048),
            layernorm_epsilon=cfg.get('layernorm_epsilon', 1e-5),
            add_qkv_bias=bool(cfg.get('add_qkv_bias', False) or cfg.get('add_bias_linear', False)),
            rope_position_divisor=rope_ratio if family.rope_ratio_scales == 'positions' else 1.0,
            rope_base=10000.0 * (rope_ratio if family.rope_ratio_scales == 'base' else 1.0),
            pre_seq_len=cfg.get('pre_seq_len'),
            prefix_projection=bool(cfg.get('prefix_projection', False)),
            quantization_bit=int(cfg.get('quantization_bit') or 0),
            torch_dtype=str(cfg.get('torch_dtype', '')),   # '' when the file does not say
            eos_token_id=_first(cfg.get('eos_token_id', 2)),
            pad_token_id=cfg.get('pad_token_id', 0),
            raw=cfg,
        )
    except KeyError as e:
        raise CheckpointError(f'config.json lacks the key {e.args[0]!r} that a ChatGLM2/3 config has; '
                              'the file is incomplete or from another model') from None


def glm1_config(cfg: dict, family) -> ModelConfig:
    """config.json of a ChatGLM-6B checkpoint."""
    try:
        num_heads = cfg['num_attention_heads']
        return ModelConfig(
            family=family.name,
            num_layers=cfg['num_layers'],
            hidden_size=cfg['hidden_size'],
            num_heads=num_heads,
            head_dim=cfg['hidden_size'] // num_heads,
            num_kv_heads=num_heads,
            ffn_hidden_size=cfg.get('inner_hidden_size') or 4 * cfg['hidden_size'],
            vocab_size=cfg['vocab_size'],
            seq_length=cfg.get('max_sequence_length', 2048),
            layernorm_epsilon=cfg.get('layernorm_epsilon', 1e-5),
            pre_seq_len=cfg.get('pre_seq_len'),
            prefix_projection=bool(cfg.get('prefix_projection', False)),
            quantization_bit=int(cfg.get('quantization_bit') or 0),
            torch_dtype=str(cfg.get('torch_dtype', '')),   # '' when the file does not say
            # The config class defaults are the pre-slim ids (150xxx); only config.json is trusted.
            eos_token_id=cfg['eos_token_id'],
            bos_token_id=cfg['bos_token_id'],
            mask_token_id=cfg['mask_token_id'],
            gmask_token_id=cfg['gmask_token_id'],
            pad_token_id=cfg.get('pad_token_id', 3),
            raw=cfg,
        )
    except KeyError as e:
        raise CheckpointError(f'config.json lacks the key {e.args[0]!r} that a ChatGLM-6B config has; '
                              'the file is incomplete or from another model') from None


def _first(value):
    return value[0] if isinstance(value, list) else value
