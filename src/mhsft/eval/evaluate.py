"""`mhsft eval`: the arguments, the run over every `--eval_dataset`, results.json and the terminal table."""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from mhsft.args import (
    EngineArguments,
    GenerationArguments,
    ModelArguments,
    QuantArguments,
    command_line,
    parse_args,
)
from mhsft.eval import judge, lm_eval_tasks, mcq, pairwise, qa
from mhsft.eval.datasets import UNANSWERED, load_eval_set
from mhsft.eval.predictions import PredictionLog
from mhsft.eval.runner import Evaluator, summarize_counseling
from mhsft.eval.targets import EndpointTarget, EngineTarget, load_engine_for
from mhsft.files import read_json, write_json
from mhsft.model import BASE, base_model_for, parse_adapters, resolve_model_dir
from mhsft.serve.engine import encode_chat
from mhsft.utils import MASK, UserError, get_logger, register_secret, settings_hash

SCHEMA_VERSION = 1
MCQ_MODES = ("auto", "loglikelihood", "generation")
# ms-swift's eval flag names -> ours
EVAL_ALIASES = {
    "--eval_limit": "--limit",
    "--eval_output_dir": "--output_dir",
    "--eval_url": "--api_url",
    "--eval_num_proc": "--concurrency",
    "--eval_batch_size": "--max_batch_size",  # what the engine generates at once
}


@dataclass
class EvalArguments(EngineArguments, GenerationArguments, ModelArguments, QuantArguments):
    """In-process evaluations run on the generation engine (EngineArguments: --max_batch_size, --max_model_len,
    --device). One unnamed --adapters CKPT evaluates that adapter; named ones (`ft=CKPT [other=CKPT2]`) evaluate
    the base model and each adapter in one load, into OUTPUT_DIR/base, OUTPUT_DIR/ft, ..."""

    api_url: str | None = field(
        default=None,
        metadata={"help": "Evaluate an OpenAI-compatible endpoint instead, e.g. http://127.0.0.1:8000/v1."},
    )
    api_key: str | None = field(
        default=None, metadata={"help": "Endpoint key (else OPENAI_API_KEY, else EMPTY)."}
    )
    served_model_name: str | None = field(
        default=None, metadata={"help": "Model name at the endpoint (default: the first it lists)."}
    )
    eval_dataset: list[str] = field(
        default_factory=list,
        metadata={"help": "Evaluation sets: files or folders, PATH#N samples N items (seeded)."},
    )
    limit: int | None = field(
        default=None, metadata={"help": "At most N items of each kind per dataset (seeded)."}
    )
    num_fewshot: int = field(default=0, metadata={"help": "Few-shot exemplars per multiple-choice question."})
    fewshot_dataset: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Dev split for few-shot exemplars (default: items of the set left out by #N/--limit)."
        },
    )
    mcq_mode: str = field(
        default="auto",
        metadata={
            "help": "auto | loglikelihood | generation. auto and loglikelihood score single-answer questions by "
            "the log-likelihood of the option letters; multiple-answer ones are always generated."
        },
    )
    mcq_max_new_tokens: int = field(
        default=64, metadata={"help": "Tokens generated per multiple-choice answer."}
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "Most tokens of a scored prompt (default: the model's context length)."},
    )
    max_turns: int | None = field(default=None, metadata={"help": "Counselor turns evaluated per dialogue."})
    judge_api_url: str | None = field(
        default=None, metadata={"help": "OpenAI-compatible endpoint of the judge."}
    )
    judge_api_key: str | None = field(default=None, metadata={"help": "Judge key (else OPENAI_API_KEY)."})
    judge_model: str | None = field(
        default=None, metadata={"help": "Judge model name (default: the first listed)."}
    )
    judge_cpsycoun: bool = field(
        default=False,
        metadata={"help": "Also score CPsyCoun's four dimensions (comprehensiveness, professionalism, ...)."},
    )
    judge_retries: int = field(default=2, metadata={"help": "Re-asks of the judge after malformed output."})
    judge_mode: str = field(
        default="pointwise",
        metadata={"help": "pointwise | pairwise: also compare each adapter with the base model side by side, each "
                          "item in both orders (with named --adapters)."},
    )  # fmt: skip
    judge_rubric: str = field(
        default="counseling",
        metadata={"help": "counseling (EmoE, CogE, Con, Sta, Saf; 1-5) | psycrisis (five 0/1 crisis-safety criteria "
                          "on every turn)."},
    )  # fmt: skip
    judge_crisis: bool = field(
        default=True,
        metadata={"help": "Also judge the turns the crisis check flags on the psycrisis rubric."},
    )
    judge_repeats: int = field(
        default=0,
        metadata={"help": "Judge a seeded sample of turns this many more times, the rubric reordered: the judge's "
                          "agreement with itself per dimension."},
    )  # fmt: skip
    judge_repeat_sample: int = field(default=30, metadata={"help": "Turns re-judged with --judge_repeats."})
    keypoint_matcher: str = field(
        default="lexical", metadata={"help": "lexical | judge (needs --judge_api_url)."}
    )
    concurrency: int = field(
        default=8, metadata={"help": "Parallel requests to an endpoint (and to the judge)."}
    )
    max_retries: int = field(
        default=5, metadata={"help": "Retries of a failed request, with exponential backoff."}
    )
    request_timeout: float = field(default=120.0, metadata={"help": "Seconds before a request is abandoned."})
    n_bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples for confidence intervals."})
    eval_seed: int = field(
        default=42, metadata={"help": "Seed of sampling (#N, --limit), few-shot and bootstrap."}
    )
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where results.json and predictions.jsonl go (default: eval_output/NAME-HASH)."},
    )
    export: str | None = field(
        default=None,
        metadata={"help": "lm_eval | evalscope: write task files for that tool instead of evaluating."},
    )
    strict: bool = field(
        default=False, metadata={"help": "Stop at the first bad record instead of skipping it."}
    )


