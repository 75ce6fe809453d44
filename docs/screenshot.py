"""A PNG of a review page (``rnnimg report`` / ``make demo``), taken by the system's headless Chromium.

    make demo && .venv/bin/python docs/screenshot.py demo-output/report docs/review-page.png

The browser is set up as in tests/test_review_page.py: Debian's ``chromium`` and its
``chromedriver`` (``apt-get install -y chromium chromium-driver``), driven by Selenium (the
``test`` extra), headless; nothing is downloaded. The page is loaded from its file, the script
scrolls to the section ``--at`` names (``overview``, ``videos``: the players and their label
timelines, ``review``: the queue), moves every player half a second into its video so that it
shows a decoded frame, and captures the window.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def open_chromium(width: int, height: int):
    """A headless Chromium (the system's binary and chromedriver, found on PATH) of ``width`` x ``height`` pixels.

    Raises:
        FileNotFoundError: no Chromium binary, or no chromedriver, on PATH.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        raise FileNotFoundError(f"need a Chromium binary ({', '.join(BROWSERS)}) and chromedriver on PATH, found "
                                f"{chromium or 'no browser'} and {driver_path or 'no chromedriver'}: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--mute-audio",
                     "--hide-scrollbars", f"--window-size={width},{height}"):
        options.add_argument(argument)
    # An explicit driver path: Selenium Manager is not run, nothing is downloaded.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(30)
    return driver


def screenshot(page: str, out: str, width: int = 1000, height: int = 1200, at: str | None = "videos", timeout_s: float = 20.0) -> str:
    """Load the review page ``page`` (its index.html, or the report folder) and write the window as a PNG to ``out``.

    Args:
        at: the id of the element scrolled to the top of the window first (default: the players); None: the page's top.

    Returns:
        ``out``.

    Raises:
        FileNotFoundError: no page there, or no Chromium.
    """
    if os.path.isdir(page):
        page = os.path.join(page, "index.html")
    page = os.path.abspath(page)
    if not os.path.isfile(page):
        raise FileNotFoundError(f"no review page at {page}: give a report folder (rnnimg report --out, make demo's demo-output/report) "
                                "or its index.html")
    driver = open_chromium(width, height)
    try:
        driver.get("file://" + page)
        if at is not None:
            if not driver.execute_script("var e = document.getElementById(arguments[0]); if (e) e.scrollIntoView(); return !!e;", at):
                ids = driver.execute_script("return Array.from(document.querySelectorAll('h2[id], section[id]')).map(e => e.id)")
                raise ValueError(f"no element with id {at!r} on {page}; its sections: {', '.join(ids[:8])}")
        # Every player has its metadata (or failed); each is then moved a little into its video, so that
        # it paints a decoded frame (headless Chromium draws a loading spinner over a poster until then).
        deadline = time.monotonic() + timeout_s
        players = "Array.from(document.querySelectorAll('video')).filter(v => v.error === null)"
        while not driver.execute_script(f"return {players}.every(v => v.readyState >= 1)") and time.monotonic() < deadline:
            time.sleep(0.1)
        driver.execute_script(f"{players}.forEach(v => {{ v.currentTime = Math.min(0.5, (v.duration || 0) / 2); }})")
        while not driver.execute_script(f"return {players}.every(v => !v.seeking && v.readyState >= 2)") and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)  # the last frames and images paint, the spinners fade out
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        if not driver.save_screenshot(out):
            raise RuntimeError(f"Chromium could not write the screenshot to {out}")
    finally:
        driver.quit()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", metavar="REPORT", help="the review page: a report folder or its index.html")
    parser.add_argument("out", metavar="OUT.png", help="where the PNG goes")
    parser.add_argument("--width", type=int, default=1000, help="window width in pixels (default 1000: two players a row)")
    parser.add_argument("--height", type=int, default=1200, help="window height in pixels, browser frame included (default 1200)")
    parser.add_argument("--at", default="videos", metavar="ID",
                        help="the section scrolled to the top first: videos (the players and their label timelines), overview, "
                        "review (the queue), or 'top' for the page's top (default videos)")
    args = parser.parse_args()
    try:
        print(screenshot(args.report, args.out, args.width, args.height, None if args.at == "top" else args.at))
    except (FileNotFoundError, ValueError) as err:
        print(f"screenshot: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
