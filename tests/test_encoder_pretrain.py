"""The vision encoder's dense pre-training: FTW's three classes, a SigLIP folder the model loads, held-out scores."""

from __future__ import annotations

import re
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from safetensors.torch import load_file
from shapely.geometry import box
from typer.testing import CliRunner

from agrivlm.cli import app
from agrivlm.errors import ConfigError
from agrivlm.model.builders import build_model, load_model_settings
from agrivlm.resources import configs_dir
from agrivlm.synth import SceneSpec, write_scene
from agrivlm.train.encoder import EncoderPretrainConfig, ftw_target, pretrain_encoder, read_scene

TINY = str(configs_dir() / "model" / "tiny.yaml")


def test_ftw_target_marks_both_sides_of_a_shared_edge_and_the_outer_ring() -> None:
    # 10 x 10 px at 1 m; two 4 x 4 fields touching along x = 5, background elsewhere
    transform = from_origin(0, 10, 1, 1)
    parcels = gpd.GeoDataFrame(geometry=[box(1, 1, 5, 5), box(5, 1, 9, 5)])
    t = ftw_target(parcels, transform, (10, 10))
    assert t.shape == (10, 10) and set(np.unique(t)) == {0, 1, 2}
    rows = slice(5, 9)  # y from 5 down to 1 is rows 5-8
    assert (t[rows, 1:9] > 0).all() and (t[:5] == 0).all() and (t[9] == 0).all()
    # the shared edge: columns 4 and 5 are boundary on both fields; interiors are 2 x 2 each
    assert (t[rows, 4] == 2).all() and (t[rows, 5] == 2).all()
    assert (t[6:8, 2:4] == 1).all() and (t[6:8, 6:8] == 1).all()
    assert int((t == 1).sum()) == 8 and int((t == 2).sum()) == 24


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("encoder_scenes")
    out = []
    for seed in (0, 1, 9000):
        folder = root / f"pannonian_{seed}"
        write_scene(folder, SceneSpec(region="pannonian", area_km2=0.4, seed=seed, start="2021-01-01",
                                      end="2021-12-31"))
        out.append(folder)
    return out


def test_read_scene_masks_clouds_and_labels_the_scene_grid(scenes: list[Path]) -> None:
    sc = read_scene(scenes[0])
    t, h, w = sc.ndvi.shape
    assert t == len(list((scenes[0] / "stack").glob("*.tif"))) and sc.target.shape == (h, w)
    masks = sorted((scenes[0] / "cloud_mask").glob("*.tif"))
    for i in (0, len(masks) // 2):
        with rasterio.open(masks[i]) as src:
            cloud = src.read(1) > 0
        assert cloud.any() and np.isnan(sc.ndvi[i][cloud]).all()  # clouds are no data
    assert np.isfinite(sc.ndvi).mean() > 0.2
    assert {1, 2} <= set(np.unique(sc.target).tolist())


def test_pretraining_beats_a_constant_on_a_scene_it_never_saw_and_loads_as_vision_checkpoint(
        scenes: list[Path], tmp_path: Path, one_torch_thread: None) -> None:
    out = tmp_path / "encoder"
    result = pretrain_encoder(EncoderPretrainConfig(
        scenes=scenes[:2], val_scenes=scenes[2:], out=out, model_config=TINY, steps=1500, batch_size=8, frames=4,
        eval_every=1500, seed=0), log=lambda _: None)
    last = result["history"][-1]  # type: ignore[index]
    # on the held-out scene, the field extent under each pixel beats the best constant answer for those pixels
    assert last["val_extent_error_px"] < 0.85 * last["val_extent_error_px_constant"], last
    # and every date's pixels are redrawn from that date's tokens better than by the date's own mean
    assert last["val_frame_error"] < 0.8 * last["val_frame_error_date_mean"], last
    # the folder is a SigLIP checkpoint: vision.checkpoint loads it, every weight as saved
    settings = load_model_settings(TINY).model_copy(deep=True)
    settings.vision.checkpoint = str(out)
    model, _ = build_model(settings)
    saved = load_file(out / "model.safetensors")
    state = model.vision_tower.state_dict()
    assert saved.keys() == state.keys()
    assert all(torch.equal(state[k], v) for k, v in saved.items())


def test_cli_refuses_to_overwrite_an_encoder_folder(scenes: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "enc"
    out.mkdir()
    (out / "config.json").write_text("{}")
    result = CliRunner().invoke(app, ["train", "encoder", str(scenes[0]), "--out", str(out), "--model-config", TINY,
                                      "--steps", "1"])
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (out / "config.json").read_text() == "{}"


def test_a_scene_smaller_than_a_chip_is_named(scenes: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{scenes[0]}: the scene is smaller than one 200-px chip")):
        pretrain_encoder(EncoderPretrainConfig(scenes=scenes[:1], val_scenes=scenes[1:2], out=tmp_path / "enc",
                                               model_config=TINY, chip_size=200, steps=1), log=lambda _: None)
    assert not (tmp_path / "enc").exists()
