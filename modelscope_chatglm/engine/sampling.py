"""Choosing tokens: a request's sampling parameters, and the one sampler every sequence goes through.

`sample(logits, seq, vocab_limit)` turns a sequence's logits row into its next token.
Logits are processed in the order transformers uses, so greedy and seeded sampling behave like the
official `generate`: logit bias, repetition penalty, OpenAI's frequency and presence penalties, then
temperature, top-k, top-p. Each sequence draws from its own generator (seeded per request), so a seeded
reply is the same alone and in any batch.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields, replace
from typing import Dict, List, Optional, Sequence

import torch


# A temperature below this samples greedily (vLLM's rule). Sampling at it already picks the best token
# unless another is within ~1e-4 of it; dividing float32 logits by 1e-300 gives 0 / 0 = NaN.
GREEDY_BELOW_TEMPERATURE = 1e-5
REPETITION_PENALTY_RANGE = (1e-4, 1e4)   # beyond it float32 logits overflow to inf (NaN after the shift)


@dataclass
class SamplingParams:
    max_new_tokens: Optional[int] = None   # new tokens; wins over max_length when both are set
    max_length: Optional[int] = None       # prompt + new tokens
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    # OpenAI's: subtracted from a token's logit per time it was generated / once if it was at all
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: Dict[int, float] = field(default_factory=dict)   # token id -> added to its logit
    stop_ids: Sequence[int] = field(default_factory=tuple)
    seed: Optional[int] = None

    @classmethod
    def from_kwargs(cls, defaults: 'SamplingParams', **kwargs) -> 'SamplingParams':
        """`defaults` updated with generation kwargs; unknown names are an error, not ignored."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(k for k in kwargs if k not in names)
        if unknown:
            raise TypeError(f'unknown generation argument(s) {unknown}; valid ones are {sorted(names)}')
        params = replace(defaults, **{k: v for k, v in kwargs.items() if v is not None})
        params.validate()
        return params

    def validate(self):
        for name, kind, text in (('max_new_tokens', int, 'an integer'), ('max_length', int, 'an integer'),
                                 ('top_k', int, 'an integer'), ('seed', int, 'an integer'),
                                 ('temperature', (int, float), 'a number'), ('top_p', (int, float), 'a number'),
                                 ('repetition_penalty', (int, float), 'a number'),
                                 ('frequency_penalty', (int, float), 'a number'),
                                 ('presence_penalty', (int, float), 'a number')):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
                raise ValueError(f'{name} must be {text}, got {value!r} ({type(value).__name__})')
        if not isinstance(self.do_sample, bool):
            raise ValueError(f'do_sample must be True or False, got {self.do_sample!r}')
        if not isinstance(self.stop_ids, (list, tuple)) or not all(
                isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0 for i in self.stop_ids):
            raise ValueError(f'stop_ids must be a list of non-negative token ids, got {self.stop_ids!r}')
        if self.seed is not None and not 0 <= self.seed < 2 ** 63:
            raise ValueError(f'seed must be in [0, 2**63), got {self.seed}')
        for name in ('temperature', 'top_p', 'repetition_penalty', 'frequency_penalty', 'presence_penalty'):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f'{name} must be finite, got {getattr(self, name)!r}')
        for name in ('frequency_penalty', 'presence_penalty'):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f'{name} must be in [-2, 2] (as in the OpenAI API), got {getattr(self, name)}')
        if not isinstance(self.logit_bias, dict) or not all(
                isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0
                and isinstance(b, (int, float)) and not isinstance(b, bool) and -100 <= b <= 100
                for i, b in self.logit_bias.items()):
            raise ValueError('logit_bias must map token ids (integers >= 0) to numbers in [-100, 100], got '
                             f'{self.logit_bias!r}'[:300])
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise ValueError(f'max_new_tokens must be >= 0, got {self.max_new_tokens}')
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f'max_length must be >= 1, got {self.max_length}')
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f'temperature must be > 0 when sampling, got {self.temperature} '
                             '(use do_sample=False for greedy decoding)')
        if not 0 < self.top_p <= 1:
            raise ValueError(f'top_p must be in (0, 1], got {self.top_p}')
        if self.top_k < 0:
            raise ValueError(f'top_k must be >= 0, got {self.top_k}')
        low, high = REPETITION_PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            raise ValueError(f'repetition_penalty must be in [{low:g}, {high:g}] (1.0 = none; >1 discourages '
                             f'repeating), got {self.repetition_penalty}')

    def bias_tensors(self, device):
        """logit_bias as (token ids, biases) tensors, made once per device: a request may carry tens of
        thousands of entries, and a Python loop over them at every token would slow the whole batch."""
        cache = self.__dict__.setdefault('_bias_tensors', {})   # not a field: replace() starts afresh
        key = str(device)
        if key not in cache:
            cache[key] = (torch.tensor(list(self.logit_bias), dtype=torch.long, device=device),
                          torch.tensor(list(self.logit_bias.values()), dtype=torch.float32, device=device))
        return cache[key]

    @property
    def sampling(self) -> bool:
        """Whether tokens are drawn at random (do_sample with a temperature of at least 1e-5)."""
        return self.do_sample and self.temperature >= GREEDY_BELOW_TEMPERATURE

    def new_token_budget(self, prompt_len: int) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if self.max_length is not None:
            return max(self.max_length - prompt_len, 0)
        raise ValueError('set max_new_tokens or max_length')


