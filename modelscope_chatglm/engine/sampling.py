"""Choosing tokens: a request's sampling parameters, and the one sampler every step's rows go through.

`sample(logits, seqs, vocab_limit)` turns a step's logits [n, V] into each sequence's next token. The
logits go through a list of processors (LOGITS_PROCESSORS), each a function of the whole batch with each
row's own parameters, in the order transformers uses, so greedy and seeded sampling behave like the
official `generate`: logit bias, the padded vocabulary masked, a grammar's token mask (structured output,
grammar.py), stop ids masked before min_tokens, repetition penalty, OpenAI's frequency and presence
penalties, then temperature, top-k, top-p, min-p. A processor touches only the rows whose parameters ask
for it. Greedy rows take the argmax; sampled rows
draw from their own generator when seeded (a seeded reply is the same alone and in any batch), the
others in one draw.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .grammar import Grammar, mask_logits

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
    stop_ids: Sequence[int] = field(default_factory=tuple)        # the model's end-of-reply ids
    seed: Optional[int] = None
    # vLLM's: tokens below min_p x the likeliest token's probability are dropped; stop ids are masked
    # until min_tokens are generated; ignore_eos generates past the model's stop ids; stop_token_ids
    # end the reply too.
    min_p: float = 0.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    # Structured output: a compiled grammar (grammar.py) the reply must follow; each sequence gets a matcher
    grammar: Optional[Grammar] = None

    @property
    def stops(self) -> frozenset:
        """The ids that end a reply: the model's (unless ignore_eos) and stop_token_ids. (A handful of ids:
        derived at each look, so no copy of the parameters can hold a stale set.)"""
        return frozenset(() if self.ignore_eos else self.stop_ids) | frozenset(self.stop_token_ids)

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
                                 ('min_tokens', int, 'an integer'), ('min_p', (int, float), 'a number'),
                                 ('temperature', (int, float), 'a number'), ('top_p', (int, float), 'a number'),
                                 ('repetition_penalty', (int, float), 'a number'),
                                 ('frequency_penalty', (int, float), 'a number'),
                                 ('presence_penalty', (int, float), 'a number')):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
                raise ValueError(f'{name} must be {text}, got {value!r} ({type(value).__name__})')
        if self.grammar is not None and not isinstance(self.grammar, Grammar):
            raise ValueError(f'grammar must be a compiled Grammar (ChatModel.grammar(text)), got {type(self.grammar).__name__}')
        for name in ('do_sample', 'ignore_eos'):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f'{name} must be True or False, got {getattr(self, name)!r}')
        for name in ('stop_ids', 'stop_token_ids'):
            ids = getattr(self, name)
            if not isinstance(ids, (list, tuple)) or not all(
                    isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ValueError(f'{name} must be a list of non-negative token ids, got {ids!r}'[:300])
        if not 0 <= self.min_p <= 1:
            raise ValueError(f'min_p must be in [0, 1], got {self.min_p}')
        if self.min_tokens < 0:
            raise ValueError(f'min_tokens must be >= 0, got {self.min_tokens}')
        if self.max_new_tokens is not None and self.min_tokens > self.max_new_tokens:
            raise ValueError(f'min_tokens={self.min_tokens} is more than max_tokens={self.max_new_tokens}; '
                             'ask for at most as many as the reply may have')
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


class Rows:
    """A step's sampled rows: each row's sequence (its parameters, tokens so far, generator)."""

    def __init__(self, seqs, vocab_limit: int):
        self.seqs, self.params = seqs, [seq.params for seq in seqs]
        self.vocab_limit = vocab_limit
        self.failures: Dict[int, BaseException] = {}   # rows a processor found no token for

    def where(self, wanted) -> List[int]:
        return [row for row, params in enumerate(self.params) if wanted(params)]


def logit_bias(logits: torch.Tensor, rows: Rows) -> torch.Tensor:
    for row in rows.where(lambda p: p.logit_bias):
        ids, biases = rows.params[row].bias_tensors(logits.device)
        inside = ids < logits.shape[-1]
        logits[row, ids[inside]] += biases[inside]   # (ids are unique: dict keys)
    return logits


def padded_vocabulary(logits: torch.Tensor, rows: Rows) -> torch.Tensor:
    logits[:, rows.vocab_limit:] = float('-inf')   # padded embedding rows are not tokens
    return logits


def structured_output(logits: torch.Tensor, rows: Rows) -> torch.Tensor:
    """Rows with a grammar: only the tokens it allows next (and once the reply is complete, its stop ids)."""
    chosen = rows.where(lambda p: p.grammar is not None)
    if chosen:
        rows.failures.update(mask_logits(logits, chosen, [rows.seqs[r].matcher for r in chosen],
                                         [rows.params[r].stops for r in chosen]))
    return logits


def min_tokens(logits: torch.Tensor, rows: Rows) -> torch.Tensor:
    """The ids that would end a reply cannot be picked before it has min_tokens tokens."""
    for row in rows.where(lambda p: p.min_tokens):
        if len(rows.seqs[row].output) < rows.params[row].min_tokens:
            ids = [i for i in rows.params[row].stops if i < logits.shape[-1]]
            logits[row, ids] = float('-inf')
    return logits


def repetition_penalty(logits: torch.Tensor, rows: Rows) -> torch.Tensor:
    """transformers' rule: every token seen so far (prompt and output) has its logit divided by the
    penalty (multiplied when negative)."""
    for row in rows.where(lambda p: p.repetition_penalty != 1.0):
        seen, penalty = rows.seqs[row].ids_tensor(logits.device)[0], rows.params[row].repetition_penalty
        picked = logits[row].gather(0, seen)
        logits[row].scatter_(0, seen, torch.where(picked < 0, picked * penalty, picked / penalty))
    return logits


def openai_penalties(logits: torch.Tensor, rows: Rows) -> torch.Tensor:
    """OpenAI's frequency (per time generated) and presence (once generated) penalties."""
    for row in rows.where(lambda p: p.frequency_penalty or p.presence_penalty):
        seq, params = rows.seqs[row], rows.params[row]
        generated = seq.ids_tensor(logits.device)[0, len(seq.prompt):]
        if generated.numel():
            counts = torch.zeros_like(logits[row]).scatter_add_(0, generated, torch.ones_like(generated, dtype=logits.dtype))
            logits[row] -= counts * params.frequency_penalty + (counts > 0).to(logits.dtype) * params.presence_penalty
    return logits


