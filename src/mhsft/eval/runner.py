"""Run one evaluation set against a target: multiple choice, open QA and turn-based counseling, each item's
record appended to the predictions log (mhsft.eval.predictions) as soon as it is done, so that an interrupted run
resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import math
import random
import time

from mhsft.eval import judge as judge_mod
from mhsft.eval import mcq, qa, safety
from mhsft.eval.agreement import ALPHA_OK, alpha
from mhsft.eval.datasets import EvalSet, MCQItem
from mhsft.eval.predictions import PredictionLog
from mhsft.eval.targets import RequestError
from mhsft.utils import get_logger


def _chunks(xs: list, n: int):
    for i in range(0, len(xs), max(1, n)):
        yield xs[i : i + n]


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", dynamic_ncols=True, leave=True)


class Evaluator:
    """Everything one `mhsft eval` run shares: target, judge, settings, predictions log, counters."""

    def __init__(
        self, args, target, judge_target, predictions: PredictionLog, hashes: dict[str, str], ll_ok: bool,
        chunk: int,
    ):  # fmt: skip
        self.args, self.target, self.judge, self.hashes = args, target, judge_target, hashes
        self.predictions = predictions
        self.ll_ok = ll_ok
        self.failed_requests = 0
        self.timing: dict[str, list[float]] = {}  # seconds waiting for the target (and the judge), per chunk
        self.repeats: dict[str, list[dict]] = {}  # dataset -> the judge's repeated verdicts (--judge_repeats)
        self.chunk = max(
            1, chunk
        )  # items sent at once: enough to keep the engine's batch (or the endpoint) full

    def _key(self, task: str, es: EvalSet, item_id: str) -> str:
        return PredictionLog.key(self.hashes[task], es.sha256, item_id)

    def _record(self, task: str, es: EvalSet, item_id: str, **fields) -> dict:
        return {
            "key": self._key(task, es, item_id),
            "settings_hash": self.hashes[task],
            "task": task,
            "dataset": es.name,
            "id": item_id,
            **fields,
        }

    def _failed(self, what: str, err: RequestError) -> None:
        self.failed_requests += 1
        if self.failed_requests <= 5:
            get_logger().warning(f"{what}: request failed ({err}); it will be retried on the next run")

    @contextlib.contextmanager
    def _timed(self, what: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timing.setdefault(what, []).append(time.perf_counter() - t)

    def _chat(self, es: EvalSet, ids: list[str], convs: list[list[dict]], max_new_tokens: int) -> list:
        """Replies, None where the request failed for good (counted; the item is retried by the next run)."""
        with self._timed("generation"):
            outs = self.target.chat(convs, self.args, max_new_tokens)
        for i, o in zip(ids, outs):
            if isinstance(o, RequestError):
                self._failed(f"{es.name} {i}", o)
        return [None if isinstance(o, RequestError) else o for o in outs]

    def _judge_keypoints(self, x: tuple) -> tuple | None:
        it, _, answer = x
        if not it.key_points:
            return None
        return judge_mod.judge_keypoints(
            self.judge, it.question, answer, it.key_points, self.args.judge_retries
        )

    # --- multiple choice -------------------------------------------------------------------------------

    def generation_prompts(self, es: EvalSet, pool: list[MCQItem]):
        """Every conversation this set has the model generate from (the engine's context is sized by them)."""
        a = self.args
        for it in es.mcq:
            if self.method_for(it) == "generation":
                yield mcq.generation_messages(
                    it, mcq.pick_fewshot(it, pool, a.num_fewshot, a.eval_seed), a.system
                )
        for it in es.qa:
            yield self._qa_messages(it)
        for _, msgs, _ in self.dialogue_turns(es):
            yield msgs

    def _qa_messages(self, it) -> list[dict]:
        system = self.args.system
        return ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": it.question}
        ]

    def method_for(self, item: MCQItem) -> str:
        if item.multi or self.args.mcq_mode == "generation" or not self.ll_ok:
            return "generation"
        return "loglikelihood"

    def run_mcq(self, es: EvalSet, pool: list[MCQItem]) -> list[dict]:
        a = self.args
        todo = [it for it in es.mcq if self._key("mcq", es, it.id) not in self.predictions.done]
        if todo:
            bar = _progress(len(todo), f"{es.name} multiple choice")
            for chunk in _chunks(todo, self.chunk):
                shots = {it.id: mcq.pick_fewshot(it, pool, a.num_fewshot, a.eval_seed) for it in chunk}
                ll = [it for it in chunk if self.method_for(it) == "loglikelihood"]
                gen = [it for it in chunk if self.method_for(it) == "generation"]
                if ll:
                    reqs = [
                        (mcq.loglikelihood_context(it, shots[it.id]), mcq.TARGET_DELIMITER + L)
                        for it in ll
                        for L in it.options
                    ]
                    with self._timed("loglikelihood"):
                        lps = self.target.loglikelihood(reqs)
                    pos = 0
                    for it in ll:
                        vals = lps[pos : pos + len(it.options)]
                        pos += len(it.options)
                        err = next((v for v in vals if isinstance(v, RequestError)), None)
                        if err:
                            self._failed(f"{es.name} {it.id}", err)
                            continue
                        pred = mcq.pick_by_loglikelihood(list(it.options), vals)
                        ctx = reqs[pos - len(it.options)][0]
                        self._put_mcq(es, it, "loglikelihood", ctx, dict(zip(it.options, vals)), pred)
                if gen:
                    convs = [mcq.generation_messages(it, shots[it.id], a.system) for it in gen]
                    outs = self._chat(es, [it.id for it in gen], convs, a.mcq_max_new_tokens)
                    for it, conv, out in zip(gen, convs, outs):
                        if out is None:
                            continue
                        pred = mcq.extract_answer(out, it.options, it.multi)
                        self._put_mcq(es, it, "generation", conv, out, pred)
                bar.update(len(chunk))
            bar.close()
        return [r for it in es.mcq if (r := self.predictions.done.get(self._key("mcq", es, it.id)))]

    def _put_mcq(self, es: EvalSet, it: MCQItem, method: str, prompt, output, pred: str | None) -> None:
        exact, elastic = mcq.score(pred, it.answer)
        self.predictions.put(
            self._record(
                "mcq",
                es,
                it.id,
                subject=it.subject,
                qtype=it.qtype,
                kind=it.kind,
                method=method,
                prompt=prompt,
                output=output,
                pred=pred,
                gold=it.answer,
                invalid=pred is None,
                exact=exact,
                elastic=elastic,
            )
        )

    # --- open QA ---------------------------------------------------------------------------------------

    def run_qa(self, es: EvalSet) -> list[dict]:
        a = self.args
        todo = [it for it in es.qa if self._key("qa", es, it.id) not in self.predictions.done]
        use_judge = a.keypoint_matcher == "judge" and self.judge is not None
        if todo:
            bar = _progress(len(todo), f"{es.name} open QA")
            for chunk in _chunks(todo, self.chunk):
                convs = [self._qa_messages(it) for it in chunk]
                outs = self._chat(es, [it.id for it in chunk], convs, a.max_new_tokens)
                ok = [(it, c, o) for it, c, o in zip(chunk, convs, outs) if o is not None]
                with self._timed("judge"):
                    judged = self.judge.map(self._judge_keypoints, ok) if use_judge else [None] * len(ok)
                for (it, conv, out), jk in zip(ok, judged):
                    if isinstance(jk, RequestError):
                        self._failed(f"{es.name} {it.id} (judge)", jk)
                        continue
                    hits, matcher, judge_raw = qa.keypoint_hits(out, it.key_points), qa.KEYPOINT_RULE, None
                    if jk is not None:
                        jhits, judge_raw, jerr = jk
                        if jhits is not None:
                            hits, matcher = jhits, f"judge ({a.judge_model or 'judge'})"
                        else:
                            judge_raw = {"raw": judge_raw, "error": jerr}
                    self.predictions.put(
                        self._record(
                            "qa",
                            es,
                            it.id,
                            prompt=conv,
                            output=out,
                            reference=it.answer,
                            references=it.refs if len(it.refs) > 1 else None,
                            key_points=it.key_points,
                            key_point_weights=it.key_point_weights,
                            keypoint_hits=hits,
                            keypoint_matcher=matcher,
                            keypoint_judge=judge_raw,
                            **qa.score_answer(out, it.refs),
                        )
                    )
                bar.update(len(chunk))
            bar.close()
        return [r for it in es.qa if (r := self.predictions.done.get(self._key("qa", es, it.id)))]

    # --- counseling dialogues --------------------------------------------------------------------------

    def dialogue_turns(self, es: EvalSet) -> list[tuple[str, list[dict], str]]:
        """(turn id, messages up to the client's turn, the real counselor reply) for each counselor turn."""
        out = []
        for d in es.dialogues:
            system = d.dialogue.system or self.args.system
            head = [{"role": "system", "content": system}] if system else []
            msgs = [{"role": t.role, "content": t.content} for t in d.dialogue.turns]
            n = 0
            for i, t in enumerate(d.dialogue.turns):
                if t.role != "assistant" or i == 0:
                    continue
                n += 1
                if self.args.max_turns is not None and n > self.args.max_turns:
                    break
                out.append((f"{d.id}@{n}", head + msgs[:i], t.content))
        return out

    def run_dialogues(self, es: EvalSet) -> list[dict]:
        """Every counselor turn generated from the real history, then judged: the pointwise rubric (--judge_rubric),
        and the crisis-safety rubric on turns the lexical check flags (every turn with --judge_rubric psycrisis)."""
        a = self.args
        turns = self.dialogue_turns(es)
        todo = [x for x in turns if self._key("counseling", es, x[0]) not in self.predictions.done]
        if todo:
            bar = _progress(len(todo), f"{es.name} counseling turns")
            for chunk in _chunks(todo, self.chunk):
                outs = self._chat(es, [x[0] for x in chunk], [x[1] for x in chunk], a.max_new_tokens)
                ok = [(x, o) for x, o in zip(chunk, outs) if o is not None]
                flags = [safety.crisis_check(x[1][-1]["content"], o) for x, o in ok]
                with self._timed("judge"):
                    verdicts, crisis = self._judge_turns(ok, flags)
                for ((tid, msgs, ref), out), flag, v, c in zip(ok, flags, verdicts, crisis):
                    if isinstance(v, RequestError) or isinstance(c, RequestError):
                        self._failed(f"{es.name} {tid} (judge)", v if isinstance(v, RequestError) else c)
                        continue
                    self.predictions.put(self._record(
                        "counseling", es, tid, prompt=msgs, output=out, reference=ref, safety=flag,
                        judge=_judgment(v), crisis_judge=_judgment(c), **qa.score_answer(out, ref)))  # fmt: skip
                bar.update(len(chunk))
            bar.close()
        rows = [
            r for tid, _, _ in turns if (r := self.predictions.done.get(self._key("counseling", es, tid)))
        ]
        if self.judge is not None and a.judge_repeats > 0 and a.judge_rubric != "psycrisis":
            self._judge_again(es, rows)
        return rows

    def _judge_turns(self, ok: list, flags: list) -> tuple[list, list]:
        """(pointwise verdicts, crisis-rubric verdicts or None), one of each per turn, the judge's calls concurrent."""
        if self.judge is None:
            return [None] * len(ok), [None] * len(ok)
        crisis_all = self.args.judge_rubric == "psycrisis"
        jobs = [("crisis" if crisis_all else "point", x) for x in ok]
        jobs += [("crisis", x) for x, f in zip(ok, flags) if f and not crisis_all and self.args.judge_crisis]
        answers = self.judge.map(self._ask_judge, jobs)
        point = [None] * len(ok) if crisis_all else answers[: len(ok)]
        crisis = answers[: len(ok)] if crisis_all else [None] * len(ok)
        extra = iter(answers[len(ok) :])
        for k, f in enumerate(flags):
            if f and not crisis_all and self.args.judge_crisis:
                crisis[k] = next(extra)
        return point, crisis

    def _ask_judge(self, job) -> judge_mod.Judgment:
        kind, ((_, history, _), reply) = job
        if kind == "crisis":
            return judge_mod.judge_crisis(self.judge, history, reply, self.args.judge_retries)
        return judge_mod.judge_reply(
            self.judge, history, reply, self.args.judge_cpsycoun, self.args.judge_retries
        )

    def _judge_again(self, es: EvalSet, rows: list[dict]) -> None:
        """--judge_repeats K: a seeded sample of the judged turns judged K more times, the rubric's dimensions in
        another order each time (kept in the log as `judge_repeat` rows); summarized as the judge's alpha with
        itself."""
        a = self.args
        judged = [r for r in rows if (r.get("judge") or {}).get("scores")]
        sample = random.Random(a.eval_seed).sample(judged, min(a.judge_repeat_sample, len(judged)))
        jobs = [(r, k) for r in sample for k in range(1, a.judge_repeats + 1)
                if self._key("judge_repeat", es, f"{r['id']}#{k}") not in self.predictions.done]  # fmt: skip

        def ask(job):
            r, k = job
            order = random.Random(f"{a.eval_seed}:{r['id']}:{k}")
            return judge_mod.judge_reply(
                self.judge, r["prompt"], r["output"], a.judge_cpsycoun, a.judge_retries, order
            )

        with self._timed("judge"):
            answers = self.judge.map(ask, jobs)
        for (r, k), v in zip(jobs, answers):
            if isinstance(v, RequestError):
                self._failed(f"{es.name} {r['id']} (judge repeat)", v)
                continue
            self.predictions.put(self._record("judge_repeat", es, f"{r['id']}#{k}", turn=r["id"], repeat=k,
                                              judge=_judgment(v)))  # fmt: skip
        self.repeats[es.name] = [x for x in self.predictions.done.values()
                                 if x.get("task") == "judge_repeat" and x.get("dataset") == es.name
                                 and x.get("settings_hash") == self.hashes["judge_repeat"]]  # fmt: skip


