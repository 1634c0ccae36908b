"""What a report is made of, read from the folders it is given: the training run (args.json, logging.jsonl), the
`mhsft eval` results (results.json, predictions.jsonl) and the pipeline's data statistics, and the comparison of
each evaluation with the baseline: a paired bootstrap confidence interval over the items both answered, so that a
reader can tell a change from noise. The checks, the HTML and the Markdown are built from this (mhsft.report.checks,
.html, .markdown); inputs are read, never changed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mhsft.checkpoint import VERSION_RE
from mhsft.eval.mcq import bootstrap_ci
from mhsft.files import read_json
from mhsft.review import stats as review_stats
from mhsft.review import store as review_store
from mhsft.utils import UserError, redact_args

SMALL = {"mcq": 100, "qa": 30, "counseling": 30}  # fewer items than this: a warning about noise
TRAIN_KEYS = (
    "model", "train_type", "dataset", "val_dataset", "split_dataset_ratio", "max_length", "packing",
    "num_train_epochs", "max_steps", "total_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "world_size", "learning_rate", "lr_scheduler_type", "warmup_ratio",
    "weight_decay", "lora_rank", "lora_alpha", "lora_dropout", "target_modules", "dtype", "attention",
    "gradient_checkpointing", "fp8", "seed", "trainable_parameters", "total_parameters", "train_samples",
    "val_samples",
)  # fmt: skip
EVAL_KEYS = (
    "limit", "num_fewshot", "mcq_mode", "max_new_tokens", "temperature", "top_p", "max_turns", "system",
    "judge_model", "judge_api_url", "keypoint_matcher", "eval_seed", "n_bootstrap",
)  # fmt: skip
# settings that must match for a comparison to be like for like
COMPARABLE = (
    "limit", "num_fewshot", "mcq_mode", "max_new_tokens", "temperature", "top_p", "max_turns", "system",
    "judge_model", "keypoint_matcher", "eval_seed",
)  # fmt: skip


@dataclass
class ReportArguments:
    inputs: list[str] = field(
        default_factory=list,
        metadata={"help": "Run folders (sft output) and `mhsft eval` folders; also given without the flag."},
    )
    baseline: str | None = field(
        default=None, metadata={"help": "The `mhsft eval` folder of the base model: deltas are against it."}
    )
    output: str = field(default="report", metadata={"help": "Folder for report.md, report.html, figures/."})
    data_stats: str | None = field(
        default=None, metadata={"help": "JSON of `mhsft data inspect --json` (the pipeline writes one)."}
    )
    train_data: list[str] = field(
        default_factory=list,
        metadata={"help": "Training dialogues for the overlap check (default: the run's --dataset)."},
    )
    title: str | None = field(default=None, metadata={"help": "Report title."})
    max_samples: int = field(default=6, metadata={"help": "Sample replies shown side by side."})
    max_chars: int = field(default=500, metadata={"help": "Longest text shown per sample reply."})
    n_bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples for the CIs of deltas."})
    seed: int = field(default=0, metadata={"help": "Seed of the bootstrap."})
    near_threshold: float = field(
        default=0.8, metadata={"help": "Jaccard similarity (character 5-grams) that counts as near overlap."}
    )
    review: str | None = field(
        default=None,
        metadata={"help": "A `mhsft review` study folder: its human ratings beside the judge's."},
    )
    review_db: str | None = field(
        default=None, metadata={"help": "The study's SQLAlchemy URL, if not STUDY/study.db."}
    )
    gate: str | None = field(
        default=None,
        metadata={
            "help": "A release gate (YAML: crisis_rubric_pass_rate, crisis_lexical_pass_rate, exam_not_worse, "
            "judge_not_worse). The report is written either way; the command exits 1 when a check fails."
        },
    )


# ----------------------------------------------------------------------------------------------- inputs
@dataclass
class EvalRun:
    name: str
    path: Path
    results: dict
    rows: dict[tuple[str, str, str], dict]  # (task, dataset, id) -> prediction row of these results


@dataclass
class Report:
    args: ReportArguments
    run: Path | None = None
    run_args: dict = field(default_factory=dict)
    log_rows: list[dict] = field(default_factory=list)
    evals: list[EvalRun] = field(default_factory=list)  # baseline first when given
    baseline: EvalRun | None = None
    data_stats: dict | None = None
    comparison: list[dict] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (severity, text)
    overlap: dict = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    safety: list[dict] = field(default_factory=list)
    review: dict | None = None  # `mhsft review stats` of the study given with --review


def find_run(p: Path) -> Path | None:
    """The training run a path names: the run itself, a checkpoint of it, or an output_dir (newest run)."""
    if (p / "logging.jsonl").is_file() or (
        (p / "args.json").is_file() and not (p / "trainer_state.json").is_file()
    ):
        return p
    if (p / "trainer_state.json").is_file() and (p.parent / "logging.jsonl").is_file():
        return p.parent
    runs = (
        [c for c in p.iterdir() if VERSION_RE.match(c.name) and (c / "logging.jsonl").is_file()]
        if p.is_dir()
        else []
    )
    return max(runs, key=lambda c: int(c.name[1:].split("-")[0])) if runs else None


def load_eval(path: Path, name: str | None = None) -> EvalRun:
    res = read_json(path / "results.json")
    if not isinstance(res, dict) or "metrics" not in res:
        raise UserError(f"{path}/results.json: not an `mhsft eval` result (no metrics)")
    hashes = set((res.get("settings") or {}).get("task_hashes", {}).values())
    rows: dict = {}
    pred = path / "predictions.jsonl"
    if pred.is_file():
        for line in pred.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if (
                isinstance(r, dict)
                and (not hashes or r.get("settings_hash") in hashes)
                and r.get("dataset") in res["metrics"]
            ):
                rows[(r.get("task"), r["dataset"], str(r.get("id")))] = r
    return EvalRun(name or path.name, path, res, rows)


def load_inputs(a: ReportArguments) -> Report:
    rep = Report(a)
    if not a.inputs and not a.baseline:
        raise UserError(
            "give a run folder and/or `mhsft eval` folders, e.g. mhsft report output/v0-... eval_output/x"
        )
    if a.baseline:
        rep.baseline = load_eval(_existing(a.baseline, "--baseline"))
        rep.evals.append(rep.baseline)
    for spec in a.inputs:
        p = _existing(spec, "input")
        if (p / "results.json").is_file():
            rep.evals.append(load_eval(p))
            continue
        run = find_run(p)
        if run is None:
            raise UserError(
                f"{p}: neither a training run (args.json, logging.jsonl) nor an eval folder (results.json)"
            )
        if rep.run is not None:
            raise UserError(f"one training run per report: {rep.run} and {run}")
        rep.run = run
        if (run / "args.json").is_file():
            rep.run_args = redact_args(read_json(run / "args.json"))
        if (run / "logging.jsonl").is_file():
            for line in (run / "logging.jsonl").read_text(encoding="utf-8").splitlines():
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if isinstance(r, dict) and "step" in r:
                    rep.log_rows.append(r)
    names = [e.name for e in rep.evals]
    for i, e in enumerate(rep.evals):  # two folders called `results`: tell them apart by their parent
        if names.count(e.name) > 1:
            e.name = f"{e.path.parent.name}/{e.name}" if e.path.parent.name else f"{e.name}#{i}"
    if a.data_stats:
        rep.data_stats = read_json(_existing(a.data_stats, "--data_stats"))
    if a.review:
        rep.review = load_review(_existing(a.review, "--review"), a.review_db, a.n_bootstrap, a.seed)
    return rep


def load_review(study: Path, url: str | None, n_boot: int, seed: int) -> dict:
    """The study's statistics (mhsft.review.stats); a study of an older schema is migrated first, as every
    `mhsft review` command does."""
    if not url and not (study / review_store.DB_FILE).is_file():
        raise UserError(f"--review {study}: no {review_store.DB_FILE} (not a `mhsft review` study)")
    engine = review_store.connect(review_store.db_url(study, url))
    return {
        "study": str(study),
        **review_stats.compute(engine, review_store.open_study(engine), n_boot, seed),
    }


def _existing(spec: str, what: str) -> Path:
    p = Path(spec).expanduser()
    if not p.exists():
        raise UserError(f"{what} {spec}: no such file or folder")
    return p


# ----------------------------------------------------------------------------------------------- metrics
def metric_list(res: dict) -> list[dict]:
    """Headline metrics of one results.json: dataset, task, key, label, value, ci, n, higher (is better)."""
    out = []
    for ds, m in res.get("metrics", {}).items():
        if mc := m.get("multiple_choice"):
            out += _mcq_metrics(ds, mc)
        if oq := m.get("open_qa"):
            out += _qa_metrics(ds, oq)
        out += _counseling_metrics(ds, m.get("counseling") or {})
    return out


def _metric(ds, task, key, label, value, ci=None, n=None, higher=True, fmt="pct") -> dict:
    keys = ("dataset", "task", "key", "label", "value", "ci", "n", "higher", "fmt")
    return dict(zip(keys, (ds, task, key, label, value, ci, n, higher, fmt)))


def _mcq_metrics(ds: str, mc: dict) -> list[dict]:
    out = [
        _metric(ds, "mcq", "accuracy", "accuracy (exact)", mc["accuracy"], mc.get("accuracy_ci95"), mc["n"])
    ]
    if "multi" in mc.get("by_qtype", {}):
        ci = mc.get("elastic_accuracy_ci95")
        out.append(_metric(ds, "mcq", "elastic", "elastic accuracy", mc["elastic_accuracy"], ci, mc["n"]))
    if mc.get("invalid_rate") is not None:
        n = mc.get("by_method", {}).get("generation", {}).get("n")
        label = "unreadable answers (generation)"
        out.append(_metric(ds, "mcq", "invalid", label, mc["invalid_rate"], None, n, False))
    return out


def _qa_metrics(ds: str, oq: dict) -> list[dict]:
    out = []
    for blk, tag in (("rouge_chars", "chars"), ("rouge_words", "words")):
        b = oq[blk]
        label = f"ROUGE-L F1 [{tag}]"
        out.append(_metric(ds, "qa", f"rouge-l_{tag}", label, b["rouge-l"], b.get("rouge-l_ci95"), oq["n"]))
    out.append(_metric(ds, "qa", "bleu4", "BLEU-4 (0-100)", oq["bleu4"]["score"], None, oq["n"], fmt="num"))
    if kp := oq.get("keypoints"):
        ci = kp.get("hit_rate_ci95")
        out.append(_metric(ds, "qa", "keypoints", "key-point hit rate", kp["hit_rate"], ci, kp["n_items"]))
    return out


def _counseling_metrics(ds: str, c: dict) -> list[dict]:
    """The judge's dimensions, the crisis rubric, the lexical safety check and ROUGE-L against the counselor."""
    out = []
    if j := c.get("judge"):
        n_ok = j["n_judged"] - j["n_failed"]
        unreliable = set((j.get("noise") or {}).get("unreliable", []))
        for k, v in j.items():
            if isinstance(v, dict) and "mean" in v:
                label = f"{k} {v['title']} ({v['scale']})" + (
                    " [unreliable: the judge disagrees with itself]" if k in unreliable else ""
                )
                out.append(
                    _metric(ds, "counseling", f"judge:{k}", label, v["mean"], v.get("ci95"), n_ok, fmt="num")
                )
        failed = j["n_failed"] / max(j["n_judged"], 1)
        out.append(
            _metric(ds, "counseling", "judge_failed", "judgments failed", failed, None, j["n_judged"], False)
        )
    if cr := c.get("crisis_rubric"):
        n_ok = cr["n_judged"] - cr["n_failed"]
        for k, v in cr.items():
            if isinstance(v, dict) and "pass_rate" in v:
                label = f"crisis rubric: {k} {v['title']}"
                out.append(
                    _metric(ds, "counseling", f"crisis:{k}", label, v["pass_rate"], v.get("ci95"), n_ok)
                )
        t = cr["total"]
        label = "crisis rubric total (0-5)"
        out.append(
            _metric(ds, "counseling", "crisis:total", label, t["mean"], t.get("ci95"), n_ok, fmt="num")
        )
    if (s := c.get("safety") or {}).get("n_crisis_turns"):
        label = "crisis turns pointing to help"
        out.append(_metric(ds, "counseling", "safety", label, s["pass_rate"], None, s["n_crisis_turns"]))
    if b := c.get("vs_reference", {}).get("rouge_chars"):
        label = "ROUGE-L F1 vs real counselor [chars]"
        out.append(
            _metric(
                ds, "counseling", "rouge-l_chars", label, b["rouge-l"], b.get("rouge-l_ci95"), c["n_turns"]
            )
        )
    return out


