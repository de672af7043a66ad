"""The web app in a real browser (issue 18): `erasekit serve` on the miniature, driven by Selenium + Chromium.

Runs where Chromium, its driver and the ``ui`` extra are installed (CI installs Debian's ``chromium``
and ``chromium-driver``): ``pytest -m browser tests/test_serve_browser.py``. It erases "triangle"
with UCE through the page, checks that the compare grid shows the new run's images, and that the
page's ESR equals ``erasekit evaluate`` on the same seeds. With ``ERASEKIT_SCREENSHOTS=DIR`` it also
attacks, builds the report and saves a screenshot of each tab (docs/webapp-*.png); timings go to
``DIR/timings.json`` when set.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
try:
    import gradio  # noqa: F401
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # the ui extra (and selenium) are not installed
    webdriver = None

if webdriver is None or not CHROMIUM or not DRIVER:
    pytest.skip("needs chromium, chromedriver, selenium and erasekit[ui]", allow_module_level=True)

N_PER_CLASS, EVAL_SEED = 2, 0
SHOTS = os.environ.get("ERASEKIT_SCREENSHOTS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    runs = tmp_path_factory.mktemp("webapp") / "runs"
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(runs.parent / "serve.log", "w")  # noqa: SIM115
    t0 = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "erasekit", "serve", "--runs", str(runs), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}/"
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if proc.poll() is not None or time.time() - t0 > 300:
                proc.kill()
                raise RuntimeError(f"erasekit serve did not start: {(runs.parent / 'serve.log').read_text()}") from None
            time.sleep(0.5)
    startup = time.time() - t0
    yield {"url": url, "runs": runs, "startup_s": startup}
    proc.terminate()
    proc.wait(30)
    log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1100",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def css(driver, selector):
    return driver.find_elements(By.CSS_SELECTOR, selector)


def wait_for(driver, selector, timeout=600, count=1):
    WebDriverWait(driver, timeout, poll_frequency=0.25).until(lambda d: len(css(d, selector)) >= count)
    return css(driver, selector)


def type_into(driver, elem_id, text):
    box = wait_for(driver, f"#{elem_id} textarea, #{elem_id} input")[0]
    box.clear()
    box.send_keys(text)


def tab(driver, name):
    buttons = [b for b in css(driver, "button[role=tab]") if b.text.strip() == name]
    assert buttons, f"no tab {name!r}"
    buttons[0].click()


def shot(driver, name):
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.5)
        driver.save_screenshot(str(Path(SHOTS) / f"webapp-{name}.png"))


def test_erase_compare_evaluate_in_the_browser(server, browser):
    d, timings = browser, {"startup_s": round(server["startup_s"], 1)}
    d.get(server["url"])
    wait_for(d, "#erase-btn", 120)

    # bad input: a run name with ../ is refused in the page, nothing written
    type_into(d, "erase-name", "../escape")
    type_into(d, "erase-concepts", "triangle")
    css(d, "#erase-btn")[0].click()
    msg = wait_for(d, "#erase-msg .ek-error", 60)[0]
    assert "is not allowed" in msg.text and "Traceback" not in d.page_source
    assert not (server["runs"].parent / "escape").exists()

    # erase "triangle" with UCE through the page
    type_into(d, "erase-name", "uce-triangle")
    t0 = time.time()
    css(d, "#erase-btn")[0].click()
    wait_for(d, '#job-status [data-status="done"], #job-status [data-status="failed"]', 600)
    status = css(d, "#job-status .ek-status")[0]
    assert status.get_attribute("data-status") == "done", status.text
    job = status.get_attribute("data-job")
    timings["erase_s"] = round(time.time() - t0, 1)
    shot(d, "erase")

    # the compare grid shows the new run's images (the new run is chosen there when the erase finishes)
    tab(d, "Compare")
    wait_for(d, "#compare-runs", 30)
    time.sleep(1.5)  # one poll, so that the run choice reached the dropdown
    css(d, "#compare-btn")[0].click()
    imgs = wait_for(d, '#compare-grid img[data-run="uce-triangle"]', 600, count=8)
    timings["erase_to_grid_s"] = round(time.time() - t0, 1)
    assert len(imgs) == 8 and len(css(d, '#compare-grid img[data-run="original"]')) == 8
    assert all(i.get_attribute("src").startswith("data:image/png;base64,") for i in imgs)
    assert css(d, "#compare-grid .ek-verdict")  # the miniature detector's verdicts
    shot(d, "compare")

    # the page's ESR equals `erasekit evaluate` on the same seeds
    tab(d, "Evaluate / attack")
    type_into(d, "eval-n", str(N_PER_CLASS))
    type_into(d, "eval-seed", str(EVAL_SEED))
    css(d, "#eval-btn")[0].click()
    wait_for(d, '#eval-metrics td[data-metric="esr_1"]', 600)
    page = {k: css(d, f'#eval-metrics td[data-metric="{k}"]')[0].text for k in ("esr_1", "esr_3", "psr_1")}
    cli = subprocess.run(
        [sys.executable, "-m", "erasekit", "evaluate", "--edit", str(server["runs"] / "uce-triangle")]
        + ["--n-per-class", str(N_PER_CLASS), "--seed", str(EVAL_SEED)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    ref = json.loads(cli.stdout[cli.stdout.index("{") :])
    assert page == {k: f"{ref[k]:.4f}" for k in page}, (page, ref)

    if SHOTS:  # the other tabs, for docs/
        type_into(d, "attack-prompts", "2")
        css(d, "#attack-btn")[0].click()
        wait_for(d, '#attack-out td[data-metric="asr-paraphrase"]', 600)
        shot(d, "evaluate")
        tab(d, "Export")
        time.sleep(1)
        shot(d, "export")
        tab(d, "Report")
        type_into(d, "report-seeds", "0:4")
        css(d, "#report-btn")[0].click()
        wait_for(d, "#report-page iframe", 600)
        time.sleep(2)
        shot(d, "report")

    # a reload with the job id in the URL shows the same job, kept on the server
    d.get(server["url"] + f"?job={job}")
    wait_for(d, f'#job-status [data-job="{job}"][data-status="done"]', 60)
    if SHOTS:
        Path(SHOTS, "timings.json").write_text(json.dumps(timings, indent=2))
    print("timings", timings)
