"""The main job end to end: `agrivlm quickstart` on a cropped copy of the real sample, every artifact checked.

It runs as a user who installed the wheel runs it: the installed (non-editable) copy of the package
(conftest's ``installed_copy``), from a folder outside the repository.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
from PIL import Image
from rasterio.windows import Window
from rasterio.windows import transform as window_transform
from shapely.geometry import box
from wheel_helpers import installed_env

from agrivlm.errors import ConfigError

CROP = Window(0, 0, 100, 100)  # 1 km × 1 km of the sample: 36 chips of 32 px, stride 16; held-out test blocks


def _crop(src: Path, dst: Path) -> None:
    with rasterio.open(src) as ds:
        profile = ds.profile | {"width": CROP.width, "height": CROP.height,
                                "transform": window_transform(CROP, ds.transform)}
        data, tags = ds.read(window=CROP), ds.tags()
    with rasterio.open(dst, "w", **profile) as out:
        out.write(data)
        out.update_tags(**tags)


@pytest.fixture(scope="module")
def user_data(tmp_path_factory: pytest.TempPathFactory, sample_root: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("user_data")
    for sub in ("ndvi", "cloud_mask"):
        (root / sub).mkdir()
        for f in sorted((sample_root / sub).glob("*.tif")):
            _crop(f, root / sub / f.name)
    parcels = gpd.read_file(sample_root / "parcels.gpkg")
    with rasterio.open(next((root / "ndvi").iterdir())) as ds:
        footprint = box(*ds.bounds)
    parcels = parcels[parcels.intersects(footprint)].copy()
    parcels["parcel_no"] = np.arange(len(parcels)).astype(str)
    parcels.to_crs(4326).to_file(root / "parcels.geojson", driver="GeoJSON")  # another CRS, on purpose
    return {"stack": root / "ndvi", "masks": root / "cloud_mask", "parcels": root / "parcels.geojson",
            "bounds": footprint}


@pytest.fixture(scope="module")
def site(installed_copy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The installed copy, checked to be what a process run from outside the repository imports."""
    res = subprocess.run([sys.executable, "-c", "import agrivlm; print(agrivlm.__file__)"], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path_factory.mktemp("elsewhere"),
                         env=installed_env(installed_copy))
    assert res.returncode == 0 and Path(res.stdout.strip()) == installed_copy / "agrivlm" / "__init__.py", res
    return installed_copy


def _run(out: Path, data: dict[str, Path], site: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "agrivlm.cli", "quickstart", "--out", str(out), "--steps", "14",
            "--stack", str(data["stack"]), "--masks", str(data["masks"]), "--parcels", str(data["parcels"]),
            "--parcel-id", "parcel_no", "--parcel-class", "LULC_NAME", "--no-progress", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=out.parent, env=installed_env(site))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, user_data: dict[str, Path], site: Path) -> Path:
    out = tmp_path_factory.mktemp("qs") / "run"
    res = _run(out, user_data, site)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


def test_every_artifact(run: Path, user_data: dict[str, Path], site: Path) -> None:
    # chip index of the ingested stack
    index = gpd.read_file(run / "ingest" / "chips.gpkg")
    assert len(index) == 36 and json.loads((run / "ingest" / "summary.json").read_text())["n_dates"] == 68
    # instruction records of stage 3 (the default checkpoint went through stages 1 and 2 already)
    manifest = json.loads((run / "data" / "stage3" / "manifest.json").read_text())
    assert sum(split["train"] for split in manifest["counts"]["by_family"].values()) > 0
    assert not (run / "data" / "stage1").exists() and not (run / "train" / "stage1").exists()
    # the fine-tuned checkpoint loads and starts from the shipped default
    from agrivlm.model import load_pretrained

    final = run / "train" / "stage3" / "final"
    model, processor = load_pretrained(final)
    assert model.config.enable_lape and processor is not None
    info = json.loads((final / "stage_info.json").read_text())
    # the default checkpoint the installed copy carries (not the checkout's)
    assert Path(info["init_source"]).resolve() == (site / "agrivlm" / "default_model").resolve()
    # predictions inside the stack's bounds, in its CRS
    fields = gpd.read_file(run / "predictions" / "fields.gpkg")
    assert fields.crs.to_epsg() == 32633
    if len(fields):
        assert fields.geometry.within(user_data["bounds"].buffer(1e-6)).all()
    assert (run / "predictions" / "growth_stages.csv").is_file()
    # scores on the held-out test blocks only, with the baselines on the same chips
    ev = json.loads((run / ".quickstart" / "eval.json").read_text())
    held = ev["heldout_chips"]
    assert held and set(held) <= set(manifest["chips"]["by_split"]["test"])
    train_chips = set(manifest["chips"]["by_split"]["train"])
    assert not set(held) & train_chips
    summary = json.loads((run / "eval" / "fields" / "summary.json").read_text())
    assert {"precision", "recall", "f1", "map_50_95", "mean_iou", "pixel_iou"} <= set(summary)
    assert summary == ev["fields"] and "whole chip" in ev["baselines"]["fields"]
    whole = ev["baselines"]["fields"]["whole chip"]
    assert whole["n_pred"] == len(held) and whole["n_truth"] == summary["n_truth"] > 0
    growth = json.loads((run / "eval" / "growth" / "summary.json").read_text())
    assert {"accuracy", "macro_f1", "temporal_iou", "key_dates"} <= set(growth)
    clim = ev["baselines"]["growth"]["climatology"]
    assert clim["n_pairs"] == growth["n_pairs"] > 0  # the same (field, date) pairs for model and baseline
    # PNGs that decode and an HTML report that references them (and nothing online)
    html = (run / "report.html").read_text()
    images = re.findall(r"<img src='([^']+)'", html)
    assert {"stack_dates.png", "loss_curves.png", "fields_map.png", "stage_curves.png"} <= set(images)
    for name in images:
        with Image.open(run / name) as im:
            im.load()
            assert im.size[0] > 300 and np.asarray(im.convert("L")).std() > 1, name
    assert "agrivlm explore --stack" in html and "agrivlm train stage3" in html and "http" not in html
    assert "shipped default checkpoint" in html and f"{len(held)} chips of 32 px" in html
    assert f"{summary['f1']:.3f}" in html and f"{whole['f1']:.3f}" in html