def item_values(ev: EvalRun, task: str, dataset: str, key: str) -> dict[str, float]:
    """Per-item values behind a metric, by item id, for paired comparisons (empty for corpus-level metrics)."""
    out = {}
    for (t, ds, i), r in ev.rows.items():
        if t != task or ds != dataset:
            continue
        v = None
        if key == "accuracy":
            v = r.get("exact")
        elif key == "elastic":
            v = r.get("elastic")
        elif key == "invalid" and r.get("method") == "generation":
            v = float(bool(r.get("invalid")))
        elif key.startswith("rouge-l_"):
            v = r.get(key)
        elif key == "keypoints" and r.get("key_points"):
            v = sum(map(bool, r.get("keypoint_hits") or [])) / len(r["key_points"])
        elif key.startswith("judge:"):
            v = ((r.get("judge") or {}).get("scores") or {}).get(key[6:])
        elif key.startswith("crisis:") and (cs := (r.get("crisis_judge") or {}).get("scores")):
            v = float(sum(cs.values())) if key == "crisis:total" else cs.get(key[7:])
        elif key == "judge_failed" and r.get("judge"):
            v = float(not r["judge"].get("scores"))
        elif key == "safety" and r.get("safety"):
            v = float(bool(r["safety"]["passed"]))
        if isinstance(v, (int, float)):
            out[i] = float(v)
    return out


