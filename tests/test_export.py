"""`export`: a hub-layout checkpoint that holds exactly what `load(M, adapter=A, quantization_bit=B)`
computes, which we and the reference implementation load (the oracle in .venv-ref); a GGUF that llama.cpp
runs as we run the model (llama-cpp-python: .ci/run builds it); and the exports that are refused.
"""
import json
import os

import numpy as np
import pytest
import torch
from conftest import missing_optional
from parity import TOL
from test_adapters import ptuning_checkpoint

import modelscope_chatglm
from modelscope_chatglm import CheckpointError
from modelscope_chatglm.checkpoint import WEIGHT_LAYOUTS, read_shard
from modelscope_chatglm.cli import main as cli
from modelscope_chatglm.errors import ExportError
from modelscope_chatglm.export import export, export_gguf
from modelscope_chatglm.models.base import left_pad
from modelscope_chatglm.testing import tiny

QUERIES = ['你好，请介绍一下你自己。', 'tell me about the weather in Beijing today']


def load(path, **options):
    return modelscope_chatglm.load(path, device='cpu', dtype='float32', int8_activations=False, **options)


def prompts_of(chat):
    # Short prompts (< 64 rows): the head's rows then take the compiled kernel whatever the head's dtype
    # (docs/quantization.md), so logits of an fp16 and an fp32 copy of the same values are bit for bit equal.
    prompts = [chat.build_inputs(q) for q in QUERIES]
    assert all(len(p) < 64 for p in prompts)
    return prompts


def assert_same_model(ours, exported):
    """The exported model's weights, logits and greedy replies are exactly those of `ours`."""
    a, b = ours.model.state_dict(), exported.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].double(), b[key].double()), key      # the same values
        if exported.config.torch_dtype == ours.config.torch_dtype:
            assert a[key].dtype == b[key].dtype, key                     # and, built alike, the same dtypes
    for prompt in prompts_of(ours):
        assert torch.equal(ours.logits(prompt), exported.logits(prompt))
        assert ours.generate(prompt, max_new_tokens=16, do_sample=False, stop_ids=[]) == \
            exported.generate(prompt, max_new_tokens=16, do_sample=False, stop_ids=[])
    assert ours.chat(QUERIES[0], do_sample=False, max_new_tokens=12) == \
        exported.chat(QUERIES[0], do_sample=False, max_new_tokens=12)


def reference_difference(ours, exported_dir, reference):
    """The reference implementation on the exported directory against our model: max |logit diff| over a
    left-padded batch; its greedy tokens must be ours."""
    prompts = prompts_of(ours)
    ref = reference({'model_dir': exported_dir, 'family': 'glm1' if ours.family == 'glm1' else 'glm2', 'cases': [
        {'kind': 'logits', 'name': 'batch', 'prompts': prompts},
        {'kind': 'greedy', 'name': 'greedy', 'prompt': prompts[0], 'max_new_tokens': 16}]})
    ids, mask = left_pad(prompts, ours.tokenizer.pad_id)
    diff = (ours.logits(ids, mask) - ref['batch'])[mask.bool()].abs().max().item()
    return diff, ref['greedy'] == ours.generate(prompts[0], max_new_tokens=16, do_sample=False)