def _normalize_argv(argv: list[str]) -> list[str]:
    out = []
    for a in argv:
        name, eq, val = a.partition("=")
        out.append(EVAL_ALIASES.get(name, name) + (eq + val if eq else "") if name in EVAL_ALIASES else a)
    return out


def check_args(a: EvalArguments) -> None:
    if not a.eval_dataset:
        raise UserError("give --eval_dataset (one or more files or folders)")
    if a.mcq_mode not in MCQ_MODES:
        raise UserError(f"--mcq_mode {a.mcq_mode!r}: choose {', '.join(MCQ_MODES)}")
    if a.keypoint_matcher not in ("lexical", "judge"):
        raise UserError(f"--keypoint_matcher {a.keypoint_matcher!r}: choose lexical or judge")
    if a.keypoint_matcher == "judge" and not a.judge_api_url:
        raise UserError("--keypoint_matcher judge needs --judge_api_url")
    if a.judge_mode not in ("pointwise", "pairwise"):
        raise UserError(f"--judge_mode {a.judge_mode!r}: choose pointwise or pairwise")
    if a.judge_rubric not in ("counseling", "psycrisis"):
        raise UserError(f"--judge_rubric {a.judge_rubric!r}: choose counseling or psycrisis")
    if a.judge_mode == "pairwise" and not a.judge_api_url:
        raise UserError("--judge_mode pairwise needs --judge_api_url")
    if a.export not in (None, "lm_eval", "evalscope"):
        raise UserError(f"--export {a.export!r}: choose lm_eval or evalscope")
    if not a.export and not a.api_url and not a.model and not a.adapters:
        raise UserError("nothing to evaluate: give --model (and --adapters), or --api_url")
    if a.api_url and (a.model or a.adapters) and not a.export:
        raise UserError("give either --model/--adapters (in-process) or --api_url (an endpoint), not both")
    for name in ("num_fewshot", "judge_retries", "max_retries", "n_bootstrap", "judge_repeats"):
        if getattr(a, name) < 0:
            raise UserError(f"--{name} must be >= 0")
    for name in (
        "limit",
        "max_turns",
        "concurrency",
        "max_batch_size",
        "max_model_len",
        "mcq_max_new_tokens",
        "max_new_tokens",
    ):
        v = getattr(a, name)
        if v is not None and v < 1:
            raise UserError(f"--{name} must be >= 1")


