"""`load()`: from a hub id, a local directory or a YAML configuration to a ready `ChatModel`.

    load('ZhipuAI/chatglm2-6b', revision='master')   # downloaded through ModelScope's snapshot_download
    load('/models/chatglm3-6b')                       # a local directory in the hub layout
    load('chatglm2-6b-32k')                            # a configuration from configuration/
    load('configuration/chatglm3-6b.yaml', device='cpu', dtype='bfloat16')

The model is built on the `meta` device (no memory), allocated once in the target dtype and device,
then filled shard by shard: peak memory is the final model plus one shard.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Optional, Union

import torch

from . import adapters, yaml_configs
from .chat import ChatModel
from .checkpoint import load_weights
from .families import get_family
from .model_config import ModelConfig, detect_family, read_json
from .models.base import CausalLM
from .errors import CheckpointError

logger = logging.getLogger(__name__)

DTYPES = {
    'float32': torch.float32, 'fp32': torch.float32, 'float': torch.float32,
    'float16': torch.float16, 'fp16': torch.float16, 'half': torch.float16,
    'bfloat16': torch.bfloat16, 'bf16': torch.bfloat16,
}
NATIVE_BF16_FLAGS = {'amx_bf16', 'avx512_bf16', 'bf16'}    # /proc/cpuinfo flags (x86) / Features (Arm)


def default_dtype(device: torch.device, quantized: bool) -> str:
    """float16 on a GPU; float32 on a CPU, except for int8/int4 models on a CPU with native bf16 matrix
    units (AMX, AVX512-BF16, Arm BF16): there bf16 activations speed up prefill and halve the unquantized
    embedding and head, while elsewhere bf16 is emulated and slow. The decode kernels accumulate in
    fp32 either way."""
    if device.type == 'cuda':
        return 'float16'
    return 'bfloat16' if quantized and device.type == 'cpu' and cpu_has_native_bf16() else 'float32'


def cpu_has_native_bf16() -> bool:
    try:
        with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as f:
            words = {w for line in f if line.startswith(('flags', 'Features')) for w in line.split()}
    except OSError:
        return False
    return bool(words & NATIVE_BF16_FLAGS)


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    if device is None or str(device) == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    name = str(device).replace('gpu', 'cuda')   # ModelScope spells CUDA devices 'gpu' / 'gpu:0'
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f'unknown device {device!r}; use "cpu", "cuda", "cuda:N" or "auto"') from None
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError(f'device {device!r} asks for a CUDA GPU but torch sees none '
                           f'(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None}); '
                           'use device="cpu"')
    return dev


def resolve_dtype(dtype, device: torch.device, policy=None, quantized: bool = False) -> torch.dtype:
    if dtype is None or dtype == 'auto':
        dtype = policy.get(device.type) if isinstance(policy, dict) else policy
        dtype = dtype or default_dtype(device, quantized)
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).replace('torch.', '')]
    except KeyError:
        raise ValueError(f'unknown dtype {dtype!r}; use one of float32, bfloat16, float16') from None


HUB_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]*')   # one part of a hub id: an owner or a model name


def resolve_model_dir(model: str, revision: Optional[str]) -> str:
    """A local directory as it is; a hub id through ModelScope's snapshot_download."""
    if os.path.isdir(model):
        return model
    if os.path.exists(model):
        raise CheckpointError(f'{model} is a file; pass the model directory that holds config.json, '
                              'or a YAML configuration (*.yaml)')
    parts = model.split('/')
    if len(parts) != 2 or not all(HUB_NAME.fullmatch(part) and part not in ('.', '..') for part in parts):
        # (checked before any network: './x' or 'ZhipuAI/..' waited for retries, and '..' reached the URL)
        raise CheckpointError(
            f'{model!r} is neither a local directory, a hub id like "ZhipuAI/chatglm2-6b", nor a known '
            f'configuration ({", ".join(sorted(yaml_configs.available()))})')
    from modelscope.hub.snapshot_download import snapshot_download   # only hub ids need it
    revision = revision or 'master'
    try:
        return snapshot_download(model, revision=revision, local_files_only=True)   # cached: no network
    except Exception:   # (not cached, or only in part: download it)
        pass
    logger.info('downloading %s (revision %s) from the ModelScope hub', model, revision)
    try:
        return snapshot_download(model, revision=revision)
    except Exception as e:   # offline, a wrong id, a wrong revision: one line, not the hub client's traceback
        raise CheckpointError(
            f'{model} (revision {revision}) is not in the ModelScope cache and could not be downloaded '
            f'({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else "no detail"}). Check the id '
            f'and the network, download it where there is one (`modelscope download --model {model}`), or '
            'pass a local directory in the hub layout') from None


