"""A model loaded as the CPU benchmark scripts time it: the process set up as the `modelscope-chatglm`
command sets itself up (libgomp's short spin, before torch loads), `threads` threads, and optionally the
kernels built for another instruction set (`march`, e.g. 'x86-64-v3' for AVX2) in an fp32 model, what a
CPU without bf16 units gets by default. Import this before anything imports torch.
"""
import os


def load(path: str, bits: int, threads: int, march: str = None, **options):
    """-> the ChatModel (quantized to `bits` while loading; 0 or None: not quantized)."""
    from modelscope_chatglm import openmp
    openmp.set_for_this_process()
    import torch
    import modelscope_chatglm
    from modelscope_chatglm.quantization import build
    torch.set_num_threads(threads)
    if march:
        import tempfile
        build.use_library(build.build_variant(march, os.path.join(tempfile.gettempdir(), 'bench-kernels')))
        options = {'dtype': 'float32', **options}
    return modelscope_chatglm.load(path, device='cpu', quantization_bit=bits or None, **options)
