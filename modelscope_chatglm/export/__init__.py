"""Export a model as `load()` builds it: a hub-layout checkpoint (`hub.py`) that this package and the
reference implementation load, or a GGUF file for llama.cpp (`gguf.py`).

    modelscope-chatglm export --model M [--adapter A] [--quantize 4|8] --out DIR
    modelscope-chatglm export --model M [--adapter A] --gguf FILE [--gguf-type f16|f32|q8_0|q4_0]

    from modelscope_chatglm.export import export, export_gguf
    export('ZhipuAI/chatglm3-6b', 'chatglm3-sql', adapter='output/checkpoint-3000', quantization_bit=4)
    export_gguf('ZhipuAI/chatglm3-6b', 'chatglm3-6b-q8_0.gguf', gguf_type='q8_0')

Both start from the model `load(M, adapter=A, quantization_bit=B)` builds on the CPU, the one place where a
LoRA is merged (in fp32, before quantizing), a checkpoint quantized and a P-tuning prefix read. So an
exported directory holds exactly the weights that call computes, and loading it gives the same logits
and replies; a GGUF holds them in llama.cpp's types. A destination is written in a temporary place next
to it and moved there when complete: a failed export leaves nothing behind.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Optional

from ..errors import ExportError

DEFAULT_SHARD_BYTES = 2 * 10 ** 9   # about the size of the hub's ChatGLM shards


def export(model: str, out_dir: str, adapter: Optional[str] = None, quantization_bit: Optional[int] = None, *,
           revision: Optional[str] = None, adapter_revision: Optional[str] = None,
           weights_format: str = 'safetensors', max_shard_bytes: int = DEFAULT_SHARD_BYTES,
           force: bool = False) -> str:
    """Write `load(model, adapter=adapter, quantization_bit=quantization_bit)` as a hub-layout directory:
    config.json, the tokenizer and the source's other files, and the weights (`weights_format`
    'safetensors' or 'bin', shards of at most `max_shard_bytes` plus their index). A LoRA is merged;
    quantization_bit 4 or 8 writes THUDM's int4/int8 blocks (the layout of chatglm2-6b-int4); a P-tuning
    checkpoint becomes config.json's pre_seq_len and the prefix encoder's weights. Each float tensor is
    written in the checkpoint's dtype where that holds the loaded value exactly, in float32 where it
    does not (what a merged LoRA computes). `force` replaces an existing model directory. -> out_dir"""
    from . import hub
    from ..checkpoint import WEIGHT_LAYOUTS
    if weights_format not in WEIGHT_LAYOUTS:
        raise ValueError(f'unknown weights format {weights_format!r}; use one of {list(WEIGHT_LAYOUTS)}')
    if max_shard_bytes < 1:
        raise ValueError(f'max_shard_bytes must be positive, got {max_shard_bytes}')
    _check_destination(model, revision, adapter, out_dir, force, directory=True)
    chat = _load(model, adapter, quantization_bit, revision, adapter_revision, dtype='float32')
    with _replacing(out_dir, directory=True) as scratch:
        hub.write(chat, scratch, weights_format, max_shard_bytes)
    return out_dir


def export_gguf(model: str, path: str, adapter: Optional[str] = None, gguf_type: str = 'f16', *,
                revision: Optional[str] = None, adapter_revision: Optional[str] = None,
                force: bool = False) -> str:
    """Write `load(model, adapter=adapter)` as a GGUF file in llama.cpp's `chatglm` architecture
    (ChatGLM2/3): every block and head weight in `gguf_type` (f32, f16, q8_0, q4_0; the norms and biases in
    f32, as llama.cpp's converter writes them), with the SentencePiece vocabulary, its scores and token
    types, the end-of-turn ids and the chat template. Needs the `gguf` package (extra [export]).
    `force` replaces an existing file. -> path"""
    try:
        from . import gguf as gguf_export   # (imports the gguf package: only here)
    except ModuleNotFoundError as e:
        raise RuntimeError(f'a GGUF export needs the gguf package ({e}); pip install "modelscope-chatglm[export]"') \
            from None
    from ..loading import load_config
    gguf_export.check_type(gguf_type)
    spec, model_dir = _check_destination(model, revision, adapter, path, force, directory=False)
    config = load_config(model_dir, spec.family)
    gguf_export.check_model(config, gguf_type, model_dir)
    # f32 keeps what load() computes. The other types are no wider than the checkpoint's own fp16/bf16, which
    # holds its weights exactly in half the memory (a 6B model: 12.5 GB; a merged LoRA rounds to it once).
    # quantization_bit=0: a GGUF's quantization is gguf_type, not a YAML configuration's quantize-on-load.
    narrow = config.torch_dtype if gguf_type != 'f32' and config.torch_dtype in ('float16', 'bfloat16') else 'float32'
    chat = _load(model, adapter, 0, revision, adapter_revision, dtype=narrow)
    gguf_export.check_model(chat.config, gguf_type, model_dir)     # and what the adapter added (a P-tuning prefix)
    with _replacing(path, directory=False) as scratch:
        gguf_export.write(chat, scratch, gguf_type)
    return path


def _load(model, adapter, quantization_bit, revision, adapter_revision, dtype):
    """The model as load() builds it on the CPU, with every LoRA merged into its weights."""
    if isinstance(adapter, dict):
        raise ExportError('export writes one model: give one adapter, not several (they are served side by side '
                          'by `serve --adapter NAME=PATH`); export them one at a time')
    from ..adapters import LoRALinear
    from ..loading import load
    chat = load(model, revision=revision, device='cpu', dtype=dtype, quantization_bit=quantization_bit,
                adapter=adapter, adapter_revision=adapter_revision, int8_activations=False, cuda_graphs=False)
    if any(isinstance(m, LoRALinear) for m in chat.model.modules()):
        if chat.config.quantization_bit:
            raise ExportError(
                f'{chat.model_dir} is a pre-quantized (int{chat.config.quantization_bit}) checkpoint: a LoRA over it '
                'runs beside the quantized linears, and merging it would quantize the weights a second time. '
                'Export from the fp16 checkpoint instead: --adapter A with --quantize '
                f'{chat.config.quantization_bit} merges the adapter, then quantizes')
        raise ExportError('the configuration holds several adapters; export them one at a time with --adapter')
    return chat


def _check_destination(model, revision, adapter, destination, force, directory: bool):
    """Refuse a destination that exists (unless `force` may replace it) or that would replace what the
    export reads. -> (the source's configuration, its model directory), as load() resolves them."""
    from ..loading import resolve_source
    spec, model_dir = resolve_source(model, revision)
    target = os.path.realpath(destination)
    flag = '--out' if directory else '--gguf'
    for what, source in (('model', model_dir), ('adapter', adapter if isinstance(adapter, str) else None)):
        if source and os.path.exists(source) and _contains(target, os.path.realpath(source)):
            raise ExportError(f'{flag} {destination} would replace the {what} it exports ({source}); write the export '
                              'somewhere else')
    if not os.path.lexists(destination):
        return spec, model_dir
    if directory and not os.path.isdir(destination):
        raise ExportError(f'--out {destination} exists and is not a directory; choose another --out')
    if not directory and os.path.isdir(destination):
        raise ExportError(f'--gguf {destination} is a directory; give the path of the .gguf file to write')
    if directory and not os.listdir(destination):
        return spec, model_dir
    if not force:
        what = 'a directory that is not empty' if directory else 'a file that exists'
        raise ExportError(f'{flag} {destination} is {what}; choose a new path, or pass --force (force=True) to '
                          'replace it')
    if directory and not os.path.exists(os.path.join(destination, 'config.json')):
        raise ExportError(f'--out {destination} holds files but no config.json: it is not a model directory, and '
                          '--force only replaces one; choose another --out')
    return spec, model_dir


def _contains(outer: str, inner: str) -> bool:
    return os.path.commonpath([outer, inner]) == outer


class _replacing:
    """`with _replacing(dest, directory) as scratch:` the body writes `scratch` (a new directory, or a file
    path, beside `dest`); when it succeeds, scratch takes dest's place, and when it fails, it is removed."""

    def __init__(self, destination: str, directory: bool):
        self.destination, self.directory = destination, directory
        parent = os.path.dirname(os.path.abspath(destination))
        os.makedirs(parent, exist_ok=True)
        prefix = f'.{os.path.basename(os.path.abspath(destination))}.partial-'
        if directory:
            self.scratch = tempfile.mkdtemp(prefix=prefix, dir=parent)
        else:
            fd, self.scratch = tempfile.mkstemp(prefix=prefix, dir=parent)
            os.close(fd)

    def __enter__(self) -> str:
        return self.scratch

    def __exit__(self, kind, error, traceback):
        if kind is not None:
            self._remove(self.scratch)
            return False
        if self.directory:
            # mkdtemp makes it 0700, and some writers make their files 0600: as any new directory instead
            os.chmod(self.scratch, 0o777 & ~_umask())
            for name in os.listdir(self.scratch):
                os.chmod(os.path.join(self.scratch, name), 0o666 & ~_umask())
            if os.path.lexists(self.destination):
                self._remove(self.destination)
            os.rename(self.scratch, self.destination)
        else:
            os.chmod(self.scratch, 0o666 & ~_umask())
            os.replace(self.scratch, self.destination)
        return False

    @staticmethod
    def _remove(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)


def _umask() -> int:
    """The process's umask. Read from /proc where it is there: os.umask reads it only by setting it, and
    for that moment files other threads create would get mode 0o666/0o777."""
    try:
        with open('/proc/self/status', encoding='ascii') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask
