"""`mhsft run EXPERIMENT.yaml`: the whole lifecycle from one file, each stage its own process, finished stages
skipped.

run.py   the verb: the stages in order, their state (resume, skip), the judge server
plan.py  the experiment file read and checked, and each stage's command line
"""
