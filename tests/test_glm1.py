"""ChatGLM-6B (first generation) against ModelScope's reference `models/nlp/chatglm`, and its formats."""
import json
import os
import shutil

import pytest
import torch
from parity import run_parity

import modelscope_chatglm
from modelscope_chatglm import CheckpointError
from modelscope_chatglm.testing import tiny
from modelscope_chatglm.chat_formats import GLM1Format


def test_chatglm6b_matches_reference(glm1_model, glm1_dir, reference):
    ref = run_parity(glm1_model, glm1_dir, reference)
    assert len(set(ref['greedy'])) > 1    # the tiny model says more than one token over and over


def test_chatglm6b_ptuning_prefix_matches_reference(tmp_path, glm1_sp, reference):
    model_dir = tiny.build(str(tmp_path / 'prefix'), 'glm1', 'bin', shards=2, seed=4, sp_model=glm1_sp,
                           pre_seq_len=3)
    model = modelscope_chatglm.load(model_dir, device='cpu', dtype='float32')
    run_parity(model, model_dir, reference, with_chat=False)


def test_pipeline_chat_matches_reference(glm1_dir, reference):
    from modelscope.pipelines import pipeline   # modelscope_chatglm, imported above, registered with it
    from modelscope.utils.constant import Tasks
    cfg = json.load(open(os.path.join(glm1_dir, 'configuration.json')))
    assert cfg['model']['type'] == 'chatglm6b' and cfg['pipeline']['type'] == 'chatglm6b-text-generation'
    queries = ['你好', '介绍下清华大学']
    ref = reference({'model_dir': glm1_dir, 'family': 'glm1',
                     'cases': [{'kind': 'chat', 'name': 'chat', 'queries': queries, 'max_new_tokens': 16}]})
    pipe = pipeline(task=Tasks.chat, model=glm1_dir)
    assert type(pipe).__module__.startswith('modelscope_chatglm')
    history = []
    for query, expected in zip(queries, ref['chat']):
        out = pipe({'text': query, 'history': history}, max_new_tokens=16, do_sample=False)
        assert out['response'] == expected
        history = out['history']
    assert [h[0] for h in history] == queries


def test_tokenizer_matches_reference(glm1_model, glm1_dir, reference):
    texts = ['a' + ' ' * n + 'b' for n in range(1, 86)] + [
        ' ' * 85, ' ' * 163, 'tab\there\t\tx', 'line1\nline2\n\n\nline3', '👋🎉 emoji 😀',
        '全角，标点！：；？（）', 'mixed中英文ABC123混合', '  leading and trailing  ', 'code:\n    if x:\n\treturn']
    ref = reference({'model_dir': glm1_dir, 'family': 'glm1',
                     'cases': [{'kind': 'tokenize', 'name': 't', 'texts': texts}]})
    for text, (ids, decoded) in zip(texts, ref['t']):
        assert glm1_model.tokenizer.encode(text) == ids, repr(text)
        assert glm1_model.tokenizer.decode(ids) == decoded, repr(text)


def test_whitespace_placeholders(glm1_model):
    tok = glm1_model.tokenizer
    blank = {n: tok.sp.PieceToId(f'<|blank_{n}|>') for n in (2, 5, 80)}
    assert blank[80] in tok.encode('x' + ' ' * 85) and blank[5] in tok.encode('x' + ' ' * 85)
    assert tok.sp.PieceToId('<|tab|>') in tok.encode('a\tb') and tok.sp.PieceToId('<n>') in tok.encode('a\nb')
    for text in ('a' + ' ' * 85 + 'b', 'x\ty\n\nz', ' ' * 2):
        assert tok.decode(tok.encode(text)) == text
    # NFKC folds full-width punctuation, as the real ice_text model does.
    assert tok.decode(tok.encode('你好，世界！')) == '你好,世界!'


def test_prompt_format_and_defaults(glm1_model):
    tok = glm1_model.tokenizer
    assert glm1_model.build_inputs('你好') == tok.encode('你好') + [tok['[gMASK]'], tok['<sop>']]
    ids = glm1_model.build_inputs('再见', [('你好', '你好！'), ('hi', 'hello')])
    text = '[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：hi\n答：hello\n[Round 2]\n问：再见\n答：'
    assert ids == tok.encode(text) + [tok['[gMASK]'], tok['<sop>']]
    d = glm1_model.defaults
    assert (d.max_length, d.top_p, d.temperature, d.do_sample) == (2048, 0.7, 0.95, True)
    assert list(d.stop_ids) == [tok['<eop>']]
    assert tok.decode(tok.encode('你好') + [tok['<eop>']]) == '你好'   # <eop> is a control piece


def test_response_postprocessing():
    assert GLM1Format().parse_text('  你好,我是ChatGLM!真的吗?是的:好;  ', []).text == '你好，我是ChatGLM！真的吗？是的：好；'
    assert GLM1Format().parse_text('Hello, world! a:b', []).text == 'Hello, world! a:b'     # ASCII context stays ASCII
    assert GLM1Format().parse_text('训练于[[训练时间]]', []).text == '训练于2023年'


