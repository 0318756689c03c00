"""Serving many users: a real `modelscope-chatglm serve` process, N concurrent streaming clients.

For each server setting (`--max-batch 1` = one request at a time, and the batching default), each in a
fresh process on the same checkpoint, in one run:
  - throughput: N clients at once, each with its own prompt (new to the server: no prefix-cache hits) of
    --prompt-tokens tokens, asking for
    --new-tokens greedy tokens (the table counts the tokens actually generated). Reported: aggregate
    output tokens/s (all tokens / wall time from the first request to the last token), decode-phase
    tokens/s (while every stream is past its first token), p50/p99 time to first token, p50 time per
    output token (TPOT: a request's mean gap after its first token) and p50/p99 inter-token latency
    (ITL: every gap between streamed chunks);
  - returning conversation (batching server only): a conversation with --history-tokens of history
    comes back while 7 other streams decode, --returning-turns times in a row, each arriving at another
    point of the decode steps: its time to first token (median, min-max) and the prompt tokens the
    prefix cache served. Every turn is the same history, then a reply and a question of its own: the
    cache serves the history and each turn prefills its ~40 new tokens (a turn that repeated the
    previous one's reply would find that in the cache too, and prefill less);
  - shared preamble (batching server only): 8 new conversations open with the same --preamble-tokens
    first round (ChatGLM2 has no system role; the shared first round is the same prefix): how many of
    their prompt tokens were prefilled.

    python benchmarks/bench_serving.py --dir /var/tmp/chatglm2-6b-random --bits 4 [--int8-activations]
    python benchmarks/bench_serving.py --tiny          # a quick check on a tiny checkpoint
The full-size checkpoint (ChatGLM2-6B shapes, random fp16 weights, hub layout) is built on first use
(benchmarks/fullsize.py, ~12.5 GB) and quantized while loading.
"""
import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

WORDS = ('river mountain cloud green quiet system model token memory light paper window garden music '
         'number letter silver orange simple future market winter summer street bridge planet forest').split()


def prompt_text(tokens: int, encode, seed: int) -> str:
    """Random words whose chat prompt is about `tokens` tokens long."""
    rng = random.Random(seed)
    words = []
    while len(encode(' '.join(words))) < tokens:
        words.append(rng.choice(WORDS) + str(rng.randrange(100)))
    return ' '.join(words)


def start_server(model_dir, bits, max_batch, port, log_path, extra=()):
    """`extra`: more `serve` flags, e.g. ['--int8-activations']."""
    args = ['--model', model_dir, '--device', 'cpu', '--max-batch', str(max_batch), '--max-queue', '1000', *extra]
    if bits:
        args += ['--quantize', str(bits)]
    return start_serve(args, port, log_path)


def start_serve(args, port, log_path, env=None, minutes=30):
    """`modelscope-chatglm serve ARGS --port PORT` as a process, once its /health answers."""
    import httpx
    proc = subprocess.Popen([sys.executable, '-m', 'modelscope_chatglm.cli', 'serve', *args, '--port', str(port)],
                            stdout=open(log_path, 'w'), stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + minutes * 60
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f'the server exited:\n{open(log_path).read()[-3000:]}')
        try:
            if httpx.get(f'http://127.0.0.1:{port}/health', timeout=5).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(1)
    proc.kill()
    sys.exit(f'the server did not start in {minutes} minutes')


