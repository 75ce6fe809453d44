"""The review page of `rnnimg report` in a real browser: Debian's Chromium, headless, driven by Selenium.

Nothing is downloaded at run time: the browser is the system's (`apt-get install chromium
chromium-driver`; .ci/run installs them), the driver its chromedriver. Without a Chromium
binary the tests skip and say so.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from urllib.parse import unquote

import numpy as np
import pytest

from rnnimg import storage, tables
from rnnimg.report import ReportConfig, build_report
from rnnimg.synth import encode_video
from tests.test_report import write_run

pytestmark = pytest.mark.slow

SECONDS, FPS = 6, 10
# One video per label pattern: clips of 2 s every 2 s (write_run's layout), labels change mid-video.
VIDEOS = {
    "a.mp4": (["left", "left", "right"], [0.9, 0.8, 0.45]),
    "b.mp4": (["up", "right", "right"], [0.35, 0.7, 0.95]),
}
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIAREVIEWPAGETEST42", "AWS_SECRET_ACCESS_KEY": "reviewPageSecret/0123456789+abcdefghijKLMNOP"}


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _mp4(seed: int) -> bytes:
    """A small real H.264 MP4 (SECONDS s at FPS, 64x64): a square moving across a coloured background."""
    rng = np.random.default_rng(seed)
    frames = np.empty((SECONDS * FPS, 64, 64, 3), np.uint8)
    frames[:] = rng.integers(40, 200, 3, dtype=np.uint8)
    for t in range(len(frames)):
        x = (t * 2) % 48
        frames[t, 20:36, x : x + 16] = 255
    return encode_video(frames, FPS)


def _labels(root: str, archive: str, segments: bool) -> str:
    """A labelling output in rnnimg.label's store layout over real videos under ``archive``; returns it."""
    videos = {}
    for seed, (name, labels) in enumerate(sorted(VIDEOS.items())):
        uri = storage.join(archive, name)
        storage.write_bytes(uri, _mp4(seed))
        videos[uri] = labels
    out = storage.join(root, "labels")
    write_run(out, videos, "r1")
    if segments:  # the runs' segments table (the page reads it when every run has one)
        rows = []
        for uri, (labels, scores) in videos.items():
            for i, (label, score) in enumerate(zip(labels, scores)):
                if rows and rows[-1]["video_uri"] == uri and rows[-1]["label"] == label:
                    rows[-1].update(end_s=2.0 * i + 2.0, clips=rows[-1]["clips"] + 1)
                    continue
                rows.append({"video_uri": uri, "start_s": 2.0 * i, "end_s": 2.0 * i + 2.0, "label": label, "mean_score": score,
                             "clips": 1, "model_id": "m1", "run_id": "r1"})
        storage.write_table(tables.table_from_rows(rows, tables.SEGMENTS), storage.join(out, "segments", "shard-00000.parquet"))
    return out


@pytest.fixture(scope="module")
def browser():
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no Chromium binary on PATH (chromium, chromium-browser, google-chrome): "
                    "install it with `apt-get install -y chromium chromium-driver` (.ci/run does, as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    driver_path = shutil.which("chromedriver")
    assert driver_path, f"Chromium is at {chromium} but chromedriver is not on PATH: apt-get install -y chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--mute-audio",
                     "--autoplay-policy=no-user-gesture-required", "--window-size=1200,1600"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager is not run, nothing is downloaded.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _wait(driver, script: str, timeout: float = 20.0, *args):
    """Poll a JavaScript expression until it returns a truthy value; returns it."""
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(script, *args)
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def _open(driver, page: str) -> list[dict]:
    """Load the page; returns the videos' state once each has loaded its metadata (or failed)."""
    driver.get_log("browser")  # drop what earlier pages logged
    driver.get("file://" + page)
    _wait(driver, "return Array.from(document.querySelectorAll('section.video video'))"
                  ".every(v => v.readyState >= 1 || v.error !== null)")
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('section.video video'))"
        ".map(v => ({src: v.currentSrc, ready: v.readyState, error: v.error && v.error.code, duration: v.duration}))")


