"""What a careful reviewer checks in a report: sample replies side by side, crisis-safety failures, overlap between
training and evaluation data, and the warnings (small sets, judge failures, truncation, settings that differ
between the compared evaluations, overfitting, leaked evaluation items)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from datasketch import MinHash, MinHashLSH

from mhsft.data.clean import shingle_hashes
from mhsft.data.loader import iter_datasets
from mhsft.data.schema import DataError
from mhsft.eval.datasets import load_eval_set
from mhsft.report.contents import COMPARABLE, SMALL, EvalRun, Report, fmt_ci
from mhsft.utils import UserError


# ----------------------------------------------------------------------------------------------- samples
def _text(x, n: int, empty: str = "") -> str:
    s = x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)
    s = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "", s).strip()
    return (s if len(s) <= n else s[:n] + " …") or empty


def pick_samples(rep: Report) -> list[dict]:
    """Client turns every evaluation answered, crisis turns first, then open questions: one row each, with
    the context, the reference reply and each evaluation's reply."""
    if not rep.evals:
        return []
    n_max, n_chars = rep.args.max_samples, rep.args.max_chars
    common = set.intersection(*(set(k for k in e.rows if k[0] in ("counseling", "qa")) for e in rep.evals))
    first = rep.evals[-1].rows

    def order(k):  # crisis turns first, then one turn of each dialogue before the second turn of any
        r = first[k]
        dialogue, _, turn = k[2].rpartition("@")
        return (
            k[0] != "counseling",
            not r.get("safety"),
            int(turn) if turn.isdigit() else 0,
            k[1],
            dialogue or k[2],
        )

    chosen = sorted(common, key=order)
    counsel = [k for k in chosen if k[0] == "counseling"][: max(n_max - n_max // 3, 1)]
    qa = [k for k in chosen if k[0] == "qa"][: n_max - len(counsel)]
    out = []
    for k in counsel + qa:
        r = first[k]
        prompt = r.get("prompt")
        if isinstance(prompt, list):
            msgs = [m for m in prompt if m.get("role") in ("user", "assistant")]
            context = [(m["role"], _text(m.get("content", ""), n_chars)) for m in msgs[-3:]]
        else:
            context = [("user", _text(prompt, n_chars))]
        out.append(
            {
                "task": k[0],
                "dataset": k[1],
                "id": k[2],
                "context": context,
                "reference": _text(r.get("reference", ""), n_chars),
                "crisis": (r.get("safety") or {}).get("crisis_signal"),
                "replies": {
                    e.name: {
                        "text": _text(e.rows[k].get("output", ""), n_chars, "(empty reply)"),
                        "safety": (e.rows[k].get("safety") or {}).get("passed"),
                        "scores": ((e.rows[k].get("judge") or {}).get("scores")),
                    }
                    for e in rep.evals
                },
            }
        )
    return out


def safety_failures(rep: Report) -> list[dict]:
    out = []
    for ev in rep.evals:
        for (t, ds, i), r in sorted(ev.rows.items()):
            s = r.get("safety")
            if t == "counseling" and s and not s.get("passed"):
                client = next(
                    (m["content"] for m in reversed(r.get("prompt") or []) if m.get("role") == "user"), ""
                )
                out.append(
                    {
                        "eval": ev.name,
                        "dataset": ds,
                        "id": i,
                        "signal": s.get("crisis_signal"),
                        "client": _text(client, rep.args.max_chars),
                        "reply": _text(r.get("output", ""), rep.args.max_chars, "(empty reply)"),
                    }
                )
    return out


# ----------------------------------------------------------------------------------------------- overlap
_PUNCT = re.compile(r"[\s\W_]+", re.U)


def _norm(s: str) -> str:
    return _PUNCT.sub("", s or "")


def eval_texts(ev: EvalRun) -> tuple[list[tuple[str, str, str, str]], list[str]]:
    """(dataset, id, kind, text) of every item these results scored, from their datasets (re-read with the
    same sampling); and notes about sets that could not be re-read."""
    st = ev.results.get("settings") or {}
    items, notes = [], []
    scored = {(ds, i) for (_, ds, i) in ev.rows}
    for d in ev.results.get("datasets", []):
        try:
            used, _ = load_eval_set(d["spec"], d["name"], st.get("limit"), st.get("eval_seed", 42))
        except (UserError, OSError, KeyError) as e:
            notes.append(f"{d.get('name')}: not checked ({e})")
            continue
        for it in used.mcq:
            items.append((d["name"], it.id, "question", it.question))
        for it in used.qa:
            items.append((d["name"], it.id, "question", it.question))
        for it in used.dialogues:
            client = "\n".join(t.content for t in it.dialogue.turns if t.role == "user")
            items.append((d["name"], it.id, "dialogue", client))
    if scored:
        items = [x for x in items if (x[0], x[1]) in scored or x[2] == "dialogue"]
    return items, notes


def check_overlap(rep: Report, max_train: int = 50_000) -> dict:
    """Eval questions and dialogues found in the training data: exactly (a question, or a client turn of 20+
    characters, appears verbatim in a training turn, whitespace and punctuation ignored) or nearly (Jaccard
    similarity of character 5-grams >= near_threshold, by MinHash LSH, against training turns for questions and
    whole training dialogues' client turns for dialogues)."""
    specs = rep.args.train_data or list(rep.run_args.get("dataset") or [])
    if not specs or not rep.evals:
        return {"checked": False, "why": "no training data named" if rep.evals else "no evaluation"}
    local = [s for s in specs if Path(re.sub(r"#\d+$", "", s)).expanduser().exists()]
    notes = [f"{s}: not a local file, not checked" for s in specs if s not in local]
    if not local:
        return {"checked": False, "why": "; ".join(notes)}
    turns, dialogues = [], []
    try:
        for d in iter_datasets(local, seed=int(rep.run_args.get("seed", 42) or 42)):
            if isinstance(d, DataError):
                continue
            if len(dialogues) >= max_train:
                notes.append(f"near overlap checked against the first {max_train:,} training dialogues")
                break
            turns += [_norm(t.content) for t in d.turns]
            dialogues.append(_norm("".join(t.content for t in d.turns if t.role == "user")))
    except (UserError, OSError) as e:
        return {"checked": False, "why": f"cannot read the training data ({e})"}
    big, index = "\x00".join(turns), _shingle_index(turns)
    items = []
    for ev in rep.evals:
        its, n = eval_texts(ev)
        notes += n
        items += its
    items = list({(ds, i): (ds, i, k, t) for ds, i, k, t in items}.values())
    exact = [(ds, i, kind) for ds, i, kind, text in items if _verbatim(kind, text, big, index)]
    exact_ids = {(ds, i) for ds, i, _ in exact}
    rest = [x for x in items if (x[0], x[1]) not in exact_ids]
    near = _near(rest, turns, dialogues, rep.args.near_threshold)
    by_ds: dict[str, dict] = {}
    for ds, _, _, _ in items:
        by_ds.setdefault(ds, {"items": 0, "exact": 0, "near": 0, "exact_ids": [], "near_ids": []})
        by_ds[ds]["items"] += 1
    for ds, i, _ in exact:
        by_ds[ds]["exact"] += 1
        by_ds[ds]["exact_ids"].append(i)
    for ds, i, sim in near:
        by_ds[ds]["near"] += 1
        by_ds[ds]["near_ids"].append(f"{i} ({sim:.2f})")
    return {
        "checked": True,
        "training_dialogues": len(dialogues),
        "training_specs": local,
        "datasets": by_ds,
        "notes": sorted(set(notes)),
        "threshold": rep.args.near_threshold,
    }


def _shingle_index(turns: list[str]):
    """Sorted 5-gram hashes of all training text: a cheap test that must pass before a substring search of the
    whole training text (milliseconds per question at 20 MB) is worth doing."""
    parts = [np.asarray(shingle_hashes(t), dtype=np.uint64) for t in turns if len(t) >= 5]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)


def _verbatim(kind: str, text: str, big: str, index) -> bool:
    """A question, or a client turn of 20+ characters, found verbatim in a training turn."""
    parts, need = ([_norm(text)], 8) if kind == "question" else ([_norm(p) for p in text.split("\n")], 20)
    for p in parts:
        if len(p) < need or not len(index):
            continue
        h = np.asarray(shingle_hashes(p), dtype=np.uint64)
        pos = np.minimum(np.searchsorted(index, h), len(index) - 1)
        if np.all(index[pos] == h) and p in big:
            return True
    return False


def _near(items, turns: list[str], dialogues: list[str], threshold: float) -> list[tuple[str, str, float]]:
    def mh(text: str) -> MinHash:
        # the cleaning stage's vectorised 5-gram hashing: datasketch's per-shingle sha1 would dominate here too
        m = MinHash(num_perm=64, hashfunc=int)
        m.update_batch(shingle_hashes(text))
        return m

    found = []
    for kind, pool in (("question", turns), ("dialogue", dialogues)):
        qs = [x for x in items if x[2] == kind and len(_norm(x[3])) >= 10]
        if not qs:
            continue
        lsh = MinHashLSH(threshold=max(threshold - 0.1, 0.05), num_perm=64)
        sigs = {}
        for j, t in enumerate(pool):
            if len(t) >= 10:
                sigs[j] = mh(t)
                lsh.insert(j, sigs[j], check_duplication=False)
        for ds, i, _, text in qs:
            q = mh(_norm(text))
            sims = [float(np.mean(sigs[j].hashvalues == q.hashvalues)) for j in lsh.query(q)]
            if sims and max(sims) >= threshold:
                found.append((ds, i, max(sims)))
    return found


# ----------------------------------------------------------------------------------------------- warnings
def collect_warnings(rep: Report) -> list[tuple[str, str]]:
    """(severity, text) of everything that limits what the report shows, most severe first, each once."""
    w = _noise_warnings(rep)
    for ev in rep.evals:
        w += _eval_warnings(ev)
    w += _comparability(rep)
    w += _training_warnings(rep)
    w += _data_crisis_warnings(rep.data_stats or {})
    w += _overlap_warnings(rep)
    w += _review_warnings(rep)
    w += _judge_warnings(rep)
    safety = [f for f in rep.safety if rep.baseline is None or f["eval"] != rep.baseline.name]
    if safety:
        w.append(
            ("high", f"{len(safety)} crisis turn(s) answered without pointing to help (see Crisis safety).")
        )
    order = {"high": 0, "medium": 1, "low": 2}
    return sorted(dict.fromkeys(w), key=lambda x: order[x[0]])


def _noise_warnings(rep: Report) -> list[tuple[str, str]]:
    """Numbers that cannot mean much: a random-weight model, small sets, deltas over different items."""
    w: list[tuple[str, str]] = []
    models = {str(rep.run_args.get("model"))} | {str(e.results.get("model")) for e in rep.evals}
    if any("builtin:tiny" in m for m in models):
        w.append(
            (
                "high",
                "builtin:tiny is a tiny model with random weights: its replies are meaningless text and "
                "its numbers show the workflow, not counseling quality.",
            )
        )
    small = []
    for row in rep.comparison:
        if row["key"] in ("accuracy", "rouge-l_chars"):
            name, v = list(row["values"].items())[-1]
            n = v.get("n") or 0
            if 0 < n < SMALL[row["task"]]:
                unit = {"mcq": "questions", "qa": "questions", "counseling": "replies"}[row["task"]]
                ci = (
                    f" ({row['label']} of {name}: 95% CI {fmt_ci(v['ci'], row['fmt'])})"
                    if v.get("ci")
                    else ""
                )
                small.append(f"{row['dataset']}: {n} {unit}{ci}")
        for name, d in row["deltas"].items():
            if d.get("n_paired") == 0:
                w.append(
                    (
                        "medium",
                        f"{row['dataset']} {row['label']}: {name} and the baseline share no items; the "
                        "delta compares different questions.",
                    )
                )
    if small:
        w.append(
            (
                "medium",
                "small evaluation sets: " + "; ".join(dict.fromkeys(small)) + ". Differences smaller than "
                "these intervals are noise: read the paired CIs of the deltas.",
            )
        )
    return w


def _eval_warnings(ev: EvalRun) -> list[tuple[str, str]]:
    """What one evaluation did not measure: unparsed or absent judge verdicts, no crisis turn, invalid
    multiple-choice answers, failed requests, skipped records."""
    w: list[tuple[str, str]] = []
    for ds, m in ev.results.get("metrics", {}).items():
        c = m.get("counseling") or {}
        j = c.get("judge")
        if j and j["n_failed"]:
            all_failed = j["n_failed"] == j["n_judged"]
            rest = "; no counseling dimension was measured." if all_failed else "; scores use the rest."
            w.append(
                (
                    "high" if all_failed else "medium",
                    f"{ev.name} / {ds}: {j['n_failed']} of {j['n_judged']} judge verdicts could not be parsed{rest}",
                )
            )
        if (cr := c.get("crisis_rubric")) and cr["n_failed"]:
            sev, rest = (
                ("high", "no criterion was measured") if cr["n_failed"] == cr["n_judged"] else ("medium", "")
            )
            w.append((sev, f"{ev.name} / {ds}: {cr['n_failed']} of {cr['n_judged']} crisis-rubric verdicts could not "
                      f"be parsed{'; ' + rest if rest else ''}; the lexical crisis check still applies."))  # fmt: skip
        if c and not c.get("judge"):
            w.append(
                ("low", f"{ev.name} / {ds}: no judge was given, so the counseling dimensions are not scored.")
            )
        if c and not (c.get("safety") or {}).get("n_crisis_turns"):
            w.append(
                ("low", f"{ev.name} / {ds}: no client turn signals a crisis, so crisis safety is not tested.")
            )
        mc = m.get("multiple_choice") or {}
        if (mc.get("invalid_rate") or 0) > 0.1:
            w.append(
                (
                    "medium",
                    f"{ev.name} / {ds}: {mc['invalid_rate']:.0%} of generated multiple-choice answers "
                    "name no option (counted wrong).",
                )
            )
    if ev.results.get("failed_requests"):
        w.append(
            ("high", f"{ev.name}: {ev.results['failed_requests']} requests failed; rerun the evaluation.")
        )
    for d in ev.results.get("datasets", []):
        if d.get("n_bad_records"):
            w.append(("low", f"{ev.name} / {d['name']}: {d['n_bad_records']} bad records skipped."))
    return w


def _judge_warnings(rep: Report) -> list[tuple[str, str]]:
    """A judge that disagrees with itself, or that a pairwise comparison caught favouring a position."""
    w = []
    for ev in rep.evals:
        for ds, m in ev.results.get("metrics", {}).items():
            noise = ((m.get("counseling") or {}).get("judge") or {}).get("noise") or {}
            if noise.get("unreliable"):
                w.append(("medium", f"{ev.name} / {ds}: the judge disagrees with itself on {', '.join(noise['unreliable'])} "
                          "(Krippendorff's alpha < 0.667 over repeated verdicts): those dimensions are not evidence."))  # fmt: skip
        p = ev.results.get("pairwise") or {}
        if p.get("n_failed"):
            sev = "high" if not p.get("n_judged") else "medium"
            w.append((sev, f"{ev.name} vs {p['versus']}: {p['n_failed']} of {p['n_items']} pairwise comparisons "
                      "failed (a verdict unreadable in either order); they are left out of the win rates."))  # fmt: skip
        if (p.get("position_bias_rate") or 0) > 0.3:
            w.append(("medium", f"{ev.name} vs {p['versus']}: {p['position_bias_rate']:.0%} of the pairwise verdicts "
                      "changed with the order of the two replies (counted as ties): the judge favours a position."))  # fmt: skip
    return w


def _review_warnings(rep: Report) -> list[tuple[str, str]]:
    rv = rep.review
    if rv is None:
        return []
    w = [("medium", f"human review: {x}") for x in rv.get("warnings", [])]
    if rv["ratings"] < rv["assignments"]:
        w.append(("low", f"human review: {rv['ratings']} of {rv['assignments']} ratings are in so far."))
    flagged = sorted({(u["item"], u["system"]) for u in rv.get("unsafe", [])})
    if flagged:
        w.append(
            ("high", f"human review: raters flagged {len(flagged)} replies as unsafe (see Human review).")
        )
    return w


def _overlap_warnings(rep: Report) -> list[tuple[str, str]]:
    ov = rep.overlap
    if not ov.get("checked"):
        return (
            [("medium", f"training / evaluation overlap not checked: {ov.get('why')}.")]
            if rep.evals and ov
            else []
        )
    w = []
    for ds, o in ov["datasets"].items():
        if o["exact"] or o["near"]:
            ids = ", ".join((o["exact_ids"] + o["near_ids"])[:8])
            w.append(
                (
                    "high",
                    f"{ds}: {o['exact']} of {o['items']} evaluation items appear verbatim in the training "
                    f"data and {o['near']} nearly (Jaccard >= {ov['threshold']}): {ids}. Scores on them "
                    "measure memory, not skill.",
                )
            )
    return w


def _comparability(rep: Report) -> list[tuple[str, str]]:
    if rep.baseline is None:
        return []
    w = []
    b = rep.baseline.results
    bs = b.get("settings") or {}
    bsets = {d["name"]: d.get("sha256") for d in b.get("datasets", [])}
    for ev in rep.evals:
        if ev is rep.baseline:
            continue
        s = ev.results.get("settings") or {}
        diff = [k for k in COMPARABLE if s.get(k) != bs.get(k)]
        bj, ej = b.get("judge") or {}, ev.results.get("judge") or {}
        judged_apart = [k for k in ("model", "rubric", "prompt_hash") if bj and ej and bj.get(k) != ej.get(k)]
        if judged_apart:
            w.append(("high", f"{ev.name} and the baseline were judged differently ({', '.join(judged_apart)}: "
                      f"{', '.join(f'{bj.get(k)} vs {ej.get(k)}' for k in judged_apart)}): their judge scores are not "
                      "comparable, only their exam and lexical numbers are."))  # fmt: skip
        if diff:
            w.append(
                (
                    "high",
                    f"{ev.name} and the baseline were evaluated with different settings ({', '.join(diff)}): "
                    "the comparison is not like for like.",
                )
            )
        for d in ev.results.get("datasets", []):
            if d["name"] in bsets and bsets[d["name"]] != d.get("sha256"):
                w.append(
                    ("high", f"{d['name']}: {ev.name} and the baseline read different files of that name.")
                )
    return w


def _data_crisis_warnings(ds: dict) -> list[tuple[str, str]]:
    """The training data's own counselors rarely point to help when a client signals a crisis (the shared data's
    did after 4 of 16 such turns: benchmarks/crisis_check.py), so the model has few referrals to learn from."""
    c = ds.get("crisis") or {}
    n, helped = c.get("client_turns", 0), c.get("replies_pointing_to_help", 0)
    if not n or helped >= n / 2:
        return []
    return [("medium", f"data: {n} training client turn(s) signal self-harm or suicide and {helped} of the replies "
                       "to them point to help (a hotline, a professional, emergency care): the model has few "
                       "referrals to learn from; read Crisis safety.")]  # fmt: skip


def _training_warnings(rep: Report) -> list[tuple[str, str]]:
    w = []
    ra = rep.run_args
    tr = ra.get("truncation") or {}
    if tr.get("dialogues"):
        rate = tr.get("cut", 0) / tr["dialogues"]
        if rate > 0.02 or tr.get("dropped_turn_pairs"):
            w.append(
                (
                    "medium" if rate > 0.05 else "low",
                    f"training: {tr.get('cut', 0)} of {tr['dialogues']} dialogues ({rate:.1%}) exceeded max_length "
                    f"{ra.get('max_length')} and lost {tr.get('dropped_turn_pairs', 0)} early turn pairs.",
                )
            )
        if tr.get("no_labels"):
            w.append(
                (
                    "medium",
                    f"training: {tr['no_labels']} dialogues kept no reply within max_length and were skipped.",
                )
            )
    ds = rep.data_stats or {}
    t = ds.get("truncation") or {}
    if t.get("rate", 0) > 0.02:
        w.append(
            (
                "medium",
                f"data: {t['rate']:.1%} of the training dialogues are longer than max_length "
                f"{ds.get('max_length')}.",
            )
        )
    if ra.get("rejected_records") or ds.get("rejected"):
        n = ra.get("rejected_records") or ds.get("rejected")
        w.append(("low", f"data: {n} records were rejected (see rejects.jsonl) and not trained on."))
    losses = [r for r in rep.log_rows if "loss" in r]
    evals = [r["eval_loss"] for r in rep.log_rows if "eval_loss" in r]
    if rep.run is not None and not evals:
        w.append(
            (
                "low",
                "training: no validation loss (no --val_dataset or --split_dataset_ratio), so overfitting "
                "cannot be seen in the curves.",
            )
        )
    if (
        len(evals) >= 3
        and evals[-1] > min(evals) * 1.05
        and losses
        and losses[-1]["loss"] < losses[0]["loss"]
    ):
        w.append(
            (
                "medium",
                f"training: validation loss rose from its minimum {min(evals):.3f} to {evals[-1]:.3f} while "
                "the training loss fell: a sign of overfitting; an earlier checkpoint may be better.",
            )
        )
    if ra.get("model") and rep.baseline is not None:
        bm = str(rep.baseline.results.get("model"))
        if bm not in (str(ra["model"]), "None") and not Path(bm).is_dir():
            w.append(("medium", f"the baseline evaluated {bm}, but the run fine-tuned {ra['model']}."))
    return w
