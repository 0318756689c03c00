"""API keys: what `--api-key` accepts (no web framework needed: the CLI checks them before loading a model)."""
from __future__ import annotations

from typing import List


def api_keys(value) -> List[str]:
    """--api-key values (a string, or several; each may be a comma-separated list) -> the keys. A key must
    be printable ASCII: an HTTP header carries it, and one that is not could never match."""
    values = [] if value is None else [value] if isinstance(value, str) else list(value)
    keys = [key.strip() for v in values for key in v.split(',') if key.strip()]
    if values and not keys and any(values):   # (',' or ' ': meant to set a key, would serve everyone)
        raise ValueError(f'--api-key {values[0]!r} holds no key; give the key itself (or leave the option out '
                         'to serve without one)')
    for key in keys:
        if not (key.isascii() and key.isprintable()) or ' ' in key:
            raise ValueError(f'--api-key {key[:4]!r}...: an API key must be printable ASCII without spaces '
                             '(clients send it in an HTTP header); choose another')
    return keys
