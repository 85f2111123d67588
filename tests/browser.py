"""Headless Chromium for tests that open HTML: the session-scoped `browser` fixture.

Use it from a test module with `from browser import browser  # noqa: F401` (pytest puts tests/ on
sys.path, as the folder has no __init__.py), or add that line to conftest.py. Skips with the reason when selenium, chromium or chromedriver is missing. The
browser has no network access to speak of (background networking off) and tests load pages from
file:// only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

CHROMIUM = os.environ.get("ATTNLOG_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("ATTNLOG_CHROMEDRIVER", "/usr/bin/chromedriver")


def _find(path: str, *names: str) -> str | None:
    if os.path.isfile(path) and os.access(path, os.X_OK):
        return path
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def start_browser(user_data_dir: str) -> Any:
    """A headless Chromium selenium driver; raises if it cannot start."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = _find(CHROMIUM, "chromium", "chromium-browser", "google-chrome")
    driver_path = _find(CHROMEDRIVER, "chromedriver")
    if binary is None or driver_path is None:
        raise FileNotFoundError("chromium or chromedriver is not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-dev-shm-usage",
        f"--user-data-dir={user_data_dir}",
        "--window-size=1400,1000",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    return driver


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """A headless Chromium (selenium WebDriver) shared by the session; skipped when absent."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
    if _find(CHROMIUM, "chromium", "chromium-browser", "google-chrome") is None:
        pytest.skip(f"chromium not found at {CHROMIUM} (apt-get install chromium)")
    if _find(CHROMEDRIVER, "chromedriver") is None:
        pytest.skip(f"chromedriver not found at {CHROMEDRIVER} (apt-get install chromium-driver)")
    profile = tempfile.mkdtemp(prefix="attnlog-chromium-")
    driver = start_browser(profile)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver: Any, script: str, timeout: float = 15.0, poll: float = 0.05) -> Any:
    """Run `script` (a JS body with `return`) until it returns something truthy; that value.

    Raises:
        TimeoutError: with the browser console log, if it never does.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(script)
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for: {script}\nconsole: {console_log(driver)}")
        time.sleep(poll)


def console_log(driver: Any) -> list[str]:
    """Browser console messages since the last call (empty if the driver cannot give them)."""
    try:
        return [entry["message"] for entry in driver.get_log("browser")]
    except Exception:  # noqa: BLE001 - logs are a debugging aid only
        return []


def open_file(driver: Any, path: str | os.PathLike[str], ready: str | None = None) -> None:
    """Load a local file and, if `ready` is given, wait until that JS expression is truthy."""
    driver.get(f"file://{os.path.abspath(path)}")
    if ready is not None:
        wait_for(driver, f"return {ready};")


def neuron_dot_products(driver: Any, query: int = 1) -> list[float]:
    """Hover query `query` in a drawn neuron view's expanded panel and read back the q . k values
    that bertviz's JavaScript computed from the embedded vectors."""
    driver.execute_script(
        "const g = Array.from(document.querySelectorAll('#expanded *'))"
        ".filter(e => e.__on && e.__on.some(o => o.type === 'mouseover') && e.tagName === 'g'"
        " && e.parentNode.id === 'leftText');"
        f"g[{int(query)}].dispatchEvent(new MouseEvent('mouseover'));"
    )
    return wait_for(
        driver,
        "const v = Array.from(document.querySelectorAll('#expanded .dotproduct'))"
        ".map(e => e.getAttribute('data-value'));"
        "return v.length && v.every(x => x !== null) ? v.map(Number) : null;",
    )
