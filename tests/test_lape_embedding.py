from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from agrivlm.lape.embedding import (
    LapeEmbeddings,
    cell_centres,
    default_frame_times,
    ntp,
    ntp_matrix,
    number_text_init_,
    reparam,
    smart_init_,
    smooth_init_,
    token_transfer,
)
from agrivlm.lape.tokens import Axis, bin_centre
from agrivlm.pipeline.pooling import pool_2d, pooled_grid


def test_ntp_matrix_values() -> None:
    m = ntp_matrix(5, torch.float64)
    assert m.shape == (5, 5)
    assert torch.equal(m, m.T) and torch.equal(torch.diagonal(m), torch.ones(5, dtype=torch.float64))
    assert m[0, 1] == 0.5 and m[0, 3] == 0.125 and m[4, 0] == 2.0**-4


@pytest.mark.parametrize("fn", [reparam, ntp])
def test_ntp_forward_is_w_and_gradient_is_g_plus_mT_g(fn) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 5, dtype=torch.float64, generator=g, requires_grad=True)
    upstream = torch.randn(12, 5, dtype=torch.float64, generator=g)
    m = ntp_matrix(12, torch.float64)
    out = fn(w, m)
    assert torch.equal(out, w)  # value is W exactly
    out.backward(upstream)
    expected = upstream + m.T @ upstream
    assert torch.equal(w.grad, expected)
    # the gradient really spreads: a grad on token 4 alone reaches token 7 with weight 2^-3
    w.grad = None
    one = torch.zeros_like(upstream)
    one[4] = 1.0
    fn(w, m).backward(one)
    assert w.grad[7, 0] == 2.0**-3 and w.grad[4, 0] == 2.0


def test_fused_ntp_matches_the_literal_reparam_through_a_real_loss() -> None:
    torch.manual_seed(0)
    w1 = torch.randn(20, 8, requires_grad=True)
    w2 = w1.detach().clone().requires_grad_(True)
    x = torch.randn(6, 8)
    m = ntp_matrix(20)
    F.cross_entropy(x @ reparam(w1, m).T, torch.arange(6)).backward()
    F.cross_entropy(x @ ntp(w2, m).T, torch.arange(6)).backward()
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-6, atol=1e-7)


def test_token_transfer_on_bins_between_bins_and_at_edges() -> None:
    n = 10
    table = torch.arange(n * 3, dtype=torch.float64).reshape(n, 3)
    centres = torch.tensor([bin_centre(i, n) for i in range(n)], dtype=torch.float64)
    torch.testing.assert_close(token_transfer(table, centres), table)
    # halfway between the centres of bins 3 and 4 is the mean of their rows
    torch.testing.assert_close(token_transfer(table, torch.tensor([0.4])), (table[3] + table[4])[None] / 2)
    # before the first / after the last centre: clamped to the end rows
    torch.testing.assert_close(token_transfer(table, torch.tensor([0.0, 0.01, 1.0])), table[[0, 0, 9]])
    # batch shape is kept
    assert token_transfer(table, torch.rand(2, 7)).shape == (2, 7, 3)


@settings(max_examples=60, deadline=None)
@given(st.floats(min_value=0.05, max_value=0.95), st.floats(min_value=0.0, max_value=0.04))
def test_token_transfer_is_piecewise_linear_and_monotone(x: float, dx: float) -> None:
    n = 20
    table = torch.linspace(-1, 1, n, dtype=torch.float64)[:, None]  # a linear table interpolates to a linear map
    a, b = token_transfer(table, torch.tensor([x, x + dx], dtype=torch.float64))[:, 0]
    expect = lambda v: -1 + 2 * (v * n - 0.5) / (n - 1)  # noqa: E731
    assert float(a) == pytest.approx(expect(x), abs=1e-9)
    assert float(b) >= float(a) - 1e-12