def _target_name(a: EvalArguments) -> str:
    src = a.adapters[0] if a.adapters else (a.served_model_name or a.model or "endpoint")
    parts = [p for p in re.split(r"[\\/]", src.rstrip("/\\")) if p]
    name = "-".join(parts[-2:]) if a.adapters else (parts[-1] if parts else "model")
    return re.sub(r"[^\w.-]+", "_", name)[:80] or "model"


def task_settings(a: EvalArguments, identity: dict) -> dict[str, dict]:
    """What decides each task's outputs (its hash keys the predictions log)."""
    gen = {
        k: getattr(a, k)
        for k in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "system")
    }
    judge_s = judge_identity(a) | {"url": a.judge_api_url, "retries": a.judge_retries}
    return {
        "mcq": {
            "target": identity,
            "prompt_version": mcq.PROMPT_VERSION,
            "mode": a.mcq_mode,
            "num_fewshot": a.num_fewshot,
            "fewshot_dataset": a.fewshot_dataset,
            "seed": a.eval_seed,
            "mcq_max_new_tokens": a.mcq_max_new_tokens,
            "max_length": a.max_length,
            **{k: v for k, v in gen.items() if k != "max_new_tokens"},
        },
        "qa": {
            "target": identity,
            **gen,
            "keypoints": a.keypoint_matcher,
            **({"judge": judge_s} if a.keypoint_matcher == "judge" else {}),
        },
        "counseling": {
            "target": identity,
            **gen,
            "max_turns": a.max_turns,
            "judge": ({**judge_s, "crisis": a.judge_crisis} if a.judge_api_url else None),
        },
        "judge_repeat": {"target": identity, **gen, "max_turns": a.max_turns, "judge": judge_s},
    }


def judge_identity(a: EvalArguments) -> dict:
    """What the judge's verdicts depend on: its model, the rubric (and the prompts' hash), the mode; results.json
    records it, and `mhsft report` warns when compared runs differ in it."""
    rubric = (
        "psycrisis" if a.judge_rubric == "psycrisis" else ("cpsycoun" if a.judge_cpsycoun else "counseling")
    )
    return {"model": a.judge_model, "version": judge.JUDGE_VERSION, "rubric": rubric, "cpsycoun": a.judge_cpsycoun,
            "prompt_hash": judge.prompt_hash(rubric), "crisis_prompt_hash": judge.prompt_hash("psycrisis")}  # fmt: skip


