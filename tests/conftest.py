"""Shared fixtures: the real data in ../shared/data (skipped with a reason when absent) and the tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import REPO

# Triton's interpreter runs the fused LoRA kernels on CPU tensors (tests/test_fused_lora.py); it must be chosen
# before triton is imported. mhsft only takes the fused path on the CPU when a test asks for it.
if os.environ.get("MHSFT_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
SHARED_DATA = Path(os.environ.get("MHSFT_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keep the tiny model cache inside the test session unless the caller pinned one (CI reuses it)."""
    if "MHSFT_CACHE" not in os.environ:
        os.environ["MHSFT_CACHE"] = str(tmp_path_factory.mktemp("mhsft_cache"))
    os.environ.setdefault("SWANLAB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield


@pytest.fixture
def fused_on_device(monkeypatch):
    """The fused LoRA path where the tests run: on the CPU under Triton's interpreter (switched on above), else
    compiled on MHSFT_TEST_DEVICE."""
    from mhsft.train import fused_lora
    from tiny import DEVICE

    monkeypatch.setattr(fused_lora, "on_cpu", DEVICE == "cpu")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"needs the real data in {SHARED_DATA} (the project's ../shared/data), not present in this clone"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """Path of the built-in tiny model (built once per session)."""
    from mhsft.builtin import resolve_model

    return Path(resolve_model("builtin:tiny"))


@pytest.fixture
def caplog(caplog):
    """pytest's caplog, also fed by mhsft's logger. That logger does not propagate to the root (its own stderr
    handler would print each line twice), so pytest's handler on the root sees its records only where no test
    before had configured it: a test asserting on them passed or failed with the order the suite ran in."""
    from mhsft.utils import get_logger

    logger = (
        get_logger()
    )  # configured here, so propagation is off in every test alike (no record counted twice)
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)
