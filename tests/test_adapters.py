"""Fine-tuned models: LoRA adapters written by peft and P-tuning v2 checkpoints as ptuning/main.py writes
them, against peft + the reference implementation (the oracle in .venv-ref); merged and unmerged, on a
quantized base, several adapters in one server, and the errors."""
import json
import os
import shutil
import threading

import pytest
import torch
from parity import TOL

import modelscope_chatglm
from modelscope_chatglm import CheckpointError
from modelscope_chatglm.models.base import left_pad

PROMPT_TEXTS = ['你好', 'tell me about the weather in Beijing today']


def prompts_of(chat):
    return [chat.build_inputs(t) for t in PROMPT_TEXTS]


def logits_of(chat, prompts):
    ids, mask = left_pad(prompts, chat.tokenizer.pad_id)
    return chat.logits(ids, mask if len(prompts) > 1 else None), mask.bool()


def compare(chat, ref, prompts, tol=TOL):
    """Our logits and greedy tokens against the oracle's; -> the max |logit diff|."""
    ours, valid = logits_of(chat, prompts)
    diff = (ours - ref['batch'])[valid].abs().max().item()
    assert diff < tol, diff
    assert chat.generate(prompts[0], max_new_tokens=16, do_sample=False) == ref['greedy']
    return diff


def cases(prompts):
    return [{'kind': 'logits', 'name': 'batch', 'prompts': prompts},
            {'kind': 'greedy', 'name': 'greedy', 'prompt': prompts[0], 'max_new_tokens': 16}]


@pytest.fixture(scope='module')
def lora(reference, glm2_dir, glm3_dir, tmp_path_factory):
    """LoRA adapters written by peft itself: ChatGLM2 with peft's default target (query_key_value) as
    safetensors; ChatGLM3 with all four block linears, rsLoRA, as an older peft's adapter_model.bin."""
    root = tmp_path_factory.mktemp('lora')
    made = {}
    for name, base, family, spec in (
            ('glm2', glm2_dir, 'glm2', dict(r=4, alpha=16, targets=['query_key_value'], safe=True, seed=1)),
            ('glm3', glm3_dir, 'glm2', dict(r=8, alpha=8, rslora=True, safe=False, seed=2,
                                            targets=['query_key_value', 'dense', 'dense_h_to_4h', 'dense_4h_to_h'])),
            ('glm2-b', glm2_dir, 'glm2', dict(r=2, alpha=4, targets=['dense_h_to_4h', 'dense_4h_to_h'], safe=True,
                                              seed=3))):
        out = str(root / name)
        reference({'model_dir': base, 'family': family, 'cases': [], 'make_lora': dict(spec, out=out)})
        made[name] = out
    assert os.path.exists(os.path.join(made['glm2'], 'adapter_model.safetensors'))
    assert os.path.exists(os.path.join(made['glm3'], 'adapter_model.bin'))
    return made


@pytest.mark.parametrize('name', ['glm2', 'glm3'])
def test_lora_matches_peft_on_the_reference(name, lora, reference, glm2_dir, glm3_dir):
    base = {'glm2': glm2_dir, 'glm3': glm3_dir}[name]
    chat = modelscope_chatglm.load(base, device='cpu', dtype='float32', adapter=lora[name])
    plain = modelscope_chatglm.load(base, device='cpu', dtype='float32')
    prompts = prompts_of(chat)
    ref = reference({'model_dir': base, 'family': 'glm2', 'cases': cases(prompts),
                     'adapter': {'kind': 'lora', 'path': lora[name]}})
    diff = compare(chat, ref, prompts)
    print(f'\n[lora {name}] max |logit diff| vs peft = {diff:.3g}')
    # The adapter changed the model (a test that an unapplied adapter would also pass proves nothing).
    assert (logits_of(plain, prompts)[0] - ref['batch']).abs().max() > 100 * TOL
    # Unmerged (the side path a quantized base and the multi-adapter server use) = merged.
    unmerged = modelscope_chatglm.load(base, device='cpu', dtype='float32', adapter=lora[name], merge_adapter=False)
    assert unmerged.model.layers[0].self_attention.query_key_value.__class__.__name__ == 'LoRALinear'
    torch.testing.assert_close(logits_of(unmerged, prompts)[0], logits_of(chat, prompts)[0], rtol=0, atol=TOL)


