"""Loading real hub-layout directories, and the errors a broken download gives."""
import json
import os
import shutil

import pytest
import torch

import modelscope_chatglm
from modelscope_chatglm import CheckpointError
from modelscope_chatglm.testing import tiny
from modelscope_chatglm.checkpoint import weight_files
from modelscope_chatglm.loading import load_config
from modelscope_chatglm.model_config import detect_family


@pytest.fixture
def copy_of(tmp_path):
    def copy(src):
        dst = tmp_path / 'model'
        shutil.copytree(src, dst)
        return str(dst)
    return copy


@pytest.mark.parametrize('fmt,shards', [('bin', 1), ('bin', 3), ('safetensors', 1), ('safetensors', 2)])
def test_every_hub_layout_loads(make_checkpoint, fmt, shards):
    model_dir = make_checkpoint(f'layout-{fmt}-{shards}', 'glm2', fmt, shards=shards, seed=5)
    files, index = weight_files(model_dir)
    assert len(files) == shards and bool(index) == (shards > 1)
    model = modelscope_chatglm.load(model_dir, device='cpu', dtype='float32')
    # Weights arrive exactly: the fp16 values stored in the shards, upcast.
    stored = {}
    for f in files:
        stored.update(torch.load(f, weights_only=True) if fmt == 'bin' else __import__(
            'safetensors.torch', fromlist=['load_file']).load_file(f))
    qkv = stored['transformer.encoder.layers.1.self_attention.query_key_value.weight']
    assert torch.equal(model.model.layers[1].self_attention.query_key_value.weight, qkv.float())
    assert torch.equal(model.model.output_layer.weight, stored['transformer.output_layer.weight'].float())


def test_missing_shard_names_the_file(glm2_dir, copy_of):
    d = copy_of(glm2_dir)
    os.remove(os.path.join(d, 'pytorch_model-00002-of-00003.bin'))
    with pytest.raises(CheckpointError, match=r'pytorch_model-00002-of-00003\.bin is missing.*download'):
        modelscope_chatglm.load(d, device='cpu')


@pytest.mark.parametrize('fmt,name', [('bin', 'pytorch_model-00001-of-00002.bin'),
                                      ('safetensors', 'model-00002-of-00002.safetensors')])
def test_truncated_shard_names_the_file(make_checkpoint, copy_of, fmt, name):
    d = copy_of(make_checkpoint(f'trunc-{fmt}', 'glm2', fmt, shards=2))
    path = os.path.join(d, name)
    with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError, match=rf'{name} could not be read.*truncated or corrupt'):
        modelscope_chatglm.load(d, device='cpu')


def test_wrong_dtype_names_file_and_key(glm2_dir, copy_of):
    d = copy_of(glm2_dir)
    index = json.load(open(os.path.join(d, 'pytorch_model.bin.index.json')))['weight_map']
    key = 'transformer.encoder.final_layernorm.weight'
    shard = os.path.join(d, index[key])
    tensors = torch.load(shard, weights_only=True)
    tensors[key] = tensors[key].to(torch.int64)
    torch.save(tensors, shard)
    with pytest.raises(CheckpointError, match=rf'{os.path.basename(shard)}: {key} is stored as torch.int64'):
        modelscope_chatglm.load(d, device='cpu')


def test_shape_mismatch_with_config(glm2_dir, copy_of):
    d = copy_of(glm2_dir)
    cfg = json.load(open(os.path.join(d, 'config.json')))
    cfg['ffn_hidden_size'] += 8
    json.dump(cfg, open(os.path.join(d, 'config.json'), 'w'))
    with pytest.raises(CheckpointError, match=r'dense_h_to_4h.weight has shape .* config.json implies'):
        modelscope_chatglm.load(d, device='cpu')


def test_tokenizer_config_mismatch_names_both_files(glm2_dir, copy_of):
    d = copy_of(glm2_dir)
    cfg = json.load(open(os.path.join(d, 'config.json')))
    cfg['padded_vocab_size'] = 300   # an embedding smaller than the tokenizer
    json.dump(cfg, open(os.path.join(d, 'config.json'), 'w'))
    with pytest.raises(CheckpointError, match=r'tokenizer.model has \d+ tokens \(with specials\) .*config.json has only 300 rows'):
        modelscope_chatglm.load(d, device='cpu')


