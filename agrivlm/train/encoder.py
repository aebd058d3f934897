"""Dense pre-training of the vision encoder on scenes with parcels: FTW's three classes from the pooled tokens.

The default model's encoder starts from random weights (nothing is downloaded), and in the curriculum it learns
only through the LM's answers: a few coordinate tokens per chip. Real VLMs start from an encoder pre-trained on
far more signal per image. This module gives ours that signal from the project's own data: every pixel of a
chip is labelled with the three classes of Fields of The World (background, field interior, field boundary),
rasterized from the scenes' parcels, and the encoder learns to predict them through a linear head on the
*pooled* visual tokens, the very tokens the LM is shown (``pooling.stride`` × ``patch_size`` pixels each; the
head predicts every pixel of a token's cell, so each token must carry where the boundaries run inside it).
The head also regresses, for every pixel inside a field, how far that field reaches inside the chip (left, top,
right, bottom: :func:`extent_target`), the numbers an outline answer is made of, so the token under a point
carries its field's extent. A second linear head reads every date's pooled tokens before the mean and redraws that
date's pixels, so the tokens keep each date's greenness, which growth answers are read from (trained for fields
alone and frozen, they would keep only the outlines). The frames of a chip (dates of the season, clouds as no
data, normalised as the processor does) go through the encoder one by one, as in the model, and the head reads
their mean over dates, so a boundary seen only when two crops differ still counts.

The result is a transformers SigLIP vision folder (``save_pretrained``), which a model YAML's
``vision.checkpoint`` loads like any local SigLIP checkpoint (:func:`agrivlm.model.builders.load_vision_tower`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import geopandas as gpd
import numpy as np
import numpy.typing as npt
import rasterio
import rasterio.features
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from agrivlm.errors import ConfigError
from agrivlm.model.builders import ModelSettings, load_model_settings, tiny_vision_config
from agrivlm.pipeline.bands import BandStats, normalize, robust_stats
from agrivlm.pipeline.pooling import pool_2d, pooled_grid

FTW_CLASSES = ("background", "field", "boundary")
N_CLASSES = len(FTW_CLASSES)
#: Channels of the head: the classes, then the four extents of :func:`extent_target`.
N_OUTPUTS = N_CLASSES + 4
DEFAULT_FIELD_CLASSES = ("cultivated land", "grassland")


@dataclass
class SceneArrays:
    """One scene in memory: ``ndvi`` ``(T, H, W)`` float16 (NaN under clouds and no data), ``target`` ``(H, W)``."""

    name: str
    ndvi: npt.NDArray[np.float16]
    target: npt.NDArray[np.int64]
    ids: npt.NDArray[np.int32]  # the field each pixel lies in (1, 2, …; 0 none)


def field_ids(parcels: gpd.GeoDataFrame, transform: rasterio.Affine, shape: tuple[int, int]) -> npt.NDArray[np.int32]:
    """Each parcel burnt with its own id (row + 1) on the pixel grid; 0 where there is none."""
    if not len(parcels):
        return np.zeros(shape, np.int32)
    shapes = ((geom, i + 1) for i, geom in enumerate(parcels.geometry) if geom is not None and not geom.is_empty)
    return rasterio.features.rasterize(shapes, out_shape=shape, transform=transform, fill=0, dtype="int32")


def ftw_target(parcels: gpd.GeoDataFrame, transform: rasterio.Affine, shape: tuple[int, int]) -> npt.NDArray[
        np.int64]:
    """FTW's three classes of a pixel grid: 0 background, 1 field interior, 2 field boundary.

    Each parcel is burnt with its own id; a field pixel is a boundary pixel when one of its four neighbours
    holds another id or background, so two touching fields are parted by boundary pixels on both sides.
    """
    return _ftw_classes(field_ids(parcels, transform, shape))


def _ftw_classes(ids: npt.NDArray[np.int32]) -> npt.NDArray[np.int64]:
    shape = ids.shape
    padded = np.pad(ids, 1, mode="edge")
    differs = np.zeros(shape, bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        differs |= padded[dy:dy + shape[0], dx:dx + shape[1]] != ids
    out = np.where(ids > 0, 1, 0).astype(np.int64)
    out[(ids > 0) & differs] = 2
    return out


def read_scene(folder: Path, field_classes: Sequence[str] = DEFAULT_FIELD_CLASSES) -> SceneArrays:
    """An ``agrivlm synth`` scene folder (``stack/``, ``cloud_mask/``, ``parcels.gpkg``) as :class:`SceneArrays`."""
    files = sorted((folder / "stack").glob("*.tif"))
    masks = sorted((folder / "cloud_mask").glob("*.tif"))
    if not files:
        raise ConfigError(f"{folder}: no stack/*.tif; is it a scene folder written by agrivlm synth?")
    if masks and len(masks) != len(files):
        raise ConfigError(f"{folder}: {len(files)} stack files but {len(masks)} cloud masks")
    frames = []
    for i, path in enumerate(files):
        with rasterio.open(path) as src:
            a = src.read(1, masked=True).astype(np.float32).filled(np.nan)
            transform, shape = src.transform, (src.height, src.width)
        if masks:
            with rasterio.open(masks[i]) as src:
                a[src.read(1) > 0] = np.nan
        frames.append(a)
    parcels = gpd.read_file(folder / "parcels.gpkg")
    fields = parcels[parcels["class"].isin(list(field_classes))]
    ids = field_ids(fields, transform, shape)
    return SceneArrays(folder.name, np.stack(frames).astype(np.float16), _ftw_classes(ids), ids)


def extent_target(ids: npt.NDArray[np.int32]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Per pixel, how far its field reaches inside this chip: ``(4, S, S)`` and where it applies ``(S, S)``.

    The four channels are the distances from the pixel to its field's bounding box (left, top, right, bottom;
    the field clipped to the chip, as a chip's answers are), in chip widths: the numbers the LM writes when it
    outlines the field at a point, so the token under a point can hand them over.
    """
    s_h, s_w = ids.shape
    out = np.zeros((4, s_h, s_w), np.float32)
    rows, cols = np.mgrid[0:s_h, 0:s_w]
    for label, sl in enumerate(ndimage.find_objects(ids), start=1):
        if sl is None:
            continue
        m = ids == label
        out[0][m] = cols[m] - sl[1].start
        out[1][m] = rows[m] - sl[0].start
        out[2][m] = sl[1].stop - 1 - cols[m]
        out[3][m] = sl[0].stop - 1 - rows[m]
    return out / max(s_h, s_w), ids > 0


