"""Evaluators, in-process and behind ``agrivlm eval``: field boundaries and growth stages.

Field boundaries (:mod:`agrivlm.eval.boundaries`): one-to-one Hungarian IoU matching, FTW object
precision/recall/F1 at IoU > 0.5, ``map_50_95`` (mean over IoU 0.50:0.05:0.95 of TP/(TP+FP+FN)), mean IoU of
matches, pixel IoU/precision/recall on a raster grid. Growth (:mod:`agrivlm.eval.growth`): stage accuracy and
macro-F1, confusion matrix, temporal IoU of stage segments, key-date errors in days.

Use in training (validation split)::

    from agrivlm.eval import evaluate_fields, evaluate_growth
    scores = evaluate_fields(pred_gdf, truth_gdf).to_dict()   # GeoDataFrames or paths, any CRS
    stages = evaluate_growth(pred_df, truth_df).to_dict()     # long tables of agrivlm.schema
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agrivlm.eval.boundaries import (
        THRESHOLDS,
        FieldEvaluation,
        PixelScores,
        ThresholdScores,
        evaluate_fields,
        match_pairs,
        pairwise_iou,
        pixel_scores,
        write_field_report,
    )
    from agrivlm.eval.growth import (
        GrowthEvaluation,
        KeyDateScores,
        StageScores,
        date_cells,
        evaluate_growth,
        evaluate_key_dates,
        evaluate_stages,
        interval_iou,
        key_dates_from_stages,
        write_growth_report,
    )

#: Where each public name lives; imported on first use so ``agrivlm --help`` does not load geopandas.
_HOMES: dict[str, str] = {
    **dict.fromkeys(
        ("THRESHOLDS", "FieldEvaluation", "PixelScores", "ThresholdScores", "evaluate_fields", "match_pairs",
         "pairwise_iou", "pixel_scores", "write_field_report"),
        "agrivlm.eval.boundaries",
    ),
    **dict.fromkeys(
        ("GrowthEvaluation", "KeyDateScores", "StageScores", "date_cells", "evaluate_growth", "evaluate_key_dates",
         "evaluate_stages", "interval_iou", "key_dates_from_stages", "write_growth_report"),
        "agrivlm.eval.growth",
    ),
}

__all__ = [
    "THRESHOLDS",
    "FieldEvaluation",
    "GrowthEvaluation",
    "KeyDateScores",
    "PixelScores",
    "StageScores",
    "ThresholdScores",
    "date_cells",
    "evaluate_fields",
    "evaluate_growth",
    "evaluate_key_dates",
    "evaluate_stages",
    "interval_iou",
    "key_dates_from_stages",
    "match_pairs",
    "pairwise_iou",
    "pixel_scores",
    "write_field_report",
    "write_growth_report",
]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'agrivlm.eval' has no attribute {name!r}")
