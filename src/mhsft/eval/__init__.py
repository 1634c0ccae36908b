"""`mhsft eval`: exam multiple choice (exact and elastic accuracy), open-QA metrics, counseling dimensions scored
by a judge, and a crisis-safety check, for a model in-process or any OpenAI-compatible endpoint.

evaluate.py    the verb: arguments, every --eval_dataset, results.json and the terminal table
datasets.py    evaluation sets (CPsyExam, PCEB, CMMLU / C-Eval CSV, PsyQA, CPsyCounE, plain JSONL) read into items
runner.py      one set against a target: multiple choice, open QA, counseling turns
predictions.py predictions.jsonl, the resumable log of finished items
targets.py     what is evaluated: a local model or an OpenAI-compatible endpoint (the judge is one too)
mcq.py, qa.py  scoring of multiple choice and open answers, with bootstrap CIs
judge.py       the counseling rubric and the judge's prompts and parsing
safety.py      the lexical crisis check
lm_eval_tasks.py  the same sets as lm-evaluation-harness / EvalScope task files (--export)
"""
