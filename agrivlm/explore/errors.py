"""The explorer's error type (kept in its own module so the CLI can import the command without geopandas)."""

from __future__ import annotations

from agrivlm.errors import AgriVLMError


class ExploreError(AgriVLMError):
    """An input of the field explorer is missing or unusable (names the file and what to do)."""
