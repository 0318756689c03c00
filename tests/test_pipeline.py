"""The real ModelScope `pipeline(task=Tasks.chat, ...)`, registry and Model API over tiny checkpoints."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import modelscope_chatglm  # noqa: F401  (registers with ModelScope)
from modelscope.models import Model
from modelscope.pipelines import pipeline
from modelscope.utils.constant import Tasks

GREEDY = dict(max_new_tokens=8, do_sample=False)


@pytest.fixture(scope='module')
def pipe(glm2_dir):
    return pipeline(task=Tasks.chat, model=glm2_dir)


def test_hub_directory_naming_builtin_types_is_served_by_us(glm2_dir, glm2_model, pipe):
    cfg = json.load(open(os.path.join(glm2_dir, 'configuration.json')))
    assert cfg['pipeline']['type'] == 'chatglm2_6b-text-generation' and cfg['model']['type'] == 'chatglm2-6b'
    assert type(pipe).__name__ == 'ChatPipeline' and type(pipe).__module__.startswith('modelscope_chatglm')
    history = []
    for query in ('你好', '介绍下清华大学', 'and then?'):
        out = pipe({'text': query, 'history': history}, **GREEDY)
        expected, expected_history = glm2_model.chat(query, history, **GREEDY)
        assert out == {'response': expected, 'history': expected_history}
        assert isinstance(out['history'], list) and all(isinstance(h, tuple) for h in out['history'])
        history = out['history']
    assert len(history) == 3


def test_empty_history_stays_a_list(pipe):
    out = pipe({'text': '你好', 'history': []}, **GREEDY)
    assert isinstance(out['history'], list) and out['history'][0][0] == '你好'


def test_messages_input(glm3_dir):
    pipe = pipeline(task=Tasks.chat, model=glm3_dir)
    messages = [{'role': 'system', 'content': 'You are ChatGLM3.'},
                {'role': 'user', 'content': '你好'}]
    out = pipe({'messages': messages}, **GREEDY)
    assert out['history'][:2] == messages and out['history'][2]['role'] == 'assistant'
    assert out['history'][2]['content'] == out['response']


def test_generation_options_at_call_time(pipe):
    short = pipe({'text': '你好', 'history': []}, max_new_tokens=2, do_sample=False)
    longer = pipe({'text': '你好', 'history': []}, max_new_tokens=12, do_sample=False)
    assert longer['response'].startswith(short['response'])
    s1 = pipe({'text': '你好', 'history': []}, max_new_tokens=12, do_sample=True, temperature=1.3, seed=1)
    s2 = pipe({'text': '你好', 'history': []}, max_new_tokens=12, do_sample=True, temperature=1.3, seed=1)
    assert s1 == s2
    # The built-in pipeline's input-dict options work, as they do there.
    prompt = len(pipe.chat_model.build_inputs('你好'))
    from_dict = pipe({'text': '你好', 'history': [], 'do_sample': False, 'max_length': prompt + 2})
    assert from_dict['response'] == short['response']
    assert pipe({'text': '你好', 'history': [], 'do_sample': False, 'max_length': prompt + 12}) == longer
    sampled = [pipe({'text': '你好', 'history': [], 'temperature': t, 'top_p': 0.9}, max_new_tokens=12, seed=5)
               for t in (0.05, 1.9)]
    assert sampled[0]['response'] == longer['response'] != sampled[1]['response']   # near-greedy vs hot
    with pytest.raises(ValueError, match='beam search is not supported'):
        pipe({'text': 'hi', 'history': [], 'num_beams': 4})


@pytest.mark.parametrize('data,match', [
    ({'history': []}, 'lacks "text"'),
    ({'text': 42, 'history': []}, '"text" must be a string'),
    ({'text': 'hi', 'history': 'oops'}, '"history" must be a list'),
    ({'text': 'hi', 'history': [['a']]}, r'history\[0\]'),
    ({'txt': 'hi'}, r"unknown input key\(s\) \['txt'\]"),
    (42, 'chat input must be a dict'),
    ({'messages': [{'role': 'assistant', 'content': 'x'}]}, 'last message must come from the user'),
])
def test_bad_input_is_a_value_error_naming_the_fix(pipe, data, match):
    with pytest.raises(ValueError, match=match):
        pipe(data, **GREEDY)


def test_bad_call_options(pipe):
    with pytest.raises(ValueError, match='unknown pipeline argument'):
        pipe({'text': 'hi', 'history': []}, max_tokens=3)
    with pytest.raises(ValueError, match='beam search is not supported'):
        pipe({'text': 'hi', 'history': []}, num_beams=4)


def test_yaml_configuration_by_path_and_by_name(glm2_dir, glm2_model, tmp_path, monkeypatch):
    yaml_path = tmp_path / 'tiny-chat.yaml'
    yaml_path.write_text(f'model: {glm2_dir}\nfamily: glm2\ndtype: float32\ncontext_length: 512\n'
                         'generation: {do_sample: false, max_new_tokens: 8}\n')
    by_path = pipeline(task=Tasks.chat, model=str(yaml_path))
    expected, _ = glm2_model.chat('你好', **GREEDY)
    assert by_path({'text': '你好', 'history': []})['response'] == expected
    assert by_path.chat_model.context_length == 512
    monkeypatch.setenv('MODELSCOPE_CHATGLM_CONFIG_PATH', str(tmp_path))
    by_name = pipeline(task=Tasks.chat, model='tiny-chat')
    assert by_name({'text': '你好', 'history': []})['response'] == expected
    assert modelscope_chatglm.load('tiny-chat').context_length == 512


@pytest.mark.parametrize('text,needle', [
    # an alias bomb: a few lines that expand to 9**9 values once walked
    ('a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nmodel: *b\n', 'aliases'),
    ('model: m\ncontext_length: abc\n', 'context_length must be a whole number'),
    ('model: m\ncontext_length: -5\n', 'context_length must be a whole number'),
    ('model: m\ncontext_length: true\n', 'context_length must be a whole number'),
    ('model: m\ngeneration: hello\n', 'generation must be a mapping'),
    ('model: m\ngeneration: {top_p: {deep: 1}}\n', 'generation must be a mapping'),
    ('model: [1, 2]\n', 'model must be a string'),
    ('model: m\nquantization_bit: 3\n', 'quantization_bit must be 4, 8 or null'),
    ('model: m\nfamily: glm9\n', 'family must be glm1, glm2 or glm3'),
    ('model: m\ndtype: [float16]\n', 'dtype must be a string'),
    ('model: m\nint8_activations: maybe\n', 'int8_activations must be true or false'),
    ('model: m\n  bad: [indent\n', 'not valid YAML'),
])
def test_a_broken_configuration_is_refused_naming_the_field(tmp_path, text, needle):
    """Each wrong field is named before anything loads; an alias bomb is refused at once."""
    import time
    from modelscope_chatglm import yaml_configs
    path = tmp_path / 'broken.yaml'
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=needle):
        yaml_configs.read(str(path))
    assert time.perf_counter() - start < 1


def test_shipped_configurations_are_valid():
    from modelscope_chatglm import yaml_configs
    found = yaml_configs.available()
    assert {'chatglm2-6b', 'chatglm2-6b-32k', 'chatglm3-6b', 'chatglm3-6b-32k'} <= set(found)
    for name, path in found.items():
        spec = yaml_configs.read(path)
        assert spec.family in ('glm1', 'glm2', 'glm3') and spec.model.count('/') == 1, name
        assert spec.context_length and spec.revision, name


def test_directory_without_pipeline_type_and_allow_remote(glm2_dir, tmp_path):
    """A hub configuration.json with allow_remote/plugins and no pipeline type: routed to us, and no
    repository code runs, so trust_remote_code is not needed."""
    d = tmp_path / 'm'
    shutil.copytree(glm2_dir, d)
    (d / 'configuration.json').write_text(json.dumps(
        {'framework': 'pytorch', 'task': 'chat', 'allow_remote': True, 'plugins': ['modelscope_chatglm']}))
    pipe = pipeline(task=Tasks.chat, model=str(d))
    assert pipe({'text': '你好', 'history': []}, **GREEDY)['response'] is not None


def test_explicit_pipeline_name_and_model_objects(glm2_dir, glm2_model):
    p = pipeline(task=Tasks.chat, model=glm2_dir, pipeline_name='modelscope-chatglm')
    expected, _ = glm2_model.chat('你好', **GREEDY)
    assert p({'text': '你好', 'history': []}, **GREEDY)['response'] == expected
    # ModelScope's own Model API keeps its gate for allow_remote repos (the hub's ChatGLM repos set it).
    ms_model = Model.from_pretrained(glm2_dir, device='cpu', trust_remote_code=True)
    assert type(ms_model).__name__ == 'ChatGLMForChat'
    p = pipeline(task=Tasks.chat, model=ms_model)
    assert p({'text': '你好', 'history': []}, **GREEDY)['response'] == expected
    p = pipeline(task=Tasks.chat, model=glm2_model, pipeline_name='modelscope-chatglm')
    assert p({'text': '你好', 'history': []}, **GREEDY)['response'] == expected


def test_stream_through_the_pipeline(pipe):
    deltas = list(pipe.stream({'text': '你好', 'history': []}, **GREEDY))
    full = pipe({'text': '你好', 'history': []}, **GREEDY)
    assert ''.join(deltas).strip() == full['response'] == pipe.last['response']


def test_interleaved_streams_keep_their_own_results(pipe):
    a, b = pipe.stream({'text': '你好', 'history': []}, **GREEDY), pipe.stream({'text': 'hello', 'history': []}, **GREEDY)
    deltas = {'a': [], 'b': []}
    for da, db in zip(a, b):                     # both advance in turn
        deltas['a'].append(da)
        deltas['b'].append(db)
    deltas['a'] += list(a)
    deltas['b'] += list(b)
    assert a.last['response'] == pipe({'text': '你好', 'history': []}, **GREEDY)['response']
    assert b.last['response'] == pipe({'text': 'hello', 'history': []}, **GREEDY)['response']
    assert a.last['history'][0][0] == '你好' and b.last['history'][0][0] == 'hello'


def test_import_is_light_and_registers_lazily():
    code = ('import sys, modelscope_chatglm; '
            'heavy = [m for m in ("transformers", "datasets", "modelscope.pipelines") if m in sys.modules]; '
            'print(heavy)')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == '[]', out.stdout + out.stderr


def test_the_registration_happens_whichever_is_imported_first():
    """Imported before ModelScope, the package registers when ModelScope is imported (importing it here
    would import torch); imported after, at once."""
    check = ('from modelscope.utils.import_utils import LazyImportModule; '
             'from modelscope.utils.ast_utils import INDEX_KEY, MODULE_KEY; '
             'print(LazyImportModule.get_ast_index()[INDEX_KEY][("PIPELINES", "chat", "chatglm2_6b-text-generation")]'
             '[MODULE_KEY])')
    for first in ('import modelscope_chatglm; import modelscope', 'import modelscope; import modelscope_chatglm'):
        out = subprocess.run([sys.executable, '-c', f'{first}; {check}'], capture_output=True, text=True, check=True)
        assert out.stdout.strip().splitlines()[-1] == 'modelscope_chatglm.modelscope_plugin.pipeline', first
