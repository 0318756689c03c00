"""Tiny random ChatGLM checkpoints in the exact hub layout, built offline in about a second.

ChatGLM-6B (glm1: `ice_text.model`, fp16 linears + fp32 LayerNorms, separate `lm_head.weight`) and
ChatGLM2/3 (glm2/glm3: `tokenizer.model`, one dtype). They feed the offline demo, the tests and the benchmarks: the same files a hub download holds
(config.json, sharded pytorch_model-*.bin or model-*.safetensors with their index, tokenizer.model,
tokenizer_config.json, configuration.json), only small. The tokenizer is a real SentencePiece model
trained on the spot with the settings of the real one (formats docs/formats.md §4.4).

    python -m modelscope_chatglm.testing.tiny /tmp/tiny-glm2 --family glm2
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
from typing import Dict, Optional

import torch

from ..families import FAMILIES, get_family

CORPUS = """\
你好，我是一个人工智能助手。很高兴认识你！
清华大学是中国著名的高等学府，位于北京市海淀区。
请介绍一下你自己。我可以回答问题、写文章、翻译和编程。
今天天气很好，我们去公园散步吧。
Hello! How can I help you today? I am a helpful assistant.
The quick brown fox jumps over the lazy dog. 1234567890
Python is a programming language: def main(): print("hello world")
机器学习和深度学习是人工智能的重要分支。
问：你好\n答：你好！有什么可以帮助你的吗？
[Round 1]\n\n问：介绍下清华大学\n\n答：清华大学是一所综合性大学。
ChatGLM is a bilingual (Chinese-English) chat model based on the GLM architecture.
北京、上海、广州和深圳是中国的大城市。
Let's write some code: for i in range(10): total += i * 2
模型的参数量为六十亿，支持中英双语对话。
What is the capital of France? Paris is the capital of France.
我喜欢读书、听音乐和旅行。你呢？
"""

GLM1_SPECIALS = ['[MASK]', '[gMASK]', '[sMASK]', '<unused_0>', '<sop>', '<eop>', '<ENC>', '<dBLOCK>']
GLM1_USER_SYMBOLS = ['<n>', '<|tab|>'] + [f'<|blank_{n}|>' for n in range(2, 81)]


def train_sentencepiece(family: str, vocab_size: int = 900) -> bytes:
    """A small SentencePiece model with the id layout of the family's real tokenizer."""
    import sentencepiece as spm
    lines = [line for line in CORPUS.replace('\\n', '\n').splitlines() if line.strip()] * 4
    common = dict(model_type='bpe', vocab_size=vocab_size, hard_vocab_limit=False, byte_fallback=True,
                  split_digits=True, character_coverage=1.0, add_dummy_prefix=True,
                  remove_extra_whitespaces=False, minloglevel=2, num_threads=1)
    if family == 'glm1':
        common.update(normalization_rule_name='nmt_nfkc', unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                      pad_piece='<pad>', user_defined_symbols=GLM1_USER_SYMBOLS,
                      control_symbols=GLM1_SPECIALS)
    else:
        common.update(normalization_rule_name='identity', allow_whitespace_only_pieces=True,
                      unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, **common)
    return out.getvalue()


