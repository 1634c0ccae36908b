#!/usr/bin/env bash
# `make demo`: the whole workflow in one command, `mhsft run examples/demo.yaml`, on the built-in tiny model
# (built locally, no download) and the demo data in examples/data: data check and split, a short LoRA run,
# merge, evaluation of the base and the fine-tuned model (multiple choice, open QA, counseling turns scored by a
# judge that `mhsft deploy` serves on a loopback port), a blind review study for two raters (its links printed; the
# demo does not wait for them), and the report. A few minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
EXP=output/demo
echo "mhsft demo: builtin:tiny has random weights. Everything below runs for real, but the text it writes is"
echo "meaningless and its scores are noise: the demo shows the workflow, not a counseling model."
echo
.venv/bin/mhsft run examples/demo.yaml "$@"
echo
echo "What the experiment left in $EXP/:"
echo "  data/       clean.jsonl, train.jsonl, test_dialogues.jsonl (held out), stats.json, rejects.jsonl (if any)"
echo "  sft/        the LoRA run: args.json, logging.jsonl, checkpoint-N/"
echo "  export/     merged/: the adapter merged into the base model (a plain transformers model)"
echo "  eval/       base/ and finetuned/: results.json + predictions.jsonl each"
echo "  review/     study.db + links.txt: a blind side-by-side study of both evaluations for raters a and b"
echo "  report/     report.html (one file, works offline), report.md, figures/"
echo
echo "Open the report:  $EXP/report/report.html"
echo "Rate the replies: .venv/bin/mhsft review serve $EXP/review   (then open a link from $EXP/review/links.txt)"
echo "Run again: finished stages are skipped.  Redo from one stage:  .venv/bin/mhsft run examples/demo.yaml --from sft"
echo "Reminder: builtin:tiny is a random 0.25M-parameter model; its replies are meaningless by design."
