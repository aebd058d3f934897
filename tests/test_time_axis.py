"""The frames' time axis: season windows, the same on every chip; old checkpoints keep the axis they learned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from agrivlm.geo import ChipStream, TimeAxis, open_stack
from agrivlm.pipeline.frames import sample_frames
from agrivlm.pipeline.inputs import INPUT_CONFIG_FILE, InputConfig, load_input_config, save_input_config
from agrivlm.synth import SceneSpec, write_scene


@pytest.fixture(scope="module")
def cloudy_scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("axis") / "scene"
    write_scene(out, SceneSpec(region="central_europe", area_km2=0.41, seed=9001, start="2021-01-01",
                               end="2021-12-31"))
    return out


def test_a_day_has_one_t_on_every_chip_whatever_its_clear_dates(cloudy_scene: Path) -> None:
    stack = open_stack(cloudy_scene / "stack", masks=cloudy_scene / "cloud_mask")
    inputs = InputConfig()
    chips = list(ChipStream(stack, chip_size=inputs.chip_size, stride=inputs.chip_size))
    assert len(chips) >= 4
    firsts, axes = set(), set()
    day = np.datetime64("2021-06-01", "us")
    for chip in chips:
        frames = sample_frames(chip, inputs.frames, season_start=inputs.season_start, time_axis=inputs.time_axis)
        firsts.add(str(frames.times[0])[:10])
        axes.add((frames.time_axis.start, frames.time_axis.end))
        # the frames' t is their day of the year over its length
        days = (frames.times - np.datetime64("2021-01-01", "us")) / np.timedelta64(1, "D")
        np.testing.assert_allclose(frames.t, days / 365, atol=1e-9)
    # clouds give the chips different first clear dates (the old axis started there, so one day had many t) ...
    assert len(firsts) > 1, firsts
    # ... but one axis: 1 January 2021 → 1 January 2022, so 1 June is the same t on every chip
    assert axes == {(np.datetime64("2021-01-01", "us"), np.datetime64("2022-01-01", "us"))}
    assert float(TimeAxis(*axes.pop()).to_norm(day)) == pytest.approx(151 / 365)
    # a season from 1 August: the frames of March fall in the window 2020-08-01 → 2021-08-01
    chip = chips[0]
    frames = sample_frames(chip, inputs.frames, season_start="08-01")
    assert str(frames.time_axis.start)[:10] == "2020-08-01" and str(frames.time_axis.end)[:10] == "2022-08-01"


def test_saved_inputs_without_a_time_axis_keep_the_usable_dates_axis(cloudy_scene: Path, tmp_path: Path) -> None:
    # written by today's trainers: the seasons axis, read back as such
    save_input_config(InputConfig(), tmp_path / "new")
    assert yaml.safe_load((tmp_path / "new" / INPUT_CONFIG_FILE).read_text())["time_axis"] == "seasons"
    assert load_input_config(tmp_path / "new")[0].time_axis == "seasons"
    # a checkpoint trained before: its inputs name no time axis, its TEMP tokens mean the usable dates' range
    saved = yaml.safe_load((tmp_path / "new" / INPUT_CONFIG_FILE).read_text())
    del saved["time_axis"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / INPUT_CONFIG_FILE).write_text(yaml.safe_dump(saved))
    old, found = load_input_config(tmp_path / "old")
    assert found and old.time_axis == "usable_dates"
    stack = open_stack(cloudy_scene / "stack", masks=cloudy_scene / "cloud_mask")
    chip = next(iter(ChipStream(stack, chip_size=old.chip_size)))
    frames = sample_frames(chip, old.frames, season_start=old.season_start, time_axis=old.time_axis)
    clear = (~chip.mask).reshape(len(chip.times), -1).mean(axis=1) > old.frames.min_valid_fraction
    assert frames.time_axis == TimeAxis.from_dates(chip.times[clear])
    assert frames.t[0] == 0.0 and frames.t[-1] == 1.0  # the uniform sampler keeps the first and last usable date
    # the shipped default checkpoint says which axis it was trained on
    from agrivlm.default_checkpoint import DEFAULT_MODEL_DIR

    shipped = load_input_config(DEFAULT_MODEL_DIR)[0]
    raw = yaml.safe_load((DEFAULT_MODEL_DIR / INPUT_CONFIG_FILE).read_text())
    assert shipped.time_axis == raw.get("time_axis", "usable_dates")