def glm2_config(n_words: int, family: str, hidden_size=64, num_layers=2, num_heads=4, kv_channels=16,
                groups=2, ffn_hidden_size=96, seq_length=2048, rope_ratio: Optional[float] = None,
                padded_vocab_size: Optional[int] = None, torch_dtype='float16', pre_seq_len=None,
                prefix_projection=False) -> dict:
    """config.json of a ChatGLM2/3 repo (docs/formats.md §1.3), scaled down."""
    vocab = padded_vocab_size or n_words
    cfg = {
        '_name_or_path': 'THUDM/chatglm3-6b' if family == 'glm3' else 'THUDM/chatglm2-6b',
        'model_type': 'chatglm', 'architectures': ['ChatGLMModel'],
        'auto_map': {'AutoConfig': 'configuration_chatglm.ChatGLMConfig',
                     'AutoModel': 'modeling_chatglm.ChatGLMForConditionalGeneration',
                     'AutoModelForCausalLM': 'modeling_chatglm.ChatGLMForConditionalGeneration',
                     'AutoModelForSeq2SeqLM': 'modeling_chatglm.ChatGLMForConditionalGeneration'},
        'add_bias_linear': False, 'add_qkv_bias': True, 'apply_query_key_layer_scaling': True,
        'apply_residual_connection_post_layernorm': False, 'attention_dropout': 0.0,
        'attention_softmax_in_fp32': True, 'bias_dropout_fusion': True, 'ffn_hidden_size': ffn_hidden_size,
        'fp32_residual_connection': False, 'hidden_dropout': 0.0, 'hidden_size': hidden_size,
        'kv_channels': kv_channels, 'layernorm_epsilon': 1e-05, 'multi_query_attention': True,
        'multi_query_group_num': groups, 'num_attention_heads': num_heads, 'num_layers': num_layers,
        'original_rope': True, 'padded_vocab_size': vocab, 'vocab_size': vocab, 'post_layer_norm': True,
        'rmsnorm': True, 'seq_length': seq_length, 'use_cache': True, 'torch_dtype': torch_dtype,
        'transformers_version': '4.30.2', 'tie_word_embeddings': False, 'eos_token_id': 2,
        'pad_token_id': 0, 'quantization_bit': 0, 'pre_seq_len': pre_seq_len,
        'prefix_projection': prefix_projection,
    }
    if rope_ratio is not None:
        cfg['rope_ratio'] = rope_ratio
    return cfg


