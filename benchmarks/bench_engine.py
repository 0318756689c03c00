"""One engine under every surface, against the commit before it: single-stream speed through `chat()`,
`stream_chat()` and the server, and what the prefix cache saves a returning conversation.

Each measurement runs in a fresh process, the two trees taking turns (A B A B ...), on the same
checkpoint: a full-width ChatGLM2-6B shape (hidden 4096, ffn 13696, vocab 65024) with --layers blocks,
random fp16 weights, quantized while loading. Per turn and tree:
  - chat(): wall time of one greedy turn of --new-tokens tokens (stop ids off), after one warm-up turn;
  - stream_chat() step: ms per token of a streamed turn after its first delta (`per_token`);
  - server step (this tree's AsyncEngine, the baseline's Engine, in process): the same for one streamed
    request, with nothing else running;
  - returning conversation (this tree): a --history-tokens conversation comes back for one more turn
    through chat() and through the server: prompt tokens prefilled vs taken from the prefix cache.
Reported: medians over turns with min-max, and the ratio this/baseline of the medians.

    python benchmarks/bench_engine.py --dir /var/tmp/chatglm2-4l --layers 4 --bits 4 --turns 5
"""
import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))


def child(path, bits, int8_activations, new_tokens, history_tokens):
    """In a fresh process whose modelscope_chatglm comes from one tree (PYTHONPATH)."""
    import torch
    import modelscope_chatglm
    chat = modelscope_chatglm.load(path, device='cpu', quantization_bit=bits, int8_activations=int8_activations)
    gen = dict(max_new_tokens=new_tokens, do_sample=False, stop_ids=[])
    chat.chat('warm up', **dict(gen, max_new_tokens=4))
    out = {}
    t = time.perf_counter()
    chat.chat('你好，请介绍一下你自己。', **gen)
    out['chat_s'] = time.perf_counter() - t
    turn = chat.turn('介绍下清华大学', **gen)     # what stream_chat iterates
    stamps = [(time.perf_counter(), len(turn.output_ids)) for _ in turn]
    out['stream_step_ms'] = per_token(stamps)
    out['server_step_ms'] = server_step(chat, new_tokens)
    if hasattr(chat, 'engine'):
        out.update(returning(chat, history_tokens))
    out['torch_threads'] = torch.get_num_threads()
    return out


def server_step(chat, new_tokens):
    """Median gap between the tokens of one streamed request through the server's engine, in process."""
    try:
        from modelscope_chatglm.serve.async_engine import AsyncEngine as Serving, ChatCall
    except ImportError:     # the baseline tree
        from modelscope_chatglm.serve.engine import Engine as Serving, ChatCall
    serving = Serving(chat, max_batch=8)
    call = ChatCall('你好，请介绍一下你自己。', [], dict(max_new_tokens=new_tokens, do_sample=False, stop_ids=[]),
                    logprobs=0)

    async def run():
        stamps, tokens = [], 0
        async for kind, value in serving.generate(call):
            if kind == 'logprobs':      # one entry per token, sent with the text it completes
                tokens += len(value)
                stamps.append((time.perf_counter(), tokens))
        return stamps
    asyncio.run(run())   # (the second run is the one measured: the first warms the engine thread)
    return per_token(asyncio.run(run()))


def per_token(stamps):
    """ms per decode step from [(time, tokens so far)] at each streamed delta: the time between the
    first and the last delta over the tokens generated between them (text held back, a space until the
    next word, say, makes some deltas carry several tokens)."""
    (t0, n0), (t1, n1) = stamps[0], stamps[-1]
    return (t1 - t0) / (n1 - n0) * 1e3 if n1 > n0 else None


