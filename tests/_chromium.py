"""Shared headless-Chromium helper for the browser tests (selenium + Debian chromium)."""

from __future__ import annotations

import os
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        return (
            f"missing {', '.join(missing)}: install Debian packages 'chromium' and 'chromium-driver' "
            "(make test does it when run as root)"
        )
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[dev]'"
    return None


def require_chromium() -> None:
    """Skips the calling test, printing why, when Chromium, chromedriver or selenium is missing."""
    reason = chromium_missing()
    if reason:
        print(f"browser test skipped: {reason}")
        pytest.skip(reason)


def chromium_driver(width: int = 1400, height: int = 900) -> Any:
    """A headless selenium Chrome driver on /usr/bin/chromium; the caller must ``quit()`` it."""
    require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-extensions",
        "--no-first-run",
        f"--window-size={width},{height}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_window_size(width, height)
    return driver
