"""mhsft/checkpoint.py: what later stages read from a run, a checkpoint and an export folder."""

from __future__ import annotations

import json

import pytest

from mhsft.checkpoint import (
    BEST_FILE,
    EXPORT_META,
    STATE_FILE,
    adapter_sha256,
    base_model_of,
    choose_checkpoint,
    export_matches,
    list_checkpoints,
    read_best,
    read_checkpoint_args,
    resolve_run_folder,
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


def _complete(run, step):
    ckpt = _adapter(run / f"checkpoint-{step}")
    (ckpt / STATE_FILE).write_text("{}")
    return ckpt


def test_a_run_folder_stands_for_its_best_checkpoint_else_its_newest(tmp_path):
    run = tmp_path / "v0-20260101-000000"
    for step in (2, 4, 6):
        _complete(run, step)
    (run / "checkpoint-8").mkdir()  # incomplete: never chosen
    path, why = resolve_run_folder(run)
    assert path == run / "checkpoint-6" and "no best checkpoint recorded" in why and "checkpoint-6" in why
    (run / BEST_FILE).write_text(
        json.dumps({"best_checkpoint": "checkpoint-4", "metric": "eval_loss", "value": 1.5})
    )
    path, why = resolve_run_folder(run)
    assert path == run / "checkpoint-4" and "best checkpoint, checkpoint-4 (eval_loss 1.5, best.json)" in why
    assert resolve_run_folder(run / "checkpoint-2") == (run / "checkpoint-2", None)  # a checkpoint: as given
    (run / BEST_FILE).write_text(json.dumps({"best_checkpoint": "checkpoint-8"}))
    path, why = choose_checkpoint(run)
    assert path == run / "checkpoint-6" and "not a complete checkpoint" in why
    (run / BEST_FILE).write_text("{}")
    with pytest.raises(UserError, match="not a best-checkpoint record"):
        read_best(run)
    with pytest.raises(UserError, match="is an output folder of training runs: pass one of them"):
        resolve_run_folder(tmp_path)
    with pytest.raises(UserError, match="no complete checkpoint"):
        choose_checkpoint(tmp_path / "empty")


def test_parse_adapters_takes_a_run_folder(tmp_path):
    from mhsft.model import parse_adapters

    run = tmp_path / "v3-20260101-000000"
    _complete(run, 3)
    _complete(run, 6)
    (run / BEST_FILE).write_text(
        json.dumps({"best_checkpoint": "checkpoint-3", "metric": "eval_loss", "value": 2})
    )
    assert parse_adapters([str(run)]) == {"default": str(run / "checkpoint-3")}
    assert parse_adapters([f"ft={run}"]) == {"ft": str(run / "checkpoint-3")}
