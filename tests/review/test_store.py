"""mhsft/review/store.py: an older study is migrated in place with its ratings; a newer or locked one is a one-line
error and is left as it was."""

from __future__ import annotations

import json
import sqlite3

import pytest
import sqlalchemy as sa

from mhsft.review import store
from mhsft.review.study import create_study
from mhsft.utils import UserError


@pytest.fixture
def study(runs, tmp_path):
    create_study(runs, ["a", "b"], tmp_path / "s", db=None, n=None, seed=0, overlap=1, dims="counseling")
    return tmp_path / "s"


def _rate(db, assignment_id: int = 1) -> None:
    with sqlite3.connect(db) as c:
        c.execute("INSERT INTO ratings (assignment_id, left_scores, right_scores, preference, unsafe_left, unsafe_right,"
                  " comment, submitted) VALUES (?, '{\"EmoE\": 4}', '{\"EmoE\": 2}', 'left', 0, 1, '很好', 1.0)",
                  (assignment_id,))  # fmt: skip


def test_a_schema_1_study_is_migrated_with_its_ratings(study):
    db = study / store.DB_FILE
    _rate(db)
    with sqlite3.connect(db) as c:  # what a study written by schema 1 looks like: no `seconds` column
        c.execute("ALTER TABLE ratings DROP COLUMN seconds")
        c.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    engine = store.connect(store.db_url(study))
    assert store.open_study(engine)["schema_version"] == store.SCHEMA_VERSION == 2
    with engine.connect() as c:
        (r,) = c.execute(sa.select(store.ratings)).all()
        version = json.loads(
            c.execute(sa.select(store.meta.c.value).where(store.meta.c.key == "schema_version")).scalar()
        )
    assert (
        r.comment == "很好"
        and r.seconds is None
        and json.loads(r.left_scores) == {"EmoE": 4}
        and version == 2
    )
    assert store.open_study(engine)["schema_version"] == 2  # opening again changes nothing


def test_a_newer_schema_is_refused_untouched(study):
    db = study / store.DB_FILE
    with sqlite3.connect(db) as c:
        c.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    before = db.read_bytes()
    with pytest.raises(UserError, match="newer mhsft .*schema 99"):
        store.open_study(store.connect(store.db_url(study)))
    assert db.read_bytes() == before


def test_a_locked_database_is_a_one_line_error(study):
    holder = sqlite3.connect(study / store.DB_FILE, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process writing
    try:
        engine = store.connect(store.db_url(study), timeout=0.2)
        locked = pytest.raises(UserError, match="saving a rating: the database is locked by another process")
        with locked, store.transaction(engine, "saving a rating") as conn:
            conn.execute(store.ratings.insert().values(
                assignment_id=1, left_scores="{}", right_scores="{}", preference="tie", unsafe_left=False,
                unsafe_right=False, comment="", submitted=0.0))  # fmt: skip
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    engine = store.connect(store.db_url(study))
    with engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(store.ratings)).scalar() == 0


def test_not_a_study(tmp_path):
    with pytest.raises(UserError, match="not a review study"):
        store.open_study(store.connect(f"sqlite:///{tmp_path / 'empty.db'}"))
