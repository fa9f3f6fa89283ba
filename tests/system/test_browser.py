"""The web page in a real headless Chromium: pick the demo, choose a picture, run, see the grids.

Needs Debian's `chromium` and `chromium-driver` and PyPI's `selenium`. On CI (CI=true) their
absence is a failure; on a developer machine without them the tests skip.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import fakeredis
import numpy as np
import pytest
import requests
from werkzeug.serving import make_server

from service.app import create_app
from service.demo import demo_images, demo_model
from worker.contract.config import Settings
from worker.embedded import start_workers

pytestmark = pytest.mark.system

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(
            f"{what} is required on CI (apt-get install chromium chromium-driver; "
            "pip install selenium)"
        )
    pytest.skip(f"{what} not installed on this machine")


try:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:  # checked per test so CI reports it as a failure, not a collection skip
    webdriver = None


@pytest.fixture(scope="module")
def server():
    """convq on a free port with one embedded worker and the demo model loaded."""
    redis = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    settings = Settings(threads=1)
    app = create_app({"REDIS": redis, "SETTINGS": settings})
    http = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    workers = start_workers(redis, settings, 1)
    url = f"http://127.0.0.1:{http.server_port}"
    spec, arrays = demo_model()
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "w.npz", **arrays)
        files = {
            "spec": ("spec.json", json.dumps(spec)),
            "weights": ("w.npz", (Path(tmp) / "w.npz").read_bytes()),
        }
        requests.post(
            f"{url}/v2/repository/models/demo/load", files=files, timeout=30
        ).raise_for_status()
    yield url
    workers.stop(timeout=10)
    http.shutdown()
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    if webdriver is None:
        _missing("selenium")
    if CHROMIUM is None or CHROMEDRIVER is None:
        _missing("chromium / chromedriver")
    profile = tempfile.mkdtemp(prefix="convq-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Headless as root in a sandbox-less container, and no calls home: this machine's network
    # refuses them, and each refusal slows start-up.
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--no-first-run",
        "--window-size=1280,2000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait(driver, condition, timeout=60):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))


def loaded(driver, element) -> bool:
    return bool(
        driver.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth > 0", element
        )
    )


def test_run_the_demo_and_see_every_layers_maps(server, browser, tmp_path):
    browser.get(server + "/")
    select = wait(browser, lambda d: d.find_element(By.ID, "model-select"))
    wait(browser, lambda d: "demo" in [o.get_attribute("value") for o in Select(select).options])
    assert Select(select).first_selected_option.get_attribute("value") == "demo"

    # The model's table and its conv1 filters appear as soon as it is chosen.
    rows = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#summary tbody tr"))
    assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in rows] == ["conv1", "relu1", "pool1"]
    filters = browser.find_element(By.ID, "filters-img")
    wait(browser, lambda d: loaded(d, filters))
    assert browser.execute_script("return arguments[0].naturalWidth", filters) > 500

    # Choose a picture through the file input (what dropping one does), then run.
    picture = tmp_path / "stripes.png"
    picture.write_bytes(dict(demo_images())["stripes.png"])
    browser.find_element(By.ID, "file-input").send_keys(str(picture))
    run = browser.find_element(By.ID, "run-button")
    wait(browser, lambda d: run.is_enabled())
    assert "227×227" in browser.find_element(By.ID, "image-note").text
    run.click()

    wait(
        browser,
        lambda d: (
            "finished" in d.find_element(By.ID, "status").text
            or "failed" in d.find_element(By.ID, "status").text
        ),
    )
    assert "finished" in browser.find_element(By.ID, "status").text
    figures = wait(
        browser,
        lambda d: (
            len(d.find_elements(By.CSS_SELECTOR, "#maps figure")) == 3
            and d.find_elements(By.CSS_SELECTOR, "#maps figure")
        ),
    )
    assert [f.get_attribute("data-layer") for f in figures] == ["conv1", "relu1", "pool1"]
    grids = browser.find_elements(By.CSS_SELECTOR, "#maps figure img")
    wait(browser, lambda d: all(loaded(d, g) for g in grids))
    assert "55×55×96" in figures[0].text and "27×27×96" in figures[2].text
    assert not browser.find_elements(By.CSS_SELECTOR, "#maps .error")

    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "browser-demo.png"))
    assert (ARTIFACTS / "browser-demo.png").stat().st_size > 10_000


def test_upload_a_model_from_the_page_and_run_a_sample(server, browser, tmp_path):
    spec, arrays = demo_model()
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    np.savez(tmp_path / "weights.npz", **arrays)
    browser.get(server + "/")
    browser.find_element(By.CSS_SELECTOR, "#upload summary").click()
    browser.find_element(By.ID, "upload-name").send_keys("mine")
    browser.find_element(By.ID, "upload-spec").send_keys(str(tmp_path / "spec.json"))
    browser.find_element(By.ID, "upload-weights").send_keys(str(tmp_path / "weights.npz"))
    browser.find_element(By.CSS_SELECTOR, "#upload-form button[type=submit]").click()
    wait(browser, lambda d: "Loaded mine" in d.find_element(By.ID, "upload-status").text)
    select = Select(browser.find_element(By.ID, "model-select"))
    wait(browser, lambda d: select.first_selected_option.get_attribute("value") == "mine")

    sample = wait(
        browser,
        lambda d: d.find_elements(By.CSS_SELECTOR, "#samples button[data-name='colour-blobs.png']"),
    )[0]
    sample.click()
    run = browser.find_element(By.ID, "run-button")
    wait(browser, lambda d: run.is_enabled())
    run.click()
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#maps figure img")) == 3)
    grids = browser.find_elements(By.CSS_SELECTOR, "#maps figure img")
    wait(browser, lambda d: all(loaded(d, g) for g in grids))
    browser.save_screenshot(str(ARTIFACTS / "browser-upload.png"))


def test_dropping_a_picture_chooses_it_and_fits_it_to_the_model(server, browser):
    browser.get(server + "/")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#summary tbody tr"))
    # Drop a 300x200 picture, built in the page, the way a file dragged from the desktop arrives.
    browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const canvas = document.createElement("canvas");
        canvas.width = 300; canvas.height = 200;
        const ctx = canvas.getContext("2d");
        ctx.fillStyle = "#c03020"; ctx.fillRect(0, 0, 300, 200);
        canvas.toBlob((blob) => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([blob], "dropped.png", {type: "image/png"}));
            const zone = document.getElementById("drop-zone");
            zone.dispatchEvent(new DragEvent("dragover", {dataTransfer: transfer, bubbles: true}));
            zone.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true}));
            done();
        }, "image/png");
    """)
    note = browser.find_element(By.ID, "image-note")
    wait(browser, lambda d: "dropped.png" in note.text)
    assert "300×200" in note.text and "227×227" in note.text  # scaled and cropped to fit
    preview = browser.find_element(By.ID, "preview")
    wait(browser, lambda d: loaded(d, preview))
    assert browser.execute_script("return arguments[0].naturalWidth", preview) == 227
    assert browser.find_element(By.ID, "run-button").is_enabled()


def test_a_stack_without_the_demo_offers_it_in_one_click(server, browser):
    requests.post(f"{server}/v2/repository/models/demo/unload", timeout=30).raise_for_status()
    requests.post(f"{server}/v2/repository/models/mine/unload", timeout=30)
    browser.get(server + "/")
    add = browser.find_element(By.ID, "add-demo")
    wait(browser, lambda d: add.is_displayed())
    add.click()
    select = Select(browser.find_element(By.ID, "model-select"))
    wait(
        browser,
        lambda d: select.options and select.first_selected_option.get_attribute("value") == "demo",
    )
    wait(browser, lambda d: not add.is_displayed())
    filters = browser.find_element(By.ID, "filters-img")
    wait(browser, lambda d: loaded(d, filters))