def test_quantize_on_load_with_lora_equals_the_reference_merged_then_quantized(lora, reference, glm3_dir, tmp_path):
    merged_dir = str(tmp_path / 'merged')
    reference({'model_dir': glm3_dir, 'family': 'glm2', 'cases': [], 'save_merged': merged_dir,
               'adapter': {'kind': 'lora', 'path': lora['glm3']}})
    for bits in (8, 4):
        ours = modelscope_chatglm.load(glm3_dir, device='cpu', dtype='float32', quantization_bit=bits,
                                       adapter=lora['glm3'])
        theirs = modelscope_chatglm.load(merged_dir, device='cpu', dtype='float32', quantization_bit=bits)
        prompts = prompts_of(ours)
        assert torch.equal(logits_of(ours, prompts)[0], logits_of(theirs, prompts)[0])


def test_lora_on_a_prequantized_base_runs_beside_the_quantized_linears(lora, make_checkpoint, tmp_path):
    """The int8 hub checkpoint of the same weights: the adapter stays unmerged next to QuantizedLinear, and
    equals merging it into the dequantized weights."""
    from test_quantization import dequantized_copy
    base = make_checkpoint('glm2-int8', 'glm2', 'bin', shards=3, quantization_bit=8)
    chat = modelscope_chatglm.load(base, device='cpu', dtype='float32', adapter=lora['glm2'], int8_activations=False)
    layer = chat.model.layers[0].self_attention.query_key_value
    assert type(layer).__name__ == 'LoRALinear' and type(layer.base).__name__ == 'QuantizedLinear'
    dense = modelscope_chatglm.load(dequantized_copy(base, str(tmp_path / 'deq'), 8), device='cpu',
                                    dtype='float32', adapter=lora['glm2'])
    prompts = prompts_of(chat)
    torch.testing.assert_close(logits_of(chat, prompts)[0], logits_of(dense, prompts)[0], rtol=0, atol=TOL)


def ptuning_checkpoint(base_dir, out, family, pre_seq_len, projection, seed):
    """What ptuning/main.py saves: checkpoint-N/ with the model's config.json (plus pre_seq_len and
    prefix_projection) and a pytorch_model.bin holding only the prefix encoder."""
    os.makedirs(out)
    config = json.load(open(os.path.join(base_dir, 'config.json')))
    config.update(pre_seq_len=pre_seq_len, prefix_projection=projection)
    json.dump(config, open(os.path.join(out, 'config.json'), 'w'))
    layers, hidden = config['num_layers'], config['hidden_size']
    kv = layers * 2 * (hidden if family == 'glm1' else config['multi_query_group_num'] * config['kv_channels'])
    g = torch.Generator().manual_seed(seed)
    p = 'transformer.prefix_encoder.'
    if not projection:
        weights = {p + 'embedding.weight': torch.randn(pre_seq_len, kv, generator=g) * 0.5}
    else:
        width = hidden if family == 'glm1' else kv   # ChatGLM-6B projects from hidden-size embeddings
        weights = {p + 'embedding.weight': torch.randn(pre_seq_len, width, generator=g) * 0.5,
                   p + 'trans.0.weight': torch.randn(hidden, width, generator=g) * 0.1,
                   p + 'trans.0.bias': torch.randn(hidden, generator=g) * 0.1,
                   p + 'trans.2.weight': torch.randn(kv, hidden, generator=g) * 0.1,
                   p + 'trans.2.bias': torch.randn(kv, generator=g) * 0.1}
    torch.save({k: v.half() for k, v in weights.items()}, os.path.join(out, 'pytorch_model.bin'))
    return out


@pytest.mark.parametrize('family,projection', [('glm2', False), ('glm2', True), ('glm1', False)])
def test_ptuning_checkpoint_matches_the_reference(family, projection, request, reference, tmp_path):
    base = request.getfixturevalue('glm1_dir' if family == 'glm1' else 'glm2_dir')
    ckpt = ptuning_checkpoint(base, str(tmp_path / 'checkpoint-1000'), family, 6, projection, seed=4)
    chat = modelscope_chatglm.load(base, device='cpu', dtype='float32', adapter=ckpt)
    assert chat.config.pre_seq_len == 6 and chat.config.prefix_projection == projection
    prompts = prompts_of(chat)
    ref = reference({'model_dir': base, 'family': family, 'cases': cases(prompts),
                     'adapter': {'kind': 'ptuning', 'path': ckpt, 'pre_seq_len': 6, 'prefix_projection': projection}})
    diff = compare(chat, ref, prompts)
    print(f'\n[p-tuning {family}, projection={projection}] max |logit diff| = {diff:.3g}')
    plain = modelscope_chatglm.load(base, device='cpu', dtype='float32')
    assert (logits_of(plain, prompts)[0] - ref['batch']).abs().max() > 100 * TOL


