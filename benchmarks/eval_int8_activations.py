"""What int8 activations add to the error, next to the error of the weights' own quantization.

For one checkpoint, the next-token logits of every position of N prompts (random token ids, teacher
forced) under three models built from the same fp16 weights:
  - float:  the fp16 weights, computed in fp32 (the reference);
  - exact:  int8/int4 weights (THUDM's per-row format), fp32 activations (`int8_activations=False`);
  - x8:     the same weights, activations quantized to int8 per block of 64 columns (q8_0's rule).
and the continuation the exact model picks greedily from each prompt, scored under all three.
It reports, for "weights" (float vs exact) and "activations" (exact vs x8), and for x8 against float:
  max and mean |logit difference|, the KL divergence of the next-token distribution (mean, p99, max)
  and the share of positions where the greedy token agrees.

    python benchmarks/eval_int8_activations.py --dir /var/tmp/chatglm2-4l --layers 4 [--bits 4,8]
        [--prompts 200] [--length 64] [--json benchmarks/results/eval_int8_activations-4l.json]
    python benchmarks/eval_int8_activations.py --tiny glm2        # a tiny test checkpoint instead

Random weights: the logits of a random model are flatter than a trained one's, so KL and agreement
here are a stress test of the arithmetic, not a measure of answer quality.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))


class Comparison:
    """Running statistics of the difference between two models' logits, position by position: a full-size
    vocabulary makes each position's logits 260 KB, so nothing is kept but the per-position KL."""

    def __init__(self):
        self.max_abs, self.sum_abs, self.count, self.kl, self.agree, self.std = 0.0, 0.0, 0, [], 0, []

    def add(self, a: torch.Tensor, b: torch.Tensor):
        """Logits [n, vocab] of two models at the same n positions."""
        diff = (a - b).abs()
        self.max_abs = max(self.max_abs, diff.max().item())
        self.sum_abs += diff.double().sum().item()
        self.count += diff.numel()
        pa, lb = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
        self.kl += (pa.exp() * (pa - lb)).sum(-1).tolist()
        self.agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        self.std.append(a.std().item())

    def report(self) -> dict:
        kl = torch.tensor(self.kl, dtype=torch.float64)
        return {'max_abs': self.max_abs, 'mean_abs': self.sum_abs / self.count, 'logit_std': statistics.mean(self.std),
                'kl_mean': kl.mean().item(), 'kl_p99': kl.quantile(0.99).item(), 'kl_max': kl.max().item(),
                'greedy_agree': self.agree / len(self.kl), 'positions': len(self.kl)}


def set_int8_activations(model, on: bool):
    from modelscope_chatglm.quantization import QuantizedLinear
    for module in model.model.modules():
        if isinstance(module, QuantizedLinear):
            module.int8_activations = on


def evaluate(path: str, bits: int, prompts: int, length: int, seed: int = 0) -> dict:
    import modelscope_chatglm
    g = torch.Generator().manual_seed(seed)
    float_model = modelscope_chatglm.load(path, device='cpu', dtype='float32')
    quant = modelscope_chatglm.load(path, device='cpu', dtype='float32', quantization_bit=bits,
                                    int8_activations=False)
    vocab = quant.tokenizer.vocab_size
    pairs = {'weights (float vs exact)': Comparison(), 'activations (exact vs x8)': Comparison(),
             'both (float vs x8)': Comparison()}
    for i in range(prompts):
        ids = torch.randint(100, vocab, (length,), generator=g)
        # the exact model's greedy continuation of the first half, then every position scored
        half = ids[: length // 2].tolist()
        cont = quant.generate(half, max_new_tokens=length - len(half), do_sample=False, stop_ids=[])
        seq = torch.tensor(half + list(cont)[: length - len(half)])
        set_int8_activations(quant, False)
        exact = quant.logits(seq)[0]
        set_int8_activations(quant, True)
        x8 = quant.logits(seq)[0]
        set_int8_activations(quant, False)
        fp = float_model.logits(seq)[0]
        pairs['weights (float vs exact)'].add(fp, exact)
        pairs['activations (exact vs x8)'].add(exact, x8)
        pairs['both (float vs x8)'].add(fp, x8)
        if (i + 1) % 25 == 0:
            print(f'  int{bits}: {i + 1}/{prompts} prompts', flush=True)
    return {name: c.report() for name, c in pairs.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--dir', help='a ChatGLM2-shaped checkpoint (fullsize.py builds one if missing)')
    ap.add_argument('--layers', type=int, default=4, help='layers of the checkpoint --dir builds')
    ap.add_argument('--tiny', choices=['glm1', 'glm2', 'glm3'], help='a tiny test checkpoint instead')
    ap.add_argument('--bits', default='4,8')
    ap.add_argument('--prompts', type=int, default=200)
    ap.add_argument('--length', type=int, default=64)
    ap.add_argument('--json')
    args = ap.parse_args()
    if args.tiny:
        from modelscope_chatglm.testing import tiny
        path = tiny.build(tempfile.mkdtemp(prefix='eval-x8-'), args.tiny, 'safetensors', 1, seed=3)
    else:
        from fullsize import build
        path = args.dir or f'/var/tmp/chatglm2-{args.layers}l'
        build(path, layers=args.layers)
    torch.set_num_threads(os.cpu_count())
    report = {}
    for bits in (int(b) for b in args.bits.split(',')):
        report[f'int{bits}'] = evaluate(path, bits, args.prompts, args.length)
    print(f'\n{args.prompts} prompts x {args.length} positions; {"tiny " + args.tiny if args.tiny else path}')
    print('| blocks | error of | max abs logit diff | mean abs | KL mean | KL p99 | KL max | greedy agreement |')
    print('|---|---|---|---|---|---|---|---|')
    for name, rows in report.items():
        for what, r in rows.items():
            print(f'| {name} | {what} | {r["max_abs"]:.4f} | {r["mean_abs"]:.5f} | {r["kl_mean"]:.2e} | '
                  f'{r["kl_p99"]:.2e} | {r["kl_max"]:.2e} | {100 * r["greedy_agree"]:.2f}% |')
    print(f'(logit std: {statistics.mean(r["logit_std"] for rows in report.values() for r in rows.values()):.3f})')
    if args.json:
        json.dump({'args': vars(args), 'report': report}, open(args.json, 'w'), indent=1)


if __name__ == '__main__':
    main()
