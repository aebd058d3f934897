"""The ablation switches of the stage configs reach the model: LAPE off, NTP off, random LAPE init, stage 3 alone.

Each is trained for a few real steps on the tiny model and the embedded sample's curriculum recipe; the LAPE-off
model is then asked for fields by the real ``agrivlm infer`` code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import geopandas as gpd
import pytest
import torch
from train_helpers import curriculum_recipe, stage_yaml

from agrivlm.errors import ConfigError
from agrivlm.infer.batch import run_inference
from agrivlm.lape.embedding import AXES
from agrivlm.model import load_pretrained
from agrivlm.model.builders import TINY_CONFIG
from agrivlm.train.curriculum import read_stage_info
from agrivlm.train.trainer import run_stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS = 4


def _common(data: Path, out: Path) -> dict[str, Any]:
    return {"output_dir": str(out), "data.roots": [str(data)], "train.max_steps": STEPS, "train.batch_size": 4,
            "train.save_every": 0, "train.torch_threads": 1, "train.progress": False, "train.eval_every": -1,
            "optim.warmup_steps": 0, "optim.lr": 1e-3}


@pytest.fixture(scope="module")
def stage1(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    data = curriculum_recipe(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("ablation_keys")
    s1 = run_stage(stage_yaml("stage1", tmp / "stage1.yaml", _common(data, tmp / "s1")), stage="stage1")
    return data, tmp, s1


def test_lape_off_stays_off_through_stages_2_and_3_and_infer_reads_its_answers(
        stage1: tuple[Path, Path, Path], sample_root: Path) -> None:
    data, tmp, s1 = stage1
    c2 = stage_yaml("stage2", tmp / "s2_off.yaml", {**_common(data, tmp / "s2_off"), "model.init_from": str(s1),
                                                     "lape.enabled": False})
    s2 = run_stage(c2, stage="stage2")
    model, _ = load_pretrained(s2)
    assert model.lape is None and not model.config.enable_lape
    # the position tokens are rows of the LLM's own vocabulary and LM head
    assert model.get_input_embeddings().weight.shape[0] > model.config.position_token_offset
    assert model.config.answers_positions
    assert read_stage_info(s2)["lape"] is False
    c3 = {**_common(data, tmp / "s3_off"), "model.init_from": str(s2), "lape.enabled": False,
          "trainable.llm.mode": "full"}
    s3 = run_stage(stage_yaml("stage3", tmp / "s3_off.yaml", c3), stage="stage3")
    out = tmp / "off_fields.gpkg"
    run_inference([str(sample_root / "ndvi")], s3, out, task="fields", masks=[str(sample_root / "cloud_mask")],
                  overrides={"stride": 32}, batch_size=16, max_new_tokens=12, progress=False, threads=1)
    assert out.is_file()
    assert isinstance(gpd.read_file(out), gpd.GeoDataFrame)
    # LAPE cannot come back on in stage 3: it would start from tables stage 2 never trained
    c3_on = stage_yaml("stage3", tmp / "s3_on.yaml", {**c3, "lape.enabled": True, "output_dir": str(tmp / "s3_on")})
    with pytest.raises(ConfigError, match="LAPE off"):
        run_stage(c3_on, stage="stage3")


def test_ntp_off_and_random_init_reach_the_lape_tables(stage1: tuple[Path, Path, Path]) -> None:
    data, tmp, s1 = stage1
    c2 = stage_yaml("stage2", tmp / "s2_plain.yaml", {
        **_common(data, tmp / "s2_plain"), "model.init_from": str(s1), "lape.ntp": False, "lape.init": "random",
        "train.max_steps": 1, "optim.lr": 1e-9})
    s2 = run_stage(c2, stage="stage2")
    model, _ = load_pretrained(s2)
    assert model.lape is not None and model.config.lape_ntp is False and model.config.lape_init == "random"
    raw = model.lape._raw(AXES[0], output=False).detach()

    def grad_of_first_row(m: Any) -> torch.Tensor:
        # NTP changes the tables' gradients (values pass through): a loss on one bin reaches its neighbours
        table = m.lape._raw(AXES[0], output=False)
        table.grad = None
        m.lape.input_table(AXES[0])[0].sum().backward()
        return table.grad.abs().sum(dim=1)

    plain_grad = grad_of_first_row(model)
    assert plain_grad[0] > 0 and float(plain_grad[1:].abs().max()) == 0.0
    std = model.config.text_config.initializer_range
    assert abs(float(raw.std()) / std - 1) < 0.1 and abs(float(raw.mean())) < std / 5
    # the smart init draws from the LLM's embedding statistics instead: another mean and scale
    c2s = stage_yaml("stage2", tmp / "s2_smart.yaml", {
        **_common(data, tmp / "s2_smart"), "model.init_from": str(s1), "train.max_steps": 1, "optim.lr": 1e-9})
    smart, _ = load_pretrained(run_stage(c2s, stage="stage2"))
    assert smart.config.lape_ntp is True
    emb = smart.get_input_embeddings().weight.detach()
    smart_raw = smart.lape._raw(AXES[0], output=False).detach()
    assert abs(float(smart_raw.std()) - 0.1 * float(emb.std())) < 0.02 * float(emb.std())
    assert float(grad_of_first_row(smart)[1:].max()) > 0  # NTP on: the neighbouring bins get gradient
    # a stage 2 cannot switch NTP on a model that already has LAPE
    bad = stage_yaml("stage2", tmp / "s2_bad.yaml", {**_common(data, tmp / "s2_bad"), "model.init_from": str(s2),
                                                      "lape.ntp": True})
    with pytest.raises(ConfigError, match="lape.ntp"):
        run_stage(bad, stage="stage2")


def test_stage3_alone_builds_its_model_with_lape_from_model_config(stage1: tuple[Path, Path, Path]) -> None:
    data, tmp, _ = stage1
    c3 = stage_yaml("stage3", tmp / "s3_alone.yaml", {
        **_common(data, tmp / "s3_alone"), "model.init_from": None, "model.config": str(TINY_CONFIG),
        "trainable.llm.mode": "full"})
    s3 = run_stage(c3, stage="stage3")
    model, _ = load_pretrained(s3)
    info = read_stage_info(s3)
    assert model.lape is not None and info["stage"] == "stage3" and info["lape"] is True
    assert Path(info["init_source"]) == TINY_CONFIG
    both = stage_yaml("stage3", tmp / "s3_both.yaml", {**_common(data, tmp / "s3_both"), "model.init_from": str(s3),
                                                        "model.config": str(TINY_CONFIG)})
    with pytest.raises(ConfigError, match="model.init_from"):
        run_stage(both, stage="stage3")
