"""`mhsft review create`: a blind side-by-side study from two or more systems' replies to the same items.

Sources are `mhsft eval` result folders (their predictions.jsonl: the counseling turns and open questions, each with
the context the model saw and its reply; judge scores when there was a judge) or `mhsft infer` batch outputs (JSONL
of conversations, the reply last). Items are matched across sources by (task, dataset, id); an item some source
lacks is left out and counted. `--sample N` keeps N of them, seeded, crisis turns first (the replies experts must
see). Each item goes to `--overlap` raters (for agreement), spread evenly; each rater gets their items in a seeded
order, and for each one two replies (with more than two systems, the pairs take turns), left and right drawn per
item and rater, so that a side never stands for a system.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import secrets
from dataclasses import dataclass
from pathlib import Path

from mhsft.data.crisis import CRISIS_RE
from mhsft.eval import judge as judge_mod
from mhsft.files import fsync_tree
from mhsft.review import store
from mhsft.utils import UserError


@dataclass
class Item:
    key: str
    kind: str  # turn | qa
    dataset: str
    context: list[dict]
    reference: str | None
    crisis: str | None
    replies: dict[str, tuple[str, dict | None]]  # system -> (reply, judge scores)


def dimensions(spec: str) -> dict[str, dict]:
    """--dims: counseling (EmoE, CogE, Con, Sta, Saf, 1-5), cpsycoun (its four), or names from both, comma-separated;
    each with its scale and the judge's own rubric text."""
    every = judge_mod.dims_for(cpsycoun=True)
    names = {"counseling": list(judge_mod.COUNSELING_DIMS), "cpsycoun": list(judge_mod.CPSYCOUN_DIMS)}.get(
        spec
    )
    names = names or [d.strip() for d in spec.split(",") if d.strip()]
    unknown = [d for d in names if d not in every]
    if unknown or not names:
        raise UserError(f"--dims {spec!r}: choose counseling, cpsycoun or names among {', '.join(every)}")
    return {d: {"low": every[d][0], "high": every[d][1], "title": every[d][2], "rubric": judge_mod.rubric(d)}
            for d in names}  # fmt: skip


def read_source(path: Path) -> tuple[str, dict[str, Item]]:
    """(system name, items by key) of an eval folder or an infer output file."""
    path = Path(path)
    if path.is_dir():
        pred = path / "predictions.jsonl"
        if not pred.is_file():
            raise UserError(f"--runs {path}: no predictions.jsonl (not an `mhsft eval` folder)")
        return path.name, _eval_items(pred)
    if path.is_file():
        return path.stem, _infer_items(path)
    raise UserError(f"--runs {path}: no such folder or file")


def _jsonl(path: Path):
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill (eval) or a bad line (infer already reported it)


def _eval_items(pred: Path) -> dict[str, Item]:
    out: dict[str, Item] = {}
    for _, r in _jsonl(pred):
        if r.get("task") not in ("counseling", "qa") or not isinstance(r.get("output"), str):
            continue
        key = f"{r['task']}|{r.get('dataset')}|{r.get('id')}"
        kind = "turn" if r["task"] == "counseling" else "qa"
        ctx = r.get("prompt") or []
        j = (r.get("judge") or {}).get("scores")
        crisis = (r.get("safety") or {}).get("crisis_signal")
        out[key] = Item(
            key, kind, str(r.get("dataset")), ctx, r.get("reference"), crisis, {"": (r["output"], j)}
        )
    return out


def _infer_items(path: Path) -> dict[str, Item]:
    out: dict[str, Item] = {}
    for n, r in _jsonl(path):
        msgs = r.get("messages") if isinstance(r, dict) else None
        if not msgs or msgs[-1].get("role") != "assistant":
            raise UserError(f"{path}:{n}: not an `mhsft infer` result (messages ending in the reply)")
        ctx = msgs[:-1]
        client = next((m["content"] for m in reversed(ctx) if m.get("role") == "user"), "")
        m = CRISIS_RE.search(client or "")
        # matched across outputs by the input record's id (its line number when it had none) and its context
        key = f"infer|{r.get('id', n)}|{hashlib.sha256(json.dumps(ctx, ensure_ascii=False).encode()).hexdigest()[:12]}"
        out[key] = Item(key, "turn", "infer", ctx, r.get("labels"), m.group(0) if m else None,
                        {"": (str(msgs[-1]["content"]), None)})  # fmt: skip
    return out


def common_items(sources: list[tuple[str, dict[str, Item]]]) -> tuple[list[Item], int]:
    """The items every source has, with each source's reply, in a stable order; and how many were left out."""
    names = [n for n, _ in sources]
    if len(set(names)) != len(names):
        names = [f"{n}-{i + 1}" for i, n in enumerate(names)]  # two folders of the same name
    keys = set.intersection(*(set(items) for _, items in sources))
    left_out = len(set.union(*(set(items) for _, items in sources))) - len(keys)
    out = []
    for key in sorted(keys):
        first = sources[0][1][key]
        reps = {name: items[key].replies[""] for name, (_, items) in zip(names, sources)}
        out.append(Item(key, first.kind, first.dataset, first.context, first.reference, first.crisis, reps))
    return out, left_out