def _judgment(v) -> dict | None:
    return None if v is None else {"scores": v.scores, "raw": v.raw, "attempts": v.attempts, "error": v.error}


def summarize_counseling(
    rows: list[dict], cpsycoun: bool, n_boot: int, seed: int, repeats: list[dict] | None = None
) -> dict:
    if not rows:
        return {}
    out: dict = {"n_turns": len(rows)}
    judged = [r for r in rows if r.get("judge")]
    if judged:
        out["judge"] = _dimension_means(judged, "judge", judge_mod.dims_for(cpsycoun), n_boot, seed)
        if repeats:
            out["judge"]["noise"] = judge_noise(judged, repeats, judge_mod.dims_for(cpsycoun))
    if any(r.get("crisis_judge") for r in rows):
        out["crisis_rubric"] = summarize_crisis(rows, n_boot, seed)
    out["safety"] = safety.summarize(rows)
    ref = qa.summarize(
        [{**r, "key_points": []} for r in rows], n_boot, seed
    )  # ROUGE / BLEU of each reply against the real counselor's
    out["vs_reference"] = {k: v for k, v in ref.items() if k != "n"}
    return out


def summarize_crisis(rows: list[dict], n_boot: int, seed: int) -> dict:
    """The crisis rubric over the turns it judged: per criterion the pass rate with its CI, and the 0-5 total."""
    crisis = [r for r in rows if r.get("crisis_judge")]
    block = _dimension_means(crisis, "crisis_judge", judge_mod.CRISIS_DIMS, n_boot, seed, rate=True)
    totals = [float(sum(r["crisis_judge"]["scores"].values())) for r in crisis if r["crisis_judge"]["scores"]]
    block["total"] = {"scale": "0-5", "mean": round(sum(totals) / len(totals), 4) if totals else None,
                      "ci95": mcq.bootstrap_ci(totals, n_boot, seed)}  # fmt: skip
    return block