@pytest.fixture(scope='module')
def adapters(glm2_dir, glm3_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp('export-adapters')
    return {
        'lora-glm2': tiny.build_lora(str(root / 'lora-glm2'), glm2_dir, seed=1),
        'lora-glm3-all': tiny.build_lora(str(root / 'lora-glm3'), glm3_dir, rank=8, seed=2,
                                         targets=('query_key_value', 'dense', 'dense_h_to_4h', 'dense_4h_to_h')),
        'ptuning-glm2': ptuning_checkpoint(glm2_dir, str(root / 'checkpoint-100'), 'glm2', 6, True, seed=3),
    }


# (case, base, adapter, bits, weights format, largest shard in bytes, run the reference too)
CASES = [
    ('glm2 + LoRA, bin shards', 'glm2_dir', 'lora-glm2', 0, 'bin', 60_000, True),
    ('glm2 + LoRA, int4', 'glm2_dir', 'lora-glm2', 4, 'safetensors', 10 ** 9, True),
    ('glm3 + LoRA on every linear, int8', 'glm3_dir', 'lora-glm3-all', 8, 'safetensors', 30_000, True),
    ('glm3, int4', 'glm3_dir', None, 4, 'bin', 10 ** 9, False),
    ('glm1', 'glm1_dir', None, 0, 'safetensors', 10 ** 9, False),
    ('glm1, int4', 'glm1_dir', None, 4, 'bin', 40_000, True),
    ('glm2 + P-tuning v2', 'glm2_dir', 'ptuning-glm2', 0, 'safetensors', 10 ** 9, True),
]


@pytest.mark.parametrize('case,base,adapter,bits,fmt,shard_bytes,with_reference', CASES, ids=[c[0] for c in CASES])
def test_the_export_holds_what_load_computes(case, base, adapter, bits, fmt, shard_bytes, with_reference, request,
                                             adapters, reference, tmp_path):
    source = request.getfixturevalue(base)
    adapter = adapters[adapter] if adapter else None
    out = export(source, str(tmp_path / 'out'), adapter=adapter, quantization_bit=bits or None,
                 weights_format=fmt, max_shard_bytes=shard_bytes)
    ours = load(source, adapter=adapter, quantization_bit=bits or None)
    exported = load(out)
    assert_same_model(ours, exported)

    # The hub's layout: the weight files (sharded with their index), the tokenizer and the rest copied.
    files = set(os.listdir(out))
    source_files = {f for f in os.listdir(source) if not f.endswith(('.bin', '.safetensors', '.index.json'))}
    assert source_files <= files and {'config.json', 'tokenizer_config.json', 'configuration.json'} <= files
    single, _, index = WEIGHT_LAYOUTS[fmt]
    if shard_bytes < 10 ** 9:
        weight_map = json.load(open(os.path.join(out, index)))['weight_map']
        shards = sorted(set(weight_map.values()))
        assert len(shards) > 1 and files - {single, index} >= set(shards)
        for shard in shards:   # within the limit, or one tensor larger than it alone
            tensors = read_shard(os.path.join(out, shard))
            assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= shard_bytes
    else:
        assert single in files and index not in files
    config = json.load(open(os.path.join(out, 'config.json')))
    assert config.get('quantization_bit', 0) == bits
    if bits:   # THUDM's int4/int8 blocks: int8 weights (int4: two per byte) and a scale per row
        q = exported.model.layers[0].mlp.dense_h_to_4h
        assert type(q).__name__ == 'QuantizedLinear' and q.bits == bits
        assert q.weight.dtype == torch.int8 and q.weight.shape[1] == q.in_features * bits // 8
    if adapter and 'ptuning' in adapter:
        assert (config['pre_seq_len'], config['prefix_projection']) == (6, True)
    # A merged LoRA's sums are float32 (so are ChatGLM-6B's LayerNorms); config.json then says so, for the
    # loaders that build the model in its torch_dtype; the other tensors keep the checkpoint's fp16.
    stored = {key: t.dtype for name in files if name.endswith(('.bin', '.safetensors'))
              for key, t in read_shard(os.path.join(out, name)).items()}
    assert config['torch_dtype'] == ('float32' if adapter and 'lora' in adapter or 'glm1' in base else 'float16')
    assert (torch.float32 in stored.values()) == (config['torch_dtype'] == 'float32')
    embedding = 'transformer.word_embeddings.weight' if 'glm1' in base else 'transformer.embedding.word_embeddings.weight'
    assert stored[embedding] == torch.float16

    if with_reference:
        diff, same_greedy = reference_difference(ours, out, reference)
        print(f'\n[export {case}] max |logit diff| vs the reference on the exported dir: {diff:.3g}')
        # int8/int4: our kernels scale each row's integer sums, the reference multiplies by the dequantized
        # matrix: the same products summed in another order (tests/test_quantization.py allows 5e-3).
        assert diff < (10 * TOL if bits else TOL) and same_greedy


def test_a_wrong_export_fails_these_checks(glm2_dir, adapters, reference, tmp_path):
    """The checks above can fail: an export without the adapter is not the model, and one whose config.json
    says float16 over float32 sums is ours exactly but not the reference's (it builds in fp16)."""
    lora = adapters['lora-glm2']
    ours = load(glm2_dir, adapter=lora, quantization_bit=4)
    plain = export(glm2_dir, str(tmp_path / 'plain'), quantization_bit=4)
    with pytest.raises(AssertionError):
        assert_same_model(ours, load(plain))
    wrong = export(glm2_dir, str(tmp_path / 'fp16-config'), adapter=lora, quantization_bit=4)
    config = json.load(open(os.path.join(wrong, 'config.json')))
    json.dump(dict(config, torch_dtype='float16'), open(os.path.join(wrong, 'config.json'), 'w'))
    assert_same_model(ours, load(wrong))
    diff, _ = reference_difference(ours, wrong, reference)
    assert diff > 10 * TOL, diff


def test_the_cli_exports_and_names_what_is_wrong(glm2_dir, adapters, tmp_path, capsys):
    out = str(tmp_path / 'merged')
    assert cli(['export', '--model', glm2_dir, '--adapter', adapters['lora-glm2'], '--quantize', '8',
                '--format', 'bin', '--max-shard-size', '50KB', '--out', out]) == 0
    assert f'wrote {out} in ' in capsys.readouterr().err
    assert os.path.exists(os.path.join(out, 'pytorch_model.bin.index.json'))
    assert_same_model(load(glm2_dir, adapter=adapters['lora-glm2'], quantization_bit=8), load(out))
    for args, needle in (
            (['--out', out], f'--out {out} is a directory that is not empty; choose a new path, or pass --force'),
            (['--gguf', str(tmp_path / 'x.gguf'), '--quantize', '4'], "--quantize shape a hub-layout export (--out "
                                                                      "DIR); a GGUF's quantization is --gguf-type"),
            (['--out', str(tmp_path / 'y'), '--gguf-type', 'q8_0'], '--gguf-type is for --gguf FILE'),
            (['--out', str(tmp_path / 'z'), '--adapter', 'a', '--adapter', 'b'], 'give one --adapter PATH')):
        assert cli(['export', '--model', glm2_dir, *args]) == 2
        assert needle in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(['export', '--model', glm2_dir, '--out', out, '--max-shard-size', 'lots'])
    assert 'a size like 2GB, 500MB or 1GiB' in capsys.readouterr().err


def test_an_existing_destination_is_refused_unless_forced(glm2_dir, tmp_path):
    out = tmp_path / 'out'
    export(glm2_dir, str(out))
    (out / 'stale.txt').write_text('from an earlier export')
    with pytest.raises(ExportError, match='is a directory that is not empty; choose a new path, or pass --force'):
        export(glm2_dir, str(out), quantization_bit=4)
    export(glm2_dir, str(out), quantization_bit=4, force=True)      # replaces the whole model directory
    assert not (out / 'stale.txt').exists() and json.load(open(out / 'config.json'))['quantization_bit'] == 4
    # --force replaces a model directory, never just any directory; nor the model or adapter it reads.
    other = tmp_path / 'notes'
    other.mkdir()
    (other / 'todo.txt').write_text('keep me')
    with pytest.raises(ExportError, match='holds files but no config.json: it is not a model directory'):
        export(glm2_dir, str(other), force=True)
    assert (other / 'todo.txt').read_text() == 'keep me'
    for target in (glm2_dir, os.path.dirname(glm2_dir)):
        with pytest.raises(ExportError, match='would replace the model it exports'):
            export(glm2_dir, target, force=True)
    (tmp_path / 'file').write_text('x')
    with pytest.raises(ExportError, match='exists and is not a directory'):
        export(glm2_dir, str(tmp_path / 'file'))
    gguf_file = tmp_path / 'model.gguf'
    gguf_file.write_text('an older file')
    with pytest.raises(ExportError, match='is a file that exists; choose a new path, or pass --force'):
        export_gguf(glm2_dir, str(gguf_file))
    with pytest.raises(ExportError, match='is a directory; give the path of the .gguf file'):
        export_gguf(glm2_dir, str(other))


def test_a_failed_export_leaves_nothing_behind(glm2_dir, tmp_path, monkeypatch):
    from modelscope_chatglm.export import hub
    out = tmp_path / 'out'
    export(glm2_dir, str(out))
    before = sorted(os.listdir(out))

    def fail(*args):
        raise OSError('disk full')
    monkeypatch.setattr(hub, 'write_weights', fail)
    with pytest.raises(OSError, match='disk full'):
        export(glm2_dir, str(out), quantization_bit=4, force=True)
    assert sorted(os.listdir(out)) == before and os.listdir(tmp_path) == ['out']   # no partial directory


def test_what_an_export_cannot_hold_is_refused_with_the_way_out(glm1_dir, glm2_dir, adapters, make_checkpoint,
                                                              tmp_path):
    int4 = make_checkpoint('export-int4', 'glm2', 'bin', shards=2, quantization_bit=4)
    with pytest.raises(ExportError, match=r'pre-quantized \(int4\) checkpoint: a LoRA over it runs beside .* '
                                          r'Export from the fp16 checkpoint instead: --adapter A with --quantize 4'):
        export(int4, str(tmp_path / 'a'), adapter=adapters['lora-glm2'])
    with pytest.raises(CheckpointError, match='holds int4 weights; it cannot be loaded as int8'):
        export(int4, str(tmp_path / 'b'), quantization_bit=8)
    with pytest.raises(ExportError, match='llama.cpp has no architecture for it .* Export it in the hub layout'):
        export_gguf(glm1_dir, str(tmp_path / 'glm1.gguf'))
    with pytest.raises(ExportError, match='P-tuning v2 prefix .* which llama.cpp cannot run'):
        export_gguf(glm2_dir, str(tmp_path / 'pt.gguf'), adapter=adapters['ptuning-glm2'])
    with pytest.raises(ExportError, match='holds int4 weights .* --gguf-type f32 writes them dequantized exactly'):
        export_gguf(int4, str(tmp_path / 'q.gguf'), gguf_type='q8_0')
    with pytest.raises(ExportError, match='export them one at a time'):
        export(glm2_dir, str(tmp_path / 'c'), adapter={'a': adapters['lora-glm2']})
    with pytest.raises(ValueError, match="unknown GGUF type 'q5_k'"):
        export_gguf(glm2_dir, str(tmp_path / 'd.gguf'), gguf_type='q5_k')
    assert sorted(os.listdir(tmp_path)) == []   # nothing written by any of them


# -- GGUF ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def gguf():
    return pytest.importorskip('gguf', reason='the gguf package (extra [export]) is not installed')


@pytest.fixture(scope='module')
def ggufs(gguf, glm2_dir, glm3_dir, adapters, make_checkpoint, tmp_path_factory):
    """name -> (GGUF path, the model it was exported from, as we load it)."""
    root = tmp_path_factory.mktemp('gguf')
    long2 = make_checkpoint('export-glm2-32k', 'glm2', 'bin', shards=1, rope_ratio=16)   # positions / 16
    long3 = make_checkpoint('export-glm3-32k', 'glm3', 'bin', shards=1, rope_ratio=50)   # base * 50
    made = {}
    for name, source, adapter, kind in (('glm2+lora f32', glm2_dir, adapters['lora-glm2'], 'f32'),
                                        ('glm3 f16', glm3_dir, None, 'f16'),
                                        ('glm2-32k f32', long2, None, 'f32'),
                                        ('glm3-32k f32', long3, None, 'f32'),
                                        ('glm2 q8_0', glm2_dir, None, 'q8_0'),
                                        ('glm3 q4_0', glm3_dir, None, 'q4_0')):
        path = export_gguf(source, str(root / f'{name.replace(" ", "-")}.gguf'), adapter=adapter, gguf_type=kind)
        made[name] = (path, load(source, adapter=adapter))
    return made


def gguf_weights(gguf, path):
    """{GGUF tensor name: (type, float32 array in the shape of ours)} of a GGUF file."""
    held = {}
    for t in gguf.GGUFReader(path).tensors:
        array = gguf.quants.dequantize(t.data, t.tensor_type)
        held[t.name] = (t.tensor_type.name, np.array(array, dtype=np.float32).reshape(tuple(reversed(t.shape))))
    return held


def expected_names(chat):
    """Our parameter -> its GGUF name: llama.cpp's chatglm names, written out (not the code under test)."""
    names = {'word_embeddings.weight': 'token_embd.weight', 'final_layernorm.weight': 'output_norm.weight',
             'output_layer.weight': 'output.weight'}
    per_layer = {'input_layernorm.weight': 'attn_norm.weight', 'self_attention.query_key_value.weight':
                 'attn_qkv.weight', 'self_attention.query_key_value.bias': 'attn_qkv.bias',
                 'self_attention.dense.weight': 'attn_output.weight', 'post_attention_layernorm.weight':
                 'ffn_norm.weight', 'mlp.dense_h_to_4h.weight': 'ffn_up.weight', 'mlp.dense_4h_to_h.weight':
                 'ffn_down.weight'}
    for i in range(chat.config.num_layers):
        names.update({f'layers.{i}.{ours}': f'blk.{i}.{theirs}' for ours, theirs in per_layer.items()})
    return names


@pytest.mark.parametrize('name', ['glm2+lora f32', 'glm3 f16', 'glm2 q8_0', 'glm3 q4_0'])
def test_the_gguf_holds_the_weights_names_and_metadata_llama_cpp_reads(name, ggufs, gguf):
    path, chat = ggufs[name]
    kind = name.split()[-1]
    reader = gguf.GGUFReader(path)
    field = {k: f.contents() for k, f in reader.fields.items()}
    cfg, tok = chat.config, chat.tokenizer
    assert field['general.architecture'] == 'chatglm'
    assert field['general.file_type'] == {'f32': 0, 'f16': 1, 'q4_0': 2, 'q8_0': 7}[kind]
    assert (field['chatglm.block_count'], field['chatglm.embedding_length'], field['chatglm.feed_forward_length'],
            field['chatglm.attention.head_count'], field['chatglm.attention.head_count_kv'],
            field['chatglm.rope.dimension_count'], field['chatglm.context_length']) == \
        (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim // 2,
         cfg.seq_length)
    assert field['chatglm.rope.freq_base'] == 10000.0 and field['tokenizer.ggml.add_bos_token'] is False
    # The vocabulary: one token per embedding row; SentencePiece pieces with their scores and types, then the
    # specials (control), as llama.cpp's ChatGLM3 converter writes them.
    tokens, scores, types = (field[f'tokenizer.ggml.{k}'] for k in ('tokens', 'scores', 'token_type'))
    assert field['tokenizer.ggml.model'] == 'llama' and len(tokens) == len(scores) == len(types) == cfg.vocab_size
    sp, kinds = tok.sp, gguf.TokenType
    assert tokens[:3] == ['<unk>', '<bos>', '<eos>']   # (renamed as the converter does)
    for i in range(3, tok.num_sp_pieces):
        piece_type = kinds.BYTE if sp.IsByte(i) else kinds.CONTROL if sp.IsControl(i) else kinds.NORMAL
        assert (tokens[i], types[i], scores[i]) == (sp.IdToPiece(i), piece_type, pytest.approx(sp.GetScore(i))), i
    assert types[3] == kinds.BYTE and tokens[3] == '<0x00>' and types[tok.encode('你好')[-1]] == kinds.NORMAL
    for special, j in tok.special_ids.items():
        assert (tokens[j], types[j]) == (special, kinds.CONTROL)
    assert field['tokenizer.ggml.eos_token_id'] == tok.eos_id
    if chat.family == 'glm3':   # a reply also ends at <|user|> and <|observation|>, and the chat template is there
        assert (field['tokenizer.ggml.eot_token_id'], field['tokenizer.ggml.eom_token_id']) == \
            (tok['<|user|>'], tok['<|observation|>'])
        assert '[gMASK]sop<|' in field['tokenizer.chat_template']
    else:
        assert 'tokenizer.ggml.eot_token_id' not in field and 'tokenizer.chat_template' not in field
    # The tensors: llama.cpp's names, our shapes, vectors in f32, matrices in the file's type, and our weights
    # (f32 exactly, f16 rounded once, q8_0 / q4_0 within half a quantization step of each block).
    held = gguf_weights(gguf, path)
    names = expected_names(chat)
    assert sorted(held) == sorted(names.values())
    # ggml's rounding: q8_0 scales a block by max|x| / 127 (an fp16 scale: a little over half a step off at
    # most), q4_0 by max / -8 with the far end clamped to 7 (a whole step, max / 8).
    bound = {'f32': 0, 'f16': 0, 'q8_0': 0.6 / 127, 'q4_0': 1.05 / 8}[kind]
    for ours, theirs in names.items():
        weight = chat.model.state_dict()[ours].float()
        stored_type, value = held[theirs]
        assert value.shape == tuple(weight.shape), theirs
        assert stored_type == ('F32' if weight.dim() == 1 else kind.upper()), theirs
        if weight.dim() == 1 or kind == 'f32':
            assert np.array_equal(value, weight.numpy()), theirs
        elif kind == 'f16':
            assert np.array_equal(value, weight.half().float().numpy()), theirs
        else:
            blocks = weight.reshape(-1, 32)
            error = (torch.from_numpy(value).reshape(-1, 32) - blocks).abs()
            assert (error <= blocks.abs().max(dim=1, keepdim=True).values * bound + 1e-6).all(), theirs


# -- llama.cpp itself --------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        missing_optional('llama-cpp-python is not installed (.ci/run builds it from the sdist)',
                         'CHATGLM_REQUIRE_LLAMACPP')
    return llama_cpp