@pytest.mark.parametrize(("h", "s", "mode"), [(8, 2, "average"), (9, 2, "average"), (9, 2, "max"), (7, 3, "bilinear"),
                                              (6, 1, "average")])
def test_cell_centres_are_the_pooled_cells_centres(h: int, s: int, mode: str) -> None:
    c = cell_centres(h, s, mode)
    assert c.numel() == pooled_grid(h, 1, s)[0]
    # pooling the patch-centre coordinate itself gives the centre of each cell (average pooling)
    patch_v = ((torch.arange(h) + 0.5) / h).reshape(1, h, 1).repeat(1, 1, 1)
    if mode == "average":
        pooled = pool_2d(patch_v, (h, 1), s, "average")[0, :, 0]
        torch.testing.assert_close(pooled, c)
    assert torch.all((c > 0) & (c < 1)) and torch.all(torch.diff(c) > 0)


def test_cell_centres_match_f_interpolate_on_divisible_grids() -> None:
    """LLaVA-ST interpolates with F.interpolate(linear): on a divisible grid, token_transfer at the cell centres."""
    torch.manual_seed(0)
    table = torch.randn(150, 4)
    for h in (4, 8, 16):
        ours = token_transfer(table, cell_centres(2 * h, 2))
        ref = F.interpolate(table.T[None], size=(h,), mode="linear", align_corners=False)[0].T
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_inject_adds_interpolated_positions_for_images_and_frames() -> None:
    torch.manual_seed(0)
    lape = LapeEmbeddings(hidden_size=6, num_spatial=150, num_temporal=50)
    h, w = 3, 4
    rows, cols = cell_centres(h, 1), cell_centres(w, 1)
    for n, t in ((2, 1), (1, 5)):
        feats = torch.randn(n, t, h * w, 6)
        times = default_frame_times(t).expand(n, t)
        out = lape.inject(feats, rows, cols, times, spatial_weight=2.0, temporal_weight=0.5)
        assert out.shape == feats.shape
        for k in range(t):
            for i in range(h):
                for j in range(w):
                    expect = (feats[0, k, i * w + j]
                              + 2.0 * token_transfer(lape.input_table(Axis.HEIGHT), rows[i:i + 1])[0]
                              + 2.0 * token_transfer(lape.input_table(Axis.WIDTH), cols[j:j + 1])[0]
                              + 0.5 * token_transfer(lape.input_table(Axis.TEMP), times[0, k:k + 1])[0])
                    torch.testing.assert_close(out[0, k, i * w + j], expect)
    assert default_frame_times(1).tolist() == [0.0] and default_frame_times(3).tolist() == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="grid"):
        lape.inject(torch.zeros(1, 1, 5, 6), rows, cols, torch.zeros(1, 1))
    with pytest.raises(ValueError, match="frame_times"):
        lape.inject(torch.zeros(1, 2, 12, 6), rows, cols, torch.zeros(1, 3))


def _llm_embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    """An LLM's input and output embeddings with different means and spreads."""
    g = torch.Generator().manual_seed(1)
    return 0.3 + 0.05 * torch.randn(3000, 64, generator=g), -0.1 + 0.2 * torch.randn(3000, 64, generator=g)


def test_smart_init_statistics() -> None:
    llm_in, llm_out = _llm_embeddings()
    lape = LapeEmbeddings(hidden_size=64)
    smart_init_(lape, llm_in, llm_out, std_ratio=0.1, generator=torch.Generator().manual_seed(0))
    tables = torch.cat([lape.height_input.weight, lape.width_input.weight, lape.temporal_input.weight]).detach()
    heads = torch.cat([lape.height_output.weight, lape.width_output.weight, lape.temporal_output.weight]).detach()
    assert float(tables.mean()) == pytest.approx(float(llm_in.mean()), abs=2e-3)
    assert float(tables.std()) == pytest.approx(0.1 * float(llm_in.std()), rel=0.03)
    assert float(heads.mean()) == pytest.approx(float(llm_out.mean()), abs=2e-3)
    assert float(heads.std()) == pytest.approx(0.1 * float(llm_out.std()), rel=0.03)
    # configurable ratio; tied LLM (same tensor) → heads start as copies of the tables
    smart_init_(lape, llm_in, llm_in, std_ratio=0.5, generator=torch.Generator().manual_seed(0))
    assert float(lape.width_input.weight.detach().std()) == pytest.approx(0.5 * float(llm_in.std()), rel=0.05)
    assert torch.equal(lape.width_output.weight, lape.width_input.weight)
    with pytest.raises(ValueError, match="std_ratio"):
        smart_init_(lape, llm_in, std_ratio=0.0)


