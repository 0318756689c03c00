"""Optional Triton kernels: imported on first use, so that the package never needs Triton to import."""
from __future__ import annotations

import functools
import importlib
import logging

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def optional(module: str):
    """The Triton-based module `module` of this package, or None (one warning) where Triton cannot be
    imported; callers then run their torch code, on the GPU too."""
    try:
        return importlib.import_module(f'{__package__}.{module}')
    except ImportError as exc:
        logger.warning('Triton is not importable (%s): %s falls back to plain torch on the GPU, which is several '
                       'times slower. CUDA builds of torch ship Triton; otherwise install the `triton` package '
                       'that matches your torch.', exc, module)
        return None
