"""Our ChatGLM2/3 against ModelScope's reference implementation on the same tiny checkpoints.

Each test prints its maximum logit difference (`pytest -s` shows them; the closing notes quote them).
"""
import pytest
import torch
from parity import long_prompt, run_parity

import modelscope_chatglm

def test_chatglm2_matches_reference(glm2_model, glm2_dir, reference):
    run_parity(glm2_model, glm2_dir, reference)


def test_chatglm2_32k_position_interpolation_matches_reference(make_checkpoint, reference):
    model_dir = make_checkpoint('glm2-32k', 'glm2', 'bin', shards=2, seed=1, rope_ratio=16.0)
    model = modelscope_chatglm.load(model_dir, device='cpu', dtype='float32')
    assert model.config.rope_position_divisor == 16.0 and model.config.rope_base == 10000.0
    run_parity(model, model_dir, reference, rope='divide')


def test_chatglm3_32k_base_scaling_matches_reference(make_checkpoint, reference):
    model_dir = make_checkpoint('glm3-32k', 'glm3', 'safetensors', shards=2, seed=2, rope_ratio=50.0)
    model = modelscope_chatglm.load(model_dir, device='cpu', dtype='float32')
    assert model.family == 'glm3'
    assert model.config.rope_base == 500000.0 and model.config.rope_position_divisor == 1.0
    # The reference has no ChatGLM3 chat code; its forward with the base-scaled RoPE is the oracle.
    run_parity(model, model_dir, reference, rope='base', with_chat=False)
    # Reading rope_ratio as the v2 divisor instead would be silently wrong: prove the test can tell.
    wrong = modelscope_chatglm.load(model_dir, device='cpu', dtype='float32', family='glm2')
    ids = long_prompt(model)
    assert (wrong.logits(ids) - model.logits(ids)).abs().max() > 1e-2


def test_ptuning_prefix_matches_reference(make_checkpoint, reference):
    model_dir = make_checkpoint('glm2-prefix', 'glm2', 'bin', shards=2, seed=3, pre_seq_len=4)
    model = modelscope_chatglm.load(model_dir, device='cpu', dtype='float32')
    run_parity(model, model_dir, reference, with_chat=False)


def test_safetensors_and_bin_checkpoints_give_identical_logits(make_checkpoint):
    bin_dir = make_checkpoint('same-bin', 'glm2', 'bin', shards=3, seed=7)
    st_dir = make_checkpoint('same-st', 'glm2', 'safetensors', shards=1, seed=7)
    a = modelscope_chatglm.load(bin_dir, device='cpu', dtype='float32')
    b = modelscope_chatglm.load(st_dir, device='cpu', dtype='float32')
    ids = a.build_inputs('你好')
    assert torch.equal(a.logits(ids), b.logits(ids))


def test_tokenizer_matches_reference(glm2_model, glm2_dir, reference):
    texts = ['你好', 'hello world', ' leading space', 'a' + ' ' * 7 + 'b', ' ' * 85, 'tab\there\t\tx',
             'line1\nline2\n\n\nline3', '👋🎉 emoji 😀', '全角，标点！：；？（）', 'mixed中英文ABC123混合',
             '[Round 1]\n\n问：你好\n\n答：', '\u3000ideographic space', 'trailing   ']
    ref = reference({'model_dir': glm2_dir, 'cases': [{'kind': 'tokenize', 'name': 't', 'texts': texts}]})
    for text, (ids, decoded) in zip(texts, ref['t']):
        assert glm2_model.tokenizer.encode(text) == ids, text
        assert glm2_model.tokenizer.decode(ids) == decoded, text


def test_bfloat16_on_cpu_stays_close_to_float32(glm2_dir):
    fp32 = modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32')
    bf16 = modelscope_chatglm.load(glm2_dir, device='cpu', dtype='bfloat16')
    assert bf16.dtype == torch.bfloat16
    ids = fp32.build_inputs('你好，请介绍一下你自己。')
    a, b = fp32.logits(ids), bf16.logits(ids)
    assert b.dtype == torch.float32
    rel = ((a - b).abs().max() / a.abs().max()).item()
    print(f'\n[bf16] max relative logit diff vs fp32: {rel:.3g}')
    assert rel < 0.05
    assert a[0, -1].argmax() == b[0, -1].argmax()


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
def test_gpu_half_precision_matches_cpu_float32(glm2_dir, dtype):
    cpu = modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32')
    gpu = modelscope_chatglm.load(glm2_dir, device='cuda', dtype=dtype)
    ids = cpu.build_inputs('你好，请介绍一下你自己。')
    rel = ((cpu.logits(ids) - gpu.logits(ids).cpu()).abs().max() / cpu.logits(ids).abs().max()).item()
    assert rel < 0.05
    assert gpu.generate(ids, max_new_tokens=8, do_sample=False) == cpu.generate(ids, max_new_tokens=8,
                                                                                  do_sample=False)