def test_adapters_in_one_batch_each_get_their_own_reply(lora, glm2_dir):
    many = modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32',
                                   adapter={'a': lora['glm2'], 'b': lora['glm2-b']})
    assert many.adapters == ['a', 'b']
    alone = {name: modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32', adapter=path)
             for name, path in (('a', lora['glm2']), ('b', lora['glm2-b']))}
    alone[None] = modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32')
    prompts = [many.build_inputs(f'question {i}') for i in range(6)]
    picks = ['a', 'b', None, 'b', 'a', None]
    sched = many.new_engine()
    params = many.sampling(max_new_tokens=12, do_sample=False)
    seqs = [sched.submit(p, params, adapter=name) for p, name in zip(prompts, picks)]
    sched.run_until_done(seqs)
    expected = [alone[name].generate(p, max_new_tokens=12, do_sample=False) for p, name in zip(prompts, picks)]
    assert [s.output for s in seqs] == expected
    assert len({tuple(e) for e in expected[:3]}) == 3     # the three really differ
    # The same prompt under another adapter is not a prefix-cache hit (its K/V differ).
    again = sched.submit(prompts[0], params, adapter='b')
    sched.run_until_done([again])
    assert again.reused < len(prompts[0]) - 1
    assert again.output == alone['b'].generate(prompts[0], max_new_tokens=12, do_sample=False)
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        sched.submit(prompts[0], params, adapter='c')


def test_the_multi_adapter_server_answers_each_request_with_its_adapter(lora, glm2_dir, tmp_path):
    import httpx
    from conftest import free_port, start_service
    port = free_port()
    proc = start_service(['serve', '--model', glm2_dir, '--device', 'cpu', '--dtype', 'float32', '--port', str(port),
                          '--name', 'base', '--adapter', f'a={lora["glm2"]}', '--adapter', f'b={lora["glm2-b"]}'],
                         f'http://127.0.0.1:{port}/health', tmp_path / 'server.log')
    url = f'http://127.0.0.1:{port}'
    try:
        assert [m['id'] for m in httpx.get(f'{url}/v1/models').json()['data']] == ['base', 'a', 'b']
        answers = {}
        for name, path in (('a', lora['glm2']), ('b', lora['glm2-b']), ('base', None)):
            chat = modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32', adapter=path)
            answers[name] = {i: chat.chat(f'question {i}', [], do_sample=False, max_new_tokens=10)[0] for i in range(4)}
        results, models, errors = {}, {}, []

        def ask(name, i):
            try:
                r = httpx.post(f'{url}/v1/chat/completions', timeout=120, json={
                    'model': name, 'messages': [{'role': 'user', 'content': f'question {i}'}], 'temperature': 0,
                    'max_tokens': 10})
                results[name, i] = r.json()['choices'][0]['message']['content']
                models[name, i] = r.json()['model']
            except Exception as e:   # reported below
                errors.append(repr(e))
        threads = [threading.Thread(target=ask, args=(name, i)) for name in ('a', 'b', 'base') for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors[:3]
        assert results == {(name, i): answers[name][i] for name in answers for i in range(4)}
        assert all(model == name for (name, _), model in models.items())   # a response names what answered
        r = httpx.post(f'{url}/v1/chat/completions', timeout=60, json={
            'model': 'c', 'messages': [{'role': 'user', 'content': 'hi'}]})
        assert r.status_code == 404 and "'base', 'a', 'b'" in r.json()['error']['message']
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_pipeline_yaml_and_cli_take_an_adapter(lora, glm2_dir, tmp_path):
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks
    from modelscope_chatglm.adapters import parse_specs
    tuned = modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32', adapter=lora['glm2'])
    want = tuned.chat('你好', [], do_sample=False, max_new_tokens=10)[0]
    plain = modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32').chat('你好', [], do_sample=False,
                                                                                max_new_tokens=10)[0]
    assert want != plain
    pipe = pipeline(task=Tasks.chat, model=glm2_dir, device='cpu', adapter=lora['glm2'])
    assert pipe({'text': '你好', 'history': []}, do_sample=False, max_new_tokens=10)['response'] == want
    shutil.copytree(lora['glm2'], tmp_path / 'my-lora')
    (tmp_path / 'tuned.yaml').write_text(f'model: {glm2_dir}\nadapter: ./my-lora\ndtype: float32\ndevice: cpu\n')
    from_yaml = modelscope_chatglm.load(str(tmp_path / 'tuned.yaml'))
    assert from_yaml.chat('你好', [], do_sample=False, max_new_tokens=10)[0] == want
    assert parse_specs([lora['glm2']], several=False) == lora['glm2']
    assert parse_specs(['a=x', 'b=y'], several=True) == {'a': 'x', 'b': 'y'}
    for values, several in ((['a=x'], False), (['x', 'y'], True), (['x', 'a=y'], True)):
        with pytest.raises(ValueError):
            parse_specs(values, several)


