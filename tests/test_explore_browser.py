"""End to end: `agrivlm explore --sample` serves the page; headless Chromium loads it, the map draws the
true parcels (their cyan outlines are on the canvas), and a click on a parcel opens its NDVI curve.

Skips only where no Chromium/chromedriver is installed (`.ci/run` installs Debian's `chromium` and
`chromium-driver`). Set AGRIVLM_EXPLORER_SCREENSHOT=path.png to keep a screenshot of the page.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
from PIL import Image

from agrivlm.explore.mapview import TRUTH_RGBA, fit_view, lonlat_to_screen
from agrivlm.geo import open_stack

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
#: Flags without which headless Chromium stalls on a machine with no network (and WebGL in software).
CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--enable-unsafe-swiftshader", "--use-angle=swiftshader", "--window-size=1400,1700",
)
#: Generous: the first page run imports the whole stack of libraries on a busy 2-core machine.
TIMEOUT_S = 120

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no Chromium browser/chromedriver installed (apt-get install chromium chromium-driver; .ci/run does)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agrivlm.cli", "explore", "--sample", "--port", str(port)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as resp:
                    if resp.read().decode().strip() == "ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"the explorer did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the session we started: streamlit and nothing else
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def wait_for(predicate, what: str, timeout: float = TIMEOUT_S):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value is not None and value is not False and not (isinstance(value, list) and not value):
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def near(rgb: np.ndarray, color: tuple[int, ...], tol: int = 40) -> np.ndarray:
    return (np.abs(rgb[..., :3].astype(int) - np.array(color[:3])) <= tol).all(axis=-1)


def test_page_draws_parcels_and_a_click_opens_the_field(server: str, sample_root: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    options.page_load_strategy = "eager"
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tempfile.mkdtemp(prefix='agrivlm-chromium-')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(TIMEOUT_S)
        driver.get(server)

        def map_ready():  # type: ignore[no-untyped-def]
            canvases = driver.find_elements(By.CSS_SELECTOR, "[data-testid=stDeckGlJsonChart] canvas")
            running = driver.find_elements(By.CSS_SELECTOR, "[data-testid=stStatusWidget]")
            return canvases[0] if canvases and not running else None

        canvas = wait_for(map_ready, "the map")
        rect = canvas.rect

        def outlines_drawn():  # type: ignore[no-untyped-def]
            shot = np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB"))
            x, y, w, h = (int(round(rect[k])) for k in ("x", "y", "width", "height"))
            crop = shot[y:y + h, x:x + w]
            return crop if near(crop, TRUTH_RGBA).sum() > 500 else None

        crop = wait_for(outlines_drawn, "the cyan parcel outlines on the map canvas", timeout=60)
        # the NDVI overlay is drawn too: green vegetation pixels of the RdYlGn colour map
        assert (crop[..., 1].astype(int) - crop[..., 0] > 40).sum() > 5000

        # click inside a parcel: its representative point, projected like the page's view
        stack = open_stack(sample_root / "ndvi")
        corners = stack.grid.corners()
        lon, lat = stack.grid.crs_to_lonlat(corners[:, 0], corners[:, 1])
        view = fit_view((lon.min(), lat.min(), lon.max(), lat.max()))
        parcels = gpd.read_file(sample_root / "parcels.gpkg")
        inside = parcels[parcels.within(stack.grid.footprint())]
        target = inside.loc[inside.area.idxmax()]
        point = target.geometry.representative_point()
        assert parcels.contains(point).sum() == 1
        plon, plat = stack.grid.crs_to_lonlat(point.x, point.y)
        sx, sy = lonlat_to_screen(float(plon), float(plat), view, rect["width"], rect["height"])
        ActionChains(driver).move_to_element_with_offset(
            canvas, int(sx - rect["width"] / 2), int(sy - rect["height"] / 2)).click().perform()

        title = f"Field {target['index']} (true)"

        def field_opened():  # type: ignore[no-untyped-def]
            heads = [h.text for h in driver.find_elements(By.CSS_SELECTOR, "h3")]
            return any(h.startswith(title) for h in heads) and not driver.find_elements(
                By.CSS_SELECTOR, "[data-testid=stStatusWidget]")

        wait_for(field_opened, f"'{title}' after clicking the parcel")
        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "[data-testid=stVegaLiteChart]"), "the NDVI curve")
        assert not driver.find_elements(By.CSS_SELECTOR, "[data-testid=stException]")
        keep = os.environ.get("AGRIVLM_EXPLORER_SCREENSHOT")
        if keep:
            time.sleep(2)  # let the chart finish drawing
            driver.save_screenshot(keep)
    finally:
        driver.quit()