@dataclass
class EncoderPretrainConfig:
    """What :func:`pretrain_encoder` trains on and for how long (see the module docstring)."""

    scenes: list[Path]
    out: Path
    model_config: str | None = None   # model YAML whose vision and pooling settings the encoder takes
    val_scenes: list[Path] = field(default_factory=list)
    steps: int = 3000
    batch_size: int = 16
    frames: int = 8
    chip_size: int = 32
    lr: float = 1e-3
    boundary_weight: float = 3.0      # CE weight of boundary pixels (about a tenth of the pixels)
    extent_weight: float = 1.0        # weight of the L1 loss of the field extents (0: the classes alone)
    frame_weight: float = 1.0         # weight of the L1 loss of every date's pixels redrawn (0: none)
    min_clear: float = 0.6            # a frame is used when this fraction of the chip is clear
    seed: int = 0
    threads: int | None = None        # torch CPU threads (None: torch's default)
    eval_every: int = 500
    field_classes: tuple[str, ...] = DEFAULT_FIELD_CLASSES


class DenseHead(nn.Module):
    """Pooled tokens ``(N, h'·w', D)`` → per-pixel outputs ``(N, 7, h'·cell, w'·cell)`` (one linear map per token).

    Channels: the logits of the three classes, then the four extents of :func:`extent_target`.
    """

    def __init__(self, hidden: int, cell: int, classes: int = N_OUTPUTS) -> None:
        super().__init__()
        self.cell, self.classes = cell, classes
        self.norm = nn.LayerNorm(hidden)
        self.linear = nn.Linear(hidden, classes * cell * cell)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Logits of every pixel of every token's cell, tokens in row-major order on ``grid``."""
        n, c, k = tokens.shape[0], self.classes, self.cell
        x = self.linear(self.norm(tokens)).reshape(n, grid[0], grid[1], c, k, k)
        return x.permute(0, 3, 1, 4, 2, 5).reshape(n, c, grid[0] * k, grid[1] * k)


