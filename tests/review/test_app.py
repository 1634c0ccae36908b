"""mhsft/review/app.py through FastAPI's test client: blind pages, a rating saved and shown again, incomplete forms
kept, forged and cross-site posts refused, unknown links told nothing, no conversation text in the log."""

from __future__ import annotations

import logging
import re

import pytest
from fastapi.testclient import TestClient

from mhsft.review import stats, store
from mhsft.review.app import build_app
from mhsft.review.study import create_study


@pytest.fixture
def served(runs, tmp_path):
    tokens, _ = create_study(
        runs, ["a", "b"], tmp_path / "s", db=None, n=4, seed=0, overlap=2, dims="EmoE,Saf"
    )
    engine = store.connect(store.db_url(tmp_path / "s"))
    settings = store.open_study(engine)
    return TestClient(build_app(engine, settings), follow_redirects=False), tokens, engine, settings


def _form(page: str, **values) -> dict:
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    shown = re.search(r'name="shown_at" value="([^"]+)"', page).group(1)
    return {"csrf": csrf, "shown_at": shown, **values}


FULL = {"left_EmoE": "4", "right_EmoE": "2", "left_Saf": "5", "right_Saf": "3", "preference": "left",
        "comment": "左边更温暖", "unsafe_right": "1"}  # fmt: skip


def test_a_rating_is_saved_shown_again_and_the_next_item_follows(served, caplog):
    client, tokens, engine, settings = served
    r = client.get(f"/r/{tokens['a']}")
    assert r.status_code == 303 and r.headers["location"] == f"/r/{tokens['a']}/1"
    page = client.get(f"/r/{tokens['a']}/1")
    assert (
        page.status_code == 200 and "1 / 4" in page.text and "回复 A" in page.text and "评分标准" in page.text
    )
    body = page.text.split("<body>", 1)[1]
    assert "base" not in body and "finetuned" not in body  # blind: no system name anywhere
    assert (
        page.headers["cache-control"] == "no-store"
        and "frame-ancestors 'none'" in page.headers["content-security-policy"]
    )
    with caplog.at_level(logging.INFO, logger="mhsft"):
        r = client.post(f"/r/{tokens['a']}/1", data=_form(page.text, **FULL))
    assert r.status_code == 303 and r.headers["location"] == f"/r/{tokens['a']}/2"
    again = client.get(f"/r/{tokens['a']}/1").text
    assert 'value="4"\n          id="left_EmoE_4" checked' in again and "左边更温暖" in again
    assert 'id="unsafe_right" value="1"\n        checked' in again
    assert "1 / 4" in again and "已完成 done 1" in again
    assert (
        "review: a rated item 1 of 4" in caplog.text
        and "左边更温暖" not in caplog.text
        and tokens["a"] not in caplog.text
    )
    # rater b sees the same item blank: a rater sees only their own answers
    assert "左边更温暖" not in client.get(f"/r/{tokens['b']}/1").text
    res = stats.compute(engine, settings, n_boot=0)
    assert res["ratings"] == 1 and res["unsafe"][0]["rater"] == "a"


def test_incomplete_forged_and_cross_site_posts(served):
    client, tokens, engine, settings = served
    page = client.get(f"/r/{tokens['a']}/2").text
    r = client.post(f"/r/{tokens['a']}/2", data=_form(page, left_EmoE="4", comment="还没写完"))
    assert (
        r.status_code == 400
        and "请完成 Please answer" in r.text
        and "B EmoE" in r.text
        and "还没写完" in r.text
    )
    assert (
        client.post(f"/r/{tokens['a']}/2", data={**_form(page, **FULL), "csrf": "x" * 32}).status_code == 403
    )
    # another rater's form token does not work with this link
    other = client.get(f"/r/{tokens['b']}/2").text
    assert client.post(f"/r/{tokens['a']}/2", data=_form(other, **FULL)).status_code == 403
    cross = client.post(
        f"/r/{tokens['a']}/2", data=_form(page, **FULL), headers={"Origin": "http://evil.example"}
    )
    assert cross.status_code == 403
    assert (
        client.post(f"/r/{tokens['a']}/2", data=_form(page, **{**FULL, "left_EmoE": "9"})).status_code == 400
    )
    assert stats.compute(engine, settings, n_boot=0)["ratings"] == 0  # nothing of the above was saved


def test_unknown_links_say_nothing(served):
    client, tokens, _, _ = served
    for path in ("/r/not-a-token", "/r/not-a-token/1", f"/r/{tokens['a']}/99", f"/r/{tokens['a']}/0"):
        r = client.get(path)
        assert r.status_code == 401 and "This link is not valid" in r.text and "回复" not in r.text, path
    assert client.post("/r/not-a-token/1", data=FULL).status_code == 401


def test_after_the_last_item_the_rater_is_thanked(served):
    client, tokens, _, _ = served
    for pos in range(1, 5):
        page = client.get(f"/r/{tokens['a']}/{pos}").text
        r = client.post(f"/r/{tokens['a']}/{pos}", data=_form(page, **FULL))
    assert r.headers["location"] == f"/r/{tokens['a']}"
    done = client.get(f"/r/{tokens['a']}")
    assert done.status_code == 200 and "全部 4 条已完成" in done.text


def test_a_locked_database_is_a_busy_page_not_a_traceback(served, tmp_path, caplog):
    import sqlite3

    _, tokens, engine, settings = served
    client = TestClient(build_app(store.connect(store.db_url(tmp_path / "s"), timeout=0.2), settings),
                        follow_redirects=False)  # fmt: skip
    page = client.get(f"/r/{tokens['a']}/1").text  # WAL: reading goes on while another process writes
    holder = sqlite3.connect(tmp_path / "s" / store.DB_FILE, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # ... but a rating cannot be written
    try:
        with caplog.at_level(logging.WARNING, logger="mhsft"):
            r = client.post(f"/r/{tokens['a']}/1", data=_form(page, **FULL))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert r.status_code == 503 and "try again" in r.text and "Traceback" not in caplog.text
    assert stats.compute(engine, settings, n_boot=0)["ratings"] == 0
    assert client.post(f"/r/{tokens['a']}/1", data=_form(page, **FULL)).status_code == 303  # once it is free