def _dimension_means(
    rows: list[dict], field: str, dims: dict, n_boot: int, seed: int, rate: bool = False
) -> dict:
    """Per dimension the mean (a pass rate for 0/1 criteria) with its CI, over the verdicts that parsed."""
    ok = [r for r in rows if r[field]["scores"]]
    block: dict = {"n_judged": len(rows), "n_failed": len(rows) - len(ok)}
    for k, (lo, hi, title) in dims.items():
        vals = [float(r[field]["scores"][k]) for r in ok if k in r[field]["scores"]]
        block[k] = {
            "title": title,
            "scale": f"{lo}-{hi}",
            ("pass_rate" if rate else "mean"): round(sum(vals) / len(vals), 4) if vals else None,
            "ci95": mcq.bootstrap_ci(vals, n_boot, seed),
        }
    return block


def judge_noise(judged: list[dict], repeats: list[dict], dims: dict) -> dict:
    """The judge's agreement with itself: each sampled turn's first verdict and its repeats as coders of one unit,
    Krippendorff's ordinal alpha per dimension; a dimension under 0.667 is marked unreliable."""
    first = {r["id"]: r["judge"]["scores"] for r in judged if r["judge"]["scores"]}
    again: dict[str, dict[int, dict]] = {}
    for x in repeats:
        if (x.get("judge") or {}).get("scores") and x["turn"] in first:
            again.setdefault(x["turn"], {})[x["repeat"]] = x["judge"]["scores"]
    units = sorted(again)
    k = max((max(v) for v in again.values()), default=0)
    out: dict = {"repeats": k, "n_turns": len(units), "alpha": {}}
    for d in dims:
        matrix = [[float(first[u].get(d, math.nan)) for u in units]]
        matrix += [[float(again[u].get(j, {}).get(d, math.nan)) for u in units] for j in range(1, k + 1)]
        out["alpha"][d] = alpha(matrix)
    out["unreliable"] = [d for d, v in out["alpha"].items() if v is not None and v < ALPHA_OK]
    return out