def sample(items: list[Item], n: int | None, seed: int) -> list[Item]:
    """n items, seeded: every crisis turn first (as many as fit), then the others at random."""
    if not n or n >= len(items):
        return items
    rng = random.Random(seed)
    crisis = [it for it in items if it.crisis]
    others = [it for it in items if not it.crisis]
    rng.shuffle(crisis)
    rng.shuffle(others)
    return sorted((crisis + others)[:n], key=lambda it: it.key)


def assign(n_items: int, raters: list[str], overlap: int, seed: int) -> dict[str, list[int]]:
    """rater -> item indices in their order: each item to `overlap` raters, the load spread evenly."""
    rng = random.Random(seed)
    load = {r: [] for r in raters}
    order = list(range(n_items))
    rng.shuffle(order)
    for k, i in enumerate(order):
        start = (k * overlap) % len(raters)
        for j in range(overlap):
            load[raters[(start + j) % len(raters)]].append(i)
    for r in raters:
        rng.shuffle(load[r])
    return load


def create_study(runs: list[Path], raters: list[str], out: Path, *, db: str | None, n: int | None, seed: int,
                 overlap: int, dims: str) -> tuple[dict[str, str], dict]:  # fmt: skip
    """Write the study; returns ({rater: link token}, a summary)."""
    if len(runs) < 2:
        raise UserError("--runs: a study compares two or more systems (eval folders or infer outputs)")
    if len(set(raters)) != len(raters) or not all(raters):
        raise UserError("--raters: give distinct, non-empty names, e.g. --raters a,b,c")
    if not 1 <= overlap <= len(raters):
        raise UserError(f"--overlap {overlap}: between 1 and the number of raters ({len(raters)})")
    dim_info = dimensions(dims)
    items, left_out = common_items([read_source(p) for p in runs])
    if not items:
        raise UserError(
            "--runs: these sources share no item (dialogue turn or open question): evaluate them on the same sets"
        )
    items = sample(items, n, seed)
    tokens = {r: secrets.token_urlsafe(24) for r in raters}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # SQLite: built beside its final name and renamed once complete, so a killed `create` leaves no half a study
    final = out / store.DB_FILE
    tmp = final.with_name(f".{final.name}.tmp")
    tmp.unlink(missing_ok=True)
    engine = store.connect(db or f"sqlite:///{tmp.resolve()}")
    settings = {"dims": dim_info, "seed": seed, "overlap": overlap, "secret": secrets.token_hex(32),
                "sources": [str(p) for p in runs]}  # fmt: skip
    store.create(engine, settings)
    with store.transaction(engine, "writing the study") as conn:
        _write(conn, items, [str(p) for p in runs], tokens, assign(len(items), raters, overlap, seed), seed)
    if db is None:
        with engine.connect() as conn:  # fold the WAL into the file before it moves
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        engine.dispose()
        fsync_tree(out)
        os.replace(tmp, final)
        for side in ("-wal", "-shm"):
            Path(f"{tmp}{side}").unlink(missing_ok=True)
    summary = {"items": len(items), "left_out": left_out, "crisis": sum(bool(it.crisis) for it in items),
               "systems": list(items[0].replies), "assignments": len(items) * overlap}  # fmt: skip
    return tokens, summary


def _write(conn, items: list[Item], sources: list[str], tokens: dict[str, str], load: dict[str, list[int]],
           seed: int) -> None:  # fmt: skip
    names = list(items[0].replies)
    sys_ids = {name: conn.execute(store.systems.insert().values(name=name, source=src)).inserted_primary_key[0]
               for name, src in zip(names, sources)}  # fmt: skip
    reply_ids: list[dict[str, int]] = []
    item_ids: list[int] = []
    for it in items:
        item_id = conn.execute(store.items.insert().values(
            key=it.key, kind=it.kind, dataset=it.dataset, context=json.dumps(it.context, ensure_ascii=False),
            reference=it.reference, crisis=it.crisis)).inserted_primary_key[0]  # fmt: skip
        item_ids.append(item_id)
        reply_ids.append({})
        for name, (text, scores) in it.replies.items():
            rid = conn.execute(store.replies.insert().values(
                item_id=item_id, system_id=sys_ids[name], text=text,
                judge=json.dumps(scores) if scores else None)).inserted_primary_key[0]  # fmt: skip
            reply_ids[-1][name] = rid
    pairs = list(itertools.combinations(names, 2))
    rng = random.Random(seed + 1)
    for rater, token in tokens.items():
        rater_id = conn.execute(
            store.raters.insert().values(name=rater, token_sha256=store.token_hash(token))
        )
        rater_id = rater_id.inserted_primary_key[0]
        for pos, i in enumerate(load[rater], 1):
            a, b = pairs[(i + pos) % len(pairs)]
            left, right = (a, b) if rng.random() < 0.5 else (b, a)
            conn.execute(
                store.assignments.insert().values(
                    rater_id=rater_id,
                    position=pos,
                    item_id=item_ids[i],
                    left_id=reply_ids[i][left],
                    right_id=reply_ids[i][right],
                )
            )