class EncoderWithHead(nn.Module):
    """The SigLIP encoder, the model's pooling and :class:`DenseHead`, on frames ``(N, T, H, W)`` in [0, 1]."""

    def __init__(self, settings: ModelSettings) -> None:
        super().__init__()
        if settings.vision.type != "siglip":
            raise ConfigError("encoder pre-training writes a SigLIP encoder; set vision.type: siglip")
        vcfg = tiny_vision_config(settings.vision)
        assert isinstance(vcfg, SiglipVisionConfig)
        self.encoder = SiglipVisionModel(vcfg)
        self.patch, self.stride, self.mode = settings.vision.patch_size, settings.pooling.stride, settings.pooling.mode
        self.feature_layer = settings.vision.feature_layer
        self.head = DenseHead(vcfg.hidden_size, self.patch * self.stride)
        self.frame_head = DenseHead(vcfg.hidden_size, self.patch * self.stride, classes=1)

    def forward(self, frames: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs ``(N, 7, H, W)`` (:class:`DenseHead`) and every date redrawn ``(N, T, H, W)``.

        ``frames`` ``(N, T, H, W)``, the dates used ``valid`` ``(N, T)``.
        """
        n, t, h, w = frames.shape
        grey = frames.reshape(n * t, 1, h, w).expand(-1, 3, -1, -1)  # the band adapter's grey start
        if self.feature_layer == -1:
            feats = self.encoder(pixel_values=grey).last_hidden_state  # (N·T, P, D)
        else:  # the layer the model reads (vision.feature_layer)
            feats = self.encoder(pixel_values=grey, output_hidden_states=True).hidden_states[self.feature_layer]
        grid = (h // self.patch, w // self.patch)
        pooled = pool_2d(feats, grid, self.stride, self.mode)  # (N·T, P', D), as the model pools
        cells = pooled_grid(*grid, self.stride)
        redrawn = self.frame_head(pooled, cells)[:, 0, :h, :w].reshape(n, t, h, w)
        pooled = pooled.reshape(n, t, *pooled.shape[1:])
        weight = valid.reshape(n, t, 1, 1).to(pooled.dtype)
        mean = (pooled * weight).sum(1) / weight.sum(1).clamp_min(1.0)
        logits = self.head(mean, cells)
        return logits[..., :h, :w], redrawn


@dataclass
class Batch:
    """Chips of a step.

    ``frames`` ``(N, T, S, S)``, the dates used ``valid`` ``(N, T)``, ``classes`` ``(N, S, S)``, ``extent``
    ``(N, 4, S, S)`` and where it applies, ``in_field`` ``(N, S, S)`` (see :func:`extent_target`).
    """

    frames: torch.Tensor
    valid: torch.Tensor
    classes: torch.Tensor
    extent: torch.Tensor
    in_field: torch.Tensor


def _sample(rng: np.random.Generator, scenes: Sequence[SceneArrays], cfg: EncoderPretrainConfig, stats: BandStats
            ) -> Batch:
    """A batch of random chips, each turned and flipped at random (frames and targets alike)."""
    s, t = cfg.chip_size, cfg.frames
    xs, vs, ys, ids = [], [], [], []
    for _ in range(cfg.batch_size):
        sc = scenes[int(rng.integers(len(scenes)))]
        _, height, width = sc.ndvi.shape
        r0, c0 = int(rng.integers(height - s + 1)), int(rng.integers(width - s + 1))
        cube = sc.ndvi[:, r0:r0 + s, c0:c0 + s].astype(np.float32)
        clear = np.flatnonzero(np.isfinite(cube).mean(axis=(1, 2)) >= cfg.min_clear)
        pick = np.sort(rng.choice(clear, size=min(t, clear.size), replace=False)) if clear.size else clear
        x = np.zeros((t, s, s), np.float32)
        if pick.size:
            x[:pick.size] = np.nan_to_num(normalize(cube[pick][:, None], stats)[:, 0], nan=0.0)
        y, i = sc.target[r0:r0 + s, c0:c0 + s], sc.ids[r0:r0 + s, c0:c0 + s]
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        x, y, i = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k), np.rot90(i, k)
        if flip:
            x, y, i = x[:, :, ::-1], y[:, ::-1], i[:, ::-1]
        xs.append(np.ascontiguousarray(x))
        vs.append(np.arange(t) < pick.size)
        ys.append(np.ascontiguousarray(y))
        ids.append(np.ascontiguousarray(i))
    extents = [extent_target(i) for i in ids]
    return Batch(torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(vs)), torch.from_numpy(np.stack(ys)),
                 torch.from_numpy(np.stack([e for e, _ in extents])),
                 torch.from_numpy(np.stack([m for _, m in extents])))


def scene_stats(scenes: Sequence[SceneArrays]) -> BandStats:
    """The 2nd/98th percentiles of every clear pixel of the scenes (the processor's band statistics rule)."""
    flat = np.concatenate([sc.ndvi[np.isfinite(sc.ndvi)][::7].astype(np.float32) for sc in scenes])
    return robust_stats(flat.reshape(-1, 1, 1, 1), source="pre-training scenes")


def dense_loss(outs: tuple[torch.Tensor, torch.Tensor], batch: Batch, cfg: EncoderPretrainConfig) -> torch.Tensor:
    """Class cross-entropy (boundary pixels weighted) + ``extent_weight`` × L1 of the extents inside fields.

    Plus ``frame_weight`` × L1 of the used dates' pixels redrawn.
    """
    out, redrawn = outs
    weight = torch.tensor([1.0, 1.0, cfg.boundary_weight])
    loss = F.cross_entropy(out[:, :N_CLASSES], batch.classes, weight=weight)
    if cfg.extent_weight > 0 and bool(batch.in_field.any()):
        err = (out[:, N_CLASSES:] - batch.extent).abs().sum(1)
        loss = loss + cfg.extent_weight * err[batch.in_field].mean()
    if cfg.frame_weight > 0 and bool(batch.valid.any()):
        loss = loss + cfg.frame_weight * (redrawn - batch.frames).abs()[batch.valid].mean()
    return loss


def dense_scores(outs: tuple[torch.Tensor, torch.Tensor], batch: Batch) -> dict[str, float]:
    """Pixel accuracy and per-class IoU of the classes; the extents' mean error in pixels inside fields.

    Also the redrawn dates' mean error (normalised units) beside each date's own mean as the answer.
    """
    out, redrawn = outs
    target = batch.classes
    pred = out[:, :N_CLASSES].argmax(1)
    scores = {"pixel_accuracy": float((pred == target).float().mean())}
    if bool(batch.in_field.any()):
        size = max(target.shape[-2:])
        truth = batch.extent.permute(0, 2, 3, 1)[batch.in_field]  # (pixels, 4)
        err = (out[:, N_CLASSES:].permute(0, 2, 3, 1)[batch.in_field] - truth).abs().mean(1)
        scores["extent_error_px"] = float(err.mean()) * size
        # the best constant answer for these very pixels (each channel's median): what the encoder must beat
        scores["extent_error_px_constant"] = float((truth - truth.median(0).values).abs().mean()) * size
    if bool(batch.valid.any()):
        frames = batch.frames[batch.valid]
        scores["frame_error"] = float((redrawn[batch.valid] - frames).abs().mean())
        scores["frame_error_date_mean"] = float((frames - frames.mean((1, 2), keepdim=True)).abs().mean())
    for c, name in enumerate(FTW_CLASSES):
        inter = float(((pred == c) & (target == c)).sum())
        union = float(((pred == c) | (target == c)).sum())
        scores[f"iou_{name}"] = inter / union if union else math.nan
    return scores


def _evaluate(model: EncoderWithHead, scenes: Sequence[SceneArrays], cfg: EncoderPretrainConfig,
              stats: BandStats) -> dict[str, float]:
    """:func:`dense_scores` on 8 fixed batches of random chips of ``scenes`` (seeded: the same chips every time)."""
    rng = np.random.default_rng(cfg.seed + 10_000)
    model.eval()
    outs, batches = [], []
    with torch.no_grad():
        for _ in range(8):
            batch = _sample(rng, scenes, cfg, stats)
            outs.append(model(batch.frames, batch.valid))
            batches.append(batch)
    joined_outs = (torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]))
    model.train()
    joined = Batch(*(torch.cat([getattr(b, f) for b in batches]) for f in ("frames", "valid", "classes", "extent",
                                                                            "in_field")))
    return dense_scores(joined_outs, joined)


