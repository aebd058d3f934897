from __future__ import annotations

from pathlib import Path

import pytest

from agrivlm.config import StrictModel, load_config
from agrivlm.errors import ConfigError


class Inner(StrictModel):
    rate: float = 0.5


class Outer(StrictModel):
    name: str
    inner: Inner = Inner()


def test_load_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("name: a\ninner:\n  rate: 0.25\n")
    assert load_config(Outer, good).inner.rate == 0.25
    assert load_config(Outer, good, {"inner.rate": 0.1}).inner.rate == 0.1
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: a\ninner:\n  rat: 0.25\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: inner\.rat: unknown key"):
        load_config(Outer, bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("name: a\ninner:\n  rate: fast\n")
    with pytest.raises(ConfigError, match=r"wrong\.yaml: inner\.rate: Input should be a valid number"):
        load_config(Outer, wrong)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(Outer, tmp_path / "missing.yaml")
