"""`modelscope-chatglm`: the command line.

    modelscope-chatglm demo                      offline: tiny random checkpoint -> ModelScope pipeline
    modelscope-chatglm chat --config chatglm3-6b interactive chat, streamed
    modelscope-chatglm configs                   the YAML configurations this install knows
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def cache_dir() -> str:
    root = os.environ.get('MODELSCOPE_CHATGLM_CACHE') or os.path.join(
        os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'modelscope_chatglm')
    return root


def demo_checkpoint(family: str) -> str:
    """The demo's tiny checkpoint, built once per cache dir (a marker file says it is complete)."""
    from . import tiny
    path = os.path.join(cache_dir(), f'demo-{family}-tiny')
    if not os.path.exists(os.path.join(path, '.complete')):
        tiny.build(path, family=family, fmt='safetensors', shards=2, seed=0)
        open(os.path.join(path, '.complete'), 'w').close()
    return path


def cmd_demo(args):
    t0 = time.time()
    path = demo_checkpoint(args.family)
    import modelscope_chatglm  # noqa: F401  (registers the pipeline)
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks
    print(f'tiny {args.family} checkpoint in the hub layout: {path} ({time.time() - t0:.1f}s)')
    print('(random weights: the replies are noise; the machinery is what is shown)\n')
    t1 = time.time()
    pipe = pipeline(task=Tasks.chat, model=path, device='cpu')
    print(f'pipeline(task=Tasks.chat) -> {type(pipe).__name__} ({time.time() - t1:.1f}s)')
    history = []
    for query in ('你好', '介绍下清华大学', 'Tell me a joke.'):
        t = time.time()
        out = pipe({'text': query, 'history': history}, max_new_tokens=args.max_new_tokens, do_sample=False)
        history = out['history']
        print(f'\nuser: {query}\nChatGLM: {out["response"]!r}   [{time.time() - t:.2f}s, '
              f'history has {len(history)} turns]')
    print('\nstreaming the next reply through pipe.stream():')
    print('ChatGLM: ', end='', flush=True)
    for delta in pipe.stream({'text': '再见', 'history': history}, max_new_tokens=args.max_new_tokens,
                             do_sample=True, seed=0):
        print(delta, end='', flush=True)
    print(f'\n\ndone in {time.time() - t0:.1f}s')


def cmd_chat(args):
    from .loading import load
    model = load(args.config or args.model, revision=args.revision, device=args.device, dtype=args.dtype)
    print(f'{model}\nType a message; "clear" resets the history, "exit" quits.')
    history = []
    while True:
        try:
            query = input('\nuser: ').strip()
        except EOFError:
            break
        if query in ('exit', 'stop'):
            break
        if query == 'clear':
            history = []
            print('(history cleared)')
            continue
        if not query:
            continue
        turn = model.turn(query, history, max_new_tokens=args.max_new_tokens)
        print('ChatGLM: ', end='', flush=True)
        try:
            for delta in turn:
                print(delta, end='', flush=True)
        except KeyboardInterrupt:
            print(' [interrupted]', end='')
        history = turn.history
        print()


def cmd_configs(args):
    from . import configurations
    for name, path in sorted(configurations.available().items()):
        spec = configurations.read(path)
        print(f'{name:20s} {spec.model:28s} {spec.description}')


def main(argv=None):
    ap = argparse.ArgumentParser(prog='modelscope-chatglm', description='ChatGLM chat models for ModelScope')
    sub = ap.add_subparsers(dest='command', required=True)
    p = sub.add_parser('demo', help='offline demo on a tiny random checkpoint through pipeline()')
    p.add_argument('--family', default='glm2', choices=['glm1', 'glm2', 'glm3'])
    p.add_argument('--max-new-tokens', type=int, default=16)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser('chat', help='interactive chat in the terminal')
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--config', help='a configuration name or YAML path')
    src.add_argument('--model', help='a hub id or a model directory')
    p.add_argument('--revision')
    p.add_argument('--device')
    p.add_argument('--dtype')
    p.add_argument('--max-new-tokens', type=int, default=None)
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser('configs', help='list the YAML configurations')
    p.set_defaults(func=cmd_configs)
    args = ap.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