def test_second_run_resumes_instead_of_redoing(run: Path, user_data: dict[str, Path], site: Path) -> None:
    stamp = (run / "train" / "stage3" / "final" / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    res = _run(run, user_data, site)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("done earlier, kept") == 5 and time.perf_counter() - start < 60
    assert res.stdout.count("skipped: fine-tuning the default checkpoint") == 2
    assert (run / "train" / "stage3" / "final" / "model.safetensors").stat().st_mtime_ns == stamp
    other = _run(run, user_data, site, "--seed", "1")
    assert other.returncode != 0 and "made by a quickstart with other options (seed)" in other.stderr


def test_the_same_run_from_a_stac_catalogue_served_over_http(run: Path, user_data: dict[str, Path], site: Path,
                                                              tmp_path: Path) -> None:
    """The user's stack as STAC items on an HTTP server (NDVI and cloud-mask assets): the same records, model,
    predictions and held-out scores as the run on the local files."""
    from http_helpers import dated_catalogue, serve

    root = user_data["stack"].parent
    with serve(root) as srv:
        catalogue = dated_catalogue(srv.url, root, "ndvi", "cloud_mask", tmp_path / "items.json")
        out = tmp_path / "stac_run"
        res = _run(out, {**user_data, "stack": catalogue, "masks": catalogue}, site, "--assets", "ndvi",
                   "--mask-assets", "clouds")
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a, b = gpd.read_file(run / "predictions" / "fields.gpkg"), gpd.read_file(out / "predictions" / "fields.gpkg")
    assert len(a) == len(b) and b.geometry.geom_equals(a.geometry).all()
    np.testing.assert_array_equal(a.score.to_numpy(), b.score.to_numpy())
    sa = pd.read_csv(run / "predictions" / "growth_stages.csv", dtype=str, keep_default_na=False)
    sb = pd.read_csv(out / "predictions" / "growth_stages.csv", dtype=str, keep_default_na=False)
    assert len(sa) > 10 and set(sb["stack"]) == {str(catalogue)}  # the stack column names the input as given
    pd.testing.assert_frame_equal(sa.drop(columns="stack"), sb.drop(columns="stack"))
    ev_a = json.loads((run / ".quickstart" / "eval.json").read_text())
    ev_b = json.loads((out / ".quickstart" / "eval.json").read_text())
    for ev in (ev_a, ev_b):  # the extent raster is named by its input (a file, an item); sources are the run's files
        ev["fields"]["pixel"].pop("extent")
        ev["growth"].pop("sources")
    assert ev_b["fields"] == ev_a["fields"] and ev_b["growth"] == ev_a["growth"]
    assert ev_b["fields"]["n_truth"] > 0 and ev_b["growth"]["accuracy"] is not None
    html = (out / "report.html").read_text()
    assert "--assets ndvi --mask-assets clouds" in html  # the commands that redo it name the assets


def test_base_model_folder_starts_stage1_from_its_weights(tmp_path: Path) -> None:
    """`--base-model DIR` (vision/ + llm/ local HF checkpoints): stage 1 builds the model from those weights."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from agrivlm.model.tokenizer import default_tokenizer
    from agrivlm.quickstart import Quickstart, QuickstartOptions
    from agrivlm.resources import stage_config
    from agrivlm.train.config import load_stage_config
    from agrivlm.train.curriculum import build_stage_model

    torch.manual_seed(0)
    base = tmp_path / "base"
    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(
        base / "vision")
    tok = default_tokenizer(512)
    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2))
    llm.save_pretrained(base / "llm")
    tok.save_pretrained(base / "llm")
    with pytest.raises(ConfigError, match="--start scratch"):
        QuickstartOptions(base_model=str(base))
    qs = Quickstart(tmp_path / "out", QuickstartOptions(steps=10, base_model=str(base), start="scratch"),
                    progress=False)
    over = qs.stage_overrides("stage1")
    cfg = load_stage_config(stage_config("stage1"), over)
    built = build_stage_model(cfg).model
    saved = SiglipVisionModel.from_pretrained(base / "vision").state_dict()
    mine = built.vision_tower.state_dict()
    assert mine and all(torch.equal(v, saved[k]) for k, v in mine.items())
    assert torch.equal(built.get_input_embeddings().weight[: len(tok)], llm.get_input_embeddings().weight[: len(tok)])
    # with real weights stage 3 keeps the config's LoRA; the tiny random LLM is trained fully instead
    assert "trainable.llm.mode" not in qs.stage_overrides("stage3")
    assert Quickstart(tmp_path / "o2", QuickstartOptions(start="scratch"), progress=False).stage_overrides(
        "stage3")["trainable.llm.mode"] == "full"
    # from the default: stage 3 alone, from the shipped checkpoint, with every step of --steps
    from agrivlm.default_checkpoint import default_model_path

    opts = QuickstartOptions(steps=10)
    assert opts.stages == ("stage3",) and opts.stage_steps() == {"stage3": 10}
    over = Quickstart(tmp_path / "o3", opts, progress=False).stage_overrides("stage3")
    assert over["model.init_from"] == str(default_model_path()) and over["train.max_steps"] == 10
