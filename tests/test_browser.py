"""The sweep page in a real browser (Debian's chromium and chromedriver, driven by selenium),
offline: it loads with no console error and no network request, the parallel-coordinates
trace has one line per sweep point, and it is drawn (a screenshot that is not blank)."""

from __future__ import annotations

import io
import shutil

import pytest
from matplotlib.image import imread

from mbz.charts import write_charts
from tests.test_charts import sweep_records

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402  (needs selenium)
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromium-driver (apt-get)"
    ),
    pytest.mark.slow,  # starts a browser: about 15 s
]
OFFLINE = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1800",
    "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",  # no network at all
)  # fmt: skip
LOCAL = ("file:", "data:", "about:", "blob:")  # URLs that are not a network request
PLOTTED = "const g = document.getElementById('parallel'); return !!(g && g._fullLayout);"


@pytest.fixture(scope="module")
def browser():
    """Headless chromium, offline, keeping its console and network logs."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in OFFLINE:
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def requested_urls(driver) -> list[str]:
    """Every URL the page asked for, from the DevTools network events."""
    import json

    events = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
    return [
        e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"
    ]


def test_sweep_page_in_a_real_browser(browser, tmp_path):
    records = sweep_records()
    write_charts(tmp_path, records, "demo sweep")
    browser.get((tmp_path / "sweep.html").as_uri())
    WebDriverWait(browser, 30).until(lambda driver: driver.execute_script(PLOTTED))
    trace = browser.execute_script(
        "const t = document.getElementById('parallel')._fullData[0];"
        "return {type: t.type, lengths: t.dimensions.map(d => d.values.length),"
        " labels: t.dimensions.map(d => d.label)};"
    )
    runs = sum(r["kind"] == "run" for r in records)
    assert trace["type"] == "parcoords"
    assert trace["lengths"] == [runs] * 5  # one line per sweep point on every axis
    assert trace["labels"] == ["weight bits", "method", "pruned", "size kB", "accuracy %"]
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    urls = requested_urls(browser)
    assert urls and all(url.startswith(LOCAL) for url in urls), urls
    shot = browser.find_element("id", "parallel").screenshot_as_png
    (tmp_path / "parallel-screenshot.png").write_bytes(shot)
    pixels = imread(io.BytesIO(shot))[..., :3]
    plot = pixels[:, : int(0.85 * pixels.shape[1])]  # left of the colour bar
    coloured = int(((plot.max(axis=2) - plot.min(axis=2)) > 0.25).sum())  # not grey, not text
    # The page's text and axes are grey or slate; only the run lines are in viridis colours.
    assert coloured > 1000, coloured
