"""Remote rasters and STAC catalogues as stacks, read from a local HTTP server with range requests.

Remote GeoTIFFs (``http://``, ``/vsicurl/``) and STAC ItemCollections whose asset hrefs point at the server give the
same dates, grid, pixels, chip index and ``agrivlm infer`` predictions as the same files read locally; a window
read fetches only part of a tiled file.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
from affine import Affine
from geopandas.testing import assert_geodataframe_equal
from http_helpers import dated_catalogue, item_collection, serve, stac_item
from rasterio.windows import Window
from rasters import smooth_field, write_raster

from agrivlm.errors import IngestError
from agrivlm.geo import open_stack
from agrivlm.geo.ingest import ingest
from agrivlm.geo.remote import RemotePath, gdal_path, is_remote
from agrivlm.geo.stac import StacRaster

T10 = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5100000.0)
T20 = Affine(20.0, 0.0, 500000.0, 0.0, -20.0, 5100000.0)
START = datetime(2021, 4, 1, 10, 0, 0)


def _dates(n: int) -> list[datetime]:
    return [START + timedelta(days=12 * k) for k in range(n)]


def test_addresses_keep_their_scheme_and_name() -> None:
    assert gdal_path("https://host/a/S2_20210401.tif") == "/vsicurl/https://host/a/S2_20210401.tif"
    assert gdal_path("s3://bucket/k/S2.tif") == "/vsis3/bucket/k/S2.tif"
    assert gdal_path("gs://bucket/S2.tif") == "/vsigs/bucket/S2.tif"
    assert gdal_path("/vsicurl/http://h/x.tif") == "/vsicurl/http://h/x.tif"
    p = RemotePath("https://host/a/S2_20210401.tif?sig=1&x=2")
    assert str(p) == "https://host/a/S2_20210401.tif?sig=1&x=2" and p.name == "S2_20210401.tif"
    assert p.stem == "S2_20210401" and p.suffix == ".tif" and p == RemotePath("/vsicurl/" + str(p))
    assert is_remote("s3://b/k.tif") and is_remote("/vsicurl/http://h/x.tif") and not is_remote("data/x.tif")
    assert not is_remote("/vsizip/local.zip/x.tif") and not is_remote("C:/data/x.tif")
    with pytest.raises(ValueError, match="GDAL reads no foo:// URLs"):
        gdal_path("foo://x/y.tif")


def _tiled_stack(folder: Path, n: int = 3, size: int = 256) -> list[Path]:
    return [write_raster(folder / f"S2_{when:%Y%m%dT%H%M%S}.tif",
                         smooth_field(size, size, 2, seed=3, t=0.4 * k), transform=T10, tiled=True, blocksize=64,
                         compress=None, descriptions=["B04", "B08"])
            for k, when in enumerate(_dates(n))]


def test_remote_files_read_as_the_local_ones_and_a_window_fetches_part_of_a_file(tmp_path: Path) -> None:
    files = _tiled_stack(tmp_path / "www" / "stk")
    with serve(tmp_path / "www") as srv:
        urls = [f"{srv.url}/stk/{p.name}" for p in files]
        urls[1] = "/vsicurl/" + urls[1]  # both forms in one stack
        local, remote = open_stack(files), open_stack(urls)
        assert list(remote.times) == list(local.times) and remote.grid == local.grid
        assert remote.band_names == ["B04", "B08"] and all(isinstance(p, RemotePath) for p in remote.files)
        assert [str(p) for p in remote.files] == urls  # the addresses as given, not folded into "http:/"
        win = Window(64, 96, 32, 32)
        a, b = local.read_window(win), remote.read_window(win)
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
        # a window of a fresh file fetches its header and the blocks under the window, not the file
        size = files[2].stat().st_size
        srv.clear()
        one = open_stack([f"{srv.url}/stk/{files[2].name}"])
        one.read_window(Window(0, 0, 32, 32))
        sent = srv.bytes_sent(f"stk/{files[2].name}")
        assert 0 < sent < 0.4 * size, (sent, size)
        assert any(r is not None for _, r, _ in srv.requests)  # by range requests
        # ingest: the same chip index (the summary names the addresses)
        s_local = ingest(files, tmp_path / "ing_local", chip_size=32, progress=False)
        s_remote = ingest(urls, tmp_path / "ing_remote", chip_size=32, progress=False)
        assert s_remote["files"] == urls
        assert {k: v for k, v in s_remote.items() if k not in ("files", "seconds", "index", "created")} == {
            k: v for k, v in s_local.items() if k not in ("files", "seconds", "index", "created")}
        ci_l = gpd.read_file(tmp_path / "ing_local" / "chips.gpkg")
        ci_r = gpd.read_file(tmp_path / "ing_remote" / "chips.gpkg")
        assert_geodataframe_equal(ci_r, ci_l)  # the files column holds the same names
        # a missing remote file is named as given; a remote pattern cannot be expanded
        with pytest.raises(IngestError, match=re.escape(f"{srv.url}/stk/nope.tif") + ".*cannot be opened"):
            open_stack([f"{srv.url}/stk/nope.tif"])
        with pytest.raises(IngestError, match="remote folder cannot be listed"):
            open_stack([f"{srv.url}/stk/*.tif"])


def _band_cogs(root: Path, n: int = 3) -> tuple[list[dict], list[np.ndarray]]:
    """Per-band files as an S2 archive stores them: B04 at 10 m (64 px), B11 at 20 m (32 px); and the stack as
    one local 2-band file per date holds them (B11 repeated onto the 10 m grid: nearest neighbour)."""
    items, expected = [], []
    for k, when in enumerate(_dates(n)):
        b04 = (smooth_field(64, 64, 1, seed=5, t=0.3 * k) * 1000).astype("uint16")
        b11 = (smooth_field(32, 32, 1, seed=7, t=0.3 * k) * 1000).astype("uint16")
        tag = f"{when:%Y%m%d}"
        write_raster(root / tag / "B04.tif", b04, transform=T10, nodata=0, tiled=True, blocksize=32)
        write_raster(root / tag / "B11.tif", b11, transform=T20, nodata=0, tiled=True, blocksize=16)
        items.append(stac_item(f"S2A_{tag}", f"{when:%Y-%m-%dT%H:%M:%S}Z",
                               {"B04": f"{tag}/B04.tif", "B11": f"{tag}/B11.tif"}))
        expected.append(np.concatenate([b04, b11.repeat(2, axis=1).repeat(2, axis=2)]))
    return items, expected


def test_a_stac_item_collection_is_a_stack_of_its_items_assets_as_bands(tmp_path: Path) -> None:
    www = tmp_path / "www"
    items, expected = _band_cogs(www)
    with serve(www) as srv:
        for it in items:  # absolute hrefs on the server, as a catalogue of COGs has them
            for a in it["assets"].values():
                a["href"] = f"{srv.url}/{a['href']}"
        (tmp_path / "search.json").write_text(json.dumps(item_collection(items[::-1])))  # any order
        stack = open_stack(tmp_path / "search.json", assets=["B04", "B11"])
        assert [t.astype("datetime64[s]").item() for t in stack.times] == _dates(3)
        assert stack.band_names == ["B04", "B11"] and stack.grid.transform == T10 and stack.shape == (3, 2, 64, 64)
        assert all(isinstance(p, StacRaster) for p in stack.files)
        assert str(stack.files[0]) == f"{tmp_path / 'search.json'}#S2A_20210401[B04,B11]"
        assert {s.date_source for st in stack.steps for s in st.sources} == {"tag:DATETIME"}  # the item's date
        data, nodata, _ = stack.read_window(Window(0, 0, 64, 64))
        np.testing.assert_array_equal(data, np.stack(expected).astype(np.float32))
        assert not nodata.any()
        # the band order is the one asked; a single item works; the local catalogue with relative hrefs too
        swapped = open_stack(tmp_path / "search.json", assets=["B11", "B04"])
        np.testing.assert_array_equal(swapped.read_window(Window(8, 8, 16, 16))[0][:, ::-1],
                                      data[:, :, 8:24, 8:24])
    local = item_collection([stac_item(it["id"], it["properties"]["datetime"],
                                       {k: v["href"].rsplit("/", 2)[-2] + "/" + v["href"].rsplit("/", 1)[-1]
                                        for k, v in it["assets"].items()}) for it in items])
    (www / "local.json").write_text(json.dumps(local))  # relative hrefs: against the JSON's folder
    here = open_stack(www / "local.json", assets=["B04", "B11"])
    np.testing.assert_array_equal(here.read_window(Window(0, 0, 64, 64))[0], data)
    (www / "one.json").write_text(json.dumps(local["features"][1]))
    assert open_stack(www / "one.json", assets=["B04", "B11"]).shape == (1, 2, 64, 64)
    # a static catalogue: catalog.json linking item files in a subfolder, asset hrefs relative to each item
    (www / "cat" / "items").mkdir(parents=True)
    links = [{"rel": "root", "href": "./catalog.json"}]
    for feat in local["features"]:
        up = [{"rel": rel, "href": "../catalog.json"} for rel in ("root", "parent")]
        item = {**feat, "links": up,
                "assets": {k: {**a, "href": "../../" + a["href"]} for k, a in feat["assets"].items()}}
        (www / "cat" / "items" / f"{feat['id']}.json").write_text(json.dumps(item))
        links.append({"rel": "item", "href": f"./items/{feat['id']}.json", "type": "application/geo+json"})
    (www / "cat" / "catalog.json").write_text(json.dumps({"type": "Catalog", "stac_version": "1.0.0", "id": "cat",
                                                         "description": "the scene's items", "links": links}))
    walked = open_stack(www / "cat" / "catalog.json", assets=["B04", "B11"])
    np.testing.assert_array_equal(walked.read_window(Window(0, 0, 64, 64))[0], data)


def test_stac_mistakes_are_one_clear_line(tmp_path: Path) -> None:
    www = tmp_path / "www"
    items, _ = _band_cogs(www, n=2)
    (www / "c.json").write_text(json.dumps(item_collection(items)))
    with pytest.raises(IngestError, match=r"name the bands to read with --assets .*the items hold B04, B11"):
        open_stack(www / "c.json")
    with pytest.raises(IngestError, match=r"c.json#S2A_20210401: no asset B08 \(the item has B04, B11\)"):
        open_stack(www / "c.json", assets=["B04", "B08"])
    (www / "bad.json").write_text(json.dumps({"type": "Catalogue?"}))
    with pytest.raises(IngestError, match=r"bad.json: not a STAC Item, ItemCollection"):
        open_stack(www / "bad.json", assets=["B04"])
    (www / "empty.json").write_text(json.dumps(item_collection([])))
    with pytest.raises(IngestError, match=r"empty.json: the STAC JSON holds no item"):
        open_stack(www / "empty.json", assets=["B04"])
    (www / "B04.json").write_text("{not json")
    with pytest.raises(IngestError, match=r"B04.json: cannot be read as STAC JSON"):
        open_stack(www / "B04.json", assets=["B04"])


def _sample_catalogue(sample_root: Path, url: str, path: Path, n: int | None = None) -> Path:
    """An ItemCollection of the embedded sample's dates on the server at ``url``: assets ndvi and clouds."""
    return dated_catalogue(url, sample_root, "ndvi", "cloud_mask", path, limit=n)


