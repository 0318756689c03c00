"""Weight-only int8/int4 quantization of the GLM blocks: formats, the QuantizedLinear module and the
auto-compiled C kernels. The embedding, the LM head, biases and norms stay unquantized."""
from .formats import dequantize, pack_int4, quantize, unpack_int4
from .linear import QuantizedLinear, quantize_linears

__all__ = ['quantize', 'dequantize', 'pack_int4', 'unpack_int4', 'QuantizedLinear', 'quantize_linears']
