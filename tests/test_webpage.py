"""The web page in a real browser (Debian chromium driven by Playwright): upload an image, see
the probabilities, click a class, see its Grad-CAM overlay, take a screenshot."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from clusters import free_port
from cxrray.labels import SYNTHETIC_FINDINGS

pytestmark = [pytest.mark.ray, pytest.mark.browser, pytest.mark.slow]

CHROMIUM = os.environ.get("CXRRAY_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = Path(os.environ.get("CXRRAY_SCREENSHOT", "/tmp/cxrray_page.png"))
VIEWPORT = {"width": 1200, "height": 820}


def xray_png(path: Path) -> Path:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:160, 0:160] / 160
    img = 0.78 - 0.5 * ((((x - 0.32) / 0.14) ** 2 + ((y - 0.45) / 0.3) ** 2) < 1)
    img = img - 0.5 * ((((x - 0.68) / 0.14) ** 2 + ((y - 0.45) / 0.3) ** 2) < 1)
    img = np.clip(img + rng.normal(0, 0.04, img.shape), 0, 1)
    Image.fromarray((img * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        pytest.skip(f"chromium is not installed at {CHROMIUM} (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="python playwright is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def url(ray_session, tmp_path_factory, browser) -> str:
    from cxrray.serve import run_server, shutdown

    from test_serve import make_artifact  # one artifact recipe for both HTTP test modules

    artifact = make_artifact(tmp_path_factory.mktemp("web") / "artifact")
    base = run_server(str(artifact), port=free_port(), blocking=False, name="test_web", num_replicas=1,
                      num_threads=1)
    yield base
    shutdown()


def test_page_is_self_contained(url) -> None:
    r = requests.get(url + "/", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    # Offline: no CDN or remote asset of any kind.
    assert "http://" not in html and "https://" not in html and "//cdn" not in html


def test_upload_see_probabilities_click_class_see_overlay(url, browser, tmp_path) -> None:
    page = browser.new_page(viewport=VIEWPORT)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    requests_made: list[str] = []
    page.on("request", lambda req: requests_made.append(req.url))
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model-info').textContent.includes('small_cnn')")

    page.set_input_files("#file-input", str(xray_png(tmp_path / "chest.png")))
    page.wait_for_selector(".bar-row", timeout=30_000)
    rows = page.locator(".bar-row")
    assert rows.count() == len(SYNTHETIC_FINDINGS)
    shown = {rows.nth(i).get_attribute("data-class") for i in range(rows.count())}
    assert shown == set(SYNTHETIC_FINDINGS)
    pct = rows.first.locator(".pct").inner_text()
    assert pct.endswith("%") and 0 <= float(pct[:-1]) <= 100
    assert page.locator(".bar-row .thr").count() == len(SYNTHETIC_FINDINGS)  # thresholds are marked

    # Click a class that is not the auto-explained top one; its overlay must appear.
    target = rows.nth(rows.count() - 1).get_attribute("data-class")
    rows.nth(rows.count() - 1).click()
    page.wait_for_function(
        "(t) => { const tag = document.getElementById('overlay-tag');"
        " const img = document.getElementById('overlay');"
        " return !img.hidden && img.complete && img.naturalWidth > 0 && tag.textContent.includes(t); }",
        arg=target, timeout=30_000)
    assert page.locator(f".bar-row.selected[data-class='{target}']").count() == 1
    assert page.locator("#overlay").get_attribute("src").startswith("data:image/png;base64,")
    assert "error" not in (page.locator("#status").get_attribute("class") or "")
    # Full resolution: the 160 px upload comes back as a 160 px overlay (the model sees 64 px);
    # the browser scales it to the viewer.
    assert page.evaluate("document.getElementById('overlay').naturalWidth") == 160
    assert "160×160" in page.locator("#overlay-tag").inner_text()

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=False)
    shot = Image.open(SCREENSHOT)
    assert shot.size == (VIEWPORT["width"], VIEWPORT["height"]) and SCREENSHOT.stat().st_size > 10_000
    # The overlay really is coloured (a heatmap over a grey image), not a blank box.
    box = page.locator("#overlay").bounding_box()
    crop = np.asarray(shot.convert("RGB").crop((box["x"], box["y"], box["x"] + box["width"],
                                                box["y"] + box["height"]))).astype(int)
    assert (np.abs(crop[..., 0] - crop[..., 2]) > 40).mean() > 0.02
    # Heatmap off: the upload itself at the same resolution, not the blurred model input.
    page.uncheck("#show-heat")
    page.wait_for_function("document.getElementById('overlay-tag').textContent.startsWith('Image')")
    assert page.evaluate("document.getElementById('overlay').naturalWidth") == 160
    assert errors == []
    assert all(u.startswith(url) or u.startswith("data:") for u in requests_made), requests_made
    page.close()


def test_page_shows_a_readable_error_for_a_bad_file(url, browser, tmp_path) -> None:
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(url + "/")
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image at all")
    page.set_input_files("#file-input", str(bad))
    page.wait_for_selector("#status.error", timeout=30_000)
    assert "not a PNG, JPEG or DICOM" in page.locator("#status").inner_text()
    page.close()


def test_page_shows_qa_warnings_for_a_lateral_dicom(url, browser, tmp_path) -> None:
    from tests.test_qa import dx_bytes

    path = tmp_path / "lateral.dcm"
    path.write_bytes(dx_bytes(view="LL", size=300))
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(url + "/")
    page.set_input_files("#file-input", str(path))
    page.wait_for_selector(".chip.warn", timeout=30_000)
    chips = page.locator(".chip.warn")
    assert chips.count() == 1 and chips.first.get_attribute("data-warning") == "lateral_view"
    assert "lateral view" in chips.first.inner_text()
    page.close()


@pytest.mark.parametrize("where", ["#drop", "#drop strong", "h1"])
def test_a_dropped_file_is_uploaded_once_wherever_it_lands(url, browser, tmp_path, where) -> None:
    """On the zone, on its text (a child: the event bubbles to the page's handler too) or
    elsewhere on the page: one /predict. A drop on the text used to upload twice."""
    import base64
    import time

    page = browser.new_page(viewport=VIEWPORT)
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model-info').textContent.includes('small_cnn')")
    posts: list[str] = []
    page.on("request", lambda req: posts.append(req.url) if req.method == "POST" and "/predict" in req.url else None)
    png = base64.b64encode(xray_png(tmp_path / "dropped.png").read_bytes()).decode("ascii")
    transfer = page.evaluate_handle("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        return dt;
    }""", png)
    page.dispatch_event(where, "drop", {"dataTransfer": transfer})
    page.wait_for_selector(".bar-row", timeout=30_000)
    time.sleep(1.0)  # a second upload, had there been one, starts within the same task
    assert len(posts) == 1, posts
    assert "dropped.png" in page.locator("#file-name").inner_text()
    page.close()
