"""The command line, run as a user runs it (a real subprocess)."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest


def run_cli(*args, cache, stdin=None, timeout=300):
    env = dict(os.environ, MODELSCOPE_CHATGLM_CACHE=str(cache))
    return subprocess.run([sys.executable, '-m', 'modelscope_chatglm.cli', *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=timeout)


def test_demo_runs_offline_through_the_pipeline(tmp_path):
    out = run_cli('demo', cache=tmp_path)
    assert out.returncode == 0, out.stderr
    assert 'pipeline(task=Tasks.chat) -> ChatPipeline' in out.stdout
    assert out.stdout.count('user: ') == 3 and 'history has 3 turns' in out.stdout
    assert 'streaming the next reply' in out.stdout and 'done in' in out.stdout
    built = tmp_path / 'demo-glm2-tiny'
    assert (built / 'model.safetensors.index.json').exists() and (built / 'tokenizer.model').exists()
    # The second run reuses the cached checkpoint.
    mtime = (built / 'tokenizer.model').stat().st_mtime
    assert run_cli('demo', '--family', 'glm3', cache=tmp_path).returncode == 0
    assert run_cli('demo', cache=tmp_path).returncode == 0
    assert (built / 'tokenizer.model').stat().st_mtime == mtime


def test_chat_reads_stdin_and_handles_clear(glm2_dir, tmp_path):
    out = run_cli('chat', '--model', glm2_dir, '--device', 'cpu', '--max-new-tokens', '6',
                  cache=tmp_path, stdin='你好\nclear\nhello again\nexit\n')
    assert out.returncode == 0, out.stderr
    assert out.stdout.count('ChatGLM: ') == 2 and '(history cleared)' in out.stdout


def test_int8_activations_are_the_quantized_default_and_exact_is_one_flag_away(glm2_dir, tmp_path):
    out = run_cli('chat', '--model', glm2_dir, '--device', 'cpu', '--int8-activations', cache=tmp_path, stdin='exit\n')
    assert out.returncode == 2 and 'error: int8_activations applies to the int8/int4 blocks' in out.stderr
    loaded = {}
    for flag in ('', '--int8-activations', '--exact'):
        out = run_cli('chat', '--model', glm2_dir, '--device', 'cpu', '--dtype', 'float32', '--quantize', '4',
                      *filter(None, [flag]), '--max-new-tokens', '4', cache=tmp_path, stdin='你好\nexit\n')
        assert out.returncode == 0, out.stderr
        assert out.stdout.count('ChatGLM: ') == 1
        loaded[flag] = next(line for line in out.stderr.splitlines() if line.startswith('loaded ChatModel('))
    assert loaded[''].endswith(', int4 blocks, int8 activations) in ' + loaded[''].rsplit(' in ', 1)[1])
    assert ', int4 blocks, int8 activations)' in loaded['--int8-activations']
    assert ', int4 blocks)' in loaded['--exact'] and 'int8 activations' not in loaded['--exact']
    out = run_cli('chat', '--model', glm2_dir, '--exact', '--int8-activations', cache=tmp_path)
    assert out.returncode == 2 and 'not allowed with argument' in out.stderr


def test_configs_lists_the_shipped_configurations(tmp_path):
    out = run_cli('configs', cache=tmp_path)
    assert out.returncode == 0
    for name in ('chatglm2-6b', 'chatglm2-6b-32k', 'chatglm3-6b', 'chatglm3-6b-32k'):
        assert name in out.stdout


def test_errors_are_one_clear_line(tmp_path):
    out = run_cli('chat', '--model', str(tmp_path / 'nowhere'), cache=tmp_path)
    assert out.returncode == 2 and 'Traceback' not in out.stderr
    assert [line for line in out.stderr.splitlines() if line.startswith('error: ')][0].count('neither') == 1


def test_chat_in_a_real_terminal_streams_clears_and_survives_ctrl_c(glm2_dir, tmp_path):
    pexpect = __import__('pytest').importorskip('pexpect')
    env = dict(os.environ, MODELSCOPE_CHATGLM_CACHE=str(tmp_path), PYTHONUNBUFFERED='1')
    # No stop tokens: every reply runs to --max-new-tokens, so the one interrupted below is still
    # streaming when Ctrl-C comes (a random tiny model may otherwise sample its end token early).
    config = tmp_path / 'endless.yaml'
    config.write_text(f'model: {glm2_dir}\ndevice: cpu\ngeneration: {{stop_ids: []}}\n')
    # A test runner started in the background (`... &` in a script) ignores SIGINT, and a child inherits
    # that: Python then installs no KeyboardInterrupt handler. A terminal user's chat has the default.
    child = pexpect.spawn(sys.executable, ['-m', 'modelscope_chatglm.cli', 'chat', '--config', str(config),
                                           '--max-new-tokens', '1500'],
                          encoding='utf-8', timeout=120, env=env,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect('user: ')
    child.sendline('hi\\')            # a trailing backslash continues the message on the next line
    child.expect(r'\.\.\. ')
    child.sendline('there')
    child.expect('ChatGLM: ')
    child.expect('user: ')            # the whole reply arrived
    child.sendline('clear')
    child.expect(r'\(history cleared\)')
    child.expect('user: ')
    child.sendline('你好')            # this reply runs to 1500 tokens: interrupt it while it streams
    child.expect('ChatGLM: ')
    child.expect(r'\S')              # the first piece of the reply is on screen
    child.sendintr()
    child.expect(r'\[interrupted\]')
    child.expect('user: ')            # still running, back at the prompt
    child.sendline('exit')
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.parametrize('flags,needle', [
    (['--port', '99999'], 'a TCP port is 1 to 65535'),       # once bound port 34463, or an OverflowError
    (['--port', '0'], 'a TCP port is 1 to 65535'),
    (['--max-queue', '0'], '--max-queue: must be >= 1'),     # once started a server that refused everything
    (['--max-body-bytes', '0'], 'at least 1024'),
    (['--max-logprobs', '21'], '0 to 20'),
])
def test_serve_flags_that_could_never_serve_are_refused_in_one_line(flags, needle, capsys):
    from modelscope_chatglm import cli
    with pytest.raises(SystemExit) as stop:
        cli.main(['serve', '--model', 'unused', *flags])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and 'Traceback' not in err


def test_help_shows_what_each_serve_option_does(capsys):
    from modelscope_chatglm import cli
    with pytest.raises(SystemExit):
        cli.main(['serve', '--help'])
    out = capsys.readouterr().out
    for text in ('default 8000', 'default 127.0.0.1', 'default 1048576', 'hub revision', 'default 20'):
        assert text in out, text


def test_hub_ids_fail_in_one_line(tmp_path):
    """Ids that cannot be hub ids fail at once, before any network ('./x' and 'ZhipuAI/..' waited ~22 s for
    retries); a real-looking id that is not cached, offline, ends in one line saying what to do, not the
    hub client's traceback (113 lines)."""
    import time
    for model in ('./x', 'ZhipuAI/..', 'a/b/c'):
        start = time.monotonic()
        out = run_cli('chat', '--model', model, cache=tmp_path, stdin='', timeout=60)
        assert out.returncode == 2 and 'is neither a local directory, a hub id' in out.stderr
        assert time.monotonic() - start < 20 and 'Traceback' not in out.stderr
    out = run_cli('chat', '--model', 'nobody-here/no-such-model-xyz', cache=tmp_path, stdin='', timeout=120)
    assert out.returncode == 2 and 'Traceback' not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith('error: nobody-here/no-such-model-xyz') and 'modelscope download' in last
    assert len(out.stderr.strip().splitlines()) <= 8


