from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from agrivlm.train.logs import TrainLog, plot_losses
from agrivlm.train.sampler import ResumableSampler, epoch_order, sample_seed
from agrivlm.train.schedule import base_lr_factor, lape_lr_factor


def test_lape_warmup_follows_the_report_from_zero_to_a_tenth_then_the_multiplier() -> None:
    # the LAPE report, §4.2 get_lape_learning_rate: base_lr * 0.1 * (current_step / warmup_steps) during the
    # warm-up, base_lr * 0.5 (the multiplier) after it
    assert lape_lr_factor(0, 0.5, 10) == 0.0
    assert lape_lr_factor(5, 0.5, 10) == pytest.approx(0.05)
    assert lape_lr_factor(9, 0.5, 10) == pytest.approx(0.09)
    assert lape_lr_factor(10, 0.5, 10) == pytest.approx(0.5)
    assert lape_lr_factor(1000, 0.5, 10) == pytest.approx(0.5)
    assert lape_lr_factor(500, 0.3, 1000) == pytest.approx(0.05)  # the ramp's top is 0.1, whatever the multiplier
    assert lape_lr_factor(1000, 0.3, 1000) == pytest.approx(0.3)
    assert lape_lr_factor(0, 0.5, 0) == 0.5  # no warm-up: the multiplier from the start
    steps = [lape_lr_factor(s, 0.5, 20) for s in range(25)]
    assert all(b >= a for a, b in zip(steps, steps[1:], strict=False))


def test_base_schedules() -> None:
    assert base_lr_factor(0, 100, warmup_steps=4) == pytest.approx(0.25)
    assert base_lr_factor(50, 100) == 1.0
    assert base_lr_factor(100, 100, schedule="linear") == pytest.approx(0.0)
    assert base_lr_factor(52, 100, warmup_steps=4, schedule="cosine") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown LR schedule"):
        base_lr_factor(1, 10, schedule="step")  # type: ignore[arg-type]


@given(n=st.integers(1, 200), seed=st.integers(0, 2**31), epoch=st.integers(0, 50))
def test_epoch_order_is_a_seeded_permutation(n: int, seed: int, epoch: int) -> None:
    order = epoch_order(n, seed, epoch)
    assert sorted(order.tolist()) == list(range(n))
    assert (order == epoch_order(n, seed, epoch)).all()


def test_sampler_resumes_exactly_and_shards() -> None:
    full = list(ResumableSampler(50, seed=3))
    resumed = ResumableSampler(50, seed=3)
    resumed.set_position(0, 17)
    assert list(resumed) == full[17:]
    ranks = [list(ResumableSampler(51, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 25 and not set(ranks[0]) & set(ranks[1])
    nxt = ResumableSampler(50, seed=3)
    nxt.set_position(1, 0)
    assert list(nxt) != full  # a new epoch is a new order
    assert sample_seed(1, 2, 3) == sample_seed(1, 2, 3) != sample_seed(1, 2, 4)


def test_train_log_resume_and_plot(tmp_path: Path) -> None:
    log = TrainLog(tmp_path)
    for s in range(1, 6):
        log.log(s, {"loss": 1.0 / s, "main_loss": 0.9 / s})
    log.close()
    resumed = TrainLog(tmp_path, resume_step=3)  # steps 4, 5 are redone after a resume from step 3
    assert [r["step"] for r in resumed.read()] == [1, 2, 3]
    resumed.log(4, {"loss": 0.2, "main_loss": 0.1})
    resumed.close()
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == "step,loss,main_loss"
    png = plot_losses({"stage 1": resumed.read()}, tmp_path / "loss.png")
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] > 300 and np.asarray(im).std() > 0


def test_checkpoint_roundtrip_and_loud_failure(tmp_path: Path) -> None:
    from accelerate import Accelerator

    from agrivlm.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint

    class Pos:
        def __init__(self) -> None:
            self.step = 0

        def state_dict(self) -> dict[str, int]:
            return {"step": self.step}

        def load_state_dict(self, s: dict[str, int]) -> None:
            self.step = s["step"]

    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    pos = Pos()
    acc.register_for_checkpointing(pos)
    pos.step = 7
    save_checkpoint(acc, tmp_path, 7)
    (tmp_path / "step_0000009.partial").mkdir()  # a save killed midway is ignored
    assert latest_checkpoint(tmp_path) == tmp_path / "step_0000007"
    saved = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    pos.step = 0
    assert load_checkpoint(acc, tmp_path / "step_0000007", num_custom=1) == 7
    assert torch.equal(model.weight, saved) and pos.step == 7
    (tmp_path / "step_0000007" / "random_states_0.pkl").unlink()
    with pytest.raises(CheckpointError, match="missing random_states_0.pkl"):
        load_checkpoint(acc, tmp_path / "step_0000007", num_custom=1)