# -- errors name the file, the tensor and the fix ---------------------------------------------------------------
def write_adapter(out, config, tensors, fmt='safetensors'):
    os.makedirs(out, exist_ok=True)
    json.dump(dict({'peft_type': 'LORA', 'r': 2, 'lora_alpha': 4, 'target_modules': ['query_key_value']}, **config),
              open(os.path.join(out, 'adapter_config.json'), 'w'))
    from safetensors.torch import save_file
    save_file(tensors, os.path.join(out, 'adapter_model.safetensors'))
    return out


QKV = 'base_model.model.transformer.encoder.layers.0.self_attention.query_key_value'


def test_lora_errors_are_clear(glm2_dir, glm2_model, tmp_path):
    cfg = glm2_model.model.cfg
    out_f = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    good = {f'{QKV}.lora_A.weight': torch.randn(2, cfg.hidden_size), f'{QKV}.lora_B.weight': torch.randn(out_f, 2)}
    cases = [
        ({'peft_type': 'IA3'}, good, 'peft_type .IA3. is not supported'),
        ({'use_dora': True}, good, 'DoRA'),
        ({}, {f'{QKV}.lora_A.weight': torch.randn(2, cfg.hidden_size + 8), f'{QKV}.lora_B.weight': torch.randn(out_f, 2)},
         r'lora_A.weight \(2, 72\).*another base model'),
        ({}, {'base_model.model.transformer.output_layer.lora_A.weight': torch.randn(2, cfg.hidden_size),
              'base_model.model.transformer.output_layer.lora_B.weight': torch.randn(cfg.vocab_size, 2)},
         'not one of the GLM block linears'),
        ({}, {f'{QKV}.lora_A.weight': torch.randn(2, cfg.hidden_size)}, 'not its pair'),
    ]
    for i, (config, tensors, message) in enumerate(cases):
        path = write_adapter(str(tmp_path / f'bad{i}'), config, tensors)
        with pytest.raises(CheckpointError, match=message) as info:
            modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32', adapter=path)
        assert path in str(info.value)
    with pytest.raises(CheckpointError, match='no such directory'):
        modelscope_chatglm.load(glm2_dir, device='cpu', adapter=str(tmp_path / 'nowhere' / 'x'))
    os.makedirs(tmp_path / 'empty')
    with pytest.raises(CheckpointError, match='is not an adapter'):
        modelscope_chatglm.load(glm2_dir, device='cpu', adapter=str(tmp_path / 'empty'))


