"""What turning generated tokens into streamed text costs, per token, as a reply grows.

Each streamed token becomes a text delta (`engine/detokenize.TextDeltas`, used by the server, the pipeline,
the CLI and the web UI). The first version decoded the whole reply at every token, so a token's cost
grew with the reply; the window version decodes only the latest tokens. Both run here side by side on
the same replies: ChatGLM2's tokenizer layout, Chinese and English text with byte-fallback emoji,
replies of --lengths tokens. Reported: microseconds per token over the whole reply (median of
--repeats, with min and max; the whole-reply version runs once above 8,000 tokens, as it takes
minutes), and per token of the last 100 (what a token costs once the reply is long).

    python benchmarks/bench_streaming_text.py [--lengths 1000 8000 32000 --repeats 5]
"""
import argparse
import os
import statistics
import tempfile
import time

import modelscope_chatglm
from modelscope_chatglm.testing import tiny
from modelscope_chatglm.engine.detokenize import TextDeltas
from modelscope_chatglm.tokenizer import GLM2Tokenizer

TEXT = '你好，世界！这是一个测试。ChatGLM answers in English too, with code: x = [1, 2, 3] 🦜\n'


class WholeReply:
    """The first version: decode every token of the reply at each token."""

    def __init__(self, tokenizer):
        self.decode, self.ids, self.text = tokenizer.decode, [], ''

    def push(self, token):
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith('\ufffd'):
            return ''
        delta, self.text = text[len(self.text):], text
        return delta


def run(kind, tokenizer, ids):
    """-> (us per token over the reply, us per token of the last 100)."""
    deltas = kind(tokenizer)
    t0 = time.perf_counter()
    for token in ids[:-100]:
        deltas.push(token)
    t1 = time.perf_counter()
    for token in ids[-100:]:
        deltas.push(token)
    t2 = time.perf_counter()
    return (t2 - t0) / len(ids) * 1e6, (t2 - t1) / 100 * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--lengths', type=int, nargs='+', default=[1000, 8000, 32000])
    ap.add_argument('--repeats', type=int, default=5)
    args = ap.parse_args()
    print(f'modelscope_chatglm from {os.path.dirname(modelscope_chatglm.__file__)}')
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, 'tokenizer.model')
        open(path, 'wb').write(tiny.train_sentencepiece('glm2'))
        tok = GLM2Tokenizer(path)
        text_ids = tok.encode(TEXT * 2000)
        print(f'{"tokens":>7} {"version":>12} {"us/token, whole reply":>30} {"us/token, last 100":>30}')
        for n in args.lengths:
            ids = (text_ids * (n // len(text_ids) + 1))[:n]
            for kind in (WholeReply, TextDeltas):
                runs = [run(kind, tok, ids) for _ in range(args.repeats if kind is TextDeltas or n <= 8000 else 1)]
                cells = []
                for values in zip(*runs):
                    cells.append(f'{statistics.median(values):10.1f} [{min(values):.1f}-{max(values):.1f}]')
                name = 'whole reply' if kind is WholeReply else 'window'
                print(f'{n:7d} {name:>12} {cells[0]:>30} {cells[1]:>30}', flush=True)


if __name__ == '__main__':
    main()
