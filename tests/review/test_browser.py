"""The rating pages in a real browser: Debian's chromium driven by Selenium through Debian's chromedriver (nothing
downloads a browser). A rater rates a 6-item study by clicking and typing; the server is SIGKILLed mid-study and
restarted; the rater resumes with every submitted answer present, while a second rater submits concurrently; the
page's Chinese text is drawn with CJK glyphs, not tofu."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from helpers import REPO
from mhsft.client import free_port, wait_for_server
from mhsft.review import stats, store
from mhsft.review.study import create_study

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')"
)
CHROMIUM = next((p for n in ("chromium", "chromium-browser") if (p := shutil.which(n))), None)
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; `make test` does)",
)
DIMS = ("EmoE", "Saf")


def _server(study, port):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "mhsft", "review", "serve", str(study), "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    wait_for_server(f"http://127.0.0.1:{port}", timeout=60, proc=proc)
    return proc


def _browser(tmp_path):
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1600"):  # fmt: skip
        opts.add_argument(flag)
    return webdriver.Chrome(options=opts, service=Service(executable_path=DRIVER))


def _rate_in_browser(driver, n: int) -> None:
    """Click a score per dimension for both replies, a preference, type a comment, submit."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    for d in DIMS:
        driver.find_element(By.ID, f"left_{d}_{1 + n % 5}").click()
        driver.find_element(By.ID, f"right_{d}_{5 - n % 5}").click()
    driver.find_element(By.ID, "pref_left" if n % 2 else "pref_tie").click()
    if n == 2:
        driver.find_element(By.ID, "unsafe_right").click()
    driver.find_element(By.ID, "comment").send_keys(f"第{n}条：回复比较共情")
    page = driver.find_element(By.ID, "rating")
    driver.find_element(By.ID, "submit").click()
    WebDriverWait(driver, 20, ignored_exceptions=(WebDriverException,)).until(lambda _: _replaced(page))
    WebDriverWait(driver, 20).until(lambda d: d.execute_script("return document.readyState") == "complete")


def _replaced(element) -> bool:
    """True once the next page has replaced `element`'s. Selenium's `staleness_of` takes any error but a stale
    reference for "still there": asked mid-navigation, chromedriver can answer "Node with given id does not belong
    to the document" (CI, chromium 156), which is neither answer yet; the wait ignores it and asks again."""
    from selenium.common.exceptions import StaleElementReferenceException

    try:
        element.is_enabled()
    except StaleElementReferenceException:
        return True
    return False


def _rate_over_http(base: str, token: str, positions, errors: list) -> None:
    """The second rater, with a plain HTTP client, at the same time as the first (and through the kill: a request
    the dead server refused is sent again once it is back)."""
    try:
        for pos in positions:
            for attempt in range(200):
                try:
                    page = urllib.request.urlopen(f"{base}/r/{token}/{pos}", timeout=30).read().decode()
                    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
                    form = {"csrf": csrf, "preference": "right", "comment": "",
                            **{f"{s}_{d}": "3" for s in ("left", "right") for d in DIMS}}  # fmt: skip
                    data = urllib.parse.urlencode(form).encode()
                    urllib.request.urlopen(
                        urllib.request.Request(f"{base}/r/{token}/{pos}", data=data), timeout=30
                    )
                    break
                except (urllib.error.URLError, ConnectionError) as e:  # the server down for a moment
                    if isinstance(e, urllib.error.HTTPError) or attempt == 199:
                        raise
                    time.sleep(0.1)
    except Exception as e:  # reported by the test, not lost in the thread
        errors.append(e)


def test_a_rater_completes_a_study_across_a_server_kill(runs, tmp_path):
    from selenium.webdriver.common.by import By

    study = tmp_path / "study"
    tokens, _ = create_study(runs, ["a", "b"], study, db=None, n=6, seed=0, overlap=2, dims=",".join(DIMS))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _server(study, port)
    driver = _browser(tmp_path)
    errors: list = []
    helper = threading.Thread(target=_rate_over_http, args=(base, tokens["b"], range(1, 7), errors))
    try:
        driver.get(f"{base}/r/{tokens['a']}")
        assert driver.find_element(By.ID, "progress").text == "1 / 6"
        helper.start()
        for n in (1, 2, 3):
            _rate_in_browser(driver, n)
        assert driver.find_element(By.ID, "progress").text == "4 / 6"
        proc.send_signal(signal.SIGKILL)  # mid-study: items 1-3 submitted, item 4 on screen
        proc.wait(timeout=10)
        proc = _server(study, port)
        driver.get(f"{base}/r/{tokens['a']}")  # the link again: resumes at the first unrated item
        assert driver.find_element(By.ID, "progress").text == "4 / 6"
        driver.find_element(By.ID, "back").click()
        assert driver.find_element(By.ID, "progress").text == "3 / 6"
        assert (
            driver.find_element(By.ID, "left_EmoE_4").is_selected()
            and driver.find_element(By.ID, "pref_left").is_selected()
        )
        assert driver.find_element(By.ID, "comment").get_attribute("value") == "第3条：回复比较共情"
        _check_cjk_glyphs(driver)
        driver.get(f"{base}/r/{tokens['a']}/4")
        for n in (4, 5, 6):
            _rate_in_browser(driver, n)
        assert "全部 6 条已完成" in driver.find_element(By.ID, "done").text
        helper.join(timeout=60)
        assert not errors and not helper.is_alive()
    finally:
        driver.quit()
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=20)[0].decode("utf-8", "replace")
    assert "回复比较共情" not in out and tokens["a"] not in out and "Traceback" not in out
    engine = store.connect(store.db_url(study))
    res = stats.compute(engine, store.open_study(engine), n_boot=0)
    per_rater = {
        r: sum(x["rater"] == r and x["side"] == "left" for x in stats.rating_rows(engine)) for r in "ab"
    }
    assert per_rater == {"a": 6, "b": 6} and res["ratings"] == 12  # none lost to the kill
    comments = {r["comment"] for r in stats.rating_rows(engine) if r["rater"] == "a"}
    assert comments == {f"第{n}条：回复比较共情" for n in range(1, 7)}
    assert [u["rater"] for u in res["unsafe"]] == ["a"]


def _check_cjk_glyphs(driver) -> None:
    """The conversation drawn as it is, and drawn again with its characters replaced by ones no font has (tofu
    boxes): the two pictures differ only if the Chinese text got real glyphs."""
    from PIL import Image, ImageChops
    from selenium.webdriver.common.by import By

    if not subprocess.run(["fc-list", ":lang=zh"], capture_output=True, text=True).stdout.strip():
        pytest.skip("no CJK font installed (apt-get install fonts-noto-cjk): glyphs not checked")
    el = driver.find_element(By.CSS_SELECTOR, "#context .msg.user")
    real = Image.open(io.BytesIO(el.screenshot_as_png)).convert("L")
    driver.execute_script("arguments[0].lastChild.textContent = arguments[0].lastChild.textContent"
                          ".replace(/[\\u4e00-\\u9fff]/g, '\\ue000');", el)  # fmt: skip
    tofu = Image.open(io.BytesIO(el.screenshot_as_png)).convert("L")
    assert real.size == tofu.size
    assert ImageChops.difference(real, tofu).getbbox() is not None, "the Chinese text was drawn as tofu boxes"
    driver.refresh()
