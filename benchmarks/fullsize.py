"""A checkpoint with the real ChatGLM2-6B shapes and random fp16 weights, in the hub layout, for the
benchmark scripts: 28 layers, hidden 4096, ffn 13696, 2 K/V groups, vocab 65024 (about 12.5 GB); or
as many full-width layers as `layers` says (a quicker checkpoint with the same per-layer shapes).

Written shard by shard (4 layers each), so building it never holds more than one shard; a `.complete`
marker makes later calls reuse it.
"""
import json
import math
import os

import torch

LAYERS, HIDDEN, FFN, VOCAB, QKV = 28, 4096, 13696, 65024, 4608
LAYERS_PER_SHARD = 4


def build(path: str, fmt: str = 'bin', device: str = 'cpu', layers: int = LAYERS) -> None:
    """fmt 'bin' (pytorch_model-*.bin) or 'safetensors'; the random numbers are drawn on `device`."""
    from modelscope_chatglm.testing import tiny
    if os.path.exists(os.path.join(path, '.complete')):
        return
    os.makedirs(path, exist_ok=True)
    open(os.path.join(path, 'tokenizer.model'), 'wb').write(tiny.train_sentencepiece('glm2'))
    cfg = tiny.glm2_config(1000, 'glm2', hidden_size=HIDDEN, num_layers=layers, num_heads=32, kv_channels=128,
                           groups=2, ffn_hidden_size=FFN, seq_length=32768, padded_vocab_size=VOCAB)
    json.dump(cfg, open(os.path.join(path, 'config.json'), 'w'), indent=2)
    json.dump({'padding_side': 'left'}, open(os.path.join(path, 'tokenizer_config.json'), 'w'))
    json.dump({'framework': 'pytorch', 'task': 'chat'}, open(os.path.join(path, 'configuration.json'), 'w'))
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=None):
        t = torch.randn(*shape, generator=g, device=device)
        return (t / math.sqrt(shape[-1]) if scale is None else t * scale).half().cpu()

    def ones(n):
        return torch.ones(n, dtype=torch.float16)

    shards, weight_map = math.ceil(layers / LAYERS_PER_SHARD), {}
    for s in range(shards):
        sd = {}
        if s == 0:
            sd['transformer.embedding.word_embeddings.weight'] = rand(VOCAB, HIDDEN, scale=1.0)
        for i in range(s * LAYERS_PER_SHARD, min(layers, (s + 1) * LAYERS_PER_SHARD)):
            p = f'transformer.encoder.layers.{i}.'
            sd[p + 'input_layernorm.weight'] = ones(HIDDEN)
            sd[p + 'self_attention.query_key_value.weight'] = rand(QKV, HIDDEN)
            sd[p + 'self_attention.query_key_value.bias'] = rand(QKV, scale=0.02)
            sd[p + 'self_attention.dense.weight'] = rand(HIDDEN, HIDDEN)
            sd[p + 'post_attention_layernorm.weight'] = ones(HIDDEN)
            sd[p + 'mlp.dense_h_to_4h.weight'] = rand(2 * FFN, HIDDEN)
            sd[p + 'mlp.dense_4h_to_h.weight'] = rand(HIDDEN, FFN)
        if s == shards - 1:
            sd['transformer.encoder.final_layernorm.weight'] = ones(HIDDEN)
            sd['transformer.output_layer.weight'] = rand(VOCAB, HIDDEN)
        if fmt == 'safetensors':
            from safetensors.torch import save_file
            name = f'model-{s + 1:05d}-of-{shards:05d}.safetensors'
            save_file(sd, os.path.join(path, name), metadata={'format': 'pt'})
        else:
            name = f'pytorch_model-{s + 1:05d}-of-{shards:05d}.bin'
            torch.save(sd, os.path.join(path, name))
        weight_map.update({key: name for key in sd})
        print(f'  wrote {name}', flush=True)
    index = 'model.safetensors.index.json' if fmt == 'safetensors' else 'pytorch_model.bin.index.json'
    json.dump({'metadata': {}, 'weight_map': weight_map}, open(os.path.join(path, index), 'w'), indent=2)
    open(os.path.join(path, '.complete'), 'w').close()
