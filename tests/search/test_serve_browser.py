"""The page of `liteclip serve` in a real browser (Debian's chromium, driven by Selenium): search, more like this,
zero-shot on an upload, and a screenshot. `.ci/run` installs chromium and chromium-driver (a failed install fails
CI) and sets LITECLIP_REQUIRE_BROWSER=1, under which a missing browser fails the test; outside CI, on a machine
without them, the test is skipped, saying how to install them."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time

import pytest

from liteclip.search.serve import create_app
from tests.search.test_serve import indexed_photos

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def server(model_dir, tmp_path):
    """The app on a real port, in a thread, over an index of drawn photos."""
    import uvicorn

    search, photos, index_path = indexed_photos(model_dir, tmp_path / "photos", size=64)
    port = free_port()
    app = create_app(search, index_path)
    running = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not running.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", search, photos
    running.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("LITECLIP_REQUIRE_BROWSER") == "1":  # .ci/run installed them: missing now is a failure
            pytest.fail("LITECLIP_REQUIRE_BROWSER=1, but chromium or chromedriver is not on PATH")
        pytest.skip("chromium and chromedriver are not installed here (apt-get install chromium chromium-driver; "
                    ".ci/run does it)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(10)
    yield driver
    driver.quit()


def first_card_id(driver) -> str:
    return driver.find_element("css selector", "#results .card").get_attribute("data-id")


def test_search_more_like_this_and_zero_shot_in_a_real_browser(server, browser, tmp_path):
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    url, search, photos = server
    wait = WebDriverWait(browser, 15)
    browser.get(url)
    wait.until(lambda driver: "6 images" in driver.find_element("id", "info").text)
    query = "a photo of a dog"
    browser.find_element("id", "query").send_keys(query + "\n")
    wait.until(lambda driver: driver.find_elements("css selector", "#results .card"))
    expected = search.ids[search.paths.index(search.query(query, 1)[0][0])]
    assert first_card_id(browser) == expected  # the page shows what the library ranks first
    thumbnails = browser.find_elements("css selector", "#results .card img")
    wait.until(lambda driver: all(img.get_attribute("naturalWidth") not in (None, "0") for img in thumbnails))

    second = browser.find_elements("css selector", "#results .card")[1]
    wanted = second.get_attribute("data-id")
    second.find_element("css selector", "button.more").click()
    wait.until(lambda driver: "image" in driver.find_element("id", "status").text and first_card_id(driver) == wanted)

    third = browser.find_elements("css selector", "#results .card")[2]
    wanted = third.get_attribute("data-id")
    browser.find_element("id", "query").clear()
    third.find_element("css selector", "button.add").click()  # an image term by id: the query box holds id:...
    assert browser.find_element("id", "query").get_attribute("value") == f"id:{wanted}"
    browser.find_element("id", "query").send_keys("\n")
    wait.until(lambda driver: f"id:{wanted}" in driver.find_element("id", "status").text
               and first_card_id(driver) == wanted)

    browser.find_element("id", "classify-image").send_keys(str(photos[2]))
    browser.find_element("css selector", "#classify-form button").click()
    wait.until(expected_conditions.presence_of_element_located(("css selector", "#bars .bar")))
    bars = {bar.get_attribute("data-label") for bar in browser.find_elements("css selector", "#bars .bar")}
    assert bars == {"a photo of a dog", "a photo of a cat", "a photo of a beach"}

    browser.save_screenshot(str(tmp_path / "liteclip-serve.png"))
    assert (tmp_path / "liteclip-serve.png").stat().st_size > 1000
