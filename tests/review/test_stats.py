"""mhsft/review/stats.py: Krippendorff's alpha equals the published worked example and the library on random data,
the bootstrap is seeded, and means, win rates, Bradley-Terry and judge-vs-human agreement follow the ratings."""

from __future__ import annotations

import json
import math
import random

import krippendorff
import numpy as np
import pytest
import sqlalchemy as sa
from scipy.stats import spearmanr

from helpers import run_cli
from mhsft.eval.agreement import alpha
from mhsft.review import stats, store
from mhsft.review.study import create_study
from review.conftest import write_run

NAN = math.nan
# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability": 4 observers, 12 units; published alphas
RELIABILITY = [[1, 2, 3, 3, 2, 1, 4, 1, 2, NAN, NAN, NAN], [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, NAN, 3],
               [NAN, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, NAN], [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, NAN]]  # fmt: skip


def test_alpha_equals_krippendorffs_worked_example_and_the_library():
    assert alpha(RELIABILITY) == pytest.approx(0.815, abs=5e-4)  # ordinal, as published
    for level, want in (("nominal", 0.743), ("interval", 0.849), ("ratio", 0.797)):
        assert krippendorff.alpha(reliability_data=RELIABILITY, level_of_measurement=level) == pytest.approx(
            want, abs=5e-4
        )
    rng = np.random.default_rng(0)
    data = rng.integers(1, 6, size=(3, 40)).astype(float)
    data[rng.random(data.shape) < 0.2] = np.nan
    assert alpha(data.tolist()) == pytest.approx(
        krippendorff.alpha(reliability_data=data, level_of_measurement="ordinal"), abs=1e-4
    )
    assert alpha([[1, 1, 1], [1, 1, 1]]) is None  # one value only: alpha is undefined


def _rate_all(engine, choose):
    """Fill every assignment with choose(rater, item_key, left_system, right_system) -> (left, right, preference)."""
    a, it, rep, sy, ra = store.assignments, store.items, store.replies, store.systems, store.raters
    with engine.begin() as c:
        rows = c.execute(sa.select(a.c.id, ra.c.name, it.c.key, a.c.left_id, a.c.right_id)
                         .join(ra, ra.c.id == a.c.rater_id).join(it, it.c.id == a.c.item_id)).all()  # fmt: skip
        name = dict(c.execute(sa.select(rep.c.id, sy.c.name).join(sy, sy.c.id == rep.c.system_id)).all())
        for aid, rater, key, lid, rid in rows:
            left, right, pref = choose(rater, key, name[lid], name[rid])
            c.execute(store.ratings.insert().values(
                assignment_id=aid, left_scores=json.dumps(left), right_scores=json.dumps(right), preference=pref,
                unsafe_left=False, unsafe_right=name[rid] == "finetuned" and "case2" in key, comment="",
                submitted=0.0, seconds=1.0))  # fmt: skip


def test_stats_follow_the_ratings(runs, tmp_path, capsys):
    create_study(runs, ["a", "b", "c"], tmp_path / "s", db=None, n=None, seed=0, overlap=3, dims="EmoE,Saf")
    engine = store.connect(store.db_url(tmp_path / "s"))
    settings = store.open_study(engine)
    assert stats.compute(engine, settings)["ratings"] == 0
    rc, out, _ = run_cli(["review", "stats", str(tmp_path / "s")], capsys)
    assert rc == 0 and "no ratings yet" in out
    rng = random.Random(1)

    def choose(rater, key, left, right):  # finetuned is better by 1 on EmoE; raters agree up to noise
        base_score = 2 + int(key[-3]) % 3 if key[-3].isdigit() else 3
        s = {
            sys: {"EmoE": min(5, base_score + (sys == "finetuned") + (rng.random() < 0.1)), "Saf": 4}
            for sys in (left, right)
        }
        pref = "left" if left == "finetuned" else "right"
        return s[left], s[right], pref

    _rate_all(engine, choose)
    res = stats.compute(engine, settings, n_boot=200, seed=0)
    assert res["ratings"] == 30 and res["raters"] == ["a", "b", "c"]
    assert res["scores"]["finetuned"]["EmoE"]["mean"] > res["scores"]["base"]["EmoE"]["mean"]
    lo, hi = res["scores"]["base"]["EmoE"]["ci95"]
    assert lo <= res["scores"]["base"]["EmoE"]["mean"] <= hi
    assert stats.compute(engine, settings, n_boot=200, seed=0)["scores"] == res["scores"]  # seeded
    (pair,) = res["pairwise"]
    assert (pair["system"], pair["win"], pair["loss"], pair["win_rate"]) == ("base", 0, 30, 0.0)
    assert res["agreement"]["EmoE"]["alpha"] > 0.667 and res["agreement"]["EmoE"]["units_rated_twice"] == 20
    assert res["agreement"]["Saf"]["alpha"] is None  # everyone said 4: no variation to agree on
    j = res["judge_vs_human"]["EmoE"]
    judge = {(r["item"], r["system"]): r["judge"]["EmoE"] for r in stats.rating_rows(engine) if r["judge"]}
    human: dict = {}
    for r in stats.rating_rows(engine):
        human.setdefault((r["item"], r["system"]), []).append(r["scores"]["EmoE"])
    units = [u for u in judge if u in human]
    want = spearmanr([judge[u] for u in units], [np.mean(human[u]) for u in units]).statistic
    assert j["n"] == 16 and j["spearman"] == pytest.approx(
        want, abs=1e-4
    )  # the 8 turns x 2 systems with a judge
    assert {u["system"] for u in res["unsafe"]} == {"finetuned"} and len(res["unsafe"]) >= 1
    rc, out, _ = run_cli(["review", "stats", str(tmp_path / "s")], capsys)
    assert rc == 0 and "finetuned" in out and "flagged unsafe" in out
    csv_text = stats.export(engine, settings, "csv")
    assert (
        csv_text.splitlines()[0].endswith("EmoE,Saf,judge_EmoE,judge_Saf")
        and len(csv_text.splitlines()) == 61
    )
    assert len(stats.export(engine, settings, "jsonl").splitlines()) == 60


def test_bradley_terry_orders_three_systems(tmp_path):
    runs = [write_run(tmp_path / n, n, n=8) for n in ("weak", "mid", "strong")]
    create_study(runs, ["a", "b"], tmp_path / "s", db=None, n=None, seed=0, overlap=2, dims="EmoE")
    engine = store.connect(store.db_url(tmp_path / "s"))
    rank = {"weak": 0, "mid": 1, "strong": 2}
    _rate_all(
        engine, lambda r, k, lt, rt: ({"EmoE": 3}, {"EmoE": 3}, "left" if rank[lt] > rank[rt] else "right")
    )
    bt = stats.compute(engine, store.open_study(engine), n_boot=0)["bradley_terry"]
    assert bt["strong"] > bt["mid"] > bt["weak"]