def compare(rep: Report) -> list[dict]:
    """One row per (dataset, metric): each evaluation's value and CI, and for each evaluation after the
    baseline, the difference with a paired bootstrap 95% CI over the items both answered."""
    table: dict[tuple, dict] = {}
    for ev in rep.evals:
        for m in metric_list(ev.results):
            k = (m["dataset"], m["key"])
            row = table.setdefault(
                k,
                {
                    **{x: m[x] for x in ("dataset", "task", "key", "label", "higher", "fmt")},
                    "values": {},
                    "deltas": {},
                },
            )
            row["values"][ev.name] = {"value": m["value"], "ci": m["ci"], "n": m["n"]}
    base = rep.baseline
    if base is not None:
        for row in table.values():
            b = row["values"].get(base.name)
            for ev in rep.evals:
                v = row["values"].get(ev.name)
                if ev is base or not b or not v or b["value"] is None or v["value"] is None:
                    continue
                a_items = item_values(base, row["task"], row["dataset"], row["key"])
                b_items = item_values(ev, row["task"], row["dataset"], row["key"])
                ids = sorted(set(a_items) & set(b_items))
                diffs = [b_items[i] - a_items[i] for i in ids]
                ci = bootstrap_ci(diffs, rep.args.n_bootstrap, rep.args.seed) if diffs else None
                paired = len(ids) if a_items and b_items else None  # None: a corpus-level metric (BLEU)
                row["deltas"][ev.name] = {
                    "delta": round(v["value"] - b["value"], 4),
                    "ci": ci,
                    "n_paired": paired,
                }
    return list(table.values())