def test_smooth_init_statistics_and_neighbours() -> None:
    llm_in, llm_out = _llm_embeddings()
    lape = LapeEmbeddings(hidden_size=64)
    smooth_init_(lape, llm_in, llm_out, std_ratio=0.1, generator=torch.Generator().manual_seed(0))
    table = lape.width_input.weight.detach()
    head = lape.height_output.weight.detach()
    # the smart init's scale: mean and std of the LLM's embeddings (input for tables, output for heads)
    assert float(table.mean()) == pytest.approx(float(llm_in.mean()), abs=3e-3)
    assert float(table.std()) == pytest.approx(0.1 * float(llm_in.std()), rel=0.25)
    assert float(head.mean()) == pytest.approx(float(llm_out.mean()), abs=1e-2)
    assert float(head.std()) == pytest.approx(0.1 * float(llm_out.std()), rel=0.25)

    def cos_at(w: torch.Tensor, k: int) -> float:
        c = w - w.mean()
        return float(F.cosine_similarity(c[:-k], c[k:]).mean())

    # neighbours alike, far bins not: the similarity falls with distance (smart init: ~0 at every distance)
    assert cos_at(table, 1) > 0.9 > cos_at(table, 5) > cos_at(table, 40) and abs(cos_at(table, 40)) < 0.2
    smart_init_(lape, llm_in, llm_out, std_ratio=0.1, generator=torch.Generator().manual_seed(0))
    assert abs(cos_at(lape.width_input.weight.detach(), 1)) < 0.1
    # a point's row is most like the visual tokens injected around it: token_transfer at nearby positions
    smooth_init_(lape, llm_in, llm_in, std_ratio=0.1, generator=torch.Generator().manual_seed(0))
    tab = lape.width_input.weight.detach() - lape.width_input.weight.detach().mean()
    cells = token_transfer(tab, torch.tensor([0.125, 0.375, 0.625, 0.875]))
    point = token_transfer(tab, torch.tensor([0.36]))
    assert int(F.cosine_similarity(cells, point).argmax()) == 1
    assert torch.equal(lape.width_output.weight, lape.width_input.weight)  # tied LLM: heads copy the tables
    with pytest.raises(ValueError, match="std_ratio"):
        smooth_init_(lape, llm_in, std_ratio=0.0)


def test_number_text_init_uses_the_digit_embeddings() -> None:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(20, 8, generator=g)
    digit_ids = {str(d): 10 + d for d in range(10)}

    def encode(text: str) -> list[int]:
        return [digit_ids[c] for c in text]

    lape = LapeEmbeddings(hidden_size=8, num_spatial=12, num_temporal=3)
    number_text_init_(lape, emb, encode, noise_ratio=1e-9, generator=g)
    torch.testing.assert_close(lape.height_input.weight[7], emb[17], atol=1e-6, rtol=0)
    expect_11 = (emb[11] * 1.0 + emb[11] * 0.1) / 1.1
    torch.testing.assert_close(lape.width_input.weight[11], expect_11, atol=1e-6, rtol=0)
    assert not torch.allclose(lape.width_input.weight[10], lape.width_input.weight[1])  # "10" differs from "01"/"1"
    assert torch.equal(lape.temporal_output.weight, lape.temporal_input.weight)  # tied → copies