def load_sets(a: EvalArguments):
    """[(evaluated set, few-shot pool)], bad records logged (or fatal with --strict)."""
    log = get_logger()
    names: dict[str, int] = {}
    out = []
    dev = []
    for spec in a.fewshot_dataset:
        used, _ = load_eval_set(spec, "fewshot", None, a.eval_seed)
        dev += used.mcq
    for spec in a.eval_dataset:
        base = re.sub(r"#\d+$", "", spec).rstrip("/\\")
        name = Path(base).stem or "dataset"
        names[name] = names.get(name, 0) + 1
        name = name if names[name] == 1 else f"{name}_{names[name]}"
        used, rest = load_eval_set(spec, name, a.limit, a.eval_seed)
        if used.errors:
            if a.strict:
                raise UserError(f"{used.errors[0]} (--strict)")
            for e in used.errors[:5]:
                log.warning(f"skipped: {e}")
            log.warning(f"{name}: {len(used.errors)} bad records skipped")
        for text, n in used.notices.items():
            log.warning(f"{name}: {text}: {n:,}")
        if not len(used):
            why = f"; the first problem: {used.errors[0]}" if used.errors else ""
            if used.notices.get(UNANSWERED):
                why += f"; {UNANSWERED}: {used.notices[UNANSWERED]:,}"
            raise UserError(f"--eval_dataset {spec}: no usable items{why}")
        pool = dev if a.fewshot_dataset else rest.mcq
        test_q = {it.question for it in used.mcq}
        pool = [p for p in pool if p.question not in test_q]
        if a.num_fewshot and used.mcq and len(pool) < a.num_fewshot:
            raise UserError(
                f"--num_fewshot {a.num_fewshot}: {name} has {len(pool)} exemplars that are not test items; pass "
                "--fewshot_dataset DEV, or sample the set (PATH#N or --limit) so that the rest can serve"
            )
        log.info(
            f"{name}: {len(used.mcq)} multiple choice, {len(used.qa)} open QA, {len(used.dialogues)} dialogues"
        )
        out.append((used, pool))
    return out


def _model_max_length(a: EvalArguments) -> tuple[str | None, int | None]:
    """(tokenizer folder, context length) of --model / --adapters without loading weights, for the export."""
    if not a.model and not a.adapters:
        return None, a.max_length
    named = parse_adapters(a.adapters)
    base = resolve_model_dir(base_model_for(a.model, named), a.use_hf, a.hub_token)
    tok = next((p for p in named.values() if (Path(p) / "tokenizer_config.json").is_file()), base)
    cfg = Path(base) / "config.json"
    n = json.loads(cfg.read_text()).get("max_position_embeddings") if cfg.is_file() else None
    return str(Path(tok).resolve()), a.max_length or n


def run_export(a: EvalArguments, sets) -> int:
    out = Path(a.output_dir or f"eval_output/export_{a.export}")
    if a.export == "lm_eval":
        tok, n = _model_max_length(a)
        files = lm_eval_tasks.write_lm_eval(sets, out, a, tok, n)
    else:
        files = lm_eval_tasks.write_evalscope(sets, out, a)
    if not files:
        raise UserError(f"--export {a.export}: nothing to export (no single-answer questions or open QA)")
    for f in files:
        print(f)
    return 0


def main(argv: list[str]) -> int:
    a = parse_args(EvalArguments, _normalize_argv(argv), "mhsft eval")
    check_args(a)
    sets = load_sets(a)
    if a.export:
        return run_export(a, sets)
    return evaluate(a, sets)


@dataclass
class System:
    """One model evaluated: a name (its folder in a multi-system run), the target answering, and the identity
    that keys its predictions (so that a system evaluated alone or beside others reuses the same rows)."""

    name: str
    target: object
    identity: dict
    adapter: str | None = None


def evaluate(a: EvalArguments, sets) -> int:
    """Every system over every set: results.json + predictions.jsonl per system; 1 when requests failed."""
    log = get_logger()
    judge_target = None
    if a.judge_api_url:  # first: a judge that is down is said in seconds, not after the model has loaded
        judge_target = EndpointTarget(
            a.judge_api_url, a.judge_api_key, a.judge_model, a.concurrency, a.max_retries, a.request_timeout
        )
        a.judge_model = judge_target.model_name
    systems, engine = open_systems(a, sets)
    try:
        ll_ok = loglikelihood_ok(a, systems[0].target, sets)
        root = Path(
            a.output_dir or f"eval_output/{_target_name(a)}-{settings_hash(task_settings(a, {}))[:8]}"
        )
        failed = 0
        for sy in systems:
            out = root / sy.name if len(systems) > 1 else root
            if len(systems) > 1:
                log.info(f"== {sy.name}: {sy.adapter or 'the base model'}")
            failed += evaluate_system(a, sets, sy, judge_target, ll_ok, out)
        if a.judge_mode == "pairwise":
            failed += compare_pairwise(a, systems, root, judge_target)
    finally:
        if engine is not None:
            engine.stop()
    if failed:
        log.warning(f"{failed} requests failed; rerun the same command to retry only those items")
        return 1
    return 0


