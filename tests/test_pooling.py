from __future__ import annotations

import numpy as np
import pytest
import torch

from agrivlm.pipeline.pooling import pool_2d, pooled_grid


def _grid(t: int, h: int, w: int, d: int) -> torch.Tensor:
    return torch.arange(t * h * w * d, dtype=torch.float32).reshape(t, h * w, d)


@pytest.mark.parametrize(("h", "w", "s"), [(4, 6, 2), (5, 7, 2), (3, 3, 3), (7, 4, 3)])
def test_average_and_max_against_direct_loops(h: int, w: int, s: int) -> None:
    feats = torch.randn(2, h * w, 3, generator=torch.Generator().manual_seed(0))
    grid = feats.reshape(2, h, w, 3).numpy()
    oh, ow = pooled_grid(h, w, s)
    avg = pool_2d(feats, (h, w), s, "average").reshape(2, oh, ow, 3).numpy()
    mx = pool_2d(feats, (h, w), s, "max").reshape(2, oh, ow, 3).numpy()
    for i in range(oh):
        for j in range(ow):
            cell = grid[:, i * s:(i + 1) * s, j * s:(j + 1) * s]  # edge cells are smaller: only real patches
            np.testing.assert_allclose(avg[:, i, j], cell.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(mx[:, i, j], cell.max(axis=(1, 2)), rtol=0, atol=0)


def test_bilinear_shape_and_constant_preserved() -> None:
    feats = torch.full((3, 5 * 7, 4), 2.5)
    out = pool_2d(feats, (5, 7), 2, "bilinear")
    assert out.shape == (3, 3 * 4, 4)
    assert torch.allclose(out, torch.full_like(out, 2.5))
    assert pool_2d(_grid(1, 2, 2, 1), (2, 2), 1).equal(_grid(1, 2, 2, 1))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="do not fill a 3x3 grid"):
        pool_2d(torch.zeros(1, 10, 2), (3, 3), 2)
    with pytest.raises(ValueError, match="pooling mode"):
        pool_2d(torch.zeros(1, 9, 2), (3, 3), 2, "median")  # type: ignore[arg-type]