def temperature(logits: torch.Tensor, rows: Rows) -> torch.Tensor:
    """Sampled rows: the best score shifted to 0, then divided by the temperature (the same distribution,
    but a tiny temperature sharpens it towards greedy instead of overflowing to inf - inf = NaN)."""
    sampled = rows.where(lambda p: p.sampling)
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        t = torch.tensor([rows.params[r].temperature for r in sampled], device=logits.device)[:, None]
        part = logits[index]
        logits[index] = (part - part.max(dim=-1, keepdim=True).values) / t
    return logits


def min_p(logits: torch.Tensor, rows: Rows) -> torch.Tensor:
    """Sampled rows: drop the tokens less likely than min_p x the likeliest one (after temperature, top-k and
    top-p, as transformers' MinPLogitsWarper and vLLM order them)."""
    chosen = rows.where(lambda p: p.sampling and p.min_p > 0)
    if chosen:
        index = torch.tensor(chosen, device=logits.device)
        floor = torch.tensor([math.log(rows.params[r].min_p) for r in chosen], device=logits.device)[:, None]
        part = logits[index]
        logprobs = part.log_softmax(dim=-1)
        best = logprobs.max(dim=-1, keepdim=True).values
        logits[index] = part.masked_fill(logprobs < best + floor, float('-inf'))
    return logits


def top_k(logits: torch.Tensor, rows: Rows) -> torch.Tensor:
    chosen = rows.where(lambda p: p.sampling and p.top_k > 0)
    if chosen:
        index = torch.tensor(chosen, device=logits.device)
        k = torch.tensor([min(rows.params[r].top_k, logits.shape[-1]) for r in chosen], device=logits.device)
        part = logits[index]
        kth = part.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
        logits[index] = part.masked_fill(part < kth, float('-inf'))
    return logits


def top_p(logits: torch.Tensor, rows: Rows) -> torch.Tensor:
    """Nucleus sampling: the fewest most likely tokens whose probabilities add up to top_p (the most
    likely token always stays)."""
    chosen = rows.where(lambda p: p.sampling and p.top_p < 1.0)
    if chosen:
        index = torch.tensor(chosen, device=logits.device)
        p = torch.tensor([rows.params[r].top_p for r in chosen], device=logits.device)[:, None]
        part = logits[index]
        sorted_logits, order = torch.sort(part, descending=False, dim=-1)
        drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - p)
        drop[:, -1] = False
        logits[index] = part.masked_fill(drop.scatter(1, order, drop), float('-inf'))
    return logits


LOGITS_PROCESSORS = (logit_bias, padded_vocabulary, structured_output, min_tokens, repetition_penalty,
                     openai_penalties, temperature, top_k, top_p, min_p)


def sample(logits: torch.Tensor, seqs, vocab_limit: int) -> Tuple[Dict[int, int], Dict[int, BaseException]]:
    """The next token of each sequence (engine/scheduler.py's Sequence) from its row of logits [n, V]
    (fp32). -> ({row: token}, {row: why it has none}). A row with NaN/inf logits fails on its own: the
    forward overflowed (fp16 activations, typically), and any token would be noise; so does a row whose
    parameters leave no valid distribution."""
    finite = torch.isfinite(logits).all(dim=-1).tolist()
    failures: Dict[int, BaseException] = {
        row: FloatingPointError('the model produced NaN/inf logits (fp16 overflow?); load it in bfloat16 or float32')
        for row, ok in enumerate(finite) if not ok}
    rows = Rows(seqs, vocab_limit)
    scores = logits.float().clone()
    for process in LOGITS_PROCESSORS:
        scores = process(scores, rows)
    failures.update({row: e for row, e in rows.failures.items() if row not in failures})
    tokens = dict(enumerate(scores.argmax(dim=-1).tolist()))   # greedy rows' tokens (the others' are replaced)
    sampled = [row for row in rows.where(lambda p: p.sampling) if row not in failures]
    if sampled:
        probs = scores[sampled].softmax(dim=-1)
        valid = (torch.isfinite(probs).all(dim=-1) & (probs >= 0).all(dim=-1)).tolist()
        shared = []
        for i, row in enumerate(sampled):
            if not valid[i]:
                failures[row] = ValueError('the probability tensor holds inf, NaN or a negative number after the '
                                           'sampling parameters were applied (check repetition_penalty, '
                                           'temperature and logit_bias)')
            elif seqs[row].generator is not None:   # its own stream: the same draw alone or batched
                tokens[row] = int(torch.multinomial(probs[i], 1, generator=seqs[row].generator))
            else:
                shared.append(i)
        if shared:
            drawn = torch.multinomial(probs[shared], 1).squeeze(1).tolist()
            for i, token in zip(shared, drawn):
                tokens[sampled[i]] = token
    return {row: token for row, token in tokens.items() if row not in failures}, failures


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


