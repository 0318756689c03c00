"""Structured output engines side by side: llguidance (ours, through engine/grammar.py), xgrammar and
outlines-core, on the same 64K SentencePiece vocabulary, the same schemas and the same reply.

What it times, per engine and schema:
- compile: the grammar (JSON schema, or any JSON object) made ready for this vocabulary, cold;
- mask: computing which tokens may come next, for a batch of 1 and of 16 replies, at every token of a
  reply (the batch advanced in step). The engines fill a bitmask (one bit per token); "llguidance (ours)"
  also turns it into the penalty tensor the sampler adds to the logits (engine/grammar.py), all of what
  a step pays.

The vocabulary: ChatGLM's tokenizer cannot be downloaded here, so a SentencePiece BPE model of the same
size (64,794 pieces, byte fallback, plus ChatGLM2's 5 specials: 64,799 ids in a 65,024-wide logits row)
is trained on this Python's own standard library sources (cached). The reply: a JSON document walked
token by token, each token the longest one llguidance allows that spells the document next; every
engine is checked to accept the same tokens.

    pip install llguidance xgrammar outlines-core    # xgrammar also pulls torch, transformers and triton
    python benchmarks/bench_structured_output.py --rounds 5
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import sysconfig
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modelscope_chatglm import structured  # noqa: E402
from modelscope_chatglm.engine import grammar  # noqa: E402
from modelscope_chatglm.chat_formats import GLM2Format  # noqa: E402
from modelscope_chatglm.tokenizer import GLM2Tokenizer  # noqa: E402

WIDTH = 65024   # ChatGLM2/3's padded vocabulary
PIECES = 64794
SCHEMA = {'type': 'object', 'additionalProperties': False, 'required': ['name', 'age', 'email', 'roles', 'address'],
          'properties': {'name': {'type': 'string'}, 'age': {'type': 'integer', 'minimum': 0},
                         'email': {'type': 'string'}, 'roles': {'type': 'array', 'items': {'enum': ['admin', 'user']}},
                         'address': {'type': 'object', 'required': ['city', 'zip'], 'additionalProperties': False,
                                     'properties': {'city': {'type': 'string'}, 'zip': {'type': 'string'}}}}}
DOCUMENT = {'name': 'Ada Lovelace, Countess of Lovelace', 'age': 36, 'email': 'ada@example.org',
            'roles': ['admin', 'user', 'user'], 'address': {'city': 'London', 'zip': 'W1J 7NF'}}


def sentencepiece_model(cache: str) -> str:
    path = os.path.join(cache, f'bench-sp-{PIECES}.model')
    if not os.path.exists(path):
        import sentencepiece as spm
        sources = sorted(glob.glob(os.path.join(sysconfig.get_paths()['stdlib'], '**', '*.py'), recursive=True))
        corpus = os.path.join(cache, 'bench-sp-corpus.txt')
        with open(corpus, 'w', encoding='utf-8') as out:
            for name in sources:
                try:
                    out.write(open(name, encoding='utf-8').read())
                except (UnicodeDecodeError, OSError):
                    pass
        spm.SentencePieceTrainer.train(input=corpus, model_prefix=path[:-len('.model')], vocab_size=PIECES,
                                       model_type='bpe', byte_fallback=True, input_sentence_size=400000,
                                       max_sentence_length=4096, num_threads=2, minloglevel=2)
    return path


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def walk(grammars: grammar.Grammars, text: str, document: bytes):
    """The reply's tokens: at each step the longest token llguidance allows that spells the document next."""
    matcher, tokens, at = grammars.compile(text).matcher(), [], 0
    vocabulary = matcher.vocabulary
    spelled = {}
    while not matcher.finished:
        allowed = grammar.allowed_tokens([matcher], 'cpu')[0].nonzero().flatten().tolist()
        best = max((t for t in allowed if t < len(vocabulary.tokens) and document.startswith(vocabulary.tokens[t], at)),
                   key=lambda t: len(vocabulary.tokens[t]), default=None)
        if best is None:
            raise RuntimeError(f'no allowed token spells {document[at:at + 20]!r}')
        tokens.append(best)
        spelled[best] = vocabulary.tokens[best]
        matcher.advance(best)
        at += len(vocabulary.tokens[best])
    assert at == len(document), (at, len(document))
    return tokens


class Ours:
    name = 'llguidance (ours)'

    def __init__(self, tokenizer):
        self.grammars = grammar.Grammars(tokenizer, WIDTH)
        self.grammars.vocabulary   # (built once per model: not part of a compile)

    def compile(self, kind):
        schema = {'type': 'object'} if kind == 'json_object' else SCHEMA
        text = structured.reply_grammar(GLM2Format(), {'type': 'json_schema', 'json_schema': {'schema': schema}})
        return grammar.Grammar(text, self.grammars.vocabulary)

    def matchers(self, compiled, n):
        return [compiled.matcher() for _ in range(n)]

    def mask(self, matchers):
        grammar.penalties(grammar.token_bitmask(matchers), WIDTH, 'cpu')   # what the sampler adds to the logits

    def advance(self, matchers, token):
        for m in matchers:
            m.advance(token)


class OursBitmask(Ours):
    """The same, the bitmask alone (what the other engines' rows time): the penalty tensor is the rest."""
    name = 'llguidance bitmask'

    def mask(self, matchers):
        grammar.token_bitmask(matchers)


