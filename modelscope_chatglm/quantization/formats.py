"""Weight-only int8/int4 formats of the ChatGLM quantized checkpoints (docs/formats.md §2.2, §2.4, §6).

Per output row r of a weight W [out, in]:
    scale[r] = max_c |W[r, c]| / (2^(bits-1) - 1)          (127 for int8, 7 for int4; no zero point)
    Q[r, c]  = round(W[r, c] / scale[r])                    (round half to even, as torch.round)
int4 packs two values per byte, [out, in/2]: the HIGH nibble holds the even column 2j, the LOW nibble
the odd column 2j+1, both 4-bit two's complement. Dequantised: W ~= Q * scale[:, None].

These torch functions are the reference the C kernels are tested against, and what quantize-on-load
and the tiny pre-quantized checkpoints use, so both produce identical bytes.
"""
from __future__ import annotations

import torch


def quantize(weight: torch.Tensor, bits: int):
    """W [out, in] (fp16/bf16/fp32) -> (Q int8 [out, in] or packed [out, in/2], scale [out] in W's dtype).

    Computed in W's own dtype, like the reference (which quantized fp16 weights on the GPU), so that
    quantizing an fp16 checkpoint reproduces the hub's pre-quantized files."""
    if bits not in (4, 8):
        raise ValueError(f'quantization_bit must be 8 or 4, got {bits}')
    if bits == 4 and weight.shape[-1] % 2:
        raise ValueError(f'int4 packs column pairs; in_features {weight.shape[-1]} is odd')
    scale = weight.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)
    q = torch.round(weight / scale[:, None]).to(torch.int8)
    return (pack_int4(q) if bits == 4 else q), scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [out, in] -> [out, in/2] bytes, high nibble = even column."""
    q = q.to(torch.int16)
    high, low = q[:, 0::2], q[:, 1::2]
    packed = ((high & 0xF) << 4) | (low & 0xF)
    return packed.to(torch.uint8).view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[out, in/2] packed bytes -> int8 [out, in]: high nibble first, each sign-extended."""
    b = packed.view(torch.int8)
    high = b >> 4                              # arithmetic shift keeps the sign of the high nibble
    low = (b.view(torch.uint8) << 4).view(torch.int8) >> 4
    return torch.stack([high, low], dim=-1).flatten(-2)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, bits: int, dtype=torch.float32) -> torch.Tensor:
    """Q (int8 or packed int4) and scale -> W [out, in] in `dtype` (computed in fp32)."""
    q = unpack_int4(weight) if bits == 4 else weight
    return (q.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)
