"""``data.frames_as_bands``: a sample's dates become the bands of one image, in training and in ``agrivlm infer``."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
from train_helpers import curriculum_recipe, stage_yaml

from agrivlm.errors import ConfigError
from agrivlm.infer.batch import run_inference
from agrivlm.infer.errors import InferError
from agrivlm.model import load_pretrained
from agrivlm.model.builders import TINY_CONFIG
from agrivlm.pipeline.inputs import frames_as_bands, load_input_config
from agrivlm.train.config import load_stage_config
from agrivlm.train.trainer import run_stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_dates_become_bands_date_major_at_their_mean_time() -> None:
    pixels = np.arange(3 * 2 * 4 * 4, dtype=np.float32).reshape(3, 2, 4, 4)
    out, times = frames_as_bands(pixels, [0.0, 0.25, 1.0])
    assert out.shape == (1, 6, 4, 4)
    for t in range(3):
        for c in range(2):
            np.testing.assert_array_equal(out[0, 2 * t + c], pixels[t, c])
    assert times.tolist() == pytest.approx([1.25 / 3])


def test_trained_with_dates_as_bands_and_asked_so_by_infer(tmp_path_factory: pytest.TempPathFactory,
                                                           sample_root: Path) -> None:
    data = curriculum_recipe(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("frames_as_bands")
    common = {"data.roots": [str(data)], "train.max_steps": 2, "train.batch_size": 4, "train.save_every": 0,
              "train.torch_threads": 1, "train.progress": False, "train.eval_every": -1,
              "data.frames.sampler": "uniform", "data.frames.num_frames": 4, "data.frames_as_bands": True}
    # stage 3 from the model YAML, its num_bands the 4 dates x 1 NDVI band
    c3 = stage_yaml("stage3", tmp / "s3.yaml", {**common, "output_dir": str(tmp / "s3"), "model.init_from": None,
                                                 "model.config": str(TINY_CONFIG), "model.overrides": {"num_bands": 4},
                                                 "trainable.llm.mode": "full"})
    s3 = run_stage(c3, stage="stage3")
    inputs, found = load_input_config(s3)
    assert found and inputs.frames_as_bands and inputs.frames.max_frames == 4
    model, _ = load_pretrained(s3)
    assert model.config.num_bands == 4
    out = tmp / "fields.gpkg"
    run_inference([str(sample_root / "ndvi")], s3, out, task="fields", masks=[str(sample_root / "cloud_mask")],
                  overrides={"stride": 32}, batch_size=16, max_new_tokens=8, progress=False, threads=1)
    assert isinstance(gpd.read_file(out), gpd.GeoDataFrame)
    # fewer dates than the model's bands: refused before anything is written, naming both counts
    with pytest.raises(InferError, match="2 channel"):
        run_inference([str(sample_root / "ndvi")], s3, tmp / "two.gpkg", task="fields",
                      overrides={"stride": 32, "frames.max_frames": 2}, progress=False, threads=1)
    assert not (tmp / "two.gpkg").exists()


def test_the_next_frame_loss_refuses_one_frame_per_sample(tmp_path: Path) -> None:
    path = stage_yaml("stage3", tmp_path / "s3.yaml", {"data.frames_as_bands": True, "reconstruction.enabled": True})
    with pytest.raises(ConfigError, match="frames_as_bands leaves one frame"):
        load_stage_config(path)
    ok = stage_yaml("stage3", tmp_path / "ok.yaml", {"data.frames_as_bands": True})
    assert load_stage_config(ok).data.frames_as_bands