class Llama:
    """llama.cpp on one GGUF: logits of every position, greedy continuation."""

    def __init__(self, llama_cpp, path):
        # The K/V cache in f32, as ours: llama.cpp's default f16 cache alone moves these logits by up to 0.05.
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=512, logits_all=True, verbose=False, n_threads=2,
                                   type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)

    def logits(self, ids):
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[:len(ids)])

    def greedy(self, ids, n):
        self.llm.reset()
        self.llm.eval(ids)
        out = []
        for _ in range(n):
            out.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            self.llm.eval([out[-1]])
        return out

    def close(self):
        self.llm.close()   # (at interpreter exit, llama-cpp-python's own cleanup finds its library gone)


def long_prompt(chat):
    return chat.build_inputs('你好，请介绍一下你自己。' + ' The quick brown fox jumps over the lazy dog.' * 5)


@pytest.mark.parametrize('name', ['glm2+lora f32', 'glm3 f16', 'glm2-32k f32', 'glm3-32k f32'])
def test_llama_cpp_continues_greedily_as_we_do(name, ggufs, llama_cpp):
    """The same prompt ids, llama.cpp on the GGUF and our model: the same greedy tokens (LoRA merged; the
    32K models' two rope_ratio meanings), logits within float rounding (f16: llama.cpp also rounds the
    activations to f16 for f16 weights)."""
    path, chat = ggufs[name]
    llm = Llama(llama_cpp, path)
    prompt = long_prompt(chat)
    diff = np.abs(llm.logits(prompt) - chat.logits(prompt)[0].numpy()).max()
    theirs = llm.greedy(prompt, 24)
    llm.close()
    print(f'\n[llama.cpp {name}] max |logit diff| over {len(prompt)} positions: {diff:.3g}')
    assert diff < (1e-3 if name.endswith('f32') else 0.05)
    assert theirs == chat.generate(prompt, max_new_tokens=24, do_sample=False, stop_ids=[])


