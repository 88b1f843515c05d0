"""`archivecolor review`: the gallery built from a real run, and the page driven in a real Chromium."""

from __future__ import annotations

import csv
import json
import shutil
import time
from dataclasses import replace
from html import escape as html_escape
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from archivecolor.catalog import index_references
from archivecolor.cli import app
from archivecolor.provenance import read_sidecar, verify
from archivecolor.review import CANDIDATES, build_review
from archivecolor.runner import RunOptions, colorize_folder
from tests.conftest import ROOT, colour_photos, gray_of

ODD = 'odd "quote" <b>&amp; ü.png'  # a name that HTML, JSON and CSV must each escape
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def run(tmp_path_factory, models_home):
    """A catalogue of 7 colour photos, 4 gray scans in two folders plus a broken one, coloured from it."""
    root = tmp_path_factory.mktemp("review")
    photos = colour_photos(11, (192, 128))
    refs = root / "refs"
    refs.mkdir()
    for i, photo in enumerate(photos[4:]):
        Image.fromarray(photo).save(refs / f"ref{i}.png")
    catalog = root / "catalog.sqlite"
    index_references(refs, catalog, home=models_home)
    scans = root / "scans"
    for folder, name, photo in (("a", "one.png", photos[0]), ("a", ODD, photos[1]), ("b", "two.png", photos[2]),
                                ("b", "three.png", photos[3])):
        (scans / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(gray_of(photo)).save(scans / folder / name)
    (scans / "b" / "broken.png").write_bytes((scans / "b" / "two.png").read_bytes()[:200])
    out = root / "out"
    report = colorize_folder(scans, RunOptions(out=out, catalog=catalog))
    assert report.count("done") == 4 and report.count("failed") == 1
    failure = next(r.reason for r in report.results if r.status == "failed")
    return {"root": root, "scans": scans, "out": out, "catalog": catalog, "refs": refs, "failure": failure}


def test_review_has_a_card_per_scan_with_candidates_and_reuses_its_images(run):
    out = run["out"]
    first = build_review(out, run["catalog"])
    assert first.index == out / "review" / "index.html" and first.index.is_file()
    assert (first.cards, first.failed, first.problems) == (5, 1, [])
    assert first.images_made > 0 and first.candidates_computed == 0  # the run recorded them
    sidecar = read_sidecar(out / "a" / "one.png.json")
    assert len(sidecar.candidates) == CANDIDATES
    assert sidecar.candidates[0]["sha256"] == sidecar.references[0]["sha256"]
    html = first.index.read_text()
    assert "broken.png" in html and html_escape(run["failure"]) in html
    for image in (out / "review" / "img").iterdir():
        with Image.open(image) as im:
            assert im.format == "JPEG" and max(im.size) <= 1600
    second = build_review(out, run["catalog"])
    assert second.images_made == 0 and second.images_reused == first.images_made
    assert verify(out).clean  # review images are not orphaned outputs


def test_review_escapes_every_name(run):
    html = build_review(run["out"], run["catalog"]).index.read_text()
    assert ODD not in html  # never raw
    assert "odd &#34;quote&#34; &lt;b&gt;&amp;amp; ü.png" in html
    data = html.split('id="cards-data">', 1)[1].split("</script>", 1)[0]
    assert "</" not in data
    assert any(card["scan"] == f"a/{ODD}" for card in json.loads(data))


def test_review_retrieves_candidates_for_a_fixed_reference_run(run, tmp_path, models_home):
    out = tmp_path / "fixed"
    colorize_folder(run["scans"], RunOptions(out=out, reference=run["refs"] / "ref0.png"))
    assert read_sidecar(out / "b" / "two.png.json").candidates == []
    assert "candidates" not in json.loads((out / "b" / "two.png.json").read_text())
    report = build_review(out, run["catalog"])
    assert report.candidates_computed == 4
    without = build_review(tmp_path / "fixed", run["catalog"], candidates=False)
    assert without.candidates_computed == 0


def test_review_cli(run, tmp_path):
    result = CliRunner().invoke(app, ["review", str(run["out"]), "--catalog", str(run["catalog"]), "-q"])
    assert result.exit_code == 0, result.output
    assert str(run["out"] / "review" / "index.html") in result.output
    missing = CliRunner().invoke(app, ["review", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "no such output folder" in missing.output
    empty = CliRunner().invoke(app, ["review", str(tmp_path)])
    assert empty.exit_code == 2 and "no archivecolor outputs here" in empty.output
    assert not (tmp_path / "review").exists()


# --- in a real browser -------------------------------------------------------------------------------

def _chrome(download_dir: Path):
    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no chromium and chromedriver installed (Debian: apt install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000",
                "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.binary_location = chromium
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    options.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                              "download.prompt_for_download": False})
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture
def page(run, tmp_path):
    index = build_review(run["out"], run["catalog"]).index
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = _chrome(downloads)
    driver.get(index.as_uri())
    yield driver, downloads
    driver.quit()


def _shown(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('.card:not([hidden])')).map(a => a.dataset.scan)")


@pytest.mark.browser
def test_page_loads_offline_without_errors_and_every_image_loads(page):
    driver, _ = page
    for card in driver.find_elements("css selector", ".card"):
        driver.execute_script("arguments[0].scrollIntoView()", card)
        time.sleep(0.1)
    deadline = time.time() + 20
    while time.time() < deadline and not driver.execute_script(
            "return Array.from(document.images).every(i => i.complete)"):
        time.sleep(0.2)
    broken = driver.execute_script(
        "return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)")
    assert broken == [] and len(driver.find_elements("css selector", "img")) >= 4 * 3
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    requested = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
    urls = [m["params"]["request"]["url"] for m in requested if m["method"] == "Network.requestWillBeSent"]
    assert urls and all(u.startswith(("file:", "data:", "blob:")) for u in urls), urls
    ARTIFACTS.mkdir(exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(ARTIFACTS / "review.png"))


@pytest.mark.browser
def test_filter_and_sort_change_what_is_shown(page):
    from selenium.webdriver.support.ui import Select

    driver, _ = page
    assert len(_shown(driver)) == 5
    Select(driver.find_element("id", "show")).select_by_value("failed")
    assert _shown(driver) == ["b/broken.png"]
    Select(driver.find_element("id", "show")).select_by_value("all")
    Select(driver.find_element("id", "folder")).select_by_value("a")
    assert sorted(_shown(driver)) == sorted(["a/one.png", f"a/{ODD}"])
    Select(driver.find_element("id", "folder")).select_by_value("*")
    Select(driver.find_element("id", "sort")).select_by_value("name")
    by_name = _shown(driver)
    assert by_name == sorted(by_name)
    Select(driver.find_element("id", "sort")).select_by_value("match")
    matches = driver.execute_script(
        "return Array.from(document.querySelectorAll('.card:not([hidden])')).map(a => a.dataset.match)")
    scored = [float(m) for m in matches if m]
    assert scored == sorted(scored) and matches[0] == ""  # the failed scan (no match) first, then worst first


@pytest.mark.browser
def test_approve_key_marks_the_card_and_survives_a_reload(page):
    from selenium.webdriver.common.keys import Keys

    driver, _ = page
    body = driver.find_element("tag name", "body")
    first = _shown(driver)[0]
    body.send_keys(Keys.ARROW_RIGHT)  # from the first card to the second
    body.send_keys("a")
    second = _shown(driver)[1]
    card = driver.find_element("css selector", f'.card[data-scan="{second}"]')
    assert card.get_attribute("data-decision") == "approved" and first != second
    driver.refresh()
    card = driver.find_element("css selector", f'.card[data-scan="{second}"]')
    assert card.get_attribute("data-decision") == "approved"
    assert "approved" in card.find_element("css selector", ".decision").text
    driver.find_element("tag name", "body").send_keys(Keys.ARROW_RIGHT, "f")  # the first card is the failed one
    full = driver.find_element("id", "full")
    assert full.is_displayed() and len(full.find_elements("css selector", "img")) == 2
    driver.find_element("tag name", "body").send_keys("s")
    assert "side" in full.get_attribute("class")
    driver.find_element("tag name", "body").send_keys(Keys.ESCAPE)
    assert not full.is_displayed()


@pytest.mark.browser
def test_a_re_picked_reference_exported_redoes_only_that_scan(page, run):
    driver, downloads = page
    card = driver.find_element("css selector", '.card[data-scan="b/two.png"]')
    unused = card.find_elements("css selector", ".cand:not(.used)")
    unused[0].click()
    assert "chosen" in unused[0].get_attribute("class")
    chosen = unused[0].get_attribute("title")
    driver.find_element("id", "export").click()
    target = downloads / "decisions.csv"
    deadline = time.time() + 20
    while time.time() < deadline and not target.is_file():
        time.sleep(0.2)
    rows = list(csv.DictReader(target.open(encoding="utf-8")))
    assert {r["scan"] for r in rows} == {"a/one.png", f"a/{ODD}", "b/two.png", "b/three.png"}
    assert [r["reference"] for r in rows if r["scan"] == "b/two.png"] == [chosen]
    report = colorize_folder(run["scans"], RunOptions(out=run["out"], mapping=target))
    status = {r.source: r.status for r in report.results}
    assert status == {"a/one.png": "skipped", f"a/{ODD}": "skipped", "b/two.png": "done", "b/three.png": "skipped",
                      "b/broken.png": "failed"}
    redone = read_sidecar(run["out"] / "b" / "two.png.json")
    assert [r["path"] for r in redone.references] == [chosen]


@pytest.mark.slow
def test_a_review_of_1000_outputs(run, tmp_path):
    """Prints how long a review of 1,000 distinct 1536x1024 outputs takes to build, then to rebuild."""
    import numpy as np

    from archivecolor.models.weights import sha256_file
    from archivecolor.provenance import write_sidecar

    template = read_sidecar(run["out"] / "a" / "one.png.json")
    out = tmp_path / "out"
    scans = tmp_path / "scans"
    base = np.asarray(Image.open(run["refs"] / "ref0.png").convert("RGB").resize((1536, 1024)))
    rng = np.random.default_rng(0)
    for i in range(1000):
        folder = f"box{i // 100:02d}"
        (out / folder).mkdir(parents=True, exist_ok=True)
        (scans / folder).mkdir(parents=True, exist_ok=True)
        rgb = np.roll(base, 7 * i, axis=1) ^ rng.integers(0, 8, 3, dtype=np.uint8)
        Image.fromarray(rgb).save(out / folder / f"{i}.jpg", quality=90)
        Image.fromarray(gray_of(rgb)).save(scans / folder / f"{i}.jpg", quality=90)
        record = replace(
            template,
            source=replace(template.source, root="../scans", path=f"{folder}/{i}.jpg",
                           sha256=sha256_file(scans / folder / f"{i}.jpg")),
            output=replace(template.output, path=f"{folder}/{i}.jpg", sha256=sha256_file(out / folder / f"{i}.jpg")))
        write_sidecar(out / folder / f"{i}.jpg", record)
    started = time.perf_counter()
    first = build_review(out, run["catalog"])
    built = time.perf_counter() - started
    started = time.perf_counter()
    second = build_review(out, run["catalog"])
    rebuilt = time.perf_counter() - started
    assert first.cards == 1000 and first.problems == [] and second.images_made == 0
    print(f"\nreview of 1,000 outputs of 1536x1024: built in {built:.1f} s ({first.images_made} images), "
          f"rebuilt in {rebuilt:.1f} s; index.html {first.index.stat().st_size / 1e6:.1f} MB")
