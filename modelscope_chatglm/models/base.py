"""What the rest of the package asks of a model: the contract between an architecture
(glm1.py, glm2.py) and the engine (engine/runner.py), the loader (loading.py, checkpoint.py) and
`ChatModel`. Written down as a Protocol; each architecture implements all of it.

The engine keeps every sequence's K/V in one paged pool (kv_cache.py) and puts the new tokens of many
sequences through one forward:
    state = model.start(prompt_ids)                            # the family's per-sequence state; runs nothing
    logits = model.forward_ragged([(state, past, ids), ...], kv)            # [n, V]
    logits = model.forward_ragged(parts, kv, every=(0,))      # [n + len(ids), V]: also each position of part 0
    model.rows_keep_their_bits(rows)        # may prompt chunks and decode tokens share one forward?
where kv is the forward's PagedKV (page tables and the new tokens' pages). Whole left-padded prompts, for
scoring and parity tests, go through the same forward (`score_whole`):
    logits = model.full_logits(input_ids, attention_mask)                      # [b, s, V]
"""
from __future__ import annotations

from typing import Any, List, Optional, Protocol, Tuple, runtime_checkable

import torch


@runtime_checkable
class CausalLM(Protocol):
    cfg: Any                                  # model_config.ModelConfig
    # The linears of each block (names relative to a block) that int8/int4 checkpoints quantize.
    QUANTIZED_LINEARS: Tuple[str, ...]
    # Whether the K/V of a prompt's prefix stay valid when the prompt grows (causal attention).
    # Only then may the engine share a cached prefix's pages between sequences (the prefix cache).
    supports_prefix_reuse: bool

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype:
        """What the blocks compute in, and the K/V's dtype. The embedding and the head may be stored
        narrower (a quantized fp32 model keeps the checkpoint's fp16 there: `loading.build_model`)."""

    @staticmethod
    def checkpoint_key(key: str) -> Optional[str]:
        """Hub state-dict key -> parameter name; None for keys the forward never reads."""

    @staticmethod
    def hub_key(name: str) -> str:
        """Parameter name -> hub state-dict key, the inverse of checkpoint_key (what `export` writes)."""

    @property
    def kv_heads(self) -> int:
        """K/V heads per position (the pool's G)."""

    def start(self, prompt) -> Any:
        """The family's state of one sequence (ChatGLM-6B: where its prompt's [gMASK] and <sop> are); runs
        nothing. May raise ValueError for a prompt the family cannot take."""

    def prefix_kv(self) -> torch.Tensor:
        """P-tuning v2 (cfg.pre_seq_len): the learned prefix K/V, [layers, 2 (k, v), G, pre_seq_len, d]."""

    def forward_ragged(self, parts, kv, every=()) -> torch.Tensor:
        """parts = [(state, past, new ids), ...] of different sequences, kv their PagedKV -> logits of each
        part's last token [n, V] (fp32); a sequence's result does not depend on the other parts. The parts
        whose indices are in `every` add the logits of each of their positions after those n rows, part
        after part."""

    def rows_keep_their_bits(self, rows: int) -> bool:
        """Whether `forward_ragged` over `rows` rows in all gives every row the bits it gets in a forward
        of its own sequence alone (see `linears_keep_row_bits`)."""

    def full_logits(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Logits at every position [b, s, V] (fp32), for scoring and parity tests."""


def left_pad(prompts: List[List[int]], pad_id: int):
    """-> input_ids [b, s], attention_mask [b, s] (1 = token, 0 = padding on the left)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if p:
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
    return ids, mask


def score_whole(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """`full_logits` of any model: each row's real tokens as one part of a forward over a pool of its own.
    -> [b, s, V] fp32 (zeros at padding)."""
    from .kv_cache import KVPool, PagedKV
    cfg, device = model.cfg, model.device
    b, s = input_ids.shape
    real = torch.ones(b, s, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
    rows = [input_ids[i].cpu()[real[i]].tolist() for i in range(b)]
    pre = cfg.pre_seq_len or 0
    pool = KVPool(cfg.num_layers, model.kv_heads, cfg.head_dim, pre + sum(map(len, rows)), model.dtype, device)
    if pre:
        pool.hold_prefix(range(pre), model.prefix_kv())
    tables, start, parts = [], pre, [i for i in range(b) if rows[i]]
    for i in parts:
        tables.append(torch.cat([torch.arange(pre), torch.arange(start, start + len(rows[i]))]).to(torch.int32))
        start += len(rows[i])
    kv = PagedKV.build(pool, tables, [len(rows[i]) for i in parts])
    logits = model.forward_ragged([(model.start(rows[i]), 0, rows[i]) for i in parts], kv,
                                  every=list(range(len(parts))))
    out = torch.zeros(b, s, logits.shape[-1], dtype=torch.float32, device=device)
    offset = len(parts)
    for i in parts:
        out[i, real[i].to(device)] = logits[offset:offset + len(rows[i])]
        offset += len(rows[i])
    return out


def ragged_logits(model, hidden: torch.Tensor, lengths, every=()) -> torch.Tensor:
    """The rows of `forward_ragged`'s result from the last block's output [T, D]: each part's last
    position, then every position of the parts in `every`. The last positions go through the final
    norm and the head as they would without `every`, so the tokens sampled from them keep their bits."""
    ends = torch.tensor(lengths, device=hidden.device).cumsum(0)
    logits = model.logits(model.final_layernorm(hidden[ends - 1])).float()
    if not every:
        return logits
    rows = torch.cat([torch.arange(int(ends[i]) - lengths[i], int(ends[i]), device=hidden.device) for i in every])
    return torch.cat([logits, model.logits(model.final_layernorm(hidden[rows])).float()])


def linears_keep_row_bits(layers: torch.nn.Module, rows: int, dtype: torch.dtype) -> bool:
    """Whether every linear of `layers` gives each of `rows` rows of x (in `dtype`) the bits that row
    gets alone. Attention gives each query its own sums and the norms run per row, so a forward's rows are independent
    exactly when its linears are. The compiled CPU kernels sum a row in one order whatever the number of
    rows (`QuantizedLinear.kernel_takes`); torch's matmuls (a float model, dequantized tiles for long
    inputs, a LoRA adapter's side product, any GPU) choose their blocking by the shape."""
    from ..adapters import LoRALinear
    from ..quantization.linear import QuantizedLinear
    for module in layers.modules():
        if isinstance(module, (torch.nn.Linear, LoRALinear)):
            return False
        if isinstance(module, QuantizedLinear) and not module.kernel_takes(rows, dtype):
            return False
    return True


def lm_head(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden [..., D] -> logits [..., V] through the head weight [V, D] (shared by both architectures).

    On CPU with an fp32 or bf16 head, the rows of a decode step (1 to 64: one sequence or a batch) go
    through the compiled kernel (`f32_gemv` / `bf16_gemv`, quantization/kernels/gemv.c), which sums each
    row in fp32 in the same order whatever the number of rows, as the quantized blocks do: a sequence's
    logits are bit for bit the same alone or batched. MKL's sgemm changes its summation order with the
    number of rows, and oneDNN's bf16 GEMM rounds the logits to bf16, where the top two often tie. Those
    logits are fp32. Other shapes and devices keep F.linear.

    A quantized fp32 model on the CPU keeps its head as the checkpoint's fp16 (`loading.build_model`):
    half the bytes a decode step reads, widened to fp32 in registers (`f16_gemv`), so the logits are
    those of the fp32 head exactly. Every row count takes that kernel: torch has no fp32 x fp16 product."""
    rows = hidden.shape[0] if hidden.dim() == 2 else 0
    if hidden.device.type == 'cpu' and weight.dtype == torch.float16 and hidden.dtype == torch.float32:
        from ..quantization.build import load_library
        lib = load_library()
        if lib is None:
            return torch.nn.functional.linear(hidden, weight.float())
        x = hidden.reshape(-1, hidden.shape[-1]).contiguous()
        out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
        lib.f16_gemv(x.data_ptr(), x.shape[0], x.shape[1], weight.contiguous().data_ptr(), None, out.data_ptr(),
                     weight.shape[0], torch.get_num_threads())
        return out.reshape(*hidden.shape[:-1], weight.shape[0])
    if (hidden.device.type == 'cpu' and 1 <= rows <= 64 and hidden.dtype == weight.dtype
            and weight.dtype in (torch.float32, torch.bfloat16) and weight.is_contiguous()):
        from ..quantization.build import load_library
        lib = load_library()
        if lib is not None:
            x = hidden.contiguous()   # the head's dtype: bf16_gemv takes bf16 x
            out = torch.empty(rows, weight.shape[0], dtype=torch.float32)
            kernel = lib.f32_gemv if weight.dtype == torch.float32 else lib.bf16_gemv
            kernel(x.data_ptr(), rows, x.shape[1], weight.data_ptr(), None, out.data_ptr(), weight.shape[0],
                   torch.get_num_threads())
            return out
    return torch.nn.functional.linear(hidden, weight)
