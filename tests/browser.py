"""A headless Chromium for the review-page tests: the system's Debian ``chromium`` + ``chromium-driver`` driven by
Selenium (a pinned dependency). Nothing is downloaded: the driver path is given, so Selenium Manager never runs.

``.ci/run`` installs the two Debian packages when they are missing; elsewhere the browser tests skip, saying so.

    python -m tests.browser docs/review-page.png    screenshot of the review page of a small generated package
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

BROWSERS = ("chromium", "chromium-browser")
MISSING = ("no chromium / chromedriver on PATH: install Debian's `chromium` and `chromium-driver` "
           "(apt-get install -y chromium chromium-driver; .ci/run does it) to run the review-page browser tests")


def chromium_paths() -> tuple[str, str] | None:
    """(browser, driver) executables, or None when either is missing."""
    browser = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@contextlib.contextmanager
def headless_chromium(width: int = 1280, height: int = 900) -> Iterator:
    """A Selenium WebDriver on a fresh, offline-minded headless Chromium profile; quit on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = chromium_paths()
    if paths is None:
        raise RuntimeError(MISSING)
    browser, driver_path = paths
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = browser
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-first-run", "--no-default-browser-check", "--hide-scrollbars",
                     f"--window-size={width},{height}", f"--user-data-dir={profile}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console errors (CSP violations) to tests
        driver = webdriver.Chrome(options=options, service=Service(driver_path))
        try:
            yield driver
        finally:
            driver.quit()


def screenshot_package_page(out: Path) -> Path:
    """Export the synthetic package of tests/export_inputs.py and save a full-page screenshot of its review.html."""
    from stages import export
    from tests.export_inputs import export_params, write_inputs

    with tempfile.TemporaryDirectory(prefix="review-shot-") as tmp:
        inputs = write_inputs(Path(tmp))
        package = Path(tmp) / "export"
        export.run(export_params(name="shapes pseudo labels (synthetic test package)"), inputs["pseudo"],
                   inputs["manifest"], package, inputs["metrics"], progress=False)
        with headless_chromium(1280, 900) as driver:
            driver.get((package / "review.html").resolve().as_uri())
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",  # the whole page, not the window's part
                                   {"width": 1280, "height": int(height), "deviceScaleFactor": 1, "mobile": False})
            out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(out))
    return out


if __name__ == "__main__":
    print(screenshot_package_page(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/review-page.png")))
