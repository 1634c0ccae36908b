"""`mhsft review serve STUDY`: the raters' web pages (FastAPI, pages rendered on the server from the templates in
this folder; no external assets, so it works offline).

A rater's link `/r/TOKEN` leads to the first item they have not rated; `/r/TOKEN/N` shows their N-th item: the
conversation so far, replies A and B side by side (which system is which is never shown, and the sides were drawn
per item and rater), a scale per dimension with the judge's rubric one click away, the overall preference, a
comment, and "flag as unsafe" per reply. Submitting writes the rating in one transaction and moves on; going back
shows what was submitted. Tokens are looked up by their sha256; a wrong token is a 401 that says nothing else. Forms
carry a token bound to the rater (HMAC with the study's secret) and must come from the page's own origin. Pages are
`no-store` and send their address (the link is the credential) to no other site, and the server logs no conversation text and no token.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from importlib import resources
from urllib.parse import parse_qs, urlsplit

import jinja2
import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from mhsft.review import store
from mhsft.utils import UserError, get_logger

NAMES = {"user": "来访者", "assistant": "咨询师", "system": "系统"}
HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "same-origin",  # never sent to another site; not no-referrer, which nulls Origin
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
}
MAX_FORM_BYTES = 256 * 1024


def _templates() -> jinja2.Environment:
    root = resources.files("mhsft.review") / "templates"
    return jinja2.Environment(loader=jinja2.FunctionLoader(lambda n: (root / n).read_text(encoding="utf-8")),
                              autoescape=True)  # fmt: skip


def build_app(engine: sa.Engine, settings: dict) -> FastAPI:
    app = FastAPI(title="mhsft review", docs_url=None, redoc_url=None, openapi_url=None)
    env, dims, secret = _templates(), settings["dims"], settings["secret"].encode()
    log = get_logger()

    def page(name: str, status: int = 200, **kw) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(**kw), status_code=status, headers=HEADERS)

    def rater_of(token: str):
        with store.transaction(engine, "reading the study") as conn:
            return conn.execute(
                sa.select(store.raters).where(store.raters.c.token_sha256 == store.token_hash(token))
            ).first()

    def csrf(rater_id: int) -> str:
        return hmac.new(secret, f"rater:{rater_id}".encode(), hashlib.sha256).hexdigest()[:32]

    denied = page("denied.html", 401)

    @app.exception_handler(UserError)
    async def _busy(
        request, exc: UserError
    ):  # the database locked past its timeout, or gone: say so, no traceback
        log.warning(f"review: {exc}")
        return HTMLResponse("<p>服务器忙，请稍后重试。The server is busy: try again in a moment.</p>", status_code=503,
                            headers=HEADERS)  # fmt: skip

    @app.get("/health")
    def health():
        return JSONResponse({"status": "ok"}, headers=HEADERS)

    @app.get("/r/{token}")
    def start(token: str):
        rater = rater_of(token)
        if rater is None:
            return denied
        with store.transaction(engine, "reading the study") as conn:
            total, nxt = _queue(conn, rater.id)
        if nxt is None:
            return page("done.html", total=total, first=f"/r/{token}/1")
        return RedirectResponse(f"/r/{token}/{nxt}", status_code=303, headers=HEADERS)

    @app.get("/r/{token}/{pos}")
    def show(token: str, pos: int):
        rater = rater_of(token)
        if rater is None:
            return denied
        with store.transaction(engine, "reading the study") as conn:
            view = _item_view(conn, rater.id, pos)
            if view is None:
                return denied
            values = _submitted(conn, view["assignment_id"])
        return page("item.html", **view, **_page_args(token, rater, pos, dims, csrf(rater.id)), values=values)

    @app.post("/r/{token}/{pos}")
    async def submit(token: str, pos: int, request: Request):
        rater = rater_of(token)
        if rater is None:
            return denied
        if not _same_origin(request):
            return Response("cross-site form post refused", status_code=403, headers=HEADERS)
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            return Response("form too large", status_code=413, headers=HEADERS)
        form = {
            k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()
        }
        if not hmac.compare_digest(form.get("csrf", ""), csrf(rater.id)):
            return Response("stale or forged form: reload the page", status_code=403, headers=HEADERS)
        with store.transaction(engine, "saving a rating") as conn:
            view = _item_view(conn, rater.id, pos)
            if view is None:
                return denied
            rating, error = _parse(form, dims)
            if error:
                args = _page_args(token, rater, pos, dims, csrf(rater.id))
                return page("item.html", 400, **view, **args, values=form, error=error)
            _save(conn, view["assignment_id"], rating)
            total, nxt = _queue(conn, rater.id, after=pos)
        log.info(f"review: {rater.name} rated item {pos} of {total}")  # no text, no token
        target = f"/r/{token}/{nxt}" if nxt is not None else f"/r/{token}"
        return RedirectResponse(target, status_code=303, headers=HEADERS)

    return app


def _page_args(token: str, rater, pos: int, dims: dict, csrf: str) -> dict:
    return {"rater": rater.name, "pos": pos, "dims": dims, "csrf": csrf, "names": NAMES, "shown_at": time.time(),
            "action": f"/r/{token}/{pos}", "back": f"/r/{token}/{pos - 1}"}  # fmt: skip


def _same_origin(request: Request) -> bool:
    """A form post must come from this server's own pages: Origin (or Referer, which our pages never send) absent
    or naming this host."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin or origin == "null":
        return origin is None  # browsers send `null` for sandboxed and cross-site redirect posts: refuse
    return urlsplit(origin).netloc == request.headers.get("host", "")