def test_batched_generation_equals_one_by_one(glm1_model):
    prompts = [glm1_model.build_inputs(q) for q in ('你好', '介绍下清华大学和北京大学的历史', 'hi')]
    batched = glm1_model.generate_batch(prompts, max_new_tokens=8, do_sample=False)
    assert batched == [glm1_model.generate(p, max_new_tokens=8, do_sample=False) for p in prompts]


def test_image_token_offset_of_early_revisions(tmp_path, glm1_dir):
    """Pre-slim tokenizers add num_image_tokens (20000 by default) to every id."""
    d = tmp_path / 'preslim'
    shutil.copytree(glm1_dir, d)
    cfg = json.load(open(d / 'config.json'))
    tok_cfg = json.load(open(d / 'tokenizer_config.json'))
    tok_cfg['num_image_tokens'] = 20
    json.dump(tok_cfg, open(d / 'tokenizer_config.json', 'w'))
    with pytest.raises(CheckpointError, match='disagree on special ids'):
        modelscope_chatglm.load(str(d))
    for key in ('bos_token_id', 'eos_token_id', 'mask_token_id', 'gmask_token_id', 'pad_token_id'):
        cfg[key] += 20
    json.dump(cfg, open(d / 'config.json', 'w'))
    with pytest.raises(CheckpointError, match='has only'):   # the embedding must grow too
        modelscope_chatglm.load(str(d))
    cfg['vocab_size'] += 20
    json.dump(cfg, open(d / 'config.json', 'w'))
    emb = 'transformer.word_embeddings.weight'
    index = json.load(open(d / 'pytorch_model.bin.index.json'))['weight_map']
    for key in (emb, 'lm_head.weight'):
        shard = d / index[key]
        tensors = torch.load(shard, weights_only=True)
        tensors[key] = torch.cat([torch.randn(20, tensors[key].shape[1]).half(), tensors[key]])
        torch.save(tensors, shard)
    shifted = modelscope_chatglm.load(str(d), device='cpu', dtype='float32')
    plain = modelscope_chatglm.load(glm1_dir, device='cpu', dtype='float32')
    assert shifted.tokenizer.encode('你好') == [i + 20 for i in plain.tokenizer.encode('你好')]
    assert shifted.tokenizer.decode(shifted.tokenizer.encode('你好 hi')) == '你好 hi'
    ids = shifted.build_inputs('你好')
    assert torch.allclose(shifted.logits(ids)[0, :, 20:], plain.logits(plain.build_inputs('你好'))[0], atol=1e-5)


def test_family_and_configuration(glm1_dir):
    assert modelscope_chatglm.load(glm1_dir).family == 'glm1'
    from modelscope_chatglm import yaml_configs
    spec = yaml_configs.read(yaml_configs.find('chatglm-6b'))
    assert spec.family == 'glm1' and spec.model == 'ZhipuAI/ChatGLM-6B' and spec.context_length == 2048


def test_placeholders_the_model_spells_decode_as_the_reference_does(glm1_model, glm1_dir, reference):
    """The model can spell a placeholder piece by piece; only the ones the reference restores (2 to 80
    spaces, tab, newline) become whitespace. '<|blank_99999999999|>' decoded to 10^11 spaces
    (MemoryError) before, and '<|blank_1|>' to one space where the reference keeps the text."""
    tok = glm1_model.tokenizer
    spelled = ['<|blank_1|>', '<|blank_2|>', '<|blank_80|>', '<|blank_81|>', '<|blank_0|>', '<|blank_007|>',
               '<|blank_99999999999|>', '<|tab|>', '<n>', 'a<|blank_12|>b<n']
    ids = [[i + tok.offset for i in tok.sp.EncodeAsIds(s)] for s in spelled]   # raw pieces, no placeholders
    assert all(len(i) > 1 for i in ids)
    ref = reference({'model_dir': glm1_dir, 'family': 'glm1', 'cases': [{'kind': 'decode', 'name': 'd', 'ids': ids}]})
    assert [tok.decode(i) for i in ids] == ref['d']
    assert ref['d'][2] == ' ' * 80 and ref['d'][6] == '<|blank_99999999999|>'


def test_a_completion_prompt_without_gmask_and_sop_is_the_callers_error(glm1_model):
    """/v1/completions with token ids that ChatGLM-6B cannot take (no [gMASK], no <sop>) was a 500
    server_error from inside the engine; it is an InputError (a 400) when the request is prepared."""
    from modelscope_chatglm.errors import InputError
    with pytest.raises(InputError, match=r'\[gMASK\]'):
        glm1_model.prepare_completion([5, 6, 7], max_new_tokens=2)
    ids = glm1_model.tokenizer.encode('hello')
    whole = ids + [glm1_model.model.cfg.gmask_token_id, glm1_model.model.cfg.bos_token_id]
    assert glm1_model.prepare_completion(whole, max_new_tokens=2).input_ids == whole