def process_logits(logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams,
                   vocab_limit: int, generated: Optional[torch.Tensor] = None) -> torch.Tensor:
    """logits [b, V] (fp32) -> processed scores; seen [b, n] = ids so far (prompt + generated),
    generated [b, m] = the generated ones (what OpenAI's frequency and presence penalties count)."""
    logits = logits.float().clone()
    if params.logit_bias:
        ids, biases = params.bias_tensors(logits.device)
        inside = ids < logits.shape[-1]
        logits[:, ids[inside]] += biases[inside]   # (ids are unique: dict keys)
    logits[:, vocab_limit:] = float('-inf')   # padded embedding rows are not tokens
    if params.repetition_penalty != 1.0 and seen.numel():
        picked = logits.gather(1, seen)
        picked = torch.where(picked < 0, picked * params.repetition_penalty,
                             picked / params.repetition_penalty)
        logits.scatter_(1, seen, picked)
    if (params.frequency_penalty or params.presence_penalty) and generated is not None and generated.numel():
        counts = torch.zeros_like(logits).scatter_add_(1, generated, torch.ones_like(generated, dtype=logits.dtype))
        logits -= counts * params.frequency_penalty + (counts > 0).to(logits.dtype) * params.presence_penalty
    if not params.sampling:
        return logits
    # Shift the best score to 0 before dividing: the same distribution, but a tiny temperature then
    # sharpens it towards greedy instead of overflowing to inf - inf = NaN.
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - params.top_p)
        drop[:, -1] = False   # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float('-inf'))
    return logits


def token_logprobs(logits: torch.Tensor, tokens: List[int], top: int, vocab_limit: int):
    """Per row of the raw logits [n, V] (before penalties and temperature; padded embedding rows are
    not tokens): the model's log-probability of that row's token and its `top` most likely tokens
    -> [(logprob, [(id, logprob), ...]), ...]."""
    logprobs = torch.log_softmax(logits[:, :vocab_limit].float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    if not top:
        return [(p, []) for p in chosen]
    best = logprobs.topk(top)
    return [(p, list(zip(ids, values))) for p, ids, values in zip(chosen, best.indices.tolist(), best.values.tolist())]


def choose(scores: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]):
    if not params.sampling:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def sample(logits: torch.Tensor, seq, vocab_limit: int) -> int:
    """The next token of one sequence (engine/scheduler.py's Sequence: its parameters, generator and
    tokens so far) from its logits row [1, V] (fp32). NaN/inf logits raise FloatingPointError: the
    forward overflowed (fp16 activations, typically), and any token would be noise."""
    if not bool(torch.isfinite(logits).all()):
        raise FloatingPointError('the model produced NaN/inf logits (fp16 overflow?); load it in bfloat16 '
                                 'or float32')
    params = seq.params
    counted = params.repetition_penalty != 1.0 or params.frequency_penalty or params.presence_penalty
    ids = seq.ids_tensor(logits.device) if counted else logits.new_zeros((1, 0), dtype=torch.long)
    seen = ids if params.repetition_penalty != 1.0 else ids[:, :0]
    scores = process_logits(logits, seen, params, vocab_limit, ids[:, len(seq.prompt):])
    return int(choose(scores, params, seq.generator)[0])