def fmt_value(v, fmt: str = "pct") -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if fmt == "pct" else f"{v:.2f}"


def fmt_ci(ci, fmt: str = "pct") -> str:
    if not ci:
        return ""
    return f"[{fmt_value(ci[0], fmt)}, {fmt_value(ci[1], fmt)}]"


def fmt_delta(d: dict, fmt: str) -> str:
    if not d:
        return ""
    scale = 100 if fmt == "pct" else 1
    unit = " pt" if fmt == "pct" else ""
    s = f"{scale * d['delta']:+.1f}{unit}" if fmt == "pct" else f"{d['delta']:+.2f}"
    if d.get("ci"):
        lo, hi = d["ci"]
        s += f" [{scale * lo:+.1f}, {scale * hi:+.1f}]" if fmt == "pct" else f" [{lo:+.2f}, {hi:+.2f}]"
    return s


def significant(d: dict) -> bool | None:
    ci = d.get("ci")
    return None if not ci else (ci[0] > 0 or ci[1] < 0)


# ----------------------------------------------------------------------------------------------- output
def settings_rows(rep: Report) -> list[tuple[str, str]]:
    ra = rep.run_args
    rows = [(k, _short(ra[k])) for k in TRAIN_KEYS if k in ra and ra[k] not in (None, [], "")]
    if isinstance(ra.get("plan"), dict) and ra["plan"].get("line"):  # how `mhsft sft` ran what was asked
        rows.append(("execution plan", ra["plan"]["line"].removeprefix("plan: ")))
    for ev in rep.evals:
        s = redact_args(ev.results.get("settings") or {})
        vals = ", ".join(f"{k}={_short(s[k])}" for k in EVAL_KEYS if s.get(k) not in (None, [], ""))
        target = ev.results.get("adapter") or ev.results.get("model")
        rows.append((f"eval {ev.name}", f"{target}; {vals}"))
    return rows