def _severe(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _seek_by_click(driver, panel: int, segment: int) -> tuple[float, float]:
    """Click a timeline segment of a panel; returns (the segment's start, the player's currentTime)."""
    from selenium.webdriver.common.by import By

    button = driver.find_elements(By.CSS_SELECTOR, f"#video-{panel} .seg")[segment]
    start = float(button.get_attribute("data-start"))
    button.click()
    current = _wait(driver, f"var v = document.querySelector('#video-{panel} video');"
                            f"return (!v.seeking && Math.abs(v.currentTime - {start}) < 0.1) ? v.currentTime : null;", 10.0)
    if current is None:
        current = driver.execute_script(f"return document.querySelector('#video-{panel} video').currentTime")
    return start, float(current)


def test_review_page_plays_and_seeks_in_chromium(browser, tmp_path):
    archive = str(tmp_path / "archive")
    labels = _labels(str(tmp_path), archive, segments=True)
    report = str(tmp_path / "report")
    result = build_report(labels, report, ReportConfig(threshold=0.6, review_examples=3))
    page = open(result.html, encoding="utf-8").read()
    assert "http://" not in page and "https://" not in page and "<link" not in page  # no network, no outside file
    assert re.findall(r'<script[^>]*\ssrc=', page) == []  # every script inline

    from selenium.webdriver.common.by import By

    states = _open(browser, result.html)
    assert len(states) == len(VIDEOS)
    for state in states:  # the relative links resolve to the archive's files and Chromium decodes them
        assert state["error"] is None and state["ready"] >= 1, state
        assert state["duration"] == pytest.approx(SECONDS, abs=0.2)
        assert os.path.realpath(unquote(state["src"]).removeprefix("file://")).startswith(os.path.realpath(archive))

    # a.mp4: segments left [0, 4), right [4, 6): clicking "right" seeks to 4 s; b.mp4's second segment starts at 2 s.
    segments = browser.execute_script("return Array.from(document.querySelectorAll('#video-0 .seg')).map(s => s.dataset.label)")
    assert segments == ["left", "right"]
    start, current = _seek_by_click(browser, 0, 1)
    assert start == 4.0 and current == pytest.approx(start, abs=0.1)
    start, current = _seek_by_click(browser, 1, 1)
    assert start == 2.0 and current == pytest.approx(start, abs=0.1)
    start, current = _seek_by_click(browser, 0, 0)
    assert start == 0.0 and current == pytest.approx(start, abs=0.1)

    # Keyframe thumbnails, one per segment (files in the report folder), loaded, and seeking like their segment.
    thumbs = browser.execute_script("return Array.from(document.querySelectorAll('#video-0 .thumb'))"
                                    ".map(t => [t.dataset.start, t.naturalWidth, t.getAttribute('src')])")
    assert [t[0] for t in thumbs] == ["0.000", "4.000"] and all(t[1] > 0 for t in thumbs)
    assert all(os.path.isfile(os.path.join(report, t[2])) for t in thumbs)
    browser.find_elements(By.CSS_SELECTOR, "#video-0 .thumb")[1].click()
    assert _wait(browser, "var v = document.querySelector('#video-0 video'); return !v.seeking && Math.abs(v.currentTime - 4) < 0.1;", 10.0)

    # The review queue: each clip plays from its start.
    buttons = browser.find_elements(By.CSS_SELECTOR, ".queue-play")
    assert len(buttons) == 2  # a.mp4 clip 2 (0.45), b.mp4 clip 0 (0.35)
    target = next(b for b in buttons if float(b.get_attribute("data-start")) == 4.0)  # a.mp4 clip 2: from 4 s, not 0
    target.click()
    queue = _wait(browser, "var v = document.getElementById('queue-player');"
                           "return (v.readyState >= 1 && !v.seeking) ? {t: v.currentTime, e: v.error && v.error.code} : null;")
    assert queue and queue["e"] is None and 4.0 - 0.1 <= queue["t"] <= 6.0 + 0.1, queue

    assert _severe(browser) == []
    browser.execute_script("document.getElementById('videos').scrollIntoView()")
    shot = tmp_path / "review-page.png"
    assert browser.save_screenshot(str(shot)) and shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.s3
def test_s3_videos_play_through_presigned_urls_and_no_credential_is_written(browser, s3_bucket, tmp_path, monkeypatch):
    for name, value in CREDENTIALS.items():  # distinctive values, so that the grep below means something
        monkeypatch.setenv(name, value)
    labels = _labels(f"{s3_bucket}/run", f"{s3_bucket}/archive", segments=False)
    report = str(tmp_path / "report")
    config = ReportConfig(threshold=0.6, link_expires_s=3600)
    result = build_report(labels, report, config)

    page = open(result.html, encoding="utf-8").read()
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    srcs = re.findall(r'<video class="player"[^>]* src="([^"]+)"', page)
    assert len(srcs) == len(VIDEOS)
    bucket = s3_bucket.removeprefix("s3://")
    for src in srcs:
        assert src.startswith(f"{endpoint}/{bucket}/archive/") and "X-Amz-Signature=" in src and "X-Amz-Expires=3600" in src
        assert f"X-Amz-Credential={CREDENTIALS['AWS_ACCESS_KEY_ID']}%2F" in src  # signed with the environment's key now
    assert "presigned URLs valid 1 h, until" in page

    states = _open(browser, result.html)  # the presigned links play from the local S3 endpoint (moto)
    for state in states:
        assert state["error"] is None and state["ready"] >= 1 and state["duration"] == pytest.approx(SECONDS, abs=0.2), state
    start, current = _seek_by_click(browser, 0, 1)
    assert start == 4.0 and current == pytest.approx(start, abs=0.1)
    assert _severe(browser) == []

    # No credential in any file of the report. A SigV4 presigned URL names the access key's id in its
    # X-Amz-Credential (that is how S3 finds the key to check the signature with; the id is not a secret):
    # that is the only place the id may appear. The secret key appears nowhere.
    secret, key_id = CREDENTIALS["AWS_SECRET_ACCESS_KEY"], CREDENTIALS["AWS_ACCESS_KEY_ID"]
    files = [os.path.join(d, f) for d, _, names in os.walk(report) for f in names]
    assert any(f.endswith("index.html") for f in files) and len(files) > 3
    for path in files:
        data = open(path, "rb").read()
        for form in (secret, secret.replace("/", "%2F").replace("+", "%2B")):
            assert form.encode() not in data, f"the secret key is in {path}"
        outside_urls = re.sub(rb"X-Amz-Credential=" + key_id.encode() + rb"%2F", b"", data)
        assert key_id.encode() not in outside_urls, f"the access key id is in {path} outside a presigned URL's X-Amz-Credential"
