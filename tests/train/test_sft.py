"""`mhsft sft` end to end on the tiny model: the users' command, layout, secrets, packing, resume, OOM advice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import DEMO, REPO, read_log, run_sft, swanlab_scalars
from mhsft.cli import main
from mhsft.train import sft

SECRET = "sk-test-NOT-A-REAL-KEY-7f3a9c1e5b"


def test_users_local_file_command_on_cpu(tmp_path, shared_data):
    """The users' third command, with builtin:tiny and SwanLab offline (bf16 dropped), as the README's CPU line
    says, but 6 steps instead of its 20 (every step is the same 32 rows of 3072 tokens: 10 s each on 2 cores) and a
    log line per step."""
    out = tmp_path / "output" / "local-file-run"
    env = {**os.environ, "SWANLAB_API_KEY": SECRET, "SWANLAB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable, "-m", "mhsft", "sft", "--model", "builtin:tiny", "--train_type", "lora",
        "--dataset", str(shared_data / "train" / "emollm_data.json"), "--num_train_epochs", "1",
        "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "4", "--learning_rate", "2e-4",
        "--max_length", "3072", "--packing", "true", "--attn_impl", "flash_attn",
        "--gradient_checkpointing", "true", "--output_dir", str(out), "--report_to", "swanlab",
        "--swanlab_token", SECRET, "--swanlab_project", "mh-sharegpt", "--swanlab_mode", "offline",
        "--swanlab_exp_name", "mh-sft-local-file", "--max_steps", "6", "--logging_steps", "1",
    ]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "flash_attn is not installed" in p.stderr  # one notice line, not an error
    assert SECRET not in p.stdout + p.stderr
    (run,) = [d for d in out.iterdir() if d.name.startswith("v")]
    assert (run / "args.json").is_file() and (run / "logging.jsonl").is_file()
    ckpt = run / "checkpoint-6"
    for name in ("adapter_model.safetensors", "adapter_config.json", "args.json", "trainer_state.json",
                 "optimizer.pt", "tokenizer_config.json"):  # fmt: skip
        assert (ckpt / name).is_file(), name
    args = json.loads((ckpt / "args.json").read_text(encoding="utf-8"))
    assert args["model"] == "builtin:tiny" and args["swanlab_token"] == "***"
    # step lines: one per logging step, with the fields users look for
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("step ")]
    assert len(lines) == 6 and all("tokens/s" in ln and "ETA" in ln for ln in lines)
    logs = read_log(run)
    assert [r["step"] for r in logs] == list(range(1, 7))
    assert sum(r["loss"] for r in logs[-3:]) / 3 < logs[0]["loss"]  # loss goes down
    # no file anywhere under the output holds the key
    for f in out.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
    # the SwanLab run holds the metrics
    metrics = swanlab_scalars(run)
    assert sorted(metrics["loss"]) == [r["step"] for r in logs]
    assert abs(metrics["loss"][6] - logs[-1]["loss"]) < 1e-5


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


def test_a_run_that_ends_before_writing_leaves_no_run_folder(tmp_path, capsys):
    """A dataset that cannot be read ends the run before it wrote anything: no empty vN folder is left behind
    (each retry would add one). A dataset whose every record is rejected keeps its folder: rejects.jsonl says why."""
    out = tmp_path / "o"
    common = [
        "sft",
        "--model",
        "builtin:tiny",
        "--output_dir",
        str(out),
        "--report_to",
        "none",
        "--max_steps",
        "1",
    ]
    assert main([*common, "--dataset", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert not out.exists() or list(out.iterdir()) == []
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n{"bar": 2}\n', encoding="utf-8")
    assert main([*common, "--dataset", str(bad)]) == 2
    (run,) = out.iterdir()
    assert len((run / "rejects.jsonl").read_text(encoding="utf-8").splitlines()) == 2


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


# ----------------------------------------------------------------------------------------------- the run folder's lock
def test_a_running_run_folder_is_locked_and_freed_by_sigkill(tmp_path, capsys):
    """Two processes: while `mhsft sft --add_version false` trains into a folder, a second run into it, an `auto`
    resume and an explicit resume of its checkpoint each stop with one line naming the first process, writing
    nothing; once the first is SIGKILLed, `--resume_from_checkpoint auto` resumes (the OS dropped the lock)."""
    out = tmp_path / "out"
    common = ["--model", "builtin:tiny", "--dataset", DEMO, "--report_to", "none", "--max_length", "128",
              "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1",
              "--gradient_checkpointing", "false", "--output_dir", str(out), "--add_version", "false"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen([sys.executable, "-m", "mhsft", "sft", *common, "--max_steps", "100000",
                                  "--save_steps", "2"], stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint-2" / "trainer_state.json").is_file():
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.1)
        args_before = (out / "args.json").stat().st_mtime_ns
        for extra in (
            [],
            ["--resume_from_checkpoint", "auto"],
            ["--resume_from_checkpoint", str(out / "checkpoint-2")],
        ):
            rc = main(["sft", *common, "--max_steps", "4", *extra])
            err = capsys.readouterr().err
            assert rc == 2, err
            (line,) = [ln for ln in err.splitlines() if "error:" in ln]
            assert f"the run folder {out} is being written by pid {first.pid} on host " in line
            assert "running: mhsft sft --model builtin:tiny" in line and "started 20" in line
        assert (out / "args.json").stat().st_mtime_ns == args_before  # the refused runs wrote nothing
        assert first.poll() is None  # and did not disturb the first
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    newest = max(
        int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file()
    )
    assert main(["sft", *common, "--max_steps", str(newest + 1), "--resume_from_checkpoint", "auto"]) == 0
    assert f"resumed from {out / f'checkpoint-{newest}'} at step {newest}" in capsys.readouterr().err
    assert (out / f"checkpoint-{newest + 1}" / "trainer_state.json").is_file()


# ----------------------------------------------------------------------------------------------- precision
def test_bf16_on_the_cpu_is_said_and_recorded(tmp_path, capsys):
    """`--bf16 true` without a GPU trains the base in bfloat16 as asked, says so in one line, and args.json says
    what each checkpoint holds: LoRA weights in float32 (PEFT's mixed precision), full weights in bfloat16."""
    for train_type, saved in (("lora", "float32"), ("full", "bfloat16")):
        run = run_sft(tmp_path / train_type, "--max_steps", "1", "--bf16", "true", "--train_type", train_type)
        err = capsys.readouterr().err
        assert err.count("no GPU: training on the CPU in bfloat16 as asked") == 1
        assert f"precision: the base model in bfloat16, the trained weights in {saved}" in err
        for args_file in (run / "args.json", run / "checkpoint-1" / "args.json"):
            args = json.loads(args_file.read_text(encoding="utf-8"))
            assert args["dtype"] == "bfloat16" and args["trainable_dtype"] == saved
        (weights,) = run.glob("checkpoint-1/*model.safetensors")
        assert {str(v.dtype).removeprefix("torch.") for v in load_file(str(weights)).values()} == {saved}


# ----------------------------------------------------------------------------------------------- best checkpoint
# A high constant learning rate makes the tiny model's validation loss fall, then rise (overfitting), so that early
# stopping ends the run before max_steps and the best checkpoint is not the last one.
BEST = ["--max_steps", "16", "--save_steps", "2", "--learning_rate", "10", "--lr_scheduler_type", "constant",
        "--warmup_ratio", "0", "--max_grad_norm", "0", "--lora_dropout", "0", "--split_dataset_ratio", "0.2",
        "--per_device_eval_batch_size", "8", "--early_stopping_patience", "2", "--save_total_limit", "1",
        "--load_best_model_at_end", "true", "--logging_steps", "2"]  # fmt: skip


def stable_log(run: Path) -> list[dict]:
    """logging.jsonl without the timings (tokens/s, elapsed, ETA, memory), which differ from run to run."""
    timing = ("tokens_per_s", "elapsed_s", "eta_s", "memory_gib")
    rows = [json.loads(x) for x in (run / "logging.jsonl").read_text(encoding="utf-8").splitlines()]
    return [{k: v for k, v in r.items() if k not in timing} for r in rows]


def patience_counters(evals: list[float]) -> list[int]:
    """transformers' EarlyStoppingCallback counter after each evaluation (threshold 0)."""
    best, counter, out = None, 0, []
    for v in evals:
        counter = 0 if best is None or v < best else counter + 1
        best = v if best is None or v < best else best
        out.append(counter)
    return out


@pytest.fixture(scope="module")
def best_run(tmp_path_factory) -> Path:
    return run_sft(tmp_path_factory.mktemp("best"), *BEST)


def test_best_checkpoint_early_stopping_and_run_folder_downstream(best_run, tmp_path, capsys):
    run = best_run
    rows = [json.loads(x) for x in (run / "logging.jsonl").read_text(encoding="utf-8").splitlines()]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    assert [s for s, _ in evals] == list(range(2, evals[-1][0] + 1, 2))  # every save evaluated
    counters = patience_counters([v for _, v in evals])
    stop = next(s for (s, _), c in zip(evals, counters) if c >= 2)
    assert stop == evals[-1][0] < 16, "the validation loss no longer rises: raise BEST's learning rate"
    best_step = min(evals, key=lambda e: e[1])[0]
    end = rows[-1]
    assert end == {"step": stop, "last_checkpoint": f"checkpoint-{stop}", "best_checkpoint": f"checkpoint-{best_step}",
                   "best_metric": min(v for _, v in evals), "metric_for_best_model": "eval_loss",
                   "final_checkpoint": f"checkpoint-{best_step}", "early_stopped": True}  # fmt: skip
    best = json.loads((run / "best.json").read_text(encoding="utf-8"))
    assert best["best_checkpoint"] == f"checkpoint-{best_step}" and best["metric"] == "eval_loss"
    assert best["value"] == end["best_metric"]
    # --save_total_limit 1 kept the best beside the newest
    assert sorted(p.name for p in run.glob("checkpoint-*")) == sorted(
        {f"checkpoint-{best_step}", f"checkpoint-{stop}"}
    )
    state = json.loads((run / f"checkpoint-{stop}" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == f"checkpoint-{best_step}"
    assert state["early_stopping_patience_counter"] == 2
    # export and infer given the run folder take the best checkpoint and say so
    out = tmp_path / "merged"
    assert main(["export", "--ckpt_dir", str(run), "--output_dir", str(out), "--verify", "false"]) == 0
    err = capsys.readouterr().err
    assert f"{run}: taking its best checkpoint, checkpoint-{best_step} (eval_loss " in err
    meta = json.loads((out / "mhsft_export.json").read_text(encoding="utf-8"))
    assert meta["adapter"] == str((run / f"checkpoint-{best_step}").resolve())
    qa = tmp_path / "q.jsonl"
    qa.write_text(json.dumps({"messages": [{"role": "user", "content": "你好"}]}, ensure_ascii=False) + "\n")
    assert main(["infer", "--adapters", str(run), "--infer_data", str(qa), "--max_new_tokens", "2"]) == 0
    assert list((run / f"checkpoint-{best_step}" / "infer_result").glob("*.jsonl"))


KILL_AFTER_SAVE = """
import os, signal, sys
from mhsft.train import sft
real = sft.save_checkpoint

def save_then_die(*a, **k):
    path = real(*a, **k)
    if path.name == "checkpoint-" + os.environ["KILL_AT"]:
        os.kill(os.getpid(), signal.SIGKILL)  # after the checkpoint, before best.json is brought up to date
    return path

sft.save_checkpoint = save_then_die
from mhsft.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_keeps_best_and_patience(best_run, tmp_path, capsys):
    """A run SIGKILLed right after a checkpoint whose patience counter is 1 resumes with its best and its counter:
    it stops at the same step with the same best, log and adapter as the uninterrupted run (a counter restarted
    from 0 would train on)."""
    rows = [json.loads(x) for x in (best_run / "logging.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    counters = patience_counters([v for _, v in evals])
    kill_at = max(s for (s, _), c in zip(evals[:-1], counters) if c >= 1)
    out = tmp_path / "out"
    argv = ["sft", "--model", "builtin:tiny", "--train_type", "lora", "--dataset", DEMO, "--output_dir", str(out),
            "--report_to", "none", "--max_length", "256", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "1", "--gradient_checkpointing", "false", *BEST]  # fmt: skip
    env = {
        **os.environ,
        "KILL_AT": str(kill_at),
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), *sys.path]),
    }
    p = subprocess.run([sys.executable, "-c", KILL_AFTER_SAVE, *argv], capture_output=True, text=True, env=env,
                       timeout=300)  # fmt: skip
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    (run,) = out.glob("v*")
    assert (run / f"checkpoint-{kill_at}" / "trainer_state.json").is_file()
    assert main([*argv, "--resume_from_checkpoint", "auto"]) == 0
    assert f"resumed from {run / f'checkpoint-{kill_at}'} at step {kill_at}" in capsys.readouterr().err
    assert stable_log(run) == stable_log(best_run)  # losses, evaluations and the end line
    assert json.loads((run / "best.json").read_text()) == json.loads((best_run / "best.json").read_text())
    best = json.loads((run / "best.json").read_text())["best_checkpoint"]
    wa = load_file(str(run / best / "adapter_model.safetensors"))
    wb = load_file(str(best_run / best / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