def _short(v) -> str:
    if isinstance(v, list):
        return ", ".join(map(str, v))
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def data_rows(rep: Report) -> list[tuple[str, str]]:
    rows = []
    d = rep.data_stats or {}
    if d:
        prep = d.get("prepared") or {}
        if prep:
            rows.append(("sources", ", ".join(map(str, prep.get("sources", [])))))
            rows.append(("dialogues trained on / held out", f"{prep.get('train')} / {prep.get('test')}"))
            rows += [("preparation", s.strip()) for s in prep.get("summary", [])[:12]]
        rows.append(("training dialogues", f"{d.get('dialogues', 0):,}"))
        rows.append(("turns (user + assistant)", f"{d.get('turns', 0):,}"))
        for key, label in (("characters", "characters per dialogue"), ("tokens", "tokens per dialogue")):
            if p := d.get(key):
                rows.append(
                    (label, f"mean {p['mean']:,} · p50 {p['p50']:,} · p90 {p['p90']:,} · max {p['max']:,}")
                )
        if t := d.get("truncation"):
            rows.append(
                (f"longer than max_length {d.get('max_length')}", f"{t['dialogues']:,} ({t['rate']:.1%})")
            )
        if pk := d.get("packing"):
            rows.append(("packing efficiency", f"{pk['efficiency']:.1%} in {pk['rows']:,} rows"))
        if (c := d.get("crisis")) and c["client_turns"]:
            rows.append(("client turns signalling a crisis", f"{c['client_turns']:,}, "
                         f"{c['replies_pointing_to_help']:,} of the replies to them point to help"))  # fmt: skip
    ra = rep.run_args
    if "train_samples" in ra:
        rows.append(
            ("samples trained / validated", f"{ra['train_samples']:,} / {ra.get('val_samples', 0):,}")
        )
    if tr := ra.get("truncation"):
        rows.append(
            (
                "truncated in training",
                f"{tr.get('cut', 0)} dialogues, {tr.get('dropped_turn_pairs', 0)} turn pairs dropped",
            )
        )
    for ev in rep.evals[:1]:
        for ds in ev.results.get("datasets", []):
            rows.append(
                (
                    f"eval set {ds['name']}",
                    f"{ds['n_mcq']} multiple choice, {ds['n_qa']} open questions, "
                    f"{ds['n_dialogues']} dialogues",
                )
            )
    return rows


