"""Synthetic agricultural landscapes with exact truth: ``agrivlm synth`` (see :mod:`agrivlm.synth.scene`)."""

from agrivlm.synth.regions import REGIONS, Region
from agrivlm.synth.scene import BAND_SETS, SceneSpec, write_scene

__all__ = ["BAND_SETS", "REGIONS", "Region", "SceneSpec", "write_scene"]
