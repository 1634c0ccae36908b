"""`mhsft report`: report.md and a self-contained report.html of a run and its evaluations, base vs fine-tuned.

report.py    the verb: inputs -> checks -> HTML and Markdown
contents.py  what a report holds: the run, the evaluations, their comparison with paired bootstrap CIs
checks.py    sample replies, crisis-safety failures, train / eval overlap, warnings
html.py      the HTML page and its figures (CJK fonts embedded)
markdown.py  the Markdown version
"""