class XGrammar:
    name = 'xgrammar'

    def __init__(self, tokenizer):
        import xgrammar as xgr
        self.xgr = xgr
        vocab = [b'' if t.startswith(b'\xff') else t for t in vocabulary_bytes(tokenizer)]
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=WIDTH, stop_token_ids=[tokenizer.eos_id])
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self.batch = xgr.BatchGrammarMatcher(max_threads=2)

    def compile(self, kind):
        schema = {'type': 'object'} if kind == 'json_object' else SCHEMA
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(', ', ': '))

    def matchers(self, compiled, n):
        self.bitmask = self.xgr.allocate_token_bitmask(n, WIDTH)
        return [self.xgr.GrammarMatcher(compiled) for _ in range(n)]

    def mask(self, matchers):
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(self.bitmask, 0)
        else:
            self.batch.batch_fill_next_token_bitmask(matchers, self.bitmask)

    def advance(self, matchers, token):
        for m in matchers:
            assert m.accept_token(token), token


class OutlinesCore:
    name = 'outlines-core'

    def __init__(self, tokenizer):
        from outlines_core import Vocabulary
        by_bytes = {}
        for i, t in enumerate(vocabulary_bytes(tokenizer)):
            if not t.startswith(b'\xff'):
                by_bytes.setdefault(t, []).append(i)
        self.vocabulary = Vocabulary(tokenizer.eos_id, by_bytes)

    def compile(self, kind):
        from outlines_core import Index
        from outlines_core.json_schema import build_regex_from_schema
        schema = {'type': 'object'} if kind == 'json_object' else SCHEMA
        # (an optional space around separators: its layout option nearest to the others' ', ' and ': ')
        regex = build_regex_from_schema(json.dumps(schema), whitespace_pattern='[ ]?')
        return Index(regex, self.vocabulary)

    def matchers(self, compiled, n):
        from outlines_core import Guide
        self.bitmask = torch.zeros((n, (WIDTH + 31) // 32), dtype=torch.int32)
        return [Guide(compiled) for _ in range(n)]

    def mask(self, matchers):
        for i, g in enumerate(matchers):
            row = self.bitmask[i]
            g.write_mask_into(row.data_ptr(), row.numel(), 4)

    def advance(self, matchers, token):
        for g in matchers:
            g.advance(token)


def vocabulary_bytes(tokenizer):
    """Bytes per token id as our engine gives them to llguidance (specials start with 0xFF), for the others."""
    return grammar.GrammarVocabulary(tokenizer, WIDTH).tokens[:tokenizer.vocab_size]


def quantiles(values):
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]   # noqa: E731
    return statistics.median(values), pick(0.1), pick(0.9)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--batches', default='1,16')
    parser.add_argument('--engines', default='ours,llguidance-bitmask,xgrammar,outlines-core')
    parser.add_argument('--cache', default=os.path.expanduser('~/.cache/modelscope_chatglm/bench'))
    parser.add_argument('--json', help='write the results here too')
    args = parser.parse_args()
    os.makedirs(args.cache, exist_ok=True)
    torch.set_num_threads(2)
    tokenizer = GLM2Tokenizer(sentencepiece_model(args.cache))
    print(f'vocabulary: {tokenizer.vocab_size} ids, logits width {WIDTH}; threads: 2; {time.strftime("%Y-%m-%d")}')
    makers = {'ours': Ours, 'llguidance-bitmask': OursBitmask, 'xgrammar': XGrammar, 'outlines-core': OutlinesCore}
    engines = [makers[name](tokenizer) for name in args.engines.split(',')]
    reference = engines[0] if isinstance(engines[0], Ours) else Ours(tokenizer)
    document = {'json_object': json.dumps(DOCUMENT, ensure_ascii=False).encode(),
                'json_schema': json.dumps(DOCUMENT, ensure_ascii=False).encode()}
    paths = {kind: walk(reference.grammars, structured.reply_grammar(
        GLM2Format(), {'type': 'json_schema', 'json_schema': {'schema': {'type': 'object'} if kind == 'json_object'
                                                                   else SCHEMA}}), document[kind])
             for kind in document}
    results = []
    print(f'reply: {len(paths["json_schema"])} tokens; per-step times in microseconds, median [p10-p90] over '
          f'steps x {args.rounds} rounds')
    print(f'{"engine":20} {"schema":12} {"compile ms":>12} ' + ' '.join(f'{"mask, batch " + b:>24}'
                                                                    for b in args.batches.split(',')))
    for engine in engines:
        for kind, path in paths.items():
            compiles, row = [], {}
            for _ in range(args.rounds):
                compiled, seconds = timed(lambda: engine.compile(kind))
                compiles.append(seconds * 1e3)
            try:
                for batch in (int(b) for b in args.batches.split(',')):
                    steps = []
                    for _ in range(args.rounds):
                        matchers = engine.matchers(compiled, batch)
                        for token in path:
                            _, seconds = timed(lambda: engine.mask(matchers))
                            steps.append(seconds * 1e6)
                            engine.advance(matchers, token)
                    row[batch] = quantiles(steps)
            except (ValueError, AssertionError) as e:   # its grammar refuses the reply the others accept
                print(f'{engine.name:20} {kind:12} cannot follow the reply: {str(e)[:80]}')
                results.append({'engine': engine.name, 'schema': kind, 'error': str(e)[:200]})
                continue
            compile_ms = quantiles(compiles)
            results.append({'engine': engine.name, 'schema': kind, 'compile_ms': compile_ms,
                            'mask_us': {str(b): v for b, v in row.items()}, 'reply_tokens': len(path)})
            cells = ' '.join(f'{m:9.0f} [{lo:5.0f}-{hi:6.0f}]' for m, lo, hi in row.values())
            print(f'{engine.name:20} {kind:12} {compile_ms[0]:12.1f} {cells}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'date': time.strftime('%Y-%m-%d'), 'vocab': tokenizer.vocab_size, 'width': WIDTH,
                       'rounds': args.rounds, 'results': results}, f, indent=1)


if __name__ == '__main__':
    main()