def returning(chat, history_tokens):
    """A conversation of ~history_tokens comes back: what its next turn prefills, through chat() and the server."""
    words = 'The quick brown fox jumps over the lazy dog near the river bank today. '
    per_round = len(chat.tokenizer.encode(words * 20))
    history = [(words * 20, 'ok') for _ in range(max(1, history_tokens // per_round))]
    gen = dict(max_new_tokens=2, do_sample=False)
    stats = chat.engine.scheduler.stats
    _, history = chat.chat(history[-1][0], history[:-1], **gen)     # the previous turn
    before = dict(stats)
    t = time.perf_counter()
    chat.chat('Summarise the story above in one sentence.', history, **gen)
    out = {'returning_prompt': len(chat.build_inputs('Summarise the story above in one sentence.', history)),
           'returning_chat_cached': stats['cached_prompt_tokens'] - before['cached_prompt_tokens'],
           'returning_chat_ttft_s': time.perf_counter() - t}
    out['returning_chat_prefilled'] = out['returning_prompt'] - out['returning_chat_cached']
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dir', default='/var/tmp/chatglm2-4l')
    parser.add_argument('--layers', type=int, default=4)
    parser.add_argument('--bits', type=int, default=4)
    parser.add_argument('--int8-activations', action='store_true')
    parser.add_argument('--new-tokens', type=int, default=32)
    parser.add_argument('--history-tokens', type=int, default=2000)
    parser.add_argument('--turns', type=int, default=5)
    parser.add_argument('--baseline', default='ca6f555', help='the commit before the one engine')
    parser.add_argument('--child', nargs=2, metavar=('TREE', 'PATH'))
    args = parser.parse_args()
    if args.child:
        _, path = args.child
        print(json.dumps(child(path, args.bits, args.int8_activations, args.new_tokens, args.history_tokens)))
        return
    from fullsize import build
    build(args.dir, layers=args.layers)
    baseline = os.path.join('/tmp', f'bench-engine-{args.baseline}')
    if not os.path.exists(baseline):
        subprocess.run(['git', '-C', ROOT, 'worktree', 'add', '--detach', baseline, args.baseline], check=True)
    trees = {'baseline': baseline, 'this': ROOT}
    runs = {name: [] for name in trees}
    for turn in range(args.turns):
        for name, tree in trees.items():
            cmd = [sys.executable, os.path.abspath(__file__), '--child', tree, args.dir, '--bits', str(args.bits),
                   '--new-tokens', str(args.new_tokens), '--history-tokens', str(args.history_tokens)]
            cmd += ['--int8-activations'] if args.int8_activations else []
            env = dict(os.environ, PYTHONPATH=tree)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd='/tmp')
            if proc.returncode:
                raise RuntimeError(proc.stderr[-3000:])
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f'turn {turn} {name}: {runs[name][-1]}', flush=True)
    print(f'\n{args.layers}-layer full-width ChatGLM2, int{args.bits}'
          f'{" + int8 activations" if args.int8_activations else ""}, {args.new_tokens} tokens, {args.turns} turns')
    for key in ('chat_s', 'stream_step_ms', 'server_step_ms'):
        meds = {}
        for name in trees:
            values = [r[key] for r in runs[name] if r.get(key) is not None]
            meds[name] = statistics.median(values)
            print(f'  {key:16s} {name:8s} median {meds[name]:8.2f}  [{min(values):.2f}-{max(values):.2f}]')
        print(f'  {key:16s} this / baseline: {meds["this"] / meds["baseline"]:.3f}')
    base_stream = statistics.median(r['stream_step_ms'] for r in runs['baseline'])
    this_server = statistics.median(r['server_step_ms'] for r in runs['this'])
    print(f'  server step (this) / stream_chat step (baseline): {this_server / base_stream:.3f}')
    last = runs['this'][-1]
    print(f'  returning conversation: prompt {last["returning_prompt"]} tokens, chat() prefilled '
          f'{last["returning_chat_prefilled"]} (cached {last["returning_chat_cached"]}), '
          f'TTFT {last["returning_chat_ttft_s"]:.2f}s')


if __name__ == '__main__':
    main()
