"""`mhsft eval`: exam multiple choice (exact and elastic accuracy), open-QA metrics, counseling dimensions scored
by a judge, and a crisis-safety check, for a model in-process or any OpenAI-compatible endpoint."""

from __future__ import annotations


def main(argv: list[str]) -> int:
    from mhsft.eval.cli import main as _main

    return _main(argv)
