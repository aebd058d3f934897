from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from agrivlm.sample import SAMPLE_ROOT  # noqa: E402


@pytest.fixture(scope="session")
def sample_root() -> Path:
    """The embedded real sample (Sentinel-2 NDVI, Slovenia); shipped in the package, never skipped."""
    assert (SAMPLE_ROOT / "ndvi").is_dir(), f"embedded sample missing at {SAMPLE_ROOT}"
    return SAMPLE_ROOT
