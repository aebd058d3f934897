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


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of the checkout, built offline (``wheel_helpers.build_wheel``)."""
    from wheel_helpers import build_wheel

    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="session")
def installed_copy(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed (non-editable) into an empty folder: its ``site`` folder."""
    from wheel_helpers import install_wheel

    return install_wheel(wheel, tmp_path_factory.mktemp("installed") / "site")


@pytest.fixture(scope="session")
def infer_ckpt() -> Path:
    """The tiny checkpoint trained on the sample's parcels (``infer_model.trained_checkpoint``)."""
    from infer_model import trained_checkpoint

    folder, stats = trained_checkpoint()
    assert stats["last_loss"] < 0.15 * stats["first_loss"], stats
    return folder


#: The fields run shared by the inference tests (36 overlapping chips of the sample, 2 per batch, one thread).
FIELDS_ARGS = ("--stride", "16", "--batch-size", "2", "--threads", "1")


@pytest.fixture(scope="session")
def fields_run(infer_ckpt: Path, sample_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """An uninterrupted ``agrivlm infer --task fields`` run on the sample, in this process; its output and arguments.

    The kill-and-restart test and the cluster tests compare their journals and outputs with it, to the bit.
    """
    import torch
    from typer.testing import CliRunner

    from agrivlm.cli import app

    out = tmp_path_factory.mktemp("fields") / "pred.gpkg"
    args = [str(sample_root / "ndvi"), "--masks", str(sample_root / "cloud_mask"), "--model", str(infer_ckpt),
            *FIELDS_ARGS]
    threads = torch.get_num_threads()
    try:  # one thread, as the subprocess of the restart test and the cluster's workers: the same sums in order
        res = CliRunner().invoke(app, ["infer", *args, "--out", str(out), "--device", "cpu", "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert res.exit_code == 0, res.output
    return out, args
