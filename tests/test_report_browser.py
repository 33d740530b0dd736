"""report.html in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium): the page a
person opens shows rendered Markdown (no literal ``**`` or backticks), every section holds a table or
a plot, and every plot loads from its relative path. A screenshot of the whole page is kept.

Skipped, as the annotation app's browser test is, only where the browser is not installed.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from rlhfkit.report import write_report
from test_report import fake_run

webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")
# On CI (which installs them through `make test`) a missing browser is a failure, not a skip.
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER) and not os.environ.get("CI"),
                                reason="Debian's chromium and chromium-driver are not installed (scripts/system-deps.sh)")

# For each <h2>: its text, and whether a <table>, <img> or <svg> (or an element holding one) comes
# before the next <h2>.
_SECTIONS_JS = """
return Array.from(document.querySelectorAll('h2')).map(h => {
  let found = false;
  for (let el = h.nextElementSibling; el && el.tagName !== 'H2'; el = el.nextElementSibling)
    if (el.matches('table, img, svg') || el.querySelector('table, img, svg')) found = true;
  return [h.textContent, found];
});
"""


def open_browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1800,900",
                "--allow-file-access-from-files"):
        opts.add_argument(arg)
    # An explicit driver path: Selenium Manager (which would download a driver) is never run.
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    driver.implicitly_wait(0)
    return driver


def check_report_in_browser(driver, run: Path, screenshot: Path) -> list[list]:
    """Open ``run``/report.html, save a screenshot of the whole page, and assert what a reader needs.

    Returns the sections as [heading, has a table or plot]."""
    from selenium.webdriver.common.by import By

    driver.get((run / "report.html").resolve().as_uri())
    text = driver.find_element(By.TAG_NAME, "body").text
    # A table wider than the window scrolls inside itself; at 1800 px none should need to.
    clipped = driver.execute_script("return Array.from(document.querySelectorAll('table'))"
                                    ".filter(t => t.scrollWidth > t.clientWidth + 1).length")
    sections = driver.execute_script(_SECTIONS_JS)
    # Every image decoded: its relative path resolved from the page, and the file is a picture.
    broken = driver.execute_script("return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
                                   ".map(i => i.getAttribute('src'));")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1800, min(max(height, 900), 16000))  # the whole page in one picture
    driver.save_screenshot(str(screenshot))
    assert "**" not in text and "`" not in text, "Markdown shown literally"
    assert sections and [h for h, ok in sections if not ok] == [], sections
    assert driver.find_elements(By.TAG_NAME, "img") and broken == []
    assert clipped == 0, f"{clipped} table(s) wider than the page"
    # No absolute path (the run directory may appear only inside a relative one, as ../../tmp/run).
    assert not re.search(rf"(^|[^\w.]){re.escape(str(run.resolve()))}", driver.page_source)
    return sections


@pytest.fixture
def browser():
    driver = open_browser()
    yield driver
    driver.quit()


def test_report_html_in_chromium(tmp_path, browser):
    run = fake_run(tmp_path / "run")
    write_report(run)
    sections = check_report_in_browser(browser, run, tmp_path / "report.png")
    assert [h for h, _ in sections] == ["Policies on held-out prompts", "Reward models", "Best-of-n reranking", "Stages",
                                        "Over-optimization", "DNO iterations", "Training curves", "Sample responses"]
    assert (tmp_path / "report.png").stat().st_size > 10_000
