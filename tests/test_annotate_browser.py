"""End to end in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium).

An annotator signs in with their token, ranks one item with the keyboard (including an undo)
and one with the mouse (plus an unsafe flag and a wrong step), and the export holds exactly
those rankings. No browser is downloaded: the test uses /usr/bin/chromium and its driver, and
is skipped with a clear reason only where they are not installed (`scripts/system-deps.sh`).
"""
from __future__ import annotations

import json
import os
import shutil
import threading

import pytest

from rlhfkit.annotate.export import export
from rlhfkit.annotate.server import make_server
from rlhfkit.annotate.store import Store

webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")
# On CI (which installs them through `make test`) a missing browser is a failure, not a skip.
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER) and not os.environ.get("CI"),
                                reason="Debian's chromium and chromium-driver are not installed (scripts/system-deps.sh)")


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        opts.add_argument(arg)
    # An explicit driver path: Selenium Manager (which would download a driver) is never run.
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def test_sign_in_rank_with_keyboard_and_mouse_then_export(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    data = tmp_path / "items.jsonl"
    data.write_text(
        json.dumps({"prompt": "What is 2 + 3?", "responses": ["2 + 3 = 5\nAnswer: 5", "Answer: 6", "2 + 3 = 4\nAnswer: 4"]}) + "\n"
        + json.dumps({"prompt": "Name a colour.", "responses": ["Blue.", "I will not.", "Red.", "Seven."]}) + "\n")
    store = Store(tmp_path / "db.sqlite")
    store.import_items(data)
    token = store.add_annotator("alice")
    store.add_annotator("bob")  # another annotator, who ranks nothing here
    server = make_server(store, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    wait = WebDriverWait(browser, 15)
    try:
        browser.get(url)
        wait.until(EC.visibility_of_element_located((By.ID, "token"))).send_keys("not-a-token", Keys.ENTER)
        wait.until(EC.text_to_be_present_in_element((By.ID, "login-error"), "unknown token"))
        tok = browser.find_element(By.ID, "token")
        tok.clear()
        tok.send_keys(token, Keys.ENTER)
        wait.until(EC.text_to_be_present_in_element((By.ID, "prompt"), "What is 2 + 3?"))
        assert browser.find_element(By.ID, "who").text == "alice"
        assert browser.find_element(By.ID, "progress").text == "0 / 2"

        # Item 1, keyboard only: 3, 1, Backspace (undoes the 1), then 1, 1 (ignored), 2 -> 3 > 1 > 2.
        body = browser.find_element(By.TAG_NAME, "body")
        body.send_keys("3", "1")
        assert browser.find_element(By.ID, "order").text == "3 > 1"
        body.send_keys(Keys.BACKSPACE)
        assert browser.find_element(By.ID, "order").text == "3"
        body.send_keys("1", "1", "2")  # a repeated key is ignored
        assert browser.find_element(By.ID, "order").text == "3 > 1 > 2"
        assert browser.find_element(By.ID, "submit").is_enabled()
        body.send_keys(Keys.ENTER)
        wait.until(EC.text_to_be_present_in_element((By.ID, "prompt"), "Name a colour."))
        assert browser.find_element(By.ID, "progress").text == "1 / 2"

        # Item 2, mouse only: click the cards 3, 1, 4, 2; mark 2 unsafe and response 4's line wrong.
        browser.find_element(By.ID, "unsafe-1").click()
        browser.find_element(By.CSS_SELECTOR, "#response-3 .line[data-line='0'] button").click()
        for i in (2, 0, 1):
            browser.find_element(By.ID, f"response-{i}").click()
        browser.find_element(By.ID, "response-1").click()  # a second click takes a card out again
        assert browser.find_element(By.ID, "order").text == "3 > 1"
        assert not browser.find_element(By.ID, "submit").is_enabled()
        browser.find_element(By.ID, "response-3").click()
        browser.find_element(By.ID, "response-1").click()
        assert browser.find_element(By.ID, "order").text == "3 > 1 > 4 > 2"
        assert "#1" in browser.find_element(By.CSS_SELECTOR, "#response-2 .badge").text
        browser.find_element(By.ID, "submit").click()
        wait.until(EC.visibility_of_element_located((By.ID, "finished")))
        assert browser.find_element(By.ID, "progress").text == "2 / 2"
        browser.save_screenshot(str(tmp_path / "finished.png"))
    finally:
        server.shutdown()
        server.server_close()

    records, agreement = export(store, tmp_path / "rankings.jsonl")
    got = [(r["annotator"], r["prompt"], r["ranking"], r["unsafe"], r["wrong_steps"]) for r in records]
    assert got == [("alice", "What is 2 + 3?", [2, 0, 1], [], []),
                   ("alice", "Name a colour.", [2, 0, 3, 1], [1], [[3, 0]])]
    assert agreement["comparisons"] == 0