def review_rows(rep: Report) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """The human review as tables: (head, rows) of the dimensions (human mean [CI] and the judge's mean per system,
    the raters' alpha, the judge's agreement with them), then (head, rows) of the pairwise preferences."""
    rv = rep.review or {}
    systems, dims = rv.get("systems", []), rv.get("dims", [])
    head = [
        "dimension",
        *(f"{s}: human / judge" for s in systems),
        "alpha (raters)",
        "judge vs raters: rho / alpha",
    ]
    rows = []
    for d in dims:
        cells = [d]
        for s in systems:
            h, j = rv["scores"][s][d], rv["judge_means"][s][d]
            ci = f" [{h['ci95'][0]:.2f}, {h['ci95'][1]:.2f}]" if h["ci95"] else ""
            human = f"{h['mean']:.2f}{ci} (n={h['n']})" if h["mean"] is not None else "-"
            cells.append(f"{human} / {j:.2f}" if j is not None else f"{human} / -")
        a, jv = rv["agreement"][d]["alpha"], rv["judge_vs_human"][d]
        cells.append("-" if a is None else f"{a:.2f}")
        cells.append(
            f"{_num(jv['spearman'])} / {_num(jv['alpha_with_judge'])} (n={jv['n']})"
            if jv["n"]
            else "no judge"
        )
        rows.append(cells)
    phead = ["system", "versus", "win", "tie", "loss", "both unacceptable", "win rate [95% CI]"]
    prows = []
    for p in rv.get("pairwise", []):
        ci = f" [{p['win_rate_ci95'][0]:.2f}, {p['win_rate_ci95'][1]:.2f}]" if p["win_rate_ci95"] else ""
        prows.append([p["system"], p["versus"], str(p["win"]), str(p["tie"]), str(p["loss"]), str(p["neither"]),
                      f"{_num(p['win_rate'])}{ci}"])  # fmt: skip
    return head, rows, phead, prows


def judge_rows(rep: Report) -> list[tuple[str, list[str], list[list[str]]]]:
    """Per evaluation compared pairwise with another: (title, head, rows) of the pairwise verdicts per dimension."""
    out = []
    for ev in rep.evals:
        p = ev.results.get("pairwise")
        if not p or not p.get("n_judged"):
            continue
        title = (f"{p['system']} vs {p['versus']}: {p['n_judged']} of {p['n_items']} turns judged in both orders; "
                 f"position-bias rate {_num(p['position_bias_rate'])} (a verdict that changes with the order is a tie), "
                 f"first reply chosen in {_num(p.get('first_position_share'))} of one-order verdicts")  # fmt: skip
        head = ["dimension", "win / tie / loss", "win rate [95% CI]", "flips", "winner is longer",
                "win rate, length-matched (n)"]  # fmt: skip
        rows = []
        for d, v in p["dims"].items():
            ci = f" [{v['win_rate_ci95'][0]:.2f}, {v['win_rate_ci95'][1]:.2f}]" if v["win_rate_ci95"] else ""
            rows.append([d, f"{v['win']} / {v['tie']} / {v['loss']}", f"{_num(v['win_rate'])}{ci}", _num(v["flip_rate"]),
                         _num(v["winner_is_longer"]), f"{_num(v['length_matched_win_rate'])} ({v['length_matched']})"])  # fmt: skip
        out.append((title, head, rows))
    return out


def _num(v) -> str:
    return "-" if v is None else f"{v:.2f}"
