"""Load time, prefill and decode speed of a ChatGLM2-6B- or ChatGLM-6B-shaped checkpoint: ours vs the reference.

The checkpoint has the full width of the real model with random weights, stored as the hub stores it
(sharded .bin + index): ChatGLM2-6B (--family glm2: hidden 4096, ffn 13696, 32 heads, 2 K/V groups,
vocab 65024, fp16) or ChatGLM-6B (--family glm1: hidden 4096, ffn 16384, 32 heads, vocab 130528, fp16
linears + fp32 LayerNorms + separate lm_head). Only the depth is reduced (--layers, default 2 of 28).
Each measurement runs in a fresh process with the checkpoint in the page cache, ours and the reference
(ModelScope's chatglm2 / chatglm code on transformers 4.40, in the side venv) interleaved, so the ratios
compare runs made minutes apart.

    python benchmarks/bench_chatglm.py --family glm2 --reference-python .venv-ref/bin/python

prefill tok/s = prompt tokens / time to the first new token;
decode tok/s  = tokens after the first / the time they took. Greedy, a timestamp per token.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def build_checkpoint(path, family, layers):
    sys.path.insert(0, ROOT)
    from modelscope_chatglm.testing import tiny
    if os.path.exists(os.path.join(path, '.complete')):
        return path
    if family == 'glm1':
        tiny.build(path, family='glm1', fmt='bin', shards=2, hidden_size=4096, num_layers=layers, num_heads=32,
                   inner_hidden_size=16384, vocab_size=130528)
    else:
        tiny.build(path, family='glm2', fmt='bin', shards=2, hidden_size=4096, num_layers=layers, num_heads=32,
                   kv_channels=128, groups=2, ffn_hidden_size=13696, seq_length=32768, padded_vocab_size=65024)
    open(os.path.join(path, '.complete'), 'w').close()
    return path


def measure(impl, family, model_dir, dtype, prompt_len, new_tokens, threads, repeats):
    """Runs in the child process: load, then one greedy generation with a timestamp per token."""
    import torch
    torch.set_num_threads(threads)
    torch_dtype = getattr(torch, dtype)
    config = json.load(open(os.path.join(model_dir, 'config.json')))
    prompt = (list(range(100, 600)) * 20)[:prompt_len]
    eos, pad = 2, 0
    if family == 'glm1':   # ChatGLM-6B prompts end with [gMASK] <sop>
        prompt = prompt[:-2] + [config['gmask_token_id'], config['bos_token_id']]
        eos, pad = config['eos_token_id'], config['pad_token_id']
    t0 = time.perf_counter()
    if impl == 'ours':
        sys.path.insert(0, ROOT)
        import modelscope_chatglm
        chat = modelscope_chatglm.load(model_dir, device='cpu', dtype=dtype)

        def token_times(n):
            start, times = time.perf_counter(), []
            for _ in chat.stream_tokens(prompt, max_new_tokens=n, do_sample=False, stop_ids=[]):
                times.append(time.perf_counter() - start)
            return times
    else:
        if family == 'glm1':
            from modelscope.models.nlp.chatglm.text_generation import ChatGLMForConditionalGeneration as Model
        else:
            from modelscope.models.nlp.chatglm2.text_generation import ChatGLM2ForConditionalGeneration as Model
        model = Model._instantiate(model_dir=model_dir, torch_dtype=torch_dtype)
        model = model.to(torch_dtype).eval()

        class Clock:   # transformers calls put() with the prompt, then once per new token
            def __init__(self):
                self.start, self.times = time.perf_counter(), []

            def put(self, value):
                self.times.append(time.perf_counter() - self.start)

            def end(self):
                pass

        def token_times(n):
            clock = Clock()
            with torch.no_grad():
                model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=pad, eos_token_id=eos, streamer=clock)
            return clock.times[1:]
    load_s = time.perf_counter() - t0
    token_times(2)   # warm-up (first-call allocations, oneDNN kernel selection)
    runs = [token_times(1 + new_tokens) for _ in range(repeats)]
    assert all(len(times) == 1 + new_tokens for times in runs), runs
    # Best of the repeats: this machine is shared, and interference only ever slows a run down.
    return {'load_s': load_s, 'prefill_tok_s': max(prompt_len / t[0] for t in runs),
            'decode_tok_s': max(new_tokens / (t[-1] - t[0]) for t in runs)}


def warm_page_cache(model_dir):
    """Read every file once so each load starts from the same (cached) state, whoever runs first."""
    for name in os.listdir(model_dir):
        with open(os.path.join(model_dir, name), 'rb') as f:
            while f.read(1 << 24):
                pass


def run_child(python, impl, args, dtype):
    warm_page_cache(args.model_dir)
    cmd = [python, os.path.abspath(__file__), '--child', impl, '--family', args.family, '--dtype', dtype,
           '--model-dir', args.model_dir,
           '--prompt', str(args.prompt), '--new', str(args.new), '--threads', str(args.threads),
           '--repeats', str(args.repeats)]
    env = dict(os.environ)
    env.pop('PYTHONPATH', None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f'{impl} {dtype} failed:\n{proc.stderr[-3000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--family', default='glm2', choices=['glm1', 'glm2'])
    ap.add_argument('--layers', type=int, default=2)
    ap.add_argument('--prompt', type=int, default=256)
    ap.add_argument('--new', type=int, default=16)
    ap.add_argument('--threads', type=int, default=os.cpu_count())
    ap.add_argument('--repeats', type=int, default=3, help='generations per measurement; the best counts')
    ap.add_argument('--dtypes', default='float32,bfloat16')
    ap.add_argument('--model-dir', default=None)
    ap.add_argument('--reference-python', default=os.path.join(ROOT, '.venv-ref', 'bin', 'python'))
    ap.add_argument('--child', default=None)
    ap.add_argument('--dtype', default='float32')
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.family, args.model_dir, args.dtype, args.prompt, args.new,
                                 args.threads, args.repeats)))
        return
    sys.path.insert(0, ROOT)
    from modelscope_chatglm import openmp
    openmp.set_for_this_process()   # the children (ours and the reference) start with it, as the CLI's would
    name = 'chatglm-6b' if args.family == 'glm1' else 'chatglm2-6b'
    args.model_dir = args.model_dir or os.path.join(tempfile.gettempdir(), f'{name}-shape-{args.layers}L')
    t = time.perf_counter()
    build_checkpoint(args.model_dir, args.family, args.layers)
    print(f'checkpoint: {args.model_dir} ({name} width, {args.layers} of 28 layers, .bin shards; '
          f'{time.perf_counter() - t:.0f}s to build)')
    print(f'prompt {args.prompt} tokens, {args.new} decode tokens, greedy, {args.threads} threads, '
          f'best of {args.repeats}\n')
    have_ref = os.path.exists(args.reference_python)
    header = f'{"dtype":9s} {"impl":10s} {"load s":>8s} {"prefill tok/s":>14s} {"decode tok/s":>13s}'
    print(header)
    print('-' * len(header))
    for dtype in args.dtypes.split(','):
        ours = run_child(sys.executable, 'ours', args, dtype)
        rows = [('ours', ours)]
        if have_ref:
            ref = run_child(args.reference_python, 'reference', args, dtype)
            rows.append(('reference', ref))
            rows.append(('ratio', {k: ours[k] / ref[k] if 'tok' in k else ref[k] / ours[k] for k in ours}))
        for name, r in rows:
            fmt = '{:8.2f}x {:13.2f}x {:12.2f}x' if name == 'ratio' else '{:8.2f}  {:13.1f}  {:12.2f} '
            print(f'{dtype:9s} {name:10s} ' + fmt.format(r['load_s'], r['prefill_tok_s'], r['decode_tok_s']))
    if not have_ref:
        print(f'\n(no reference venv at {args.reference_python}: only our numbers)')
    print('\nratio = ours / reference for speeds, reference / ours for load time (> 1 = ours better)')


if __name__ == '__main__':
    main()
