"""The inference error type (its own module, so the CLI can import it without torch)."""

from __future__ import annotations

from agrivlm.errors import AgriVLMError


class InferError(AgriVLMError):
    """``agrivlm infer`` cannot run: bad options, an unusable checkpoint, or a journal of another run."""