def test_missing_files_are_named(glm2_dir, copy_of):
    d = copy_of(glm2_dir)
    os.remove(os.path.join(d, 'tokenizer.model'))
    with pytest.raises(CheckpointError, match=r'tokenizer.model is missing'):
        modelscope_chatglm.load(d, device='cpu')
    os.remove(os.path.join(d, 'config.json'))
    with pytest.raises(CheckpointError, match=r'config.json is missing'):
        modelscope_chatglm.load(d, device='cpu')
    for f in os.listdir(d):
        if 'pytorch_model' in f:
            os.remove(os.path.join(d, f))
    with pytest.raises(CheckpointError, match=r'no weights in'):
        weight_files(d)


def test_corrupt_tokenizer_and_config(glm2_dir, copy_of):
    d = copy_of(glm2_dir)
    open(os.path.join(d, 'tokenizer.model'), 'wb').write(b'not a sentencepiece model')
    with pytest.raises(CheckpointError, match=r'tokenizer.model is not a valid SentencePiece model'):
        modelscope_chatglm.load(d, device='cpu')
    open(os.path.join(d, 'config.json'), 'w').write('{"num_layers": 2,')
    with pytest.raises(CheckpointError, match=r'config.json is not valid JSON'):
        modelscope_chatglm.load(d, device='cpu')


def test_weights_of_another_variant_are_rejected(glm2_dir, copy_of):
    d = copy_of(glm2_dir)
    cfg = json.load(open(os.path.join(d, 'config.json')))
    cfg['num_layers'] = 1   # the shards still hold layer 1
    json.dump(cfg, open(os.path.join(d, 'config.json'), 'w'))
    with pytest.raises(CheckpointError, match=r'holds weights this model does not have.*layers\.1\.'):
        modelscope_chatglm.load(d, device='cpu')


def test_family_detection(glm2_dir, glm3_dir, copy_of, tmp_path):
    assert load_config(glm2_dir).family == 'glm2'
    assert load_config(glm3_dir).family == 'glm3'     # via the chat template naming <|user|>
    d = copy_of(glm2_dir)
    cfg = json.load(open(os.path.join(d, 'config.json')))
    # The hub's remote code file names the role tokens in v3 repos.
    open(os.path.join(d, 'tokenization_chatglm.py'), 'w').write('role_tokens = ["<|user|>"]\n')
    assert detect_family(d, cfg) == 'glm3'
    os.remove(os.path.join(d, 'tokenization_chatglm.py'))
    assert detect_family(d, dict(cfg, _name_or_path='THUDM/chatglm3-6b-32k')) == 'glm3'
    assert detect_family(d, dict(cfg, _name_or_path='THUDM/chatglm2-6b')) == 'glm2'
    with pytest.raises(CheckpointError, match='does not describe a ChatGLM model'):
        detect_family(d, {'model_type': 'llama'})


def test_load_allocates_once_and_in_the_target_dtype(glm2_dir):
    model = modelscope_chatglm.load(glm2_dir, device='cpu', dtype='bfloat16')
    dtypes = {p.dtype for p in model.model.parameters()}
    assert dtypes == {torch.bfloat16}
    assert all(p.device.type == 'cpu' for p in model.model.parameters())


def test_bad_device_and_dtype(glm2_dir):
    with pytest.raises(ValueError, match='unknown dtype'):
        modelscope_chatglm.load(glm2_dir, device='cpu', dtype='int3')
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match='no(ne)? .*use device="cpu"|sees none'):
            modelscope_chatglm.load(glm2_dir, device='cuda')


def test_not_a_model(tmp_path):
    with pytest.raises(CheckpointError, match='neither a local directory, a hub id'):
        modelscope_chatglm.load('no-such-model-anywhere')
    f = tmp_path / 'x.bin'
    f.write_bytes(b'')
    with pytest.raises(CheckpointError, match='is a file'):
        modelscope_chatglm.load(str(f))
    with pytest.raises(FileNotFoundError, match='does not exist; known configurations'):
        modelscope_chatglm.load(str(tmp_path / 'missing.yaml'))


def test_tiny_builder_writes_the_hub_layout(tmp_path):
    d = tiny.build(str(tmp_path / 'm'), family='glm3', fmt='safetensors', shards=2)
    names = set(os.listdir(d))
    assert {'config.json', 'configuration.json', 'tokenizer.model', 'tokenizer_config.json',
            'model.safetensors.index.json', 'model-00001-of-00002.safetensors',
            'model-00002-of-00002.safetensors'} <= names
    cfg = json.load(open(os.path.join(d, 'config.json')))
    assert cfg['model_type'] == 'chatglm' and cfg['multi_query_attention'] is True
