"""`mhsft sft` end to end on the tiny model: the users' command, layout, secrets, packing, resume, OOM advice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import DEMO, REPO, read_log, run_sft, swanlab_scalars
from mhsft.cli import main
from mhsft.train import sft

SECRET = "sk-test-NOT-A-REAL-KEY-7f3a9c1e5b"


def test_users_local_file_command_on_cpu(tmp_path, shared_data):
    """The users' third command, with builtin:tiny, --max_steps 20 and SwanLab offline (bf16 dropped)."""
    out = tmp_path / "output" / "local-file-run"
    env = {**os.environ, "SWANLAB_API_KEY": SECRET, "SWANLAB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable, "-m", "mhsft", "sft", "--model", "builtin:tiny", "--train_type", "lora",
        "--dataset", str(shared_data / "train" / "emollm_data.json"), "--num_train_epochs", "1",
        "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "4", "--learning_rate", "2e-4",
        "--max_length", "3072", "--packing", "true", "--attn_impl", "flash_attn",
        "--gradient_checkpointing", "true", "--output_dir", str(out), "--report_to", "swanlab",
        "--swanlab_token", SECRET, "--swanlab_project", "mh-sharegpt", "--swanlab_mode", "offline",
        "--swanlab_exp_name", "mh-sft-local-file", "--max_steps", "20", "--logging_steps", "2",
    ]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "flash_attn is not installed" in p.stderr  # one notice line, not an error
    assert SECRET not in p.stdout + p.stderr
    (run,) = [d for d in out.iterdir() if d.name.startswith("v")]
    assert (run / "args.json").is_file() and (run / "logging.jsonl").is_file()
    ckpt = run / "checkpoint-20"
    for name in ("adapter_model.safetensors", "adapter_config.json", "args.json", "trainer_state.json",
                 "optimizer.pt", "tokenizer_config.json"):  # fmt: skip
        assert (ckpt / name).is_file(), name
    args = json.loads((ckpt / "args.json").read_text(encoding="utf-8"))
    assert args["model"] == "builtin:tiny" and args["swanlab_token"] == "***"
    # step lines: one per logging step, with the fields users look for
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("step ")]
    assert len(lines) >= 10 and all("tokens/s" in ln and "ETA" in ln for ln in lines)
    logs = read_log(run)
    assert [r["step"] for r in logs] == list(range(2, 21, 2))
    assert sum(r["loss"] for r in logs[-3:]) / 3 < logs[0]["loss"]  # loss goes down
    # no file anywhere under the output holds the key
    for f in out.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
    # the SwanLab run holds the metrics
    metrics = swanlab_scalars(run)
    assert sorted(metrics["loss"]) == [r["step"] for r in logs]
    assert abs(metrics["loss"][20] - logs[-1]["loss"]) < 1e-5


