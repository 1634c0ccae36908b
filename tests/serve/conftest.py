"""What the serving tests share: a LoRA adapter trained for two steps on the tiny model, and it loaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import REPO

DEVICE = os.environ.get("MHSFT_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def adapter(tmp_path_factory) -> Path:
    from mhsft.cli import main

    out = tmp_path_factory.mktemp("sft")
    rc = main(
        ["sft", "--model", "builtin:tiny", "--dataset", str(REPO / "examples/data/demo_sharegpt.jsonl"),
         "--max_steps", "2", "--output_dir", str(out), "--report_to", "none", "--max_length", "256",
         "--learning_rate", "1e-2"]
    )  # fmt: skip
    assert rc == 0
    return next(out.glob("v*/checkpoint-2"))


@pytest.fixture(scope="session")
def loaded(adapter):
    from mhsft.model import load_for_inference

    # MHSFT_TEST_DEVICE=cuda runs the engine tests on a GPU: CUDA graphs, pinned copies and events included
    return load_for_inference(None, [f"a={adapter}"], device=DEVICE)