@pytest.mark.parametrize('name', ['glm2 q8_0', 'glm3 q4_0'])
def test_llama_cpp_runs_the_quantized_gguf_on_the_weights_it_holds(name, ggufs, llama_cpp, gguf):
    """q8_0 / q4_0: our model with the GGUF's (dequantized) weights against llama.cpp on the file: the weights
    sit where llama.cpp reads them (what is left is llama.cpp's q8_0 rounding of the activations; the fp
    weights would be about 3.7 apart at q4_0)."""
    path, chat = ggufs[name]
    held = gguf_weights(gguf, path)
    same = load(chat.model_dir)
    with torch.no_grad():
        for ours, theirs in expected_names(same).items():
            same.model.get_parameter(ours).copy_(torch.from_numpy(held[theirs][1]))
    llm = Llama(llama_cpp, path)
    prompt = long_prompt(chat)
    theirs = llm.logits(prompt)
    llm.close()
    ours = same.logits(prompt)[0].numpy()
    agree = (ours.argmax(-1) == theirs.argmax(-1)).mean()
    print(f'\n[llama.cpp {name}] max |logit diff| {np.abs(ours - theirs).max():.3g}, top-1 agreement {agree:.2f}')
    assert np.abs(ours - theirs).max() < 1.0 and agree >= 0.9


