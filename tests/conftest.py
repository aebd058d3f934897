from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from agrivlm.sample import SAMPLE_ROOT  # noqa: E402


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for the test: tiny models run far faster than with 2 threads on a shared 2-core box."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def sample_root() -> Path:
    """The embedded real sample (Sentinel-2 NDVI, Slovenia); shipped in the package, never skipped."""
    assert (SAMPLE_ROOT / "ndvi").is_dir(), f"embedded sample missing at {SAMPLE_ROOT}"
    return SAMPLE_ROOT
