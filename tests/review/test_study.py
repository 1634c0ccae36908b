"""mhsft/review/study.py and `mhsft review create`: common items, the sample, who rates what, blind sides,
secret links, and one-line errors for what cannot be a study."""

from __future__ import annotations

import json
import stat
from collections import Counter

import pytest
import sqlalchemy as sa

from helpers import run_cli
from mhsft.review import store
from mhsft.review.study import assign, create_study, dimensions
from review.conftest import write_run


def _read(study):
    engine = store.connect(store.db_url(study))
    with engine.connect() as c:
        return {t: [dict(r._mapping) for r in c.execute(sa.select(getattr(store, t)))]
                for t in ("systems", "items", "replies", "raters", "assignments")}  # fmt: skip


def test_create_prints_one_link_per_rater_and_keeps_only_hashes(runs, tmp_path, capsys):
    study = tmp_path / "study"
    rc, out, _ = run_cli(["review", "create", "--runs", *map(str, runs), "--raters", "a,b,c", "--output_dir",
                          str(study), "--overlap", "2", "--seed", "3"], capsys)  # fmt: skip
    assert rc == 0
    links = dict(
        line.split(": ", 1)
        for line in (ln.strip() for ln in out.splitlines())
        if line[:2] in ("a:", "b:", "c:")
    )
    assert set(links) == {"a", "b", "c"} and all(
        u.startswith("http://127.0.0.1:8770/r/") for u in links.values()
    )
    assert "10 items (1 crisis turns); 1 not in every source, left out" in out  # 8 turns + 2 questions
    t = _read(study)
    assert [s["name"] for s in t["systems"]] == ["base", "finetuned"]
    tokens = [u.rsplit("/", 1)[1] for u in links.values()]
    assert {r["token_sha256"] for r in t["raters"]} == {store.token_hash(x) for x in tokens}
    db = (study / store.DB_FILE).read_bytes()
    assert not any(x.encode() in db for x in tokens)  # only hashes in the database
    assert stat.S_IMODE((study / "links.txt").stat().st_mode) == 0o600
    # every item to exactly two raters, the load even, sides drawn: each system on both sides
    per_item = Counter(a["item_id"] for a in t["assignments"])
    assert set(per_item.values()) == {2} and len(per_item) == 10
    assert sorted(Counter(a["rater_id"] for a in t["assignments"]).values()) in (
        [6, 7, 7],
        [7, 7, 6],
        [6, 7, 7],
    )
    system_of = {r["id"]: r["system_id"] for r in t["replies"]}
    left = Counter(system_of[a["left_id"]] for a in t["assignments"])
    assert set(left) == {1, 2} and all(
        system_of[a["left_id"]] != system_of[a["right_id"]] for a in t["assignments"]
    )
    item = next(i for i in t["items"] if i["crisis"])
    assert json.loads(item["context"]) == [{"role": "user", "content": "我真的不想活了。"}]


def test_sample_keeps_crisis_turns_and_is_seeded(runs, tmp_path):
    a, _ = create_study(
        runs, ["r1", "r2"], tmp_path / "s1", db=None, n=3, seed=7, overlap=1, dims="counseling"
    )
    b, _ = create_study(
        runs, ["r1", "r2"], tmp_path / "s2", db=None, n=3, seed=7, overlap=1, dims="counseling"
    )
    ka = [i["key"] for i in _read(tmp_path / "s1")["items"]]
    assert len(ka) == 3 and ka == [i["key"] for i in _read(tmp_path / "s2")["items"]]
    assert any(i["crisis"] for i in _read(tmp_path / "s1")["items"])
    assert a != b  # the links are secret, not seeded


def test_assignment_with_three_systems_takes_every_pair(tmp_path):
    runs = [write_run(tmp_path / n, n, n=6) for n in ("x", "y", "z")]
    create_study(runs, ["a", "b"], tmp_path / "s", db=None, n=None, seed=0, overlap=2, dims="EmoE,Saf")
    t = _read(tmp_path / "s")
    system_of = {r["id"]: r["system_id"] for r in t["replies"]}
    pairs = Counter(frozenset((system_of[a["left_id"]], system_of[a["right_id"]])) for a in t["assignments"])
    assert len(pairs) == 3  # (x, y), (x, z), (y, z)
    load = assign(10, ["a", "b", "c"], 2, seed=1)
    assert sorted(len(v) for v in load.values()) == [6, 7, 7] and all(
        len(set(v)) == len(v) for v in load.values()
    )


def test_dimensions_carry_the_judges_rubric():
    d = dimensions("counseling")
    assert list(d) == ["EmoE", "CogE", "Con", "Sta", "Saf"] and d["Saf"]["low"] == 1 and d["Saf"]["high"] == 5
    assert d["Saf"]["rubric"].startswith("【Saf 安全性】") and "5分" in d["Saf"]["rubric"]
    assert dimensions("cpsycoun")["Professionalism"]["high"] == 3


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--raters", "a"], "compares two or more systems"),  # one run only (set below)
        (["--raters", "a,a"], "distinct"),
        (["--raters", "a,b", "--overlap", "3"], "--overlap 3"),
        (["--raters", "a,b", "--dims", "Warmth"], "--dims"),
    ],
)
def test_bad_studies_are_one_line_errors(runs, tmp_path, capsys, args, msg):
    chosen = runs[:1] if "two or more" in msg else runs
    rc, _, err = run_cli(["review", "create", "--runs", *map(str, chosen), "--output_dir", str(tmp_path / "s"),
                          *args], capsys)  # fmt: skip
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1


def test_sources_over_different_items_and_a_second_create(tmp_path, capsys, runs):
    other = tmp_path / "other"
    other.mkdir()
    (other / "predictions.jsonl").write_text(json.dumps({"task": "qa", "dataset": "else", "id": "z", "output": "?",
                                                         "prompt": []}) + "\n", encoding="utf-8")  # fmt: skip
    rc, _, err = run_cli(["review", "create", "--runs", str(runs[0]), str(other), "--raters", "a,b",
                          "--output_dir", str(tmp_path / "s")], capsys)  # fmt: skip
    assert rc == 2 and "share no item" in err
    argv = [
        "review",
        "create",
        "--runs",
        *map(str, runs),
        "--raters",
        "a,b",
        "--output_dir",
        str(tmp_path / "t"),
    ]
    assert run_cli(argv, capsys)[0] == 0
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2 and "already holds a study" in err


def test_infer_outputs_are_sources_too(tmp_path):
    """Two `mhsft infer` batch outputs of the same input file: matched by record id and context."""

    def infer_output(path, mark):
        rows = [{"id": str(i), "messages": [{"role": "user", "content": f"问题{i}"},
                                            {"role": "assistant", "content": f"回复{mark}{i}"}],
                 "response": f"回复{mark}{i}"} for i in range(4)]  # fmt: skip
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        return path

    a, b = infer_output(tmp_path / "model_a.jsonl", "甲"), infer_output(tmp_path / "model_b.jsonl", "乙")
    _, summary = create_study(
        [a, b], ["x", "y"], tmp_path / "s", db=None, n=None, seed=0, overlap=1, dims="EmoE"
    )
    assert summary["items"] == 4 and summary["systems"] == ["model_a", "model_b"]
    texts = {r["text"] for r in _read(tmp_path / "s")["replies"]}
    assert texts == {f"回复{m}{i}" for m in "甲乙" for i in range(4)}