def test_chat_refuses_a_reply_length_the_context_cannot_hold(glm2_dir, tmp_path):
    """`chat --max-new-tokens 100000` started, then failed on every turn."""
    out = run_cli('chat', '--model', glm2_dir, '--max-new-tokens', '100000', cache=tmp_path, stdin='hi\n')
    assert out.returncode == 2 and 'leaves no room for a prompt' in out.stderr and 'Traceback' not in out.stderr
    assert 'ChatGLM: ' not in out.stdout


def test_ctrl_c_while_the_model_loads_exits_without_a_traceback(glm2_dir, tmp_path):
    # The last shard is a FIFO nobody writes: loading waits there until the signal comes, however slow
    # this machine is (a tiny model otherwise loaded before a busy test sent it, and the chat began).
    checkpoint = tmp_path / 'checkpoint'
    shutil.copytree(glm2_dir, checkpoint)
    last = sorted(checkpoint.glob('pytorch_model-*.bin'))[-1]
    last.unlink()
    os.mkfifo(last)
    env = dict(os.environ, MODELSCOPE_CHATGLM_CACHE=str(tmp_path))
    # Ctrl-C's default disposition, as a terminal starts a program: a child inherits an ignored SIGINT,
    # and somewhere in the full suite the test process ignores it (the child then never heard it).
    proc = subprocess.Popen([sys.executable, '-m', 'modelscope_chatglm.cli', 'chat', '--model', str(checkpoint)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stderr.readline()                 # "loading ...": the model is being read now
        assert 'loading' in line, line
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and 'interrupted' in err and 'Traceback' not in err, err


def test_an_api_key_option_that_holds_no_key_is_refused():
    """`--api-key ,` would have started a server open to everyone."""
    from modelscope_chatglm.serve.auth import api_keys
    for value in (',', ' , ', [',', ' ']):
        with pytest.raises(ValueError, match='holds no key'):
            api_keys(value)
    assert api_keys(None) == [] and api_keys('') == [] and api_keys(['a', 'b,c']) == ['a', 'b', 'c']


# The installed `modelscope-chatglm` script, run in a fresh process that notes the OpenMP variables at the
# moment torch is first imported (libgomp reads them as torch loads it, and never again).
OPENMP_PROBE = '''
import json, os, runpy, sys
seen = []
def note(event, args):
    if event == 'import' and args[0] == 'torch' and not seen:
        seen.append({name: os.environ.get(name) for name in ('GOMP_SPINCOUNT', 'OMP_WAIT_POLICY')})
sys.addaudithook(note)
sys.argv = ['modelscope-chatglm'] + sys.argv[1:]
try:
    runpy.run_path(os.path.join(os.path.dirname(sys.executable), 'modelscope-chatglm'), run_name='__main__')
except SystemExit:
    pass
print(json.dumps(seen))
'''


def test_the_command_sets_the_openmp_spin_before_torch_loads_and_never_over_the_users(tmp_path):
    """openmp.py: our processes shorten libgomp's idle spinning; a user's own OpenMP setting always wins."""
    def at_torch_import(**user):
        env = {k: v for k, v in os.environ.items() if k not in ('GOMP_SPINCOUNT', 'OMP_WAIT_POLICY')}
        out = subprocess.run([sys.executable, '-c', OPENMP_PROBE, 'chat', '--model', str(tmp_path / 'nowhere')],
                             env=dict(env, MODELSCOPE_CHATGLM_CACHE=str(tmp_path), **user), capture_output=True,
                             text=True, timeout=300)
        assert 'is neither a local directory' in out.stderr, out.stderr[-3000:]   # (it got as far as loading)
        seen = json.loads(out.stdout.strip().splitlines()[-1])
        assert len(seen) == 1, 'torch was never imported'
        return seen[0]
    assert at_torch_import() == {'GOMP_SPINCOUNT': '10000', 'OMP_WAIT_POLICY': None}
    assert at_torch_import(GOMP_SPINCOUNT='123') == {'GOMP_SPINCOUNT': '123', 'OMP_WAIT_POLICY': None}
    assert at_torch_import(OMP_WAIT_POLICY='PASSIVE') == {'GOMP_SPINCOUNT': None, 'OMP_WAIT_POLICY': 'PASSIVE'}
