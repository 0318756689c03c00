"""Errors in the OpenAI shape: the body {"error": {"message", "type"}}, and the one table from the
engine's exceptions to (HTTP status, message, error type, Retry-After).
"""
from __future__ import annotations

from ..engine.grammar import GrammarError
from ..engine.scheduler import KVBudgetError
from ..errors import ContextLengthError, InputError
from .async_engine import QueueFull, ReplicaUnavailable


def error_body(message_: str, kind: str = 'invalid_request_error') -> dict:
    return {'error': {'message': message_, 'type': kind}}


RETRY_AFTER_S = 5


def rejection(exc: Exception):
    """A refused or failed request -> (HTTP status, message, OpenAI error type, Retry-After or None).
    The one table from the engine's exceptions to the protocol's errors."""
    if isinstance(exc, QueueFull):
        return 503, str(exc), 'server_busy', RETRY_AFTER_S
    if isinstance(exc, ReplicaUnavailable):
        return 503, str(exc), 'server_unavailable', RETRY_AFTER_S
    if isinstance(exc, (InputError, ContextLengthError, KVBudgetError, ValueError, TypeError)):
        return 400, str(exc), 'invalid_request_error', None
    # The request was valid: a failure now is the server's.
    return 500, f'{type(exc).__name__}: {exc}', 'server_error', None


def failure(exc: Exception):
    """Like `rejection`, for a request that was accepted and then failed: the server's fault, but for a
    schema the grammar engine could not follow to the end (the client's to simplify)."""
    status, message_, kind, retry_after = rejection(exc)
    if status < 500 and not isinstance(exc, GrammarError):
        return 500, f'{type(exc).__name__}: {exc}', 'server_error', None
    return status, message_, kind, retry_after