def glm2_state_dict(cfg: dict, seed: int = 0, dtype=torch.float16) -> Dict[str, torch.Tensor]:
    """Random weights under the hub's key names and shapes (docs/formats.md §2.3)."""
    g = torch.Generator().manual_seed(seed)
    hidden, ffn, vocab = cfg['hidden_size'], cfg['ffn_hidden_size'], cfg['padded_vocab_size']
    q_size = cfg['num_attention_heads'] * cfg['kv_channels']
    kv_size = cfg['multi_query_group_num'] * cfg['kv_channels']

    def linear(out_f, in_f):
        return torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)

    def norm(n):
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    sd = {'transformer.embedding.word_embeddings.weight': torch.randn(vocab, hidden, generator=g),
          'transformer.rotary_pos_emb.inv_freq': 1.0 / (10000 ** (torch.arange(0, cfg['kv_channels'] // 2, 2)
                                                                 / (cfg['kv_channels'] // 2)))}
    for i in range(cfg['num_layers']):
        p = f'transformer.encoder.layers.{i}.'
        sd[p + 'input_layernorm.weight'] = norm(hidden)
        sd[p + 'self_attention.query_key_value.weight'] = linear(q_size + 2 * kv_size, hidden)
        sd[p + 'self_attention.query_key_value.bias'] = 0.1 * torch.randn(q_size + 2 * kv_size, generator=g)
        sd[p + 'self_attention.dense.weight'] = linear(hidden, q_size)
        sd[p + 'post_attention_layernorm.weight'] = norm(hidden)
        sd[p + 'mlp.dense_h_to_4h.weight'] = linear(2 * ffn, hidden)
        sd[p + 'mlp.dense_4h_to_h.weight'] = linear(hidden, ffn)
    sd['transformer.encoder.final_layernorm.weight'] = norm(hidden)
    sd['transformer.output_layer.weight'] = linear(vocab, hidden) * 4.0   # peaked logits: clear argmax
    if cfg.get('pre_seq_len'):
        kv = cfg['num_layers'] * 2 * kv_size
        sd['transformer.prefix_encoder.embedding.weight'] = torch.randn(cfg['pre_seq_len'], kv, generator=g)
        if cfg.get('prefix_projection'):
            sd['transformer.prefix_encoder.trans.0.weight'] = linear(hidden, kv)
            sd['transformer.prefix_encoder.trans.0.bias'] = torch.zeros(hidden)
            sd['transformer.prefix_encoder.trans.2.weight'] = linear(kv, hidden)
            sd['transformer.prefix_encoder.trans.2.bias'] = torch.zeros(kv)
    return {k: v.to(dtype) for k, v in sd.items()}


def glm1_config(special_ids: Dict[str, int], vocab_size: int, hidden_size=64, num_layers=2, num_heads=4,
                inner_hidden_size=160, max_sequence_length=2048, pre_seq_len=None,
                prefix_projection=False) -> dict:
    """config.json of the ChatGLM-6B repo (docs/formats.md §1.1), scaled down; special ids from the SP model."""
    return {
        '_name_or_path': 'THUDM/chatglm-6b', 'model_type': 'chatglm', 'architectures': ['ChatGLMModel'],
        'auto_map': {'AutoConfig': 'configuration_chatglm.ChatGLMConfig',
                     'AutoModel': 'modeling_chatglm.ChatGLMForConditionalGeneration',
                     'AutoModelForSeq2SeqLM': 'modeling_chatglm.ChatGLMForConditionalGeneration'},
        'bos_token_id': special_ids['<sop>'], 'eos_token_id': special_ids['<eop>'],
        'mask_token_id': special_ids['[MASK]'], 'gmask_token_id': special_ids['[gMASK]'],
        'pad_token_id': special_ids['<pad>'], 'hidden_size': hidden_size, 'inner_hidden_size': inner_hidden_size,
        'layernorm_epsilon': 1e-05, 'max_sequence_length': max_sequence_length, 'num_attention_heads': num_heads,
        'num_layers': num_layers, 'position_encoding_2d': True, 'torch_dtype': 'float16',
        'transformers_version': '4.23.1', 'use_cache': True, 'vocab_size': vocab_size,
        'pre_seq_len': pre_seq_len, 'prefix_projection': prefix_projection,
    }


def glm1_state_dict(cfg: dict, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random weights as the v1 hub files store them (docs/formats.md §2.1): fp16 linears, biases and inv_freq,
    fp32 LayerNorms, and a separate `lm_head.weight` equal to the word embedding."""
    g = torch.Generator().manual_seed(seed)
    hidden, inner, vocab = cfg['hidden_size'], cfg['inner_hidden_size'], cfg['vocab_size']
    head_dim = hidden // cfg['num_attention_heads']
    half, full = torch.float16, torch.float32

    def linear(out_f, in_f, gain=1.0):
        return (gain * torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)).to(half)

    def bias(n):
        return (0.1 * torch.randn(n, generator=g)).to(half)

    embedding = torch.randn(vocab, hidden, generator=g).to(half)
    sd = {'transformer.word_embeddings.weight': embedding}
    for i in range(cfg['num_layers']):
        p = f'transformer.layers.{i}.'
        sd[p + 'input_layernorm.weight'] = (1.0 + 0.1 * torch.randn(hidden, generator=g)).to(full)
        sd[p + 'input_layernorm.bias'] = (0.1 * torch.randn(hidden, generator=g)).to(full)
        sd[p + 'attention.rotary_emb.inv_freq'] = (1.0 / (10000 ** (torch.arange(0, head_dim // 2, 2).float()
                                                                    / (head_dim // 2)))).to(half)
        sd[p + 'attention.query_key_value.weight'] = linear(3 * hidden, hidden)
        sd[p + 'attention.query_key_value.bias'] = bias(3 * hidden)
        # Gains so the branches compete with the alpha-scaled residual: a random model whose output
        # is just its input token would make the greedy tests trivial.
        sd[p + 'attention.dense.weight'] = linear(hidden, hidden, gain=12.0)
        sd[p + 'attention.dense.bias'] = bias(hidden)
        sd[p + 'post_attention_layernorm.weight'] = (1.0 + 0.1 * torch.randn(hidden, generator=g)).to(full)
        sd[p + 'post_attention_layernorm.bias'] = (0.1 * torch.randn(hidden, generator=g)).to(full)
        sd[p + 'mlp.dense_h_to_4h.weight'] = linear(inner, hidden)
        sd[p + 'mlp.dense_h_to_4h.bias'] = bias(inner)
        sd[p + 'mlp.dense_4h_to_h.weight'] = linear(hidden, inner, gain=12.0)
        sd[p + 'mlp.dense_4h_to_h.bias'] = bias(hidden)
    sd['transformer.final_layernorm.weight'] = (1.0 + 0.1 * torch.randn(hidden, generator=g)).to(full)
    sd['transformer.final_layernorm.bias'] = (0.1 * torch.randn(hidden, generator=g)).to(full)
    if cfg.get('pre_seq_len'):
        kv = cfg['num_layers'] * 2 * hidden
        if cfg.get('prefix_projection'):
            sd['transformer.prefix_encoder.embedding.weight'] = torch.randn(cfg['pre_seq_len'], hidden,
                                                                            generator=g).to(half)
            sd['transformer.prefix_encoder.trans.0.weight'] = linear(hidden, hidden)
            sd['transformer.prefix_encoder.trans.0.bias'] = bias(hidden)
            sd['transformer.prefix_encoder.trans.2.weight'] = linear(kv, hidden)
            sd['transformer.prefix_encoder.trans.2.bias'] = bias(kv)
        else:
            sd['transformer.prefix_encoder.embedding.weight'] = torch.randn(cfg['pre_seq_len'], kv,
                                                                            generator=g).to(half)
    sd['lm_head.weight'] = embedding.clone()
    return sd


def quantize_state_dict(sd: Dict[str, torch.Tensor], family: str, bits: int) -> Dict[str, torch.Tensor]:
    """The THUDM int8/int4 layout (docs/formats.md §2.2/§2.4): each block's four linears become int8 `weight`
    (int4: packed [out, in/2]) + fp16 `weight_scale` (+ the bias, unchanged); the rest stays float."""
    from ..quantization import quantize
    suffixes = tuple(f'.{name}.weight' for name in get_family(family).model_class().QUANTIZED_LINEARS)
    out = {}
    for key, tensor in sd.items():
        if key.endswith(suffixes) and '.layers.' in key:
            q, scale = quantize(tensor.to(torch.float16), bits)
            out[key], out[key[:-len('weight')] + 'weight_scale'] = q, scale
        else:
            out[key] = tensor
    return out


def save_shards(state_dict: Dict[str, torch.Tensor], out_dir: str, fmt: str = 'bin', shards: int = 2):
    """Write `state_dict` as the hub does: `shards` files plus an index (1 shard = a single file)."""
    from ..checkpoint import write_weights
    keys = list(state_dict)
    per = math.ceil(len(keys) / shards)
    write_weights(out_dir, [keys[i:i + per] for i in range(0, len(keys), per)], state_dict.__getitem__, fmt)


def build(out_dir: str, family: str = 'glm2', fmt: str = 'bin', shards: int = 2, seed: int = 0,
          pipeline_type: Optional[str] = None, sp_model: Optional[bytes] = None, **config_overrides) -> str:
    """Write a tiny random checkpoint of `family` ('glm1', 'glm2' or 'glm3') to `out_dir`; return it."""
    record = get_family(family)
    os.makedirs(out_dir, exist_ok=True)
    sp_model = sp_model or train_sentencepiece(family)
    if family == 'glm1':
        return _build_glm1(out_dir, fmt, shards, seed, sp_model, pipeline_type, **config_overrides)
    with open(os.path.join(out_dir, 'tokenizer.model'), 'wb') as f:
        f.write(sp_model)
    import sentencepiece as spm
    n_sp = spm.SentencePieceProcessor(model_proto=sp_model).GetPieceSize()
    n_words = n_sp + len(record.tokenizer.SPECIAL_TOKENS)
    dtype_name = config_overrides.pop('torch_dtype', 'float16')
    bits = config_overrides.pop('quantization_bit', 0)
    cfg = glm2_config(n_words, family, torch_dtype=dtype_name, **config_overrides)
    cfg['quantization_bit'] = bits
    _write_json(out_dir, 'config.json', cfg)
    tok_cfg = {'remove_space': False, 'do_lower_case': False, 'padding_side': 'left',
               'tokenizer_class': 'ChatGLMTokenizer',
               'auto_map': {'AutoTokenizer': ['tokenization_chatglm.ChatGLMTokenizer', None]}}
    if family == 'glm3':
        # Later ChatGLM3 revisions ship this chat template; it is how a directory shows it is v3.
        tok_cfg['chat_template'] = ("{% for message in messages %}{% if loop.first %}[gMASK]sop<|{{ "
                                    "message['role'] }}|>\n {{ message['content'] }}{% else %}<|{{ "
                                    "message['role'] }}|>\n {{ message['content'] }}{% endif %}{% endfor %}"
                                    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    _write_json(out_dir, 'tokenizer_config.json', tok_cfg)
    _write_json(out_dir, 'generation_config.json', {'eos_token_id': 2, 'pad_token_id': 0})
    _write_json(out_dir, 'configuration.json', {
        'framework': 'pytorch', 'task': 'chat', 'allow_remote': True,
        'model': {'type': 'chatglm2-6b'},
        'pipeline': {'type': pipeline_type or 'chatglm2_6b-text-generation'}})
    state_dict = glm2_state_dict(cfg, seed, getattr(torch, dtype_name))
    if bits:
        state_dict = quantize_state_dict(state_dict, family, bits)
    save_shards(state_dict, out_dir, fmt, shards)
    return out_dir


def _build_glm1(out_dir, fmt, shards, seed, sp_model, pipeline_type, **config_overrides) -> str:
    import sentencepiece as spm
    with open(os.path.join(out_dir, 'ice_text.model'), 'wb') as f:
        f.write(sp_model)
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    special_ids = {t: sp.PieceToId(t) for t in GLM1_SPECIALS + ['<pad>']}
    bits = config_overrides.pop('quantization_bit', 0)
    cfg = glm1_config(special_ids, config_overrides.pop('vocab_size', sp.GetPieceSize()), **config_overrides)
    if bits:
        cfg.update(quantization_bit=bits, quantization_embeddings=False)
    _write_json(out_dir, 'config.json', cfg)
    _write_json(out_dir, 'tokenizer_config.json', {
        'name_or_path': 'THUDM/chatglm-6b', 'bos_token': '<sop>', 'eos_token': '<eop>', 'end_token': '</s>',
        'gmask_token': '[gMASK]', 'mask_token': '[MASK]', 'pad_token': '<pad>', 'unk_token': '<unk>',
        'remove_space': False, 'do_lower_case': False, 'num_image_tokens': 0, 'padding_side': 'left',
        'tokenizer_class': 'ChatGLMTokenizer',
        'auto_map': {'AutoTokenizer': ['tokenization_chatglm.ChatGLMTokenizer', None]}})
    _write_json(out_dir, 'configuration.json', {
        'framework': 'pytorch', 'task': 'chat', 'allow_remote': True, 'model': {'type': 'chatglm6b'},
        'pipeline': {'type': pipeline_type or 'chatglm6b-text-generation'}})
    state_dict = glm1_state_dict(cfg, seed)
    if bits:
        state_dict = quantize_state_dict(state_dict, 'glm1', bits)
    save_shards(state_dict, out_dir, fmt, shards)
    return out_dir


def _write_json(out_dir, name, data):
    with open(os.path.join(out_dir, name), 'w', encoding='utf-8') as f:
        json.dump(data, f, indent=2, ensure_ascii=False)


def build_lora(out_dir: str, base_dir: str, rank: int = 4, seed: int = 0,
               targets=('query_key_value',)) -> str:
    """A random LoRA adapter for the ChatGLM2/3 checkpoint in `base_dir`, as peft writes one (adapter_config.json
    and adapter_model.safetensors over each block's `targets`, by default query_key_value, peft's default for
    ChatGLM): how to try `--adapter` offline."""
    import torch
    from safetensors.torch import save_file
    with open(os.path.join(base_dir, 'config.json'), encoding='utf-8') as f:
        cfg = json.load(f)
    if 'num_layers' not in cfg:
        raise ValueError(f'{base_dir} is not a ChatGLM2/3 checkpoint (its LoRA targets are another module)')
    hidden, heads, ffn = cfg['hidden_size'], cfg['num_attention_heads'], cfg['ffn_hidden_size']
    head_dim = cfg.get('kv_channels') or hidden // heads
    groups = cfg.get('multi_query_group_num', heads) if cfg.get('multi_query_attention') else heads
    shapes = {'query_key_value': ('self_attention', (heads + 2 * groups) * head_dim, hidden),   # (parent, out, in)
              'dense': ('self_attention', hidden, heads * head_dim),
              'dense_h_to_4h': ('mlp', 2 * ffn, hidden), 'dense_4h_to_h': ('mlp', hidden, ffn)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg['num_layers']):
        for target in targets:
            parent, out_features, in_features = shapes[target]
            module = f'base_model.model.transformer.encoder.layers.{layer}.{parent}.{target}'
            tensors[f'{module}.lora_A.weight'] = torch.randn(rank, in_features, generator=g) / in_features ** 0.5
            tensors[f'{module}.lora_B.weight'] = torch.randn(out_features, rank, generator=g) * 0.5
    os.makedirs(out_dir, exist_ok=True)
    _write_json(out_dir, 'adapter_config.json', {'peft_type': 'LORA', 'r': rank, 'lora_alpha': 2 * rank,
                                                  'target_modules': list(targets), 'lora_dropout': 0.0,
                                                  'bias': 'none', 'task_type': 'CAUSAL_LM'})
    save_file(tensors, os.path.join(out_dir, 'adapter_model.safetensors'))
    return out_dir


def cache_dir() -> str:
    """Where the demo's checkpoints are kept: $MODELSCOPE_CHATGLM_CACHE, else ~/.cache/modelscope_chatglm."""
    return os.environ.get('MODELSCOPE_CHATGLM_CACHE') or os.path.join(
        os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'modelscope_chatglm')


def demo_checkpoint(family: str) -> str:
    """The offline demo's tiny checkpoint (`modelscope-chatglm demo`, a Ray deployment without a model),
    built once per cache dir (a marker file says it is complete)."""
    path = os.path.join(cache_dir(), f'demo-{family}-tiny')
    if not os.path.exists(os.path.join(path, '.complete')):
        build(path, family=family, fmt='safetensors', shards=2, seed=0)
        open(os.path.join(path, '.complete'), 'w').close()
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] + ' With --lora-for BASE: a random LoRA '
                                 'adapter for the tiny checkpoint BASE instead (to try --adapter offline).')
    ap.add_argument('out_dir')
    ap.add_argument('--lora-for', metavar='BASE', help='write a LoRA adapter for this tiny ChatGLM2/3 checkpoint')
    ap.add_argument('--family', default='glm2', choices=list(FAMILIES))
    ap.add_argument('--format', default='bin', choices=['bin', 'safetensors'])
    ap.add_argument('--shards', type=int, default=2)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--quantization-bit', type=int, default=0, choices=[0, 4, 8])
    args = ap.parse_args(argv)
    if args.lora_for:
        print(build_lora(args.out_dir, args.lora_for, seed=args.seed))
        return
    print(build(args.out_dir, args.family, args.format, args.shards, args.seed,
                quantization_bit=args.quantization_bit))


if __name__ == '__main__':
    main()
