"""The one error type of the backends (below every backend module, so each can raise it)."""

from __future__ import annotations

from .._errors import MixqError

__all__ = ["EngineError"]


class EngineError(MixqError):
    """An engine that cannot be built, loaded or run as asked (the message says why)."""