def test_the_explorer_draws_a_stac_stack_served_over_http(monkeypatch: pytest.MonkeyPatch, sample_root: Path,
                                                          tmp_path: Path) -> None:
    from test_explore_app import deck_layers, run_app

    with serve(sample_root) as srv:
        catalogue = _sample_catalogue(sample_root, srv.url, tmp_path / "items.json", n=6)
        at = run_app(monkeypatch, "--stack", catalogue, "--asset", "ndvi", "--masks", catalogue,
                     "--mask-asset", "clouds", "--truth", sample_root / "parcels.gpkg")
        assert not at.error, [e.value for e in at.error]
        assert "stack-overlay" in deck_layers(at)
        date = at.sidebar.select_slider(key="date")
        assert len(date.options) == 6 and at.caption[0].value.startswith("2015-07-11 10:00 · NDVI")
        date.set_value(2).run()  # the third item: its date and its clouds (the items' second asset)
        local = open_stack(sample_root / "ndvi", masks=sample_root / "cloud_mask")
        assert at.caption[0].value.startswith(f"{local.steps[2].time:%Y-%m-%d %H:%M} · NDVI"), at.caption[0].value


def test_infer_on_a_stac_catalogue_served_over_http_equals_infer_on_the_local_files(
    fields_run: tuple[Path, list[str]], sample_root: Path, tmp_path: Path
) -> None:
    """The shared fields run (the sample's NDVI + cloud masks, local) against the same files as STAC items over
    HTTP, the masks as the items' second asset: the same fields, to the bit."""
    import torch
    from conftest import FIELDS_ARGS
    from typer.testing import CliRunner

    from agrivlm.cli import app

    out_local, args = fields_run
    model = args[args.index("--model") + 1]
    with serve(sample_root) as srv:
        catalogue = _sample_catalogue(sample_root, srv.url, tmp_path / "sample_items.json")
        out = tmp_path / "stac_pred.gpkg"
        threads = torch.get_num_threads()
        try:
            res = CliRunner().invoke(app, [
                "infer", str(catalogue), "--assets", "ndvi", "--masks", str(catalogue), "--mask-assets", "clouds",
                "--model", model, *FIELDS_ARGS, "--out", str(out), "--device", "cpu", "--no-progress"])
        finally:
            torch.set_num_threads(threads)
        assert res.exit_code == 0, res.output
    a, b = gpd.read_file(out_local), gpd.read_file(out)
    assert len(a) > 0 and len(b) == len(a)
    assert b.chip_id.tolist() == a.chip_id.tolist() and b.geometry.geom_equals(a.geometry).all()
    np.testing.assert_array_equal(b.score.to_numpy(), a.score.to_numpy())
    assert b.crs == a.crs