async def stream_chat(client, url, messages, max_tokens, started=None):
    """One streaming request: -> dict(start, first, last, tokens, times, prompt_tokens, cached_tokens);
    `started` (an asyncio.Event) is set at its first token."""
    body = {'messages': messages, 'max_tokens': max_tokens, 'temperature': 0, 'stream': True,
            'stream_options': {'include_usage': True}}   # the token counts come in a last chunk
    out = {'start': time.perf_counter(), 'first': None, 'times': [], 'tokens': 0}
    async with client.stream('POST', f'{url}/v1/chat/completions', json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f'HTTP {response.status_code}: {await response.aread()}')
        async for line in response.aiter_lines():
            if not line.startswith('data:') or line.strip() == 'data: [DONE]':
                continue
            chunk = json.loads(line[5:])
            now = time.perf_counter()
            choice = chunk['choices'][0] if chunk.get('choices') else {}
            if choice.get('delta', {}).get('content'):
                out['first'] = out['first'] or now
                if started is not None:
                    started.set()
                out['times'].append(now)
            if chunk.get('usage'):
                out['tokens'] = chunk['usage']['completion_tokens']
                out['prompt_tokens'] = chunk['usage']['prompt_tokens']
                out['cached_tokens'] = chunk['usage']['prompt_tokens_details']['cached_tokens']
    out['last'] = time.perf_counter()
    out['first'] = out['first'] or out['last']
    return out


def percentile(values, q):
    values = sorted(values)
    if not values:
        return float('nan')
    index = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[index]


async def throughput(url, n, prompts, new_tokens):
    import httpx
    async with httpx.AsyncClient(timeout=None) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*[stream_chat(client, url, [{'role': 'user', 'content': prompt}],
                                                     new_tokens) for prompt in prompts])
        wall = time.perf_counter() - t0
        health = (await client.get(f'{url}/health')).json()
    tokens = sum(r['tokens'] for r in results)
    ttft = [r['first'] - r['start'] for r in results]
    # TPOT: each request's mean time per output token after its first; ITL: every gap between two streamed
    # chunks of any request (vLLM's benchmark_serving definitions). A prefill chunk that pauses the streams
    # shows in TPOT and in ITL's tail, not in ITL's median.
    tpot = [(r['last'] - r['first']) / (r['tokens'] - 1) for r in results if r['tokens'] > 1]
    gaps = [b - a for r in results for a, b in zip(r['times'], r['times'][1:])]
    # Decode phase: from the moment every stream has its first token to the first stream's end.
    begin, end = max(r['first'] for r in results), min(r['last'] for r in results)
    in_window = sum(sum(begin <= t <= end for t in r['times']) for r in results)
    decode_rate = in_window / (end - begin) if end - begin > 1e-3 else float('nan')
    return {'clients': n, 'tokens': tokens, 'wall_s': wall, 'tokens_per_s': tokens / wall,
            'decode_tokens_per_s': decode_rate, 'ttft_p50': percentile(ttft, 50), 'ttft_p99': percentile(ttft, 99),
            'tpot_p50': statistics.median(tpot) if tpot else float('nan'),
            'itl_p50': percentile(gaps, 50), 'itl_p99': percentile(gaps, 99),
            'preempted_so_far': health['preempted'], 'kv_budget_bytes': health['kv_budget_bytes']}


async def returning_conversation(url, encode, history_tokens, prompt_tokens, new_tokens, turns):
    """A conversation with `history_tokens` of history returns while 7 other streams decode, `turns`
    times one after the other (the same history; a reply and a question of its own each time)."""
    import httpx
    first = prompt_text(history_tokens, encode, seed=9000)
    async with httpx.AsyncClient(timeout=None) as client:
        t = time.perf_counter()
        opening = await client.post(f'{url}/v1/chat/completions', json={
            'messages': [{'role': 'user', 'content': first}], 'max_tokens': 8, 'temperature': 0})
        opening_s = time.perf_counter() - t
        reply = opening.json()['choices'][0]['message']['content']
        decoding = [asyncio.Event() for _ in range(7)]
        others = [asyncio.ensure_future(stream_chat(client, url, [{'role': 'user', 'content': prompt_text(
            prompt_tokens, encode, seed=9100 + i)}], new_tokens, decoding[i])) for i in range(7)]
        for event in decoding:          # all 7 are past their first token
            await event.wait()
        backs = []
        for turn in range(turns):
            backs.append(await stream_chat(client, url, [
                {'role': 'user', 'content': first},
                {'role': 'assistant', 'content': reply if turn == 0 else f'({turn}) {reply}'},
                {'role': 'user', 'content': 'and what follows from that?'}], 8))
        running = (await client.get(f'{url}/health')).json()['running']
        finished_early = sum(o.done() for o in others)
        await asyncio.gather(*others)
    ttft = [b['first'] - b['start'] for b in backs]
    return {'prompt_tokens': backs[0]['prompt_tokens'], 'cached_prompt_tokens': backs[0]['cached_tokens'],
            'new_tokens_each': [b['prompt_tokens'] - b['cached_tokens'] for b in backs],
            'ttft_s': ttft, 'ttft_p50': statistics.median(ttft),
            'opening_s': opening_s, 'running_after': running, 'others_done_before_the_last_turn': finished_early}


