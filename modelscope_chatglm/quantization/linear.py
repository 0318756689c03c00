"""`QuantizedLinear`: the int8/int4 replacement for the four linears of each GLM block.

Parameters mirror the hub files: `weight` (int8 [out, in], or int4 packed [out, in/2]),
`weight_scale` [out], optional `bias` [out].

Forward, by where the weights live:
- CPU with the compiled kernels (build.py), `int8_activations` set: every row of x, prompt or decode,
  goes through the integer kernels (x quantized to int8 per block of 64 columns, as ggml's q8_0; exact
  integer dot products): the fastest path, within ~0.5% of the exact one per layer, and a row's result
  never depends on the other rows (a prompt prefilled cold or from the prefix cache gets the same numbers).
- CPU with the compiled kernels, exact (the default): up to DECODE_ROWS rows of x (128 for bf16 x on
  AVX512-BF16) go through the fused kernel,
  which streams the quantized weights once for all rows (no dequantised copy; a bf16 model's x stays bf16
  and, on AVX512-BF16, is multiplied in bf16 pairs); longer inputs (prefill) copy
  row tiles of W's integer values into a small reused buffer, multiply with torch (bf16 tiles for a bf16
  model, so oneDNN can use AMX; fp32 tiles otherwise) and scale the product, as the kernel does. The whole
  W is never materialised.
- CUDA: Triton kernels that dequantise in registers (triton_kernels.py): a streaming GEMV for
  decode, tensor-core tiles for prefill. Without Triton (it ships with CUDA builds of torch), the
  tiled dequantise-and-multiply in torch below.
- CPU without a compiler: the same tiled dequantise-and-multiply in torch.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from . import formats
from ..triton_support import optional
from .build import load_library

# Rows of x up to which the compiled kernel runs (batched decode, short prompts): it gives each row the
# same bits whatever the other rows are. Longer inputs (prefill) take dequantized tiles + matmul.
DECODE_ROWS = 64
# Where bf16 x is multiplied in bf16 pairs (the avx512-vnni-bf16 build), the kernel stays the faster path
# up to 128 rows, the serving scheduler's prefill chunk on a CPU (at 256 rows tiles win in int8; numbers in
# benchmarks/README.md, "Design choices").
DECODE_ROWS_BF16_PAIRS = 128
TILE_ELEMENTS = 1 << 22  # dequantised tile size (4M weights: 8 MB in bf16)


def kernel_rows(lib, dtype: torch.dtype) -> int:
    """Rows of x up to which the exact kernel runs, for this library and x's dtype."""
    return DECODE_ROWS_BF16_PAIRS if dtype == torch.bfloat16 and lib.isa == 'avx512-vnni-bf16' else DECODE_ROWS


class QuantizedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool, dtype=None,
                 scale_dtype=None, device=None):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f'quantization_bit must be 8 or 4, got {bits}')
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        packed = in_features // 2 if bits == 4 else in_features
        self.weight = nn.Parameter(torch.empty(out_features, packed, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=scale_dtype or dtype, device=device),
                                         requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None
        self.lane_layout = False        # see `int8_activations`
        self._int8_activations = False

    @property
    def int8_activations(self) -> bool:
        """Quantize x to int8 too (see the module docstring); set for the whole model by
        loading.load(int8_activations=True). On x86 (AVX2, AVX-512), setting it rearranges `weight` in place
        for that kernel (`lane_layout`: strips of 16 to 64 rows, their groups of 4 bytes side by side and
        sign bits flipped where the kernel wants them, so that no call transposes them); clearing it
        restores the hub's layout, and the state dict always holds the hub's layout."""
        return self._int8_activations

    @int8_activations.setter
    def int8_activations(self, on: bool):
        self._int8_activations = bool(on)
        self._use_lane_layout(self._int8_activations)

    def _use_lane_layout(self, lanes: bool):
        if lanes != self.lane_layout and self.weight.device.type == 'cpu' and self._relayout(self.weight, lanes):
            self.lane_layout = lanes

    def _relayout(self, weight: torch.Tensor, lanes: bool) -> bool:
        """Rearrange `weight` in place to (lanes) or from the lane layout; False where the build keeps the
        hub layout (NEON and scalar builds, or no compiled kernels)."""
        lib = load_library()
        return lib is not None and lib.x8_relayout_weights(weight.data_ptr(), self.out_features, self.in_features,
                                                           self.bits, int(lanes), torch.get_num_threads()) == 0

    @contextlib.contextmanager
    def _hub_layout(self):
        """The weights in the hub's layout inside (to load, quantize or move them), then in the layout
        int8_activations calls for."""
        self._use_lane_layout(False)
        try:
            yield
        finally:
            self._use_lane_layout(self._int8_activations)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.lane_layout:
            rows = self.weight.detach().clone()
            self._relayout(rows, False)
            destination[prefix + 'weight'] = rows

    def _apply(self, fn, *args, **kwargs):
        """Moving or converting the module (`.to('cuda')`, `.cpu()`, ...): the weights leave in the hub's
        layout, the only one other devices read."""
        with self._hub_layout():
            return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        with self._hub_layout():   # the state dict holds the hub's layout
            super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self):
        return (f'in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}'
                + (', int8_activations=True' if self.int8_activations else ''))

    @torch.no_grad()
    def load_float_weight(self, weight: torch.Tensor):
        """Quantize-on-load: fill `weight` and `weight_scale` from a float [out, in] matrix."""
        # On the module's own device: a GPU quantizes a 6B model in seconds, a CPU in fp16 would not.
        q, scale = formats.quantize(weight.to(self.weight.device), self.bits)
        with self._hub_layout():
            self.weight.copy_(q)
            self.weight_scale.copy_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x.is_cuda and (kernels := optional('quantization.triton_kernels')) is not None:
            y = kernels.quantized_linear(x2, self.weight, self.weight_scale, self.bias, self.bits)
        elif x.is_cpu and self.kernel_takes(x2.shape[0], x2.dtype):
            y = self._gemv(load_library(), x2)
        else:
            y = self._tiled_matmul(load_library() if x.is_cpu else None, x2)
        return y.reshape(*x.shape[:-1], self.out_features)

    def kernel_takes(self, rows: int, dtype: torch.dtype) -> bool:
        """Whether `rows` rows of x in `dtype` go through the compiled CPU kernel, which sums each row in
        one order whatever the other rows are (so each row gets the bits it gets alone); the others take
        dequantized tiles + matmul, or the GPU kernels."""
        lib = load_library() if self.weight.is_cpu else None
        return lib is not None and (self._int8_activations or rows <= kernel_rows(lib, dtype))

    def _gemv(self, lib, x2):
        rows, threads, bf16 = x2.shape[0], torch.get_num_threads(), x2.dtype == torch.bfloat16
        if bf16 and not self._int8_activations:
            # bf16 x as it is (AVX512-BF16 multiplies bf16 pairs). A bf16 model's prefill tiles round
            # x @ q to bf16 before the scales multiply it (oneDNN writes bf16): the kernel's sums are
            # rounded at the same point, so a prompt prefilled cold and one continued from the prefix
            # cache differ only in summation order, not in an extra rounding. (Rounding once here and
            # twice there changed 2 of 50 greedy replies.)
            xb, y = x2.contiguous(), torch.empty(rows, self.out_features, dtype=torch.float32)
            getattr(lib, f'q{self.bits}_gemv_xbf16')(xb.data_ptr(), rows, self.in_features, self.weight.data_ptr(),
                                                     None, None, y.data_ptr(), self.out_features, threads)
            return self._scale_and_bias(y.to(torch.bfloat16)).to(x2.dtype)
        scale, bias = self.fp32_scale_and_bias()
        name = f'q{self.bits}_gemv' + ('_x8' if self._int8_activations else '') + ('_lanes' if self.lane_layout else '')
        if self._int8_activations and bf16:
            # bf16 in and out of the kernel, which widens and rounds exactly as the conversions around
            # the fp32 entry point would: two torch ops fewer per linear in a decode step.
            kernel, x, y = getattr(lib, name + '_bf16'), x2.contiguous(), torch.empty(rows, self.out_features,
                                                                                       dtype=torch.bfloat16)
        else:
            kernel, x, y = getattr(lib, name), x2.float().contiguous(), torch.empty(rows, self.out_features,
                                                                                     dtype=torch.float32)
        kernel(x.data_ptr(), rows, self.in_features, self.weight.data_ptr(), scale.data_ptr(),
               None if bias is None else bias.data_ptr(), y.data_ptr(), self.out_features, threads)
        return y.to(x2.dtype)

    def fp32_scale_and_bias(self):
        """The scales and the bias (None if none) in fp32, what the int8-activation kernels read (the
        CPU keeps the scales in fp32 already; a bf16 model's bias is converted)."""
        scale = self.weight_scale if self.weight_scale.dtype == torch.float32 else self.weight_scale.float()
        return scale, None if self.bias is None else self.bias.float().contiguous()

    def _scale_and_bias(self, out):
        """x @ q (any float dtype) -> (x @ q) * scale + bias in fp32."""
        out = out.float().mul_(self.weight_scale.float())
        if self.bias is not None:
            out += self.bias.float()
        return out

    def _tiled_matmul(self, lib, x2):
        """x2 @ dequant(W).T, one tile of rows of W at a time.

        In fp32 and bf16 the tiles hold the integer values (exact in both) and the scales multiply the
        product in fp32, as the kernels do: a prompt's rows and a decode step's multiply x by the same
        numbers, so a prompt prefilled cold and one continued from the prefix cache agree up to
        summation order. (bf16 tiles of q * scale rounded every weight to 8 bits of mantissa.) fp16
        (a GPU without Triton) keeps q * scale in the tiles: x @ q could exceed fp16's range."""
        compute = x2.dtype if x2.dtype in (torch.bfloat16, torch.float32) or x2.is_cuda else torch.float32
        scale_after = compute in (torch.float32, torch.bfloat16)
        xc = x2.to(compute)
        rows = max(1, min(self.out_features, TILE_ELEMENTS // self.in_features))
        out = torch.empty(x2.shape[0], self.out_features, dtype=compute, device=x2.device)
        tile = torch.empty(rows, self.in_features, dtype=compute, device=x2.device)
        for n0 in range(0, self.out_features, rows):
            n1 = min(n0 + rows, self.out_features)
            w = self._weight_rows(lib, n0, n1, tile[:n1 - n0], compute, scaled=not scale_after)
            out[:, n0:n1] = F.linear(xc, w)
        if scale_after:
            out = self._scale_and_bias(out)
        elif self.bias is not None:
            out += self.bias.to(out.dtype)
        return out.to(x2.dtype)

    def _weight_rows(self, lib, n0, n1, tile, dtype, scaled: bool):
        """Rows [n0, n1) of W as `dtype`: q * scale, or the integer values q with scaled=False."""
        if lib is None:
            scale = self.weight_scale[n0:n1] if scaled else torch.ones(n1 - n0, device=self.weight.device)
            return formats.dequantize(self.weight[n0:n1], scale, self.bits, dtype)
        scale = self.weight_scale.float() if scaled else None
        name = f'q{self.bits}_dequant_rows_{"bf16" if dtype == torch.bfloat16 else "f32"}'
        getattr(lib, name)(self.weight.data_ptr(), None if scale is None else scale.data_ptr(), n0, n1,
                           self.in_features, tile.data_ptr(), torch.get_num_threads())
        return tile


def quantize_linears(model: nn.Module, bits: int, dtype: torch.dtype, device: torch.device) -> None:
    """Swap the GLM blocks' linears (named by `model.QUANTIZED_LINEARS`) for QuantizedLinear modules.

    Call on a model built on the meta device, before its weights are loaded. On CPU the scales are
    kept in fp32 (what the kernels read); on GPU in the model dtype."""
    scale_dtype = torch.float32 if device.type == 'cpu' else dtype
    for layer in model.layers:
        for path in model.QUANTIZED_LINEARS:
            parent_name, _, name = path.rpartition('.')
            parent = layer.get_submodule(parent_name)
            old = getattr(parent, name)
            setattr(parent, name, QuantizedLinear(old.in_features, old.out_features, bits, old.bias is not None,
                                                  dtype=dtype, scale_dtype=scale_dtype, device=torch.device('meta')))