def test_lora_changes_adapter_and_freezes_base(tmp_path, tiny_model_dir):
    run = run_sft(tmp_path, "--max_steps", "3", "--save_steps", "2", "--save_total_limit", "1")
    ckpts = sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-"))
    assert ckpts == ["checkpoint-3"]  # limit 1 keeps only the newest
    adapter = load_file(str(run / "checkpoint-3" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)  # B starts at zero; training moved it
    cfg = json.loads((run / "checkpoint-3" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 32 and abs(cfg["lora_dropout"] - 0.05) < 1e-9
    assert "lm_head" not in json.dumps(cfg["target_modules"])
    # base weights frozen: reload base + adapter and compare the base tensors with the original files
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = load_file(str(tiny_model_dir / "model.safetensors"))
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "checkpoint-3"
    )
    merged_keys = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                   for k, v in model.state_dict().items() if "lora_" not in k}  # fmt: skip
    for k, v in base.items():
        assert torch.equal(merged_keys[k], v), k


def test_packed_step_equals_unpacked_step(tmp_path):
    """One optimizer step over the same samples, packed and unpacked, moves the LoRA weights identically."""
    common = ["--max_steps", "1", "--lora_dropout", "0", "--gradient_accumulation_steps", "64",
              "--dataset", DEMO + "#12", "--warmup_ratio", "0"]  # fmt: skip
    a = run_sft(tmp_path / "a", *common, "--packing", "false")
    b = run_sft(tmp_path / "b", *common, "--packing", "true")
    wa = load_file(str(a / "checkpoint-1" / "adapter_model.safetensors"))
    wb = load_file(str(b / "checkpoint-1" / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5)
    la, lb = read_log(a)[0]["loss"], read_log(b)[0]["loss"]
    assert abs(la - lb) < 1e-5


def test_resume_after_kill_matches_uninterrupted(tmp_path, monkeypatch):
    common = ["--max_steps", "8", "--save_steps", "3", "--packing", "true", "--dataset", DEMO + "#24"]
    full = read_log(run_sft(tmp_path / "full", *common))

    real_save = sft.save_checkpoint

    class Killed(Exception):
        pass

    def save_then_die(*a, **k):
        path = real_save(*a, **k)
        if path.name == "checkpoint-3":
            raise Killed  # as if the process were killed right after this checkpoint
        return path

    monkeypatch.setattr(sft, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        run_sft(tmp_path / "resumed", *common)
    monkeypatch.setattr(sft, "save_checkpoint", real_save)
    run = run_sft(tmp_path / "resumed", *common, "--resume_from_checkpoint", "auto")
    resumed = read_log(run)
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    for x, y in zip(full, resumed):
        assert abs(x["loss"] - y["loss"]) < 1e-6, (x, y)


def test_interrupted_checkpoint_write_leaves_no_checkpoint(tmp_path):
    from mhsft.checkpoint import list_checkpoints
    from mhsft.train.checkpointing import atomic_checkpoint

    run = tmp_path / "run"
    run.mkdir()

    def half_write(tmp: Path):
        (tmp / "adapter_model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_checkpoint(run, 5, half_write)
    assert not (run / "checkpoint-5").exists() and list_checkpoints(run) == []


def test_oom_becomes_advice(tmp_path, monkeypatch, capsys):
    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(sft, "run_loop", boom)
    rc = main(["sft", "--model", "builtin:tiny", "--dataset", DEMO, "--output_dir", str(tmp_path),
               "--report_to", "none", "--max_steps", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert "per_device_train_batch_size" in err and "gradient_accumulation_steps" in err and "zero3" in err
    assert "Traceback" not in err


def test_cloud_swanlab_without_key_fails_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SWANLAB_API_KEY", raising=False)
    monkeypatch.setenv("SWANLAB_ROOT", str(tmp_path / "no-login"))
    rc = main(["sft", "--model", "builtin:tiny", "--dataset", DEMO, "--output_dir", str(tmp_path / "o"),
               "--report_to", "swanlab", "--swanlab_mode", "cloud", "--max_steps", "1"])  # fmt: skip
    assert rc == 2 and "SWANLAB_API_KEY" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_full_fine_tuning_and_validation_split(tmp_path):
    run = run_sft(tmp_path, "--train_type", "full", "--max_steps", "2", "--split_dataset_ratio", "0.2",
                  "--eval_steps", "1", "--learning_rate", "1e-4")  # fmt: skip
    assert (run / "checkpoint-2" / "model.safetensors").is_file()
    lines = [json.loads(x) for x in (run / "logging.jsonl").read_text().splitlines()]
    assert any("eval_loss" in x for x in lines)


def test_ms_swift_flag_renames_and_adapter_continuation(tmp_path):
    first = run_sft(tmp_path / "a", "--tuner_type", "lora", "--max_steps", "1")
    # an ms-swift style checkpoint: adapter files plus args.json naming the base model under `model`
    ckpt = first / "checkpoint-1"
    (ckpt / "trainer_state.json").unlink()
    (ckpt / "args.json").write_text(json.dumps({"model": "builtin:tiny", "train_type": "lora"}))
    out = tmp_path / "b"
    assert main(["sft", "--adapters", str(ckpt), "--dataset", DEMO, "--output_dir", str(out),
                 "--report_to", "none", "--max_steps", "1", "--max_length", "256"]) == 0  # fmt: skip
    (run,) = [p for p in out.iterdir() if p.name.startswith("v")]
    assert json.loads((run / "args.json").read_text())["model"] == "builtin:tiny"


def test_ddp_two_processes_equal_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo) x 2 micro-batches == 1 process x 4: same global batch, same update."""
    common = ["-m", "mhsft", "sft", "--model", "builtin:tiny", "--dataset", DEMO + "#16", "--max_steps", "2",
              "--report_to", "none", "--packing", "true", "--max_length", "256", "--lora_dropout", "0",
              "--per_device_train_batch_size", "1", "--learning_rate", "1e-3"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
    ]
    p = subprocess.run([*torchrun, *common, "--gradient_accumulation_steps", "2", "--output_dir", str(tmp_path / "ddp")],
                       capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    q = subprocess.run([sys.executable, *common, "--gradient_accumulation_steps", "4", "--output_dir",
                        str(tmp_path / "one")], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert q.returncode == 0, q.stderr[-3000:]
    (a,) = (tmp_path / "ddp").glob("v*/checkpoint-2/adapter_model.safetensors")
    (b,) = (tmp_path / "one").glob("v*/checkpoint-2/adapter_model.safetensors")
    wa, wb = load_file(str(a)), load_file(str(b))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


DS_SHIM = """
import sys

import accelerate
from accelerate.utils import InitProcessGroupKwargs

_init = accelerate.Accelerator.__init__


def init(self, *a, **k):  # mhsft passes cpu=True without a GPU, which makes accelerate skip DeepSpeed
    if k.get("deepspeed_plugin") is not None:
        k.update(cpu=False, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    _init(self, *a, **k)


accelerate.Accelerator.__init__ = init
from mhsft.cli import main

sys.exit(main())
"""


def test_deepspeed_zero2_zero3_equal_ddp(tmp_path):
    """`--deepspeed zero2|zero3` on 2 CPU processes (gloo; accelerate pushed onto its DeepSpeed path by a shim) with
    gradient accumulation: same adapter as DDP. Needs the deepspeed package (not installed on CI)."""
    pytest.importorskip("deepspeed")
    shim = tmp_path / "shim.py"
    shim.write_text(DS_SHIM, encoding="utf-8")
    common = ["sft", "--model", "builtin:tiny", "--dataset", DEMO + "#16", "--max_steps", "2", "--report_to", "none",
              "--packing", "true", "--max_length", "256", "--lora_dropout", "0", "--per_device_train_batch_size", "1",
              "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3"]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), *sys.path]),
    }
    adapters = {}
    for i, mode in enumerate(("ddp", "zero2", "zero3")):
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", str(29527 + i)]  # fmt: skip
        entry = ["-m", "mhsft"] if mode == "ddp" else [str(shim)]
        extra = [] if mode == "ddp" else ["--deepspeed", mode]
        p = subprocess.run([*torchrun, *entry, *common, *extra, "--output_dir", str(tmp_path / mode)],
                           capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
        assert p.returncode == 0, p.stderr[-3000:]
        (f,) = (tmp_path / mode).glob("v*/checkpoint-2/adapter_model.safetensors")
        adapters[mode] = load_file(str(f))
        log = [
            json.loads(x) for x in next((tmp_path / mode).glob("v*/logging.jsonl")).read_text().splitlines()
        ]
        assert all(r["grad_norm"] is not None for r in log if "loss" in r)
    for mode in ("zero2", "zero3"):
        assert adapters[mode].keys() == adapters["ddp"].keys()
        for k, v in adapters["ddp"].items():
            torch.testing.assert_close(adapters[mode][k], v, rtol=0, atol=1e-6)
