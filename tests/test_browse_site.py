"""The shard browser in a real headless Chromium (Debian's ``chromium``), driven by Playwright.

Playwright's own browser download is not reachable here, so the tests launch the system Chromium
(``executable_path``); ``make setup`` installs it. They skip only when Chromium is not installed and
cannot be installed (the reason is in the skip message). The screenshot of the grid is written to
``outputs/test-screenshots/browse-grid.png`` (beside the test output) for a person to look at.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

import shards
from pipeline.synth import CLASSES
from shards.browse.site import build_site

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "outputs" / "test-screenshots"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


def find_chromium() -> tuple[str | None, str]:
    """The Chromium binary, installing Debian's package when it is missing; else (None, why)."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path, ""
    if not shutil.which("apt-get"):
        return None, "chromium is not installed and there is no apt-get to install it (run `make setup-browser`)"
    proc = subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, text=True, timeout=900)
    path = shutil.which("chromium")
    if path:
        return path, ""
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return None, f"chromium is not installed and `apt-get install -y chromium` failed: {tail[0]}"


@pytest.fixture(scope="module")
def browser():
    path, why = find_chromium()
    if path is None:
        pytest.skip(why)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def site(synth_shards, tmp_path_factory) -> Path:
    """The site of the 40 synthetic training samples plus one shard holding only a failure record."""
    src = tmp_path_factory.mktemp("browse_src")
    for f in synth_shards.glob("*"):
        shutil.copy(f, src / f.name)
    with shards.ShardWriter(src, prefix="zfail") as w:
        w.add_failure("synth_999", "grounder", "CUDA out of memory")
    out = tmp_path_factory.mktemp("browse") / "site"
    res = build_site(src, out)
    assert res["samples"] == 40
    return out


@pytest.fixture
def page(browser, site):
    pg = browser.new_page(viewport={"width": 1400, "height": 900})
    problems: list[str] = []
    pg.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
    pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    pg.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    pg.goto((site / "index.html").as_uri())
    pg.problems = problems
    yield pg
    pg.close()


def _ready_cards(pg, n: int) -> None:
    pg.wait_for_function(f"document.querySelectorAll('.card[data-ready=\"1\"]').length >= {n}", timeout=20_000)


def test_site_is_self_contained(site):
    names = {p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file()}
    assert {"index.html", "app.js", "style.css", "data/index.js", "search-index.js"} <= names
    assert len([n for n in names if n.startswith("images/")]) == 40
    for name in ("index.html", "app.js", "style.css"):
        text = (site / name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text), f"{name} refers to the network"


def test_loads_without_errors_and_shows_stats_and_failures(page):
    page.wait_for_selector("#stats-table")
    stats = page.inner_text("#stats-table")
    assert re.search(r"images\s+40", stats) and re.search(r"failures\s+1", stats)
    assert page.locator(".hist").count() >= 4
    page.click("#tab-failures")
    row = page.inner_text("#failures-table")
    assert "synth_999" in row and "grounder" in row and "CUDA out of memory" in row
    page.click("#tab-grid")
    _ready_cards(page, 24)
    assert page.problems == []


def test_grid_search_click_and_pagination(page, site):
    data = json.loads((site / "data" / "index.js").read_text().split("=", 1)[1].rstrip().rstrip(";"))
    page.click("#tab-grid")
    _ready_cards(page, 24)
    assert page.locator(".card").count() == 24
    assert page.inner_text("#page-info") == "Page 1 of 2"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    # pagination
    first_keys = page.eval_on_selector_all(".card", "cs => cs.map(c => c.dataset.key)")
    page.click("#next")
    _ready_cards(page, 16)
    assert page.inner_text("#page-info") == "Page 2 of 2" and page.locator(".card").count() == 16
    second_keys = page.eval_on_selector_all(".card", "cs => cs.map(c => c.dataset.key)")
    assert not set(first_keys) & set(second_keys) and len(first_keys) + len(second_keys) == 40
    assert page.is_disabled("#next")
    page.click("#prev")
    _ready_cards(page, 24)

    # the search box narrows the grid to the samples with a matching segment, and says how many segments
    name = CLASSES[0]
    with_class = [s for s in data["samples"] if any(t[0] == name for seg in s["g"] for t in seg[3])]
    n_segs = sum(1 for s in data["samples"] for seg in s["g"] if any(t[0] == name for t in seg[3]))
    page.fill("#search", name)
    _ready_cards(page, min(24, len(with_class)))
    assert page.locator(".card").count() == min(24, len(with_class)) < 24
    assert page.inner_text("#match-info").startswith(f"{n_segs} segments in {len(with_class)} samples")

    # a click on a segment lists its texts: the shown segment of the first card, clicked at its box centre
    card = page.locator(".card").first
    sample = next(s for s in data["samples"] if s["k"] == card.get_attribute("data-key"))
    seg = next(g for g in sample["g"] if any(t[0] == name for t in g[3]))
    x, y, w, h = seg[4]
    box = card.locator("canvas").bounding_box()
    page.mouse.move(box["x"] + (x + w / 2) * box["width"] / sample["w"], box["y"] + (y + h / 2) * box["height"] / sample["h"])
    page.mouse.down()
    page.mouse.up()
    page.wait_for_selector("#segment-texts li")
    details = page.inner_text("#details")
    assert f"{sample['k']} : segment {seg[0]}" in details and name in details and "synth" in details
    page.screenshot(path=str(SCREENSHOTS / "browse-grid.png"))

    # source and area filters: an area range no segment has empties the grid
    page.fill("#search", "")
    page.fill("#area-min", "99")
    assert page.locator(".card").count() == 0
    page.fill("#area-min", "0")
    page.select_option("#source", label="synth")
    _ready_cards(page, 24)
    assert page.inner_text("#page-info") == "Page 1 of 2"
    assert page.problems == []