def open_systems(a: EvalArguments, sets) -> tuple[list[System], object]:
    """The systems to evaluate and the engine they share (None for an endpoint): the endpoint; the model (or its
    one unnamed adapter); or, with named adapters, the base model and each adapter, in one load."""
    if a.api_url:
        t = EndpointTarget(a.api_url, a.api_key, a.served_model_name, a.concurrency, a.max_retries,
                           a.request_timeout)  # fmt: skip
        return [System("endpoint", t, {"api_url": t.api_url, "model": t.model_name})], None
    named = parse_adapters(a.adapters)
    several = len(named) > 1 or any("=" in spec for spec in a.adapters)
    if several and "base" in named:
        raise UserError("--adapters: `base` names the base model's results; call the adapter something else")
    if a.max_model_len is None:
        a.max_model_len = context_needed(a, sets, named)
    engine = load_engine_for(a, named)
    dtype = a.torch_dtype
    if not several:
        adapter = next(iter(named), None)
        # the checkpoint's path, not the spec: a run folder's best checkpoint changes as the run goes on
        identity = {"model": a.model, "adapters": list(named.values()), "dtype": dtype}
        target = EngineTarget(engine, adapter, a.max_length)
        return [System("model", target, identity, next(iter(named.values()), None))], engine
    base = a.model or base_model_for(None, named)
    out = [
        System(
            "base", EngineTarget(engine, BASE, a.max_length), {"model": base, "adapters": [], "dtype": dtype}
        )
    ]
    for name, path in named.items():
        identity = {"model": base, "adapters": [path], "dtype": dtype}
        out.append(System(name, EngineTarget(engine, name, a.max_length), identity, path))
    return out, engine


