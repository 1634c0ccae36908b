"""mhsft/utils.py: secret hygiene."""

from __future__ import annotations

import pytest

from mhsft.utils import MASK, is_secret_name, redact_args, redact_argv, scrub


@pytest.mark.parametrize(
    "name,secret",
    [("--swanlab_token", True), ("hub_token", True), ("--api_key", True), ("judge_api_key", True),
     ("SWANLAB_API_KEY", True), ("--hf-token", True), ("max_new_tokens", False), ("tokenizer", False),
     ("--mcq_max_new_tokens", False), ("loss_chunk_size", False)],
)  # fmt: skip
def test_secret_names(name, secret):
    assert is_secret_name(name) is secret


def test_redact_argv_and_scrub():
    argv = ["sft", "--swanlab_token", "abcd1234secret", "--max_new_tokens", "1024", "--api_key=k-99887766"]
    out = redact_argv(argv)
    assert out == ["sft", "--swanlab_token", MASK, "--max_new_tokens", "1024", f"--api_key={MASK}"]
    assert scrub("key abcd1234secret and k-99887766 and 1024") == f"key {MASK} and {MASK} and 1024"


def test_redact_args_nested():
    d = redact_args({"swanlab_token": "zzzz9999", "max_new_tokens": 512, "judge": {"api_key": "qqqq1111"}})
    assert d == {"swanlab_token": MASK, "max_new_tokens": 512, "judge": {"api_key": MASK}}
