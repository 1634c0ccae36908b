"""`mhsft eval --export lm_eval|evalscope`: task files those tools run as they are, on the same items.

lm-eval: one task per dataset (`output_type: multiple_choice`, `dataset_path: json` with `data_files`), its docs
carrying the exact prompt mhsft scores (few-shot exemplars included), the letters as choices and the gold index,
so that `lm_eval --model local-completions` against the same server gives mhsft's log-likelihood accuracy.
Only single-answer questions go in: lm-eval's multiple_choice has one gold option.

EvalScope: `general_mcq` files (`{subset}_val.jsonl`, `{subset}_dev.jsonl` for few-shot; question, A..J,
answer; single answers only) and `general_qa` files (`{subset}.jsonl` with query/response), plus a script with
the TaskConfig that runs them against an OpenAI-compatible endpoint.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from mhsft.client import normalize_api_url
from mhsft.eval import mcq
from mhsft.eval.datasets import EvalSet, MCQItem
from mhsft.utils import get_logger


def _task_name(name: str) -> str:
    return "mhsft_" + (re.sub(r"[^0-9A-Za-z_]+", "_", name).strip("_").lower() or "set")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _yaml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a valid YAML scalar


def lm_eval_docs(items: list[MCQItem], pool: list[MCQItem], num_fewshot: int, seed: int) -> list[dict]:
    docs = []
    for it in items:
        if it.multi:
            continue
        shots = mcq.pick_fewshot(it, pool, num_fewshot, seed)
        letters = list(it.options)
        docs.append(
            {
                "id": it.id,
                "prompt": mcq.loglikelihood_context(it, shots),
                "choices": letters,
                "gold": letters.index(it.answer),
                "subject": it.subject,
            }
        )
    return docs


def write_lm_eval(
    sets: list[tuple[EvalSet, list[MCQItem]]],
    out: Path,
    args,
    tokenizer_path: str | None,
    max_length: int | None,
) -> list[Path]:
    out = out.resolve()
    tasks, written = [], []
    for es, pool in sets:
        docs = lm_eval_docs(es.mcq, pool, args.num_fewshot, args.eval_seed)
        skipped = sum(it.multi for it in es.mcq)
        if skipped:
            get_logger().info(
                f"lm_eval export {es.name}: {skipped} multiple-answer questions left out (lm-eval's multiple_choice "
                "has one gold option; mhsft scores them by generation)"
            )
        if not docs:
            continue
        task = _task_name(es.name)
        data = out / f"{task}.jsonl"
        _write_jsonl(data, docs)
        letter_sets = {tuple(d["choices"]) for d in docs}
        choice = (
            "[" + ", ".join(_yaml_str(x) for x in next(iter(letter_sets))) + "]"
            if len(letter_sets) == 1
            else "choices"
        )
        yaml = "\n".join(
            [
                f"# written by mhsft eval --export lm_eval from {es.spec} (sha256 {es.sha256[:16]})",
                f"task: {task}",
                "dataset_path: json",
                "dataset_kwargs:",
                "  data_files:",
                f"    test: {_yaml_str(str(data))}",
                "test_split: test",
                "output_type: multiple_choice",
                "doc_to_text: prompt  # the full prompt, few-shot exemplars included, ending in 答案：",
                f"doc_to_choice: {choice}",
                "doc_to_target: gold",
                f"target_delimiter: {_yaml_str(mcq.TARGET_DELIMITER)}",
                "metric_list:",
                "  - metric: acc",
                "    aggregation: mean",
                "    higher_is_better: true",
                "metadata:",
                f"  version: {mcq.PROMPT_VERSION}",
                "",
            ]
        )
        path = out / f"{task}.yaml"
        path.write_text(yaml, encoding="utf-8")
        tasks.append(task)
        written += [data, path]
    if tasks:
        script = out / "run_lm_eval.sh"
        script.write_text(
            lm_eval_command(tasks, out, args, tokenizer_path, max_length) + "\n", encoding="utf-8"
        )
        written.append(script)
    return written


def lm_eval_command(
    tasks: list[str], out: Path, args, tokenizer_path: str | None, max_length: int | None
) -> str:
    base = normalize_api_url(args.api_url) if args.api_url else "http://127.0.0.1:8000/v1"
    model_args = [
        f"model={args.served_model_name or 'MODEL_NAME'}",
        f"base_url={base}/completions",
        f"tokenizer={tokenizer_path or 'PATH_TO_TOKENIZER'}",
        "tokenizer_backend=huggingface",
        "tokenized_requests=False",
        f"max_length={max_length or 2048}",
        "num_concurrent=1",
    ]
    return "\n".join(
        [
            "#!/usr/bin/env bash",
            "# Log-likelihood multiple choice through an OpenAI-compatible /v1/completions endpoint (echo + logprobs).",
            "# NO_PROXY keeps requests to a local server away from any HTTP(S)_PROXY.",
            "set -euo pipefail",
            'export NO_PROXY="127.0.0.1,localhost,::1${NO_PROXY:+,$NO_PROXY}"',
            "lm_eval --model local-completions \\",
            f"  --model_args {shlex.quote(','.join(model_args))} \\",
            f"  --tasks {','.join(tasks)} \\",
            f"  --include_path {shlex.quote(str(out))} \\",
            f'  --output_path {shlex.quote(str(out / "results"))} --log_samples "$@"',
        ]
    )


def evalscope_mcq_row(it: MCQItem) -> dict:
    return {"id": it.id, "question": it.question, **it.options, "answer": it.answer}


def write_evalscope(sets: list[tuple[EvalSet, list[MCQItem]]], out: Path, args) -> list[Path]:
    out = out.resolve()
    written: list[Path] = []
    mcq_subsets, qa_subsets = [], []
    for es, pool in sets:
        subset = _task_name(es.name).removeprefix("mhsft_")
        single = [it for it in es.mcq if not it.multi]
        if len(single) < len(es.mcq):
            get_logger().info(
                f"evalscope export {es.name}: {len(es.mcq) - len(single)} multiple-answer questions left out "
                "(general_mcq scores one answer letter)"
            )
        if single:
            path = out / "mcq" / f"{subset}_val.jsonl"
            _write_jsonl(path, [evalscope_mcq_row(it) for it in single])
            written.append(path)
            dev = [it for it in pool if not it.multi][: max(args.num_fewshot, 0) * 10]
            if args.num_fewshot > 0 and dev:
                path = out / "mcq" / f"{subset}_dev.jsonl"
                _write_jsonl(path, [evalscope_mcq_row(it) for it in dev])
                written.append(path)
            mcq_subsets.append(subset)
        if es.qa:
            path = out / "qa" / f"{subset}.jsonl"
            sys_ = {"system": args.system} if args.system else {}
            _write_jsonl(path, [{**sys_, "query": it.question, "response": it.answer} for it in es.qa])
            written.append(path)
            qa_subsets.append(subset)
    if mcq_subsets or qa_subsets:
        script = out / "run_evalscope.py"
        script.write_text(evalscope_script(out, mcq_subsets, qa_subsets, args), encoding="utf-8")
        written.append(script)
    return written


def evalscope_script(out: Path, mcq_subsets: list[str], qa_subsets: list[str], args) -> str:
    base = normalize_api_url(args.api_url) if args.api_url else "http://127.0.0.1:8000/v1"
    datasets, dargs = [], {}
    if mcq_subsets:
        datasets.append("general_mcq")
        dargs["general_mcq"] = {
            "local_path": str(out / "mcq"),
            "subset_list": mcq_subsets,
            "few_shot_num": args.num_fewshot,
        }
    if qa_subsets:
        datasets.append("general_qa")
        dargs["general_qa"] = {"local_path": str(out / "qa"), "subset_list": qa_subsets}
    return (
        '"""Written by mhsft eval --export evalscope. Run: python run_evalscope.py (pip install evalscope)."""\n'
        "import os\n\n"
        "from evalscope import TaskConfig, run_task\n\n"
        'os.environ["NO_PROXY"] = ",".join(filter(None, ["127.0.0.1,localhost,::1", os.environ.get("NO_PROXY")]))\n'
        "task = TaskConfig(\n"
        f"    model={args.served_model_name or 'MODEL_NAME'!r},\n"
        f"    api_url={base!r},\n"
        '    api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"),\n'
        '    eval_type="openai_api",\n'
        f"    datasets={datasets!r},\n"
        f"    dataset_args={json.dumps(dargs, ensure_ascii=False)},\n"
        f"    generation_config={{'temperature': {args.temperature}, 'max_tokens': {args.max_new_tokens}}},\n"
        f"    work_dir={str(out / 'outputs')!r},\n"
        ")\n"
        "run_task(task_cfg=task)\n"
    )
