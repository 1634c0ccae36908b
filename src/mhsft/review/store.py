"""A review study's database: SQLite in the study folder by default (WAL mode, so the server's readers never wait
for a writer), any SQLAlchemy URL with `--db` (PostgreSQL for a server several coordinators share).

The schema is versioned (`meta.schema_version`) and migrated in place, step by step, inside one transaction: a
study created by an older mhsft opens with its ratings intact; one created by a newer mhsft is refused (a one-line
error) rather than guessed at. Every rating is written in its own transaction when the rater submits it, so a
server killed mid-study loses nothing that was submitted.

Tables: meta (key, value), systems (the models compared; their names are shown only by `stats` and `report`),
items (a dialogue turn or an open question: the context shown to raters), replies (one per item and system, with
the judge's scores when the eval run had them), raters (a name and the sha256 of their secret link token),
assignments (what a rater rates, in their order: an item and two replies, left and right), ratings (the answer to
an assignment: per-dimension scores of both replies, the preference, the unsafe flags, a comment).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path

import sqlalchemy as sa

from mhsft.utils import UserError

SCHEMA_VERSION = 2
DB_FILE = "study.db"

metadata = sa.MetaData()
meta = sa.Table(
    "meta", metadata, sa.Column("key", sa.String(64), primary_key=True), sa.Column("value", sa.Text)
)
systems = sa.Table(
    "systems", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("source", sa.Text, nullable=False),
)  # fmt: skip
items = sa.Table(
    "items", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("key", sa.String(400), nullable=False, unique=True),  # task, dataset and id of the eval item
    sa.Column("kind", sa.String(16), nullable=False),  # turn | qa
    sa.Column("dataset", sa.String(200), nullable=False),
    sa.Column("context", sa.Text, nullable=False),  # JSON: the messages before the reply
    sa.Column("reference", sa.Text),
    sa.Column("crisis", sa.String(100)),  # the crisis signal the lexical check found in the client's turn
)  # fmt: skip
replies = sa.Table(
    "replies", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("item_id", sa.ForeignKey("items.id"), nullable=False),
    sa.Column("system_id", sa.ForeignKey("systems.id"), nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("judge", sa.Text),  # JSON: the judge's scores in the eval run, or null
    sa.UniqueConstraint("item_id", "system_id"),
)  # fmt: skip
raters = sa.Table(
    "raters", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(100), nullable=False, unique=True),
    sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
)  # fmt: skip
assignments = sa.Table(
    "assignments", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("rater_id", sa.ForeignKey("raters.id"), nullable=False),
    sa.Column("position", sa.Integer, nullable=False),  # 1-based, the rater's order
    sa.Column("item_id", sa.ForeignKey("items.id"), nullable=False),
    sa.Column("left_id", sa.ForeignKey("replies.id"), nullable=False),
    sa.Column("right_id", sa.ForeignKey("replies.id"), nullable=False),
    sa.UniqueConstraint("rater_id", "position"),
)  # fmt: skip
ratings = sa.Table(
    "ratings", metadata,
    sa.Column("assignment_id", sa.ForeignKey("assignments.id"), primary_key=True),
    sa.Column("left_scores", sa.Text, nullable=False),  # JSON {dimension: score}
    sa.Column("right_scores", sa.Text, nullable=False),
    sa.Column("preference", sa.String(16), nullable=False),  # left | right | tie | neither
    sa.Column("unsafe_left", sa.Boolean, nullable=False),
    sa.Column("unsafe_right", sa.Boolean, nullable=False),
    sa.Column("comment", sa.Text, nullable=False),
    sa.Column("submitted", sa.Float, nullable=False),  # unix time of the last submission
    sa.Column("seconds", sa.Float),  # schema 2: time from showing the item to submitting it
)  # fmt: skip
PREFERENCES = ("left", "right", "tie", "neither")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def db_url(study: Path, url: str | None = None) -> str:
    return url or f"sqlite:///{(Path(study) / DB_FILE).resolve()}"


def connect(url: str, timeout: float = 5.0) -> sa.Engine:
    """An engine on the study's database; SQLite in WAL mode with a busy timeout (a writer holding the lock for
    longer than `timeout` seconds is a one-line error, not a hang)."""
    engine = sa.create_engine(url, connect_args={"timeout": timeout} if url.startswith("sqlite") else {})
    if url.startswith("sqlite"):

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=FULL")  # a submitted rating is on disk when the page says so
            cur.close()

    return engine


@contextlib.contextmanager
def transaction(engine: sa.Engine, what: str):
    """engine.begin(), with a locked or unreachable database as a one-line UserError naming `what`."""
    try:
        with engine.begin() as conn:
            yield conn
    except sa.exc.OperationalError as e:
        why = (
            "the database is locked by another process" if "locked" in str(e) else str(e.orig).splitlines()[0]
        )
        raise UserError(f"{what}: {why}") from None


def create(engine: sa.Engine, settings: dict) -> None:
    """The tables of a new study at the current schema version, and its settings."""
    with transaction(engine, "creating the study") as conn:
        if sa.inspect(conn).has_table("meta"):
            raise UserError(f"{engine.url.render_as_string(hide_password=True)} already holds a study")
        metadata.create_all(conn)
        rows = {"schema_version": SCHEMA_VERSION, "created": time.time(), **settings}
        conn.execute(
            meta.insert(), [{"key": k, "value": json.dumps(v, ensure_ascii=False)} for k, v in rows.items()]
        )


def open_study(engine: sa.Engine) -> dict:
    """The study's settings, after migrating an older schema in place. A newer schema is refused."""
    with transaction(engine, "opening the study") as conn:
        if not sa.inspect(conn).has_table("meta"):
            raise UserError(
                f"{engine.url.render_as_string(hide_password=True)}: not a review study (no meta table)"
            )
        settings = {r.key: json.loads(r.value) for r in conn.execute(sa.select(meta))}
        version = int(settings.get("schema_version", 0))
        if version < 1:
            raise UserError(
                f"{engine.url.render_as_string(hide_password=True)}: not a review study (no schema version)"
            )
        if version > SCHEMA_VERSION:
            raise UserError(
                f"this study was written by a newer mhsft (schema {version}; this one reads up to {SCHEMA_VERSION}): "
                "upgrade mhsft"
            )
        for v in range(version, SCHEMA_VERSION):
            MIGRATIONS[v](conn)
            conn.execute(meta.update().where(meta.c.key == "schema_version").values(value=json.dumps(v + 1)))
        settings["schema_version"] = SCHEMA_VERSION
    return settings


def _migrate_1_to_2(conn) -> None:
    """Schema 2 records how long a rater spent on an item."""
    conn.execute(sa.text("ALTER TABLE ratings ADD COLUMN seconds FLOAT"))


MIGRATIONS = {1: _migrate_1_to_2}