def _queue(conn, rater_id: int, after: int = 0) -> tuple[int, int | None]:
    """(the rater's number of items, the position of their next unrated item after `after`, else the first
    unrated one anywhere, else None)."""
    a, r = store.assignments, store.ratings
    rows = conn.execute(sa.select(a.c.position, r.c.assignment_id).select_from(a.outerjoin(r, r.c.assignment_id == a.c.id))
                        .where(a.c.rater_id == rater_id).order_by(a.c.position)).all()  # fmt: skip
    todo = [p for p, done in rows if done is None]
    nxt = next((p for p in todo if p > after), todo[0] if todo else None)
    return len(rows), nxt


def _item_view(conn, rater_id: int, pos: int) -> dict | None:
    a, it, rep = store.assignments, store.items, store.replies
    row = conn.execute(sa.select(a.c.id, a.c.left_id, a.c.right_id, it.c.context)
                       .join(it, it.c.id == a.c.item_id)
                       .where(a.c.rater_id == rater_id, a.c.position == pos)).first()  # fmt: skip
    if row is None:
        return None
    text = dict(
        conn.execute(sa.select(rep.c.id, rep.c.text).where(rep.c.id.in_([row.left_id, row.right_id]))).all()
    )
    total, _ = _queue(conn, rater_id)
    done = conn.execute(sa.select(sa.func.count()).select_from(a.join(store.ratings, store.ratings.c.assignment_id == a.c.id))
                        .where(a.c.rater_id == rater_id)).scalar_one()  # fmt: skip
    return {"assignment_id": row.id, "context": json.loads(row.context), "left": text[row.left_id],
            "right": text[row.right_id], "total": total, "done": done}  # fmt: skip


def _submitted(conn, assignment_id: int) -> dict:
    """The form values of a submitted rating, to show it again (empty when not rated yet)."""
    r = conn.execute(sa.select(store.ratings).where(store.ratings.c.assignment_id == assignment_id)).first()
    if r is None:
        return {}
    values = {f"left_{d}": str(v) for d, v in json.loads(r.left_scores).items()}
    values |= {f"right_{d}": str(v) for d, v in json.loads(r.right_scores).items()}
    return values | {"preference": r.preference, "comment": r.comment, "unsafe_left": r.unsafe_left,
                     "unsafe_right": r.unsafe_right}  # fmt: skip


def _parse(form: dict, dims: dict) -> tuple[dict, str | None]:
    """The rating in a submitted form, or what is missing (in Chinese and English, shown on the page)."""
    scores: dict[str, dict] = {"left": {}, "right": {}}
    missing = []
    for d, info in dims.items():
        for side, label in (("left", "A"), ("right", "B")):
            v = form.get(f"{side}_{d}", "")
            if not v.isdigit() or not info["low"] <= int(v) <= info["high"]:
                missing.append(f"{label} {d}")
            else:
                scores[side][d] = int(v)
    if form.get("preference") not in store.PREFERENCES:
        missing.append("总体偏好 preference")
    if missing:
        return {}, "请完成 Please answer: " + ", ".join(missing)
    try:
        seconds = max(0.0, time.time() - float(form.get("shown_at", "")))
    except ValueError:
        seconds = None
    return {"left_scores": json.dumps(scores["left"]), "right_scores": json.dumps(scores["right"]),
            "preference": form["preference"], "unsafe_left": bool(form.get("unsafe_left")),
            "unsafe_right": bool(form.get("unsafe_right")), "comment": form.get("comment", "")[:10000],
            "submitted": time.time(), "seconds": seconds}, None  # fmt: skip


def _save(conn, assignment_id: int, rating: dict) -> None:
    r = store.ratings
    if conn.execute(sa.select(r.c.assignment_id).where(r.c.assignment_id == assignment_id)).first():
        conn.execute(r.update().where(r.c.assignment_id == assignment_id).values(**rating))
    else:
        conn.execute(r.insert().values(assignment_id=assignment_id, **rating))