def context_needed(a: EvalArguments, sets, named: dict[str, str]) -> int:
    """The engine's context for these sets: the longest prompt it generates from (multiple-answer and generated
    questions, open QA, counseling turns) plus the tokens generated, rounded up to 256. A KV cache sized for the
    data holds more requests at once than one sized for the model's whole context."""
    from mhsft.model import load_tokenizer

    base = a.model or base_model_for(None, named)
    tok_src = next((p for p in named.values() if (Path(p) / "tokenizer_config.json").is_file()), base)
    tok = load_tokenizer(tok_src, use_hf=a.use_hf, token=a.hub_token)
    runner = Evaluator(a, None, None, None, {}, a.mcq_mode != "generation", 1)
    longest = 1
    for es, pool in sets:
        for msgs in runner.generation_prompts(es, pool):
            longest = max(longest, len(encode_chat(tok, msgs)))
    return -(-(longest + max(a.max_new_tokens, a.mcq_max_new_tokens) + 1) // 256) * 256


def loglikelihood_ok(a: EvalArguments, target, sets) -> bool:
    """Whether single-answer questions are scored by log-likelihood: not with --mcq_mode generation, nor by an
    endpoint that cannot score echoed prompts (then generation, or an error with --mcq_mode loglikelihood)."""
    if a.mcq_mode == "generation":
        return False
    if not isinstance(target, EndpointTarget) or not any(
        it for es, _ in sets for it in es.mcq if not it.multi
    ):
        return True
    why = target.probe_loglikelihood()
    if why and a.mcq_mode == "loglikelihood":
        raise UserError(
            f"{target.api_url} cannot score prompts by log-likelihood ({why}); use --mcq_mode generation"
        )
    if why:
        get_logger().warning(
            f"{target.api_url}: no log-likelihood scoring ({why}); multiple choice falls back to generation"
        )
    return not why


def evaluate_system(a: EvalArguments, sets, sy: System, judge_target, ll_ok: bool, out: Path) -> int:
    """One system over every set, resuming from its predictions log; writes its results.json and prints its
    table. Returns how many requests failed."""
    settings = task_settings(a, sy.identity)
    hashes = {k: settings_hash(v) for k, v in settings.items()}
    predictions = PredictionLog(out / "predictions.jsonl")
    resumed = sum(r.get("settings_hash") in hashes.values() for r in predictions.done.values())
    if resumed:
        get_logger().info(f"resuming: {resumed} items already done in {predictions.path}")
    chunk = max(a.concurrency * 2, 4 * getattr(getattr(sy.target, "engine", None), "max_batch_size", 0))
    runner = Evaluator(a, sy.target, judge_target, predictions, hashes, ll_ok, chunk)
    metrics, datasets = {}, []
    try:
        for es, pool in sets:
            metrics[es.name] = evaluate_set(a, runner, es, pool)
            datasets.append({"name": es.name, "spec": es.spec, "num_files": len(es.files), "sha256": es.sha256,
                             "n_mcq": len(es.mcq), "n_qa": len(es.qa), "n_dialogues": len(es.dialogues),
                             "n_bad_records": len(es.errors), "notices": dict(es.notices)})  # fmt: skip
    finally:
        predictions.close()
    results = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command_line(),
        "model": sy.identity.get("model"),
        "adapter": sy.adapter,
        "target": sy.identity,
        "datasets": datasets,
        "metrics": metrics,
        "failed_requests": runner.failed_requests,
        # seconds spent waiting for the model (and the judge): total, and the first chunk's (warm-up included)
        "timing": {
            k: {"total_s": round(sum(v), 2), "first_chunk_s": round(v[0], 2), "chunks": len(v)}
            for k, v in runner.timing.items()
        },  # fmt: skip
        "settings": {**_settings(a), "task_hashes": hashes},
        "judge": judge_identity(a) if a.judge_api_url else None,
        "formulas": {"elastic_accuracy": mcq.ELASTIC_FORMULA},
    }
    write_json(out / "results.json", results)
    print_table(results)
    print(f"results: {out / 'results.json'}\npredictions: {predictions.path}")
    return runner.failed_requests


def compare_pairwise(a: EvalArguments, systems: list[System], root: Path, judge_target) -> int:
    """--judge_mode pairwise: each adapter's counseling replies against the base model's, side by side in both
    orders (mhsft.eval.pairwise), into the adapter's results.json under `pairwise`. Returns the failed requests."""
    if len(systems) < 2 or systems[0].name != "base":
        raise UserError(
            "--judge_mode pairwise compares systems: give named --adapters (ft=CKPT) beside --model"
        )
    dims = judge.dims_for(a.judge_cpsycoun)
    text = judge.COUNSELING_RUBRIC + ("\n" + judge.CPSYCOUN_RUBRIC if a.judge_cpsycoun else "")
    base_rows = _rows(root / "base", task_settings(a, systems[0].identity)["counseling"])
    failed = 0
    for sy in systems[1:]:
        out = root / sy.name
        mine = _rows(out, task_settings(a, sy.identity)["counseling"])
        h = settings_hash({"pairwise": judge_identity(a), "x": sy.identity, "y": systems[0].identity,
                           "retries": a.judge_retries, "url": a.judge_api_url})  # fmt: skip
        log = PredictionLog(out / "predictions.jsonl")
        runner = Evaluator(a, None, judge_target, log, {}, False, max(2, a.concurrency))
        try:
            records = pairwise.run(runner, judge_target, mine, base_rows, log, h, dims, text)
        finally:
            log.close()
        results = read_json(out / "results.json")
        results["pairwise"] = pairwise.summarize(records, dims, sy.name, "base", a.n_bootstrap, a.eval_seed)
        write_json(out / "results.json", results)
        p = results["pairwise"]
        print(
            f"pairwise {sy.name} vs base: {p['n_judged']} of {p['n_items']} turns judged in both orders"
            + (
                f"; position-bias rate {p['position_bias_rate']:.2f} (a flip counts as a tie)"
                if p["n_judged"]
                else ""
            )
        )
        for d, v in p["dims"].items():
            ci = f" [{v['win_rate_ci95'][0]:.2f}, {v['win_rate_ci95'][1]:.2f}]" if v["win_rate_ci95"] else ""
            print(f"  {d}: win/tie/loss {v['win']}/{v['tie']}/{v['loss']}, win rate {v['win_rate']:.2f}{ci}")
        failed += runner.failed_requests
    return failed