def pretrain_encoder(cfg: EncoderPretrainConfig, log: Callable[[str], None] = print) -> dict[str, object]:
    """Train the encoder (see the module docstring); write ``cfg.out`` (SigLIP folder + ``pretrain.json``)."""
    settings = load_model_settings(cfg.model_config) if cfg.model_config else ModelSettings()
    if settings.vision.checkpoint:
        raise ConfigError(f"{cfg.model_config}: vision.checkpoint is set; pre-training starts a tiny encoder")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if not cfg.scenes:
        raise ConfigError("encoder pre-training needs at least one scene folder to train on")
    train = [read_scene(Path(p), cfg.field_classes) for p in cfg.scenes]
    val = [read_scene(Path(p), cfg.field_classes) for p in cfg.val_scenes]
    small = next((p for p, sc in zip([*cfg.scenes, *cfg.val_scenes], [*train, *val], strict=True)
                  if min(sc.ndvi.shape[1:]) < cfg.chip_size), None)
    if small is not None:
        raise ConfigError(f"{small}: the scene is smaller than one {cfg.chip_size}-px chip")
    stats = scene_stats(train)
    model = EncoderWithHead(settings)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(i, cfg.steps) / cfg.steps)))
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        batch = _sample(rng, train, cfg, stats)
        loss = dense_loss(model(batch.frames, batch.valid), batch, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            row = {"step": float(step), "loss": float(loss.detach()), "seconds": time.perf_counter() - start}
            if val:
                row.update({f"val_{k}": v for k, v in _evaluate(model, val, cfg, stats).items()})
            history.append(row)
            log(" ".join(f"{k} {v:.3f}" for k, v in row.items()))
    cfg.out.mkdir(parents=True, exist_ok=True)
    model.encoder.save_pretrained(cfg.out)
    result: dict[str, object] = {
        "scenes": [str(p) for p in cfg.scenes], "val_scenes": [str(p) for p in cfg.val_scenes],
        "steps": cfg.steps, "batch_size": cfg.batch_size, "frames": cfg.frames, "lr": cfg.lr,
        "extent_weight": cfg.extent_weight, "frame_weight": cfg.frame_weight,
        "band_stats": stats.to_dict(), "history": history, "classes": list(FTW_CLASSES),
    }
    (cfg.out / "pretrain.json").write_text(json.dumps(result, indent=1))
    return result
