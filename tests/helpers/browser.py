"""Headless Chromium driven by selenium, as the browser tests use it (tests/view/test_viewer_browser.py,
tests/metric/test_validation.py, tests/hospital/test_ohif.py): Debian's ``chromium`` and
``chromium-driver``; without them a test skips, except where ``CI`` or ``PEDETECT_REQUIRE_BROWSER``
is set (``.ci/run`` sets it): there it fails, so CI cannot pass without having run it."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

LAPTOP = (1366, 768)


def browser_paths() -> tuple[str, str] | None:
    """(Chromium, chromedriver), or None when either is missing."""
    browser = next(
        (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None
    )
    driver = shutil.which("chromedriver") or next(
        (p for p in ("/usr/lib/chromium/chromedriver",) if Path(p).is_file()), None
    )
    return (browser, driver) if browser and driver else None


def start_browser(size: tuple[int, int] = LAPTOP):
    """Headless Chromium at a laptop's window size, its console log kept. The driver's path is given,
    so selenium never looks for one on the network."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={size[0]},{size[1]}",
        "--force-device-scale-factor=1",
        "--hide-scrollbars",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def wait_for(condition, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def missing(message: str) -> None:
    """A skip on a developer's machine, a failure on CI (``CI``, or ``PEDETECT_REQUIRE_BROWSER`` that
    .ci/run sets): CI must not pass without the browser, node and OHIF tests."""
    if os.environ.get("CI") or os.environ.get("PEDETECT_REQUIRE_BROWSER"):
        pytest.fail(message)
    pytest.skip(message)