def load(model: str, revision: Optional[str] = None, device=None, dtype=None,
         quantization_bit: Optional[int] = None, family: Optional[str] = None,
         context_length: Optional[int] = None, generation: Optional[dict] = None,
         progress=None, cuda_graphs: Optional[bool] = None, adapter=None,
         adapter_revision: Optional[str] = None, merge_adapter: Optional[bool] = None,
         int8_activations: Optional[bool] = None) -> ChatModel:
    """Load a ChatGLM chat model. `model` is a hub id, a hub-layout directory or a configuration.
    progress(done, total, path), if given, is called after each weight shard. cuda_graphs: replay
    decode steps from CUDA graphs on a GPU (ChatGLM2/3; default on, or MODELSCOPE_CHATGLM_CUDA_GRAPHS=0).

    adapter: a fine-tuned adapter on top (adapters.py): a LoRA directory (peft, ms-swift) or a P-tuning
    v2 checkpoint-N directory, or a hub id (with adapter_revision). A LoRA is merged into the weights
    while loading (before quantize-on-load), unless the base is pre-quantized or merge_adapter=False:
    then it runs beside the linears, unmerged. A dict {name: path} holds several LoRA adapters over one
    base, unmerged, selected per request by name (`ChatModel.adapters`).

    int8_activations: on CPU, the quantized blocks quantize their input to int8 too (per block of 64
    columns, as llama.cpp / chatglm.cpp do) and use integer dot products. The default (None) is on for a
    quantized model on the CPU wherever the compiled kernels are: the error it adds is about that of int8
    weights (docs/quantization.md, "Which activations by default"). False keeps
    fp32/bf16 activations: the exact kernels, whose logits match the reference on the same weights."""
    spec, model_dir = resolve_source(model, revision)
    dev = resolve_device(device or spec.device)
    config = load_config(model_dir, family or spec.family)
    bits = quantization_bit if quantization_bit is not None else spec.quantization_bit
    bits = resolve_quantization(model_dir, config, bits)
    int8_activations = spec.int8_activations if int8_activations is None else int8_activations
    if int8_activations is None:
        int8_activations = default_int8_activations(bits, dev)
    check_int8_activations(bool(int8_activations), bits, dev)
    dt = resolve_dtype(dtype, dev, spec.dtype, quantized=bool(bits))
    tokenizer = load_tokenizer(model_dir, config)
    wanted = adapter if adapter is not None else spec.adapter
    named = dict(wanted) if isinstance(wanted, dict) else {None: wanted} if wanted else {}
    bad = [n for n in named if n is not None and (not isinstance(n, str) or not n.strip())]
    if bad:
        raise ValueError(f'adapter names must be non-empty strings, got {bad}')
    paths = {name: adapters.resolve(path, adapter_revision or spec.adapter_revision) for name, path in named.items()}
    ptuning = {name: adapters.read_ptuning(path) for name, path in paths.items() if adapters.is_ptuning(path)}
    if ptuning:
        if len(named) > 1:
            raise ValueError('a P-tuning checkpoint changes the whole model (its prefix); load one at a time '
                             '(serve several LoRA adapters by name instead)')
        config = adapters.with_prefix(config, next(iter(ptuning.values())))
    net = build_model(config, dt, dev, bits)
    loras = {name: adapters.read(path, net) for name, path in paths.items() if name not in ptuning}
    merge = (merge_adapter is not False and not config.quantization_bit and list(loras) == [None])
    transform = adapters.merge_transform(loras[None]) if merge else None
    load_weights(net, model_dir, net.checkpoint_key, progress, transform=transform,
                 required=(lambda n: not n.startswith('prefix_encoder.')) if ptuning else None)
    if merge:
        adapters.check_merged(transform, loras[None])
    else:
        for name, lora in loras.items():
            adapters.attach(net, lora, name or '', dt, dev, default=name is None)
    for p in ptuning.values():
        adapters.load_prefix(net, p)
    if int8_activations:
        from .quantization import QuantizedLinear
        for module in net.modules():
            if isinstance(module, QuantizedLinear):
                module.int8_activations = True
    if hasattr(net, 'cuda_graphs'):
        if cuda_graphs is None:
            cuda_graphs = os.environ.get('MODELSCOPE_CHATGLM_CUDA_GRAPHS', '1') not in ('0', 'false', 'no', '')
        net.cuda_graphs = bool(cuda_graphs)
    if dev.type == 'cpu' and (bits or dt in (torch.float32, torch.bfloat16)):
        # The quantized blocks and the decode step's LM head (models/base.py lm_head) run on the
        # compiled kernels: build or load them now rather than inside the first reply.
        from .quantization.build import load_library
        load_library()
    gen = dict(spec.generation or {})
    gen.update(generation or {})
    return ChatModel(net.eval(), tokenizer, config, model_dir,
                     context_length=context_length or spec.context_length, generation=gen, name=spec.name)


