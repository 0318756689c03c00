"""A loaded ChatGLM2/3 model -> a GGUF file in llama.cpp's `chatglm` architecture: what `export_gguf()`
writes, and what benchmarks/bench_vs_llamacpp.py runs llama.cpp on.

What llama.cpp's chatglm architecture reads (src/models/chatglm.cpp and the converter,
convert_hf_to_gguf.py's ChatGLMModel, in the llama.cpp that llama-cpp-python 0.3.36 vendors):
- tensors under gguf's names for the hub's (`gguf.TensorNameMap`: token_embd, blk.N.attn_norm, attn_qkv
  (+ bias), attn_output, ffn_norm, ffn_up (gate half first, as dense_h_to_4h), ffn_down, output_norm,
  output), shapes as the hub's;
- RMS eps, head counts, the rotary dimension (half a head: RoPE rotates the first half as adjacent pairs,
  llama.cpp's "norm" RoPE) and base, no BOS token;
- the vocabulary as its ChatGLM3 converter writes it: every embedding row a token, SentencePiece pieces
  with their scores and types, the specials after them as control tokens, the padding rows [PAD<id>].
Beyond the converter: ChatGLM2-32K's rope_ratio divides the positions (linear RoPE scaling here; the
converter multiplies the base by it, which is ChatGLM3-32K's meaning), and ChatGLM3's replies end at
<|user|> and <|observation|> too (end-of-turn / end-of-message ids), as they do in our engine.

The gguf package is imported with this module (extra [export]); `import modelscope_chatglm` never does.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, List, Tuple

import numpy as np
import torch

import gguf   # (the package on the index: this module is modelscope_chatglm.export.gguf)

from ..errors import ExportError
from ..quantization import QuantizedLinear, dequantize

Q = gguf.GGMLQuantizationType
TYPES = {'f32': (Q.F32, gguf.LlamaFileType.ALL_F32), 'f16': (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
         'q8_0': (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0), 'q4_0': (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0)}
ARCH = 'chatglm'


def check_type(gguf_type: str) -> None:
    if gguf_type not in TYPES:
        raise ValueError(f'unknown GGUF type {gguf_type!r}; use one of {list(TYPES)}')


def check_model(config, gguf_type: str, model_dir: str) -> None:
    """Refuse what llama.cpp's chatglm architecture cannot run, or what the GGUF would hold differently
    from what we compute, naming the way out."""
    if config.family == 'glm1':
        raise ExportError(
            f'{model_dir} is a ChatGLM-6B model, and llama.cpp has no architecture for it (its "chatglm" is '
            'ChatGLM2/3\'s blocks; ChatGLM-6B has 2D RoPE and DeepNorm blocks). Export it in the hub layout '
            '(--out DIR) instead')
    if config.pre_seq_len:
        raise ExportError(
            f'the model has a P-tuning v2 prefix (pre_seq_len={config.pre_seq_len}), which llama.cpp cannot run '
            '(it has no learned K/V prefix); export it in the hub layout (--out DIR), or use a LoRA adapter')
    if config.quantization_bit and gguf_type != 'f32':
        raise ExportError(
            f'{model_dir} holds int{config.quantization_bit} weights (THUDM\'s format, which llama.cpp does not '
            f'read). As {gguf_type} they would be rounded a second time; --gguf-type f32 writes them '
            'dequantized exactly as we compute them, or export the fp16 checkpoint with --gguf-type q8_0/q4_0')


def write(chat, path: str, gguf_type: str) -> None:
    """Write `chat` (a ChatModel from `export._load`: ChatGLM2/3, every LoRA merged) to `path`."""
    config, tokenizer = chat.config, chat.tokenizer
    qtype, file_type = TYPES[gguf_type]
    writer = gguf.GGUFWriter(path, ARCH)
    writer.add_name(chat.name)
    writer.add_file_type(file_type)
    add_hyperparameters(writer, config)
    add_vocabulary(writer, tokenizer, config, chat.model_dir)
    tensors = [(name, shape, read, tensor_type(name, shape, qtype)) for name, shape, read in float_tensors(chat.model)]
    # Every tensor's description comes before the data: the sizes first, then one tensor at a time,
    # converted as it is written, so at most one converted tensor exists beside the model.
    for name, shape, _, kind in tensors:
        if kind in (Q.F32, Q.F16):
            dtype = np.dtype(np.float32 if kind == Q.F32 else np.float16)
            writer.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, kind)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, _, read, kind in tensors:
        data = read().float().numpy()
        writer.write_tensor_data(data if kind == Q.F32 else data.astype(np.float16) if kind == Q.F16
                                 else gguf.quants.quantize(data, kind))
    writer.close()


def add_hyperparameters(writer, config) -> None:
    writer.add_context_length(config.seq_length)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.ffn_hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.layernorm_epsilon)
    writer.add_rope_dimension_count(config.head_dim // 2)     # the first half of each head rotates
    writer.add_rope_freq_base(config.rope_base)                # ChatGLM3-32K: 10000 * rope_ratio
    if config.rope_position_divisor != 1:                       # ChatGLM2-32K: positions / rope_ratio
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_position_divisor)
    writer.add_add_bos_token(False)                             # the prompt starts with [gMASK] sop


def add_vocabulary(writer, tokenizer, config, model_dir: str) -> None:
    """One token per embedding row, as llama.cpp's converter writes ChatGLM3's (set_vocab_chatglm3), for
    ChatGLM2 too: a SentencePiece ("llama") vocabulary with the pieces' scores and types."""
    sp = tokenizer.sp
    tokens, scores, types = [], [], []
    for i in range(config.vocab_size):
        if i < tokenizer.num_sp_pieces:
            # ids 0-2 renamed as the converter does (llama.cpp would take '</s>' for an end-of-generation text)
            piece = {0: '<unk>', 1: '<bos>', 2: '<eos>'}.get(i, sp.IdToPiece(i))
            kind = (gguf.TokenType.UNKNOWN if sp.IsUnknown(i) else gguf.TokenType.CONTROL if sp.IsControl(i)
                    else gguf.TokenType.UNUSED if sp.IsUnused(i) else gguf.TokenType.BYTE if sp.IsByte(i)
                    else gguf.TokenType.NORMAL)
            tokens.append(piece.encode('utf-8'))
            scores.append(sp.GetScore(i))
            types.append(kind)
        elif i in tokenizer.special_tokens:
            tokens.append(tokenizer.special_tokens[i].encode('utf-8'))
            scores.append(0.0)
            types.append(gguf.TokenType.CONTROL)
        else:   # the embedding's padding rows
            tokens.append(f'[PAD{i}]'.encode('utf-8'))
            scores.append(0.0)
            types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model('llama')
    writer.add_tokenizer_pre('chatglm-spm')
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(sp.unk_id())
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_id)
    if config.family == 'glm3':
        # ChatGLM3 ends a reply at eos, <|user|> (the next turn) or <|observation|> (a tool call's result
        # comes next): llama.cpp stops at each end-of-generation id.
        writer.add_eot_token_id(tokenizer['<|user|>'])
        writer.add_eom_token_id(tokenizer['<|observation|>'])
    template = chat_template(model_dir)
    if template:
        writer.add_chat_template(template)