def test_llama_cpp_tokenizes_templates_and_stops_as_we_do(ggufs, llama_cpp):
    import ctypes
    path, chat = ggufs['glm3 f16']
    llm = Llama(llama_cpp, path).llm
    tok = chat.tokenizer
    for text in QUERIES + ['[Round 1]\n\n问：1234\t  spaces  ', '清华大学是一所综合性大学。']:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
    # llama.cpp recognises the chat template as its chatglm3 format: the prompt it builds is ours, id for id.
    template = llama_cpp.llama_model_chat_template(llm.model, None)
    message = (llama_cpp.llama_chat_message * 1)(llama_cpp.llama_chat_message(role=b'user', content='你好'.encode()))
    buffer = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_chat_apply_template(template, message, 1, True, buffer, len(buffer))
    assert llm.tokenize(buffer.raw[:n], add_bos=False, special=True) == chat.build_inputs('你好')
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    ends = [i for i in range(tok.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)]
    llm.close()
    assert sorted(ends) == sorted(tok.stop_ids)


def test_a_prequantized_model_goes_to_gguf_as_f32_dequantized_exactly(make_checkpoint, gguf, tmp_path):
    from modelscope_chatglm.quantization import dequantize
    int8 = make_checkpoint('export-int8', 'glm2', 'bin', shards=1, quantization_bit=8)
    path = export_gguf(int8, str(tmp_path / 'int8.gguf'), gguf_type='f32')
    chat = load(int8)
    layer = chat.model.layers[1].self_attention.query_key_value
    _, value = gguf_weights(gguf, path)['blk.1.attn_qkv.weight']
    assert np.array_equal(value, dequantize(layer.weight, layer.weight_scale, 8).numpy())


def test_the_benchmark_writes_its_gguf_with_the_package():
    """bench_vs_llamacpp.py has no GGUF writer of its own: it exports the checkpoint it benchmarks."""
    source = open(os.path.join(os.path.dirname(__file__), '..', 'benchmarks', 'bench_vs_llamacpp.py')).read()
    assert 'from modelscope_chatglm.export import export_gguf' in source
    assert 'GGUFWriter' not in source and 'add_tensor_info' not in source