def resolve_source(model: str, revision: Optional[str] = None):
    """What `load()` is given -> (its configuration, the model directory): a YAML configuration as it says, a
    hub id or a directory as a configuration of its own, named after it."""
    cfg_path = yaml_configs.find(model)
    if cfg_path:
        spec = yaml_configs.read(cfg_path)
    else:   # named after the hub id, or after the directory
        name = os.path.basename(os.path.normpath(model)) if os.path.isdir(model) else model
        spec = yaml_configs.Configuration(name=name, model=model)
    return spec, resolve_model_dir(spec.model, revision or spec.revision)


def load_config(model_dir: str, family: Optional[str] = None) -> ModelConfig:
    """A hub-layout directory's config.json, read by its family's record (`family`, or the one its files
    show: `model_config.detect_family`)."""
    cfg = read_json(os.path.join(model_dir, 'config.json'))
    record = get_family(family or detect_family(model_dir, cfg))
    return record.read_config(cfg, record)


def load_tokenizer(model_dir: str, config: ModelConfig):
    """The tokenizer of a hub-layout directory (its class from config.family), checked against the
    model's embedding size."""
    tok = get_family(config.family).tokenizer.from_dir(model_dir, config)
    if tok.vocab_size > config.vocab_size:
        raise CheckpointError(
            f'{tok.model_file} has {tok.vocab_size} tokens (with specials) but the embedding in '
            f'{os.path.join(model_dir, "config.json")} has only {config.vocab_size} rows: the tokenizer '
            'and the config come from different models; use the files of one model revision')
    return tok


def resolve_quantization(model_dir: str, config, requested: Optional[int]) -> int:
    """Bits of the GLM blocks: the checkpoint's own (pre-quantized) or `requested` (quantize on load)."""
    stored = config.quantization_bit
    if config.raw.get('quantization_embeddings'):
        raise CheckpointError(f'{model_dir}/config.json sets quantization_embeddings (a "-qe" checkpoint with '
                              'quantized embeddings), which is not supported; use the int4/int8 repos without '
                              '"-qe", or quantize an fp16 checkpoint on load')
    if requested not in (None, 0, 4, 8):
        raise ValueError(f'quantization_bit must be 8 or 4, got {requested!r}')
    if stored and requested and requested != stored:
        raise CheckpointError(f'{model_dir} holds int{stored} weights; it cannot be loaded as int{requested} '
                              '(quantize the fp16 checkpoint instead)')
    return stored or requested or 0


def default_int8_activations(bits: int, device: torch.device) -> bool:
    """Int8 activations by default for a quantized model on the CPU with the compiled kernels: measured,
    they add about the error int8 weights have of their own (0.8-1.3x; an int4 model's own is 16-22x
    larger) and make int4 decode and every prompt faster (docs/quantization.md). Elsewhere there is no
    choice."""
    if not bits or device.type != 'cpu':
        return False
    from .quantization.build import load_library
    return load_library() is not None


def check_int8_activations(wanted: bool, bits: int, device: torch.device) -> None:
    if not wanted:
        return
    if not bits:
        raise ValueError('int8_activations applies to the int8/int4 blocks: load an int4/int8 checkpoint or add '
                         'quantization_bit=4 (--quantize 4), or drop int8_activations')
    if device.type != 'cpu':
        raise ValueError(f'int8_activations is an option of the CPU kernels; on {device} the GPU kernels keep '
                         'activations in floating point: drop int8_activations, or run on device=cpu')
    from .quantization.build import load_library
    if load_library() is None:
        logger.warning('int8_activations needs the compiled CPU kernels, which are not available here (see the '
                       'warning above); the quantized blocks run on the exact torch path instead')


def build_model(config, dtype: torch.dtype, device: torch.device, bits: int = 0):
    """The architecture for `config`, allocated (uninitialised) in `dtype` on `device`; with `bits`,
    its GLM blocks' linears are int8/int4 `QuantizedLinear`s."""
    Architecture = get_family(config.family).model_class()
    with torch.device('meta'):
        net = Architecture(config).to(dtype)
        if bits and dtype == torch.float32 and device.type == 'cpu' and config.torch_dtype == 'float16':
            from .quantization.build import load_library
            if load_library() is not None:
                # The embedding and the LM head stay unquantized, but need not widen to fp32: kept as the
                # checkpoint's fp16 they are exact (fp16 -> fp32 loses nothing), half the memory, and half
                # the bytes a decode step reads for its head (lm_head widens them in registers: f16_gemv;
                # without the compiled kernels they stay fp32, as torch has no fp32 x fp16 product).
                for module in (net.word_embeddings, getattr(net, 'output_layer', None)):
                    if module is not None:
                        module.half()
    assert isinstance(net, CausalLM), f'{Architecture.__name__} does not implement models/base.py CausalLM' 
    if bits:
        from .quantization import quantize_linears
        quantize_linears(net, bits, dtype, device)
    return net.to_empty(device=device)