def chat_template(model_dir: str):
    """The chat template of tokenizer_config.json, where the repository has one (later ChatGLM3 revisions;
    llama.cpp recognises it as its chatglm3 format). ChatGLM2 ships none, and llama.cpp has no ChatGLM2
    format."""
    path = os.path.join(model_dir, 'tokenizer_config.json')
    if not os.path.exists(path):
        return None
    from ..model_config import read_json
    return read_json(path).get('chat_template')


def float_tensors(net) -> List[Tuple[str, Tuple[int, ...], Callable[[], torch.Tensor]]]:
    """(GGUF name, shape, read) of every parameter, in the model's order; read() gives it as a float tensor,
    an int8/int4 linear's weight (a pre-quantized source) dequantized then, as our kernels compute it
    (q * scale, in fp32)."""
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.CHATGLM, net.cfg.num_layers)
    modules = dict(net.named_modules())
    out = []
    for name, t in net.state_dict().items():
        owner, _, leaf = name.rpartition('.')
        module = modules.get(owner)
        if isinstance(module, QuantizedLinear) and leaf == 'weight_scale':
            continue
        if isinstance(module, QuantizedLinear) and leaf == 'weight':
            shape = (module.out_features, module.in_features)
            read = functools.partial(dequantize, t, module.weight_scale, module.bits, torch.float32)
        else:
            shape, read = tuple(t.shape), functools.partial(torch.Tensor.detach, t)
        # The converter's names: the hub key without 'transformer.', through gguf's map for the arch.
        hub_name = net.hub_key(name).removeprefix('transformer.')
        gguf_name = names.get_name(hub_name, try_suffixes=('.weight', '.bias'))
        if gguf_name is None:
            raise ExportError(f'{hub_name} has no name in llama.cpp\'s chatglm architecture; it cannot be exported '
                              'to GGUF')
        out.append((gguf_name, shape, read))
    return out


def tensor_type(name: str, shape: Tuple[int, ...], wanted):
    """llama.cpp's converter's choice: vectors (norms, biases) in f32, matrices in the file's type; a
    quantized type needs rows in whole blocks (else f16, as the converter falls back)."""
    if len(shape) <= 1 or name.endswith('_norm.weight') or not name.endswith('.weight'):
        return Q.F32
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    return wanted if shape[-1] % block == 0 else Q.F16
