"""``charlm serve`` in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``)
driven by Selenium against a real uvicorn server.

Skipped only where the browser is missing and ``$CI`` is not set; under CI a missing browser fails
(``.ci/run`` installs it)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
webdriver = pytest.importorskip("selenium.webdriver")
from conftest import CHROMIUM_OPTIONS  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from charlm.tools.serve.app import create_app  # noqa: E402
from charlm.tools.serve.registry import Registry  # noqa: E402
from charlm.tools.serve.requests import Limits  # noqa: E402
from charlm.tools.serve.server import serve_in_thread  # noqa: E402


def chrome(browser: tuple[str, str], user_data_dir: Path) -> webdriver.Chrome:
    """Headless Chromium with a fresh profile; the driver is Debian's, so Selenium Manager downloads nothing."""
    options = webdriver.ChromeOptions()
    options.binary_location = browser[0]
    for flag in [*CHROMIUM_OPTIONS, f"--user-data-dir={user_data_dir}"]:
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(browser[1]))


@pytest.fixture
def page(browser: tuple[str, str], trained_run: Path, tmp_path: Path) -> Iterator[tuple[webdriver.Chrome, str]]:
    app = create_app(Registry([trained_run / "best.ckpt"]), Limits(max_length=1_000_000, max_generations=1))
    with serve_in_thread(app) as url:
        driver = chrome(browser, tmp_path / "profile")
        try:
            driver.get(url)
            yield driver, url
        finally:
            driver.quit()


def generated(driver: webdriver.Chrome) -> int:
    return int(driver.execute_script("return document.querySelectorAll('#output .ch').length"))


def test_page_streams_coloured_text_and_shows_errors(page: tuple[webdriver.Chrome, str]) -> None:
    driver, url = page
    wait = WebDriverWait(driver, 10)
    wait.until(lambda d: "lstm" in d.find_element(By.ID, "model-info").text)
    assert "val bpc" in driver.find_element(By.ID, "model-info").text
    prime = driver.find_element(By.ID, "prime")
    prime.clear()
    prime.send_keys("ROMEO:")
    length = driver.find_element(By.ID, "length")
    length.clear()
    length.send_keys("1000000")  # streams until Stop
    driver.find_element(By.ID, "generate").click()

    seen: list[int] = []  # the number of characters on the page, observed while they stream in
    deadline = time.monotonic() + 10
    while len(set(seen) - {0}) < 3 and time.monotonic() < deadline:
        seen.append(generated(driver))
        time.sleep(0.05)
    assert len(set(seen) - {0}) >= 3, seen
    assert seen == sorted(seen)
    driver.find_element(By.ID, "stop").click()
    wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("stopped after"))
    # the page closed its stream: the server's generation ends and gives its slot back
    wait.until(lambda d: httpx.get(f"{url}api/info").json()["running"] == 0)
    assert driver.find_element(By.CSS_SELECTOR, "#output .prime").text == "ROMEO:"

    colours = driver.execute_script(
        "return [...document.querySelectorAll('#output .ch')].slice(0, 200).map(s => s.style.backgroundColor)")
    assert all(c.startswith("rgb") for c in colours) and len(set(colours)) > 3
    span = driver.find_elements(By.CSS_SELECTOR, "#output .ch")[5]
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", span)
    tip = driver.find_element(By.ID, "tip")

    def hovered(d: webdriver.Chrome) -> bool:
        """Point at the span from beside it (40 px right, on its line): a scroll event of the scroll above, if it
        comes late on a busy machine, hides the tooltip (as any scroll does), and the next try shows it again."""
        ActionChains(d).move_to_element_with_offset(span, 40, 0).move_to_element(span).perform()
        return bool(tip.is_displayed())

    wait.until(hovered)
    assert len(tip.find_elements(By.CSS_SELECTOR, "tr")) == 5 and "bits" in tip.text

    error = driver.find_element(By.ID, "error")
    with httpx.stream("POST", f"{url}api/generate", json={"prime": "a", "length": 1_000_000}) as held:
        assert held.status_code == 200  # the server's one slot is taken
        lines = held.iter_lines()
        while next(lines) != "event: char":
            pass
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: error.is_displayed())
        assert error.text.startswith("the server is busy: 1 generation(s) are running")
    wait.until(lambda d: httpx.get(f"{url}api/info").json()["running"] == 0)

    prime.clear()
    prime.send_keys("ROMEO: é")
    driver.find_element(By.ID, "generate").click()
    wait.until(lambda d: "outside" in error.text)
    assert "the prime has 1 character(s) outside the model's" in error.text and "'é' (1x)" in error.text