def test_ptuning_mismatches_name_both_values(glm2_dir, make_checkpoint, tmp_path):
    ckpt = ptuning_checkpoint(glm2_dir, str(tmp_path / 'ckpt'), 'glm2', 6, False, seed=5)
    config = json.load(open(os.path.join(ckpt, 'config.json')))
    config['pre_seq_len'] = 8        # the weights hold 6 rows
    json.dump(config, open(os.path.join(ckpt, 'config.json'), 'w'))
    with pytest.raises(CheckpointError, match=r'\(6, 128\).*pre_seq_len=8.*\(8, 128\)'):
        modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32', adapter=ckpt)
    with_prefix = make_checkpoint('glm2-prefix', 'glm2', 'bin', shards=2, seed=3, pre_seq_len=4)
    other = ptuning_checkpoint(with_prefix, str(tmp_path / 'other'), 'glm2', 6, False, seed=6)
    with pytest.raises(CheckpointError, match='pre_seq_len=6 but the base model.s config.json already has pre_seq_len=4'):
        modelscope_chatglm.load(with_prefix, device='cpu', dtype='float32', adapter=other)
    config = json.load(open(os.path.join(other, 'config.json')))
    config['prefix_projection'] = True
    json.dump(config, open(os.path.join(other, 'config.json'), 'w'))
    with pytest.raises(CheckpointError, match='prefix_projection=True'):
        modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32', adapter=other)


def test_fan_in_fan_out_is_ignored_for_linear_layers_as_peft_does(glm2_dir, glm2_model, tmp_path, caplog):
    """fan_in_fan_out describes Conv1D weights stored [in, out]; ChatGLM's linears are nn.Linear, for which
    peft switches it off with a warning: the same adapter with and without it gives the same model."""
    cfg = glm2_model.model.cfg
    out_f = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    g = torch.Generator().manual_seed(0)
    tensors = {f'{QKV}.lora_A.weight': torch.randn(2, cfg.hidden_size, generator=g) * 0.1,
               f'{QKV}.lora_B.weight': torch.randn(out_f, 2, generator=g) * 0.1}
    plain = write_adapter(str(tmp_path / 'plain'), {}, tensors)
    flagged = write_adapter(str(tmp_path / 'flagged'), {'fan_in_fan_out': True}, tensors)
    prompts = prompts_of(glm2_model)
    results = []
    for path in (plain, flagged):
        for merge in (True, False):
            chat = modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32', adapter=path, merge_adapter=merge)
            results.append(logits_of(chat, prompts)[0])
    assert 'fan_in_fan_out' in caplog.text
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=0, atol=TOL)
    assert (results[0] - logits_of(glm2_model, prompts)[0]).abs().max() > 100 * TOL


@pytest.mark.parametrize('flags,needle', [
    (['--adapter', 'a=/x', '--adapter', 'a=/y'], 'given twice'),
    (['--adapter', '=/x'], 'both parts non-empty'),
    (['--adapter', 'a='], 'both parts non-empty'),
])
def test_adapter_flags_that_would_hide_an_adapter_are_refused(flags, needle, capsys):
    """The same name twice (the first adapter became unreachable) or an empty part are refused, in one
    line, before anything loads."""
    from modelscope_chatglm import cli
    assert cli.main(['serve', '--model', 'unused', *flags]) == 2
    err = capsys.readouterr().err
    assert needle in err and 'Traceback' not in err


def test_an_adapter_named_like_the_served_model_is_refused(lora, glm2_dir):
    """A request naming it got the base model: the adapter was unreachable."""
    pytest.importorskip('fastapi')
    from modelscope_chatglm.serve.server import create_app
    chat = modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32', adapter={'base': lora['glm2']})
    with pytest.raises(ValueError, match="adapter name 'base' is the served model's name"):
        create_app(chat, model_name='base')


def test_a_tiny_lora_lets_a_user_try_adapters_offline(glm2_dir, glm2_model, tmp_path):
    """`python -m modelscope_chatglm.testing.tiny OUT --lora-for BASE` writes a LoRA adapter in peft's layout: it
    loads merged and unmerged alike, and changes the replies."""
    from modelscope_chatglm.testing import tiny
    out = str(tmp_path / 'lora')
    tiny.main([out, '--lora-for', glm2_dir])
    assert sorted(os.listdir(out)) == ['adapter_config.json', 'adapter_model.safetensors']
    merged = modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32', adapter=out)
    served = modelscope_chatglm.load(glm2_dir, device='cpu', dtype='float32', adapter={'tiny': out})
    greedy = dict(do_sample=False, max_new_tokens=10)
    reply = merged.chat('你好', [], **greedy)[0]
    engine = served.new_engine()
    seq = engine.submit(served.build_inputs('你好'), served.sampling(**greedy), adapter='tiny')
    engine.run_until_done([seq])
    assert served.respond(served.prepare('你好', [], **greedy), seq.output)[0] == reply
    assert reply != glm2_model.chat('你好', [], **greedy)[0]
