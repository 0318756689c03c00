"""The ChatGLM generations, one record each: the one place that says what differs between them.

    glm1  ChatGLM-6B    GLM-6B blocks (2D RoPE, DeepNorm), `ice_text.model`, "[Round N] 问/答" text prompt
    glm2  ChatGLM2-6B   multi-query GLM2 blocks, `tokenizer.model` + 5 specials, the same prompt, reworded
    glm3  ChatGLM3-6B   the GLM2 blocks, role tokens, role messages with a system prompt and tools

Everything else asks the record: `loading.load_config` reads config.json with `read_config`, `load()`
builds `model_class()`, `loading.load_tokenizer` uses `tokenizer`, `ChatModel` encodes and parses with
`chat_format` and starts from `generation_defaults`. A fourth generation is one more record and the
files it names. (Which record a directory holds is decided from its files: `model_config.detect_family`.)

The records name the pieces (`model_config`'s readers, `tokenizer`'s classes, `chat_formats`' formats),
so this module sits above them and they never import it: what dispatches on a record (`loading`,
`chat`, `testing.tiny`) imports this module.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict

from . import model_config
from .chat_formats import GLM1Format, GLM2Format, GLM3Format, ChatFormat
from .tokenizer import GLM1Tokenizer, GLM2Tokenizer, GLM3Tokenizer


@dataclass(frozen=True)
class Family:
    name: str                        # what config.family, YAML `family:` and `--family` say
    title: str
    model: str                       # 'module:Class' of the architecture (imported when a model is built)
    tokenizer: type                  # with .from_dir(model_dir, config)
    chat_format: ChatFormat
    generation_defaults: Dict        # the official chat() defaults of the generation
    read_config: Callable            # (config.json as a dict, Family) -> ModelConfig
    # What config.json's `rope_ratio` scales: ChatGLM2-32K divides the positions by it, ChatGLM3-32K
    # multiplies the RoPE base (docs/formats.md §1.5).
    rope_ratio_scales: str = 'nothing'     # 'positions' | 'base' | 'nothing'

    def model_class(self):
        module, _, cls = self.model.partition(':')
        return getattr(importlib.import_module(module, __package__), cls)


FAMILIES: Dict[str, Family] = {f.name: f for f in (
    Family('glm1', 'ChatGLM-6B', '.models.glm1:GLM1Model', GLM1Tokenizer, GLM1Format(),
           dict(max_length=2048, do_sample=True, top_p=0.7, temperature=0.95), model_config.glm1_config),
    Family('glm2', 'ChatGLM2-6B', '.models.glm2:GLM2Model', GLM2Tokenizer, GLM2Format(),
           dict(max_length=8192, do_sample=True, top_p=0.8, temperature=0.8), model_config.glm2_config,
           rope_ratio_scales='positions'),
    Family('glm3', 'ChatGLM3-6B', '.models.glm2:GLM2Model', GLM3Tokenizer, GLM3Format(),
           dict(max_length=8192, do_sample=True, top_p=0.8, temperature=0.8), model_config.glm2_config,
           rope_ratio_scales='base'),
)}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f'unknown family {name!r}; expected one of {tuple(FAMILIES)}') from None