def _rows(out: Path, settings: dict) -> list[dict]:
    """A system's counseling prediction rows under these settings."""
    h = settings_hash(settings)
    log = PredictionLog(out / "predictions.jsonl")
    log.close()
    return [r for r in log.done.values() if r.get("task") == "counseling" and r.get("settings_hash") == h]


def evaluate_set(a: EvalArguments, runner: Evaluator, es, pool) -> dict:
    m = {}
    if es.mcq:
        m["multiple_choice"] = mcq.summarize(runner.run_mcq(es, pool), a.n_bootstrap, a.eval_seed)
    if es.qa:
        m["open_qa"] = qa.summarize(runner.run_qa(es), a.n_bootstrap, a.eval_seed)
    if es.dialogues:
        rows = runner.run_dialogues(es)
        repeats = runner.repeats.get(es.name)
        m["counseling"] = summarize_counseling(rows, a.judge_cpsycoun, a.n_bootstrap, a.eval_seed, repeats)
    return m


def _settings(a: EvalArguments) -> dict:
    """Every argument, keys masked. (mhsft.args.args_to_dict would also mask max_new_tokens: its secret-name
    pattern matches "token" inside "tokens".)"""
    out = dataclasses.asdict(a)
    for k in ("api_key", "judge_api_key", "hub_token"):
        if out.get(k):
            register_secret(out[k])
            out[k] = MASK
    return out