def test_a_recipe_on_a_stac_catalogue_over_http_writes_the_records_of_the_local_files(tmp_path: Path) -> None:
    """The synthetic recipe scene as STAC items (NDVI and cloud mask assets) on the server: the same records as the
    local recipe (conversations, chips, frames) but for the stack reference, and training reads the same pixels."""
    from recipes_synth import recipe_yaml, write_scene

    from agrivlm.lape.tokens import LapeVocab
    from agrivlm.recipes.build import build_recipe
    from agrivlm.recipes.schema import read_records
    from agrivlm.train.config import FramesConfig, NormalizeConfig
    from agrivlm.train.data import RecordDataset, SourceRecord, StackCache

    paths = write_scene(tmp_path / "www")
    (tmp_path / "local.yaml").write_text(recipe_yaml(paths, name="r"))
    build_recipe(tmp_path / "local.yaml", tmp_path / "local", progress=False)
    with serve(tmp_path / "www") as srv:
        catalogue = dated_catalogue(srv.url, tmp_path / "www", "ndvi", "masks", tmp_path / "items.json", "clm")
        text = recipe_yaml({**paths, "ndvi": catalogue, "masks": catalogue}, name="r").replace(
            "  parcels:", "  assets: [ndvi]\n  mask_assets: [clm]\n  parcels:")
        (tmp_path / "stac.yaml").write_text(text)
        build_recipe(tmp_path / "stac.yaml", tmp_path / "stac", progress=False)
        local = [r for p in sorted((tmp_path / "local" / "shards").glob("*.jsonl")) for r in read_records(p)]
        remote = [r for p in sorted((tmp_path / "stac" / "shards").glob("*.jsonl")) for r in read_records(p)]
        assert len(remote) == len(local) > 50
        for a, b in zip(local, remote, strict=True):
            assert (a.sample_id, a.conversation, a.chip, a.meta) == (b.sample_id, b.conversation, b.chip, b.meta)
        ref = remote[0].stack
        assert ref.data == str(catalogue) and ref.assets == ["ndvi"] and ref.mask_assets == ["clm"]
        assert all(name.endswith(".vrt") for name in ref.frame_files)  # the items, by id
        # training reads the record's frames from the server: the local record's pixels
        frames, norm = FramesConfig(sampler="uniform", num_frames=4), NormalizeConfig(mode="chip")
        vocab, stacks = LapeVocab(), StackCache()
        pick = [k for k, r in enumerate(local) if r.task == "field_at_point"][:2] + [3]
        for k in pick:
            x = RecordDataset([SourceRecord(local[k], "keep")], frames, norm, vocab, 0, train=False,
                              stacks=stacks)[0]
            y = RecordDataset([SourceRecord(remote[k], "keep")], frames, norm, vocab, 0, train=False,
                              stacks=stacks)[0]
            np.testing.assert_array_equal(x.pixels, y.pixels)
            assert (x.prompt, x.answer) == (y.prompt, y.answer)
        stacks.close()