async def shared_preamble(url, encode, preamble_tokens):
    """8 new conversations whose first round (a long shared preamble) is the same."""
    import httpx
    preamble = prompt_text(preamble_tokens, encode, seed=7000)
    async with httpx.AsyncClient(timeout=None) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*[stream_chat(client, url, [
            {'role': 'user', 'content': preamble}, {'role': 'assistant', 'content': 'Understood.'},
            {'role': 'user', 'content': f'question {i}: {prompt_text(20, encode, seed=7100 + i)}'}], 8)
            for i in range(8)])
        wall = time.perf_counter() - t0
    prompt = sum(r['prompt_tokens'] for r in results)
    cached = sum(r['cached_tokens'] for r in results)
    return {'conversations': 8, 'prompt_tokens': prompt, 'cached_prompt_tokens': cached,
            'prefilled_tokens': prompt - cached, 'wall_s': wall,
            'ttft_p50': statistics.median(r['first'] - r['start'] for r in results)}


def tokenizer_encode(model_dir):
    """text -> the prompt ids of a one-message conversation, as the server builds them."""
    from modelscope_chatglm.families import get_family
    from modelscope_chatglm.loading import load_config, load_tokenizer
    cfg = load_config(model_dir)
    family = get_family(cfg.family)
    tok = load_tokenizer(model_dir, cfg)
    return lambda text: family.chat_format.encode(tok, [{'role': 'user', 'content': text}])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--dir', default='/var/tmp/chatglm2-6b-random', help='full-size checkpoint (built if missing)')
    ap.add_argument('--tiny', action='store_true', help='a tiny random checkpoint instead (a quick check)')
    ap.add_argument('--bits', type=int, choices=[0, 4, 8], default=4, help='quantize while loading (0: none)')
    ap.add_argument('--clients', default='1,2,4,8,16')
    ap.add_argument('--serial-clients', default='1,2', help='client counts for --max-batch 1')
    ap.add_argument('--max-batch', type=int, default=16, help='the batching server\'s --max-batch')
    ap.add_argument('--prompt-tokens', type=int, default=128)
    ap.add_argument('--new-tokens', type=int, default=128)
    ap.add_argument('--history-tokens', type=int, default=2000)
    ap.add_argument('--preamble-tokens', type=int, default=1000)
    ap.add_argument('--returning-turns', type=int, default=5, help='returning-conversation requests, one after the other')
    ap.add_argument('--skip', default='', help='comma list of: serial, returning, preamble')
    ap.add_argument('--exact', action='store_true',
                    help='serve with --exact (fp32/bf16 activations; the default is int8 activations)')
    ap.add_argument('--int8-activations', action='store_true', help='serve with --int8-activations (the default)')
    ap.add_argument('--json', help='write the results here too')
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(',')))
    if args.tiny:
        from modelscope_chatglm.testing import tiny
        model_dir = tiny.build(tempfile.mkdtemp(prefix='bench-serving-'), 'glm2', seq_length=8192)
    else:
        from fullsize import build
        build(args.dir)
        model_dir = args.dir
    encode = tokenizer_encode(model_dir)
    fresh = iter(range(10**6))    # every request gets a prompt never seen before: no prefix-cache hits

    def prompts(n):
        return [prompt_text(args.prompt_tokens, encode, seed=next(fresh)) for _ in range(n)]
    results = {'model_dir': model_dir, 'bits': args.bits, 'int8_activations': bool(args.bits) and not args.exact,
               'prompt_tokens': args.prompt_tokens,
               'new_tokens': args.new_tokens, 'cpus': os.cpu_count(), 'runs': []}
    settings = [(args.max_batch, args.clients)] + ([] if 'serial' in skip else [(1, args.serial_clients)])
    port = 8300
    for max_batch, clients in settings:
        log = tempfile.mktemp(prefix=f'serve-b{max_batch}-', suffix='.log')
        t = time.perf_counter()
        proc = start_server(model_dir, args.bits, max_batch, port, log,
                            extra=['--exact'] if args.exact else ['--int8-activations'] if args.int8_activations else [])
        url = f'http://127.0.0.1:{port}'
        print(f'\n--max-batch {max_batch}: server up in {time.perf_counter() - t:.0f} s (log {log})', flush=True)
        try:
            asyncio.run(throughput(url, 1, prompts(1), 4))    # warm-up: first-call costs (kernel build, allocator)
            print(f'{"clients":>7s} {"tokens":>6s} {"wall s":>7s} {"tok/s":>7s} {"decode tok/s":>12s} '
                  f'{"TTFT p50":>9s} {"TTFT p99":>9s} {"TPOT p50":>9s} {"ITL p50":>8s} {"ITL p99":>8s}', flush=True)
            for n in map(int, clients.split(',')):
                r = asyncio.run(throughput(url, n, prompts(n), args.new_tokens))
                r['max_batch'] = max_batch
                results['runs'].append(r)
                print(f'{n:7d} {r["tokens"]:6d} {r["wall_s"]:7.1f} {r["tokens_per_s"]:7.2f} '
                      f'{r["decode_tokens_per_s"]:12.2f} {r["ttft_p50"]:9.2f} {r["ttft_p99"]:9.2f} '
                      f'{r["tpot_p50"]:9.3f} {r["itl_p50"]:8.3f} {r["itl_p99"]:8.3f}  (preemptions so far: {r["preempted_so_far"]}, KV budget '
                      f'{r["kv_budget_bytes"] / 2**30:.2f} GiB)', flush=True)
            if max_batch > 1 and 'returning' not in skip:
                r = asyncio.run(returning_conversation(url, encode, args.history_tokens, args.prompt_tokens,
                                                       args.new_tokens, args.returning_turns))
                results['returning'] = r
                print(f'returning conversation: {r["prompt_tokens"]} prompt tokens, {r["cached_prompt_tokens"]} '
                      f'from the prefix cache (new tokens per turn: {r["new_tokens_each"]}); first token in {r["ttft_p50"]:.2f} s (median of {len(r["ttft_s"])} '
                      f'turns, {min(r["ttft_s"]):.2f}-{max(r["ttft_s"]):.2f}: '
                      f'{", ".join(f"{x:.2f}" for x in r["ttft_s"])}) with 7 streams decoding, '
                      f'{r["running_after"]} running after the last; its opening turn took {r["opening_s"]:.1f} s',
                      flush=True)
            if max_batch > 1 and 'preamble' not in skip:
                r = asyncio.run(shared_preamble(url, encode, args.preamble_tokens))
                results['preamble'] = r
                print(f'shared preamble: 8 conversations, {r["prompt_tokens"]} prompt tokens, '
                      f'{r["prefilled_tokens"]} prefilled ({r["cached_prompt_tokens"]} from the cache), '
                      f'first tokens p50 {r["ttft_p50"]:.1f} s, all done in {r["wall_s"]:.1f} s', flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    by = {(r['max_batch'], r['clients']): r for r in results['runs']}
    serial = [r for r in results['runs'] if r['max_batch'] == 1]
    if serial:
        base = max(r['tokens_per_s'] for r in serial)   # one at a time: its rate hardly depends on N
        print(f'\naggregate tokens/s relative to --max-batch 1 (its best: {base:.2f} tok/s):')
        for n in map(int, args.clients.split(',')):
            if (args.max_batch, n) in by:
                print(f'  {n:2d} streams: {by[(args.max_batch, n)]["tokens_per_s"] / base:.2f}x')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=2)


if __name__ == '__main__':
    main()