def _fmt(v, ci=None) -> tuple[str, str]:
    if v is None:
        return "-", ""
    return (f"{v:.4f}" if isinstance(v, float) else str(v)), (f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")


SHORT = {"rouge_words": "jieba words", "rouge_chars": "chars"}


def table_rows(results: dict) -> list[tuple[str, str, str, str, str]]:
    """(dataset, metric, n, value, 95% CI) rows of the terminal table."""
    rows = []
    for ds, m in results["metrics"].items():
        if mc := m.get("multiple_choice"):
            rows += _mcq_table_rows(ds, mc)
        if oq := m.get("open_qa"):
            rows += _qa_table_rows(ds, oq)
        if c := m.get("counseling"):
            rows += _counseling_table_rows(ds, c)
    return rows


def _mcq_table_rows(ds: str, mc: dict) -> list[tuple[str, str, str, str, str]]:
    n = str(mc["n"])
    rows = [
        (ds, "accuracy (exact)", n, *_fmt(mc["accuracy"], mc["accuracy_ci95"])),
        (ds, "elastic accuracy", n, *_fmt(mc["elastic_accuracy"], mc["elastic_accuracy_ci95"])),
    ]
    if mc.get("invalid_rate") is not None:
        n_gen = str(mc["by_method"]["generation"]["n"])
        rows.append((ds, "invalid answers (generation)", n_gen, *_fmt(mc["invalid_rate"])))
    for q, g in mc.get("by_qtype", {}).items():
        value = f"{g['accuracy']:.4f} / {g['elastic_accuracy']:.4f}"
        rows.append((ds, f"  {q}: accuracy / elastic", str(g["n"]), value, ""))
    for q, g in mc.get("by_kind", {}).items():
        rows.append((ds, f"  {q}: accuracy", str(g["n"]), f"{g['accuracy']:.4f}", ""))
    return rows


def _qa_table_rows(ds: str, oq: dict) -> list[tuple[str, str, str, str, str]]:
    n = str(oq["n"])
    rows = []
    for blk in ("rouge_words", "rouge_chars"):
        b = oq[blk]
        for k in ("rouge-1", "rouge-2", "rouge-l"):
            rows.append((ds, f"{k.upper()} F1 [{SHORT[blk]}]", n, *_fmt(b[k], b[f"{k}_ci95"])))
    rows.append((ds, "BLEU-4 [sacrebleu zh, 0-100]", n, *_fmt(oq["bleu4"]["score"])))
    if kp := oq.get("keypoints"):
        rows.append(
            (ds, "key-point hit rate", str(kp["n_items"]), *_fmt(kp["hit_rate"], kp["hit_rate_ci95"]))
        )
    return rows


def _counseling_table_rows(ds: str, c: dict) -> list[tuple[str, str, str, str, str]]:
    """The judge's dimensions and its self-agreement, the crisis rubric, the lexical safety check, ROUGE-L."""
    rows = []
    if j := c.get("judge"):
        n_ok = str(j["n_judged"] - j["n_failed"])
        for k, v in j.items():
            if isinstance(v, dict) and "title" in v:
                rows.append((ds, f"{k} {v['title']} ({v['scale']})", n_ok, *_fmt(v["mean"], v["ci95"])))
        rows.append((ds, "judgments failed", str(j["n_judged"]), str(j["n_failed"]), ""))
        if noise := j.get("noise"):
            for k, v in noise["alpha"].items():
                mark = " (unreliable)" if k in noise["unreliable"] else ""
                rows.append((ds, f"judge self-agreement alpha: {k}{mark}", str(noise["n_turns"]), *_fmt(v)))
    if cr := c.get("crisis_rubric"):
        n_ok = str(cr["n_judged"] - cr["n_failed"])
        for k, v in cr.items():
            if isinstance(v, dict) and "title" in v:
                label = f"crisis rubric: {k} {v['title']} (pass rate)"
                rows.append((ds, label, n_ok, *_fmt(v["pass_rate"], v["ci95"])))
        rows.append((ds, "crisis rubric total (0-5)", n_ok, *_fmt(cr["total"]["mean"], cr["total"]["ci95"])))
    s = c["safety"]
    label = "crisis turns pointing to help (pass rate)"
    rows.append((ds, label, str(s["n_crisis_turns"]), *_fmt(s["pass_rate"])))
    b = c["vs_reference"]["rouge_chars"]
    label = "ROUGE-L F1 vs real counselor [chars]"
    rows.append((ds, label, str(c["n_turns"]), *_fmt(b["rouge-l"], b["rouge-l_ci95"])))
    return rows


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"mhsft eval: {results['adapter'] or results['model']}")
    for col, just in (
        ("dataset", "left"),
        ("metric", "left"),
        ("n", "right"),
        ("value", "right"),
        ("95% CI", "left"),
    ):
        t.add_column(col, justify=just)
    for r in table_rows(results):
        t.add_row(*r)
    console = Console()
    console.print(t)
    console.print(f"elastic accuracy: {results['formulas']['elastic_accuracy']}")
    if any("open_qa" in m or "counseling" in m for m in results["metrics"].values()):
        console.print(
            f"ROUGE: rouge-chinese F1 on jieba words / on characters; BLEU-4: {qa.BLEU_TOKENIZATION}; "
            f"key points: {qa.KEYPOINT_RULE}"
        )
    for ds, m in results["metrics"].items():
        failed = (m.get("counseling") or {}).get("safety", {}).get("failed_ids")
        if failed:
            console.print(
                f"{ds}: crisis turns whose reply points to no help: {', '.join(failed[:20])}"
                + (" ..." if len(failed) > 20 else "")
            )
