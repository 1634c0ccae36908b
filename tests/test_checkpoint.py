"""mhsft/checkpoint.py: what later stages read from a run, a checkpoint and an export folder."""

from __future__ import annotations

import json

import pytest

from mhsft.checkpoint import (
    EXPORT_META,
    STATE_FILE,
    adapter_sha256,
    base_model_of,
    export_matches,
    list_checkpoints,
    read_checkpoint_args,
)
from mhsft.utils import UserError


def _adapter(path, weights=b"w"):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": 8, "base_model_name_or_path": "peft/base"}))
    (path / "adapter_model.safetensors").write_bytes(weights)
    return path


def test_list_checkpoints_only_complete_ones_in_step_order(tmp_path):
    for step in (10, 9, 100):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / STATE_FILE).write_text("{}")
    (tmp_path / "checkpoint-11").mkdir()  # no state file: still being written, or killed mid-write
    (tmp_path / ".tmp-checkpoint-12-x").mkdir()
    (tmp_path / "checkpoint-x").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10", "checkpoint-100"]
    assert list_checkpoints(tmp_path / "missing") == []


def test_checkpoint_args_and_base_model(tmp_path):
    run = tmp_path / "v0-20260101-000000"
    ckpt = _adapter(run / "checkpoint-5")
    assert base_model_of(ckpt) == "peft/base"  # nothing but PEFT's config
    (run / "args.json").write_text(json.dumps({"model": "Qwen/Qwen2.5-7B-Instruct", "lora_rank": 8}))
    assert read_checkpoint_args(ckpt)["lora_rank"] == 8  # the run's args.json
    assert base_model_of(ckpt) == "Qwen/Qwen2.5-7B-Instruct"
    (ckpt / "args.json").write_text(json.dumps({"model": "own/model"}))  # a checkpoint's own wins (ms-swift)
    assert base_model_of(ckpt) == "own/model"
    (ckpt / "args.json").write_text("{not json")
    with pytest.raises(UserError, match="args.json"):
        read_checkpoint_args(ckpt)
    assert base_model_of(tmp_path / "nothing") is None


def test_adapter_identity_and_export_reuse(tmp_path):
    a = _adapter(tmp_path / "a")
    b = _adapter(tmp_path / "b", weights=b"other")
    assert adapter_sha256(a) == adapter_sha256(_adapter(tmp_path / "a2")) != adapter_sha256(b)
    out = tmp_path / "merged"
    assert not export_matches(out, a, None, None)  # nothing exported yet
    out.mkdir()
    meta = {"adapter_sha256": adapter_sha256(a), "merge_dtype": "float16", "base_model": "base"}
    (out / EXPORT_META).write_text(json.dumps(meta))
    assert export_matches(out, a, None, None) and export_matches(out, a, "float16", "base")
    assert not export_matches(out, b, None, None)
    assert not export_matches(out, a, "bfloat16", None)
    assert not export_matches(out, a, None, "another/base")
    (a / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="adapter_model.safetensors"):
        adapter_sha256(a)
