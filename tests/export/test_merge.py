"""`mhsft export`: LoRA merged shard by shard equals base + adapter (PEFT), for our and ms-swift's checkpoints,
tied embeddings, modules_to_save, rsLoRA / rank patterns; refusals; atomic output; the memory bound."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import REPO
from mhsft.cli import main
from mhsft.export import merge_weights
from mhsft.export.merge import EXPORT_META, export_merged, merge_lora
from mhsft.export.merge_verify import verify_budget
from mhsft.utils import UserError

DEMO = str(REPO / "examples" / "data" / "demo_sharegpt.jsonl")


def make_adapter(
    base_dir: Path, out: Path, targets="all-linear", std: float = 0.05, seed: int = 0, **cfg
) -> Path:
    """A LoRA adapter for `base_dir` with random (non-zero) A and B, saved the way PEFT saves it, plus an
    args.json naming the base as mhsft and ms-swift do."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    cfg = {"r": 4, "lora_alpha": 8, **cfg}
    pm = get_peft_model(model, LoraConfig(target_modules=targets, task_type="CAUSAL_LM", **cfg))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * std)
    pm.save_pretrained(str(out))
    (out / "args.json").write_text(
        json.dumps({"model": str(base_dir), "train_type": "lora"}), encoding="utf-8"
    )
    return out


def logits_pair(
    base_dir: Path, adapter: Path, merged: Path
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(base + adapter through PEFT, base alone, merged loaded by transformers alone) on fixed token ids."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 2000, (2, 40), generator=torch.Generator().manual_seed(1))
    ref_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32), str(adapter)
    ).eval()
    with torch.no_grad():
        ref = ref_model(input_ids=ids).logits
        with ref_model.disable_adapter():
            plain = ref_model(input_ids=ids).logits
        got = (
            AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
            .eval()(input_ids=ids)
            .logits
        )
    return ref, plain, got


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory) -> Path:
    """A real `mhsft sft` checkpoint (high LR so that the adapter moves the logits)."""
    out = tmp_path_factory.mktemp("sft")
    argv = ["sft", "--model", "builtin:tiny", "--dataset", DEMO, "--max_steps", "2", "--output_dir", str(out),
            "--report_to", "none", "--max_length", "128", "--learning_rate", "1e-2",
            "--gradient_accumulation_steps", "2"]  # fmt: skip
    assert main(argv) == 0
    (run,) = [p for p in out.iterdir() if p.name.startswith("v")]
    (ckpt,) = list(run.glob("checkpoint-*"))
    return ckpt


def test_users_command_float32_equals_peft_and_loads_alone(sft_checkpoint, tiny_model_dir, tmp_path, capsys):
    """`swift export --ckpt_dir ... --merge_lora true` as users type it: base from the checkpoint, merged logits
    equal base + adapter to 1e-5, and the folder is a plain transformers model with the adapter's tokenizer."""
    out = tmp_path / "export" / "qwen-sft"
    argv = ["export", "--ckpt_dir", str(sft_checkpoint), "--merge_lora", "true", "--merge_dtype", "float32",
            "--output_dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out)
    ref, plain, got = logits_pair(tiny_model_dir, sft_checkpoint, out)
    assert (ref - plain).abs().max() > 1e-2  # the adapter matters, so equality below means something
    assert (got - ref).abs().max() <= 1e-5
    meta = json.loads((out / EXPORT_META).read_text(encoding="utf-8"))
    assert meta["verify"]["max_abs_diff"] <= 1e-5 and meta["verify"]["compute_dtype"] == "float32"
    assert meta["base_model"] == "builtin:tiny" and meta["merge_dtype"] == "float32"
    assert meta["training_args"]["lora_rank"] == 8 and meta["peak_rss_mb"]["merge"] > 0
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["dtype"] == "float32" and config["tie_word_embeddings"] is True
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / f).is_file(), f
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True
    )
    # no temp folder left beside it, only the export's lock file (mhsft.folder_lock)
    assert sorted(p.name for p in out.parent.iterdir()) == [".qwen-sft.lock", "qwen-sft"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_within_tolerance(dtype, tiny_model_dir, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "ad")
    res = export_merged(None, adapter, tmp_path / "out", dtype)
    v = res.meta["verify"]
    assert v["max_abs_diff"] <= v["tolerance"] < v["adapter_effect"]
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        stored = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (not iterable)
    assert stored == {"F16" if dtype == "float16" else "BF16"}
    ref, _, got = logits_pair(tiny_model_dir, adapter, tmp_path / "out")
    assert (got - ref).abs().max() <= v["tolerance"]


def test_multi_shard_base_and_output(tiny_model_dir, tmp_path):
    """A base in several shards with an index; the output sharded too, each shard within max_shard_size."""
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).save_pretrained(
        str(base), max_shard_size="150KB"
    )
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (base / f).write_bytes((tiny_model_dir / f).read_bytes())
    assert len(list(base.glob("model-*.safetensors"))) > 2
    adapter = make_adapter(base, tmp_path / "ad")
    out = merge_lora(str(base), adapter, tmp_path / "out", dtype="float32", max_shard_size="200KB")
    shards = sorted(out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text(encoding="utf-8"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert all(p.stat().st_size < 600_000 for p in shards)  # the embedding alone is 540 KB
    v = json.loads((out / EXPORT_META).read_text(encoding="utf-8"))["verify"]
    assert v["max_abs_diff"] <= 1e-5 < v["adapter_effect"]


def test_ms_swift_checkpoint(tiny_model_dir, tmp_path, capsys):
    """An ms-swift checkpoint: PEFT files, args.json naming `model`, swift's extra files, no tokenizer, and a
    secret in args.json that must not reach the export metadata."""
    ckpt = tmp_path / "output" / "v0-20250820-144506" / "checkpoint-508"
    ckpt.mkdir(parents=True)
    make_adapter(tiny_model_dir, ckpt, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"], r=8, lora_alpha=32)  # fmt: skip
    swift_args = {"model": str(tiny_model_dir), "model_type": "qwen2_5", "train_type": "lora", "lora_rank": 8,
                  "lora_alpha": 32, "hub_token": "ms-0123456789abcdef", "dataset": ["AI-ModelScope/alpaca-gpt4-data-zh#500"],
                  "torch_dtype": "bfloat16"}  # fmt: skip
    (ckpt / "args.json").write_text(json.dumps(swift_args), encoding="utf-8")
    (ckpt / "additional_config.json").write_text(
        '{"lora_dtype": null, "lorap_lr_ratio": null}', encoding="utf-8"
    )
    out = tmp_path / "merged"
    assert main(["export", "--adapters", str(ckpt), "--merge_lora", "true", "--output_dir", str(out)]) == 0
    meta_text = (out / EXPORT_META).read_text(encoding="utf-8")
    meta = json.loads(meta_text)
    assert meta["verify"]["max_abs_diff"] <= 1e-5  # float32: the tiny base's own dtype
    assert meta["tokenizer_from"] == str(tiny_model_dir) and (out / "tokenizer.json").is_file()
    assert "ms-0123456789abcdef" not in meta_text and "hub_token" not in meta["training_args"]
    assert meta["training_args"]["model_type"] == "qwen2_5"


def test_tied_embeddings_untied_when_adapted(tiny_model_dir, tmp_path):
    """LoRA on lm_head and on the embedding of a tied model: PEFT changes each side alone, so the merged model
    gets its own lm_head and tie_word_embeddings=false."""
    adapter = make_adapter(tiny_model_dir, tmp_path / "ad", targets=["embed_tokens", "lm_head", "q_proj"])
    res = export_merged(None, adapter, tmp_path / "out", "float32")
    assert res.meta["untied_embeddings"] and res.meta["verify"]["max_abs_diff"] <= 1e-5
    config = json.loads((tmp_path / "out" / "config.json").read_text(encoding="utf-8"))
    assert config["tie_word_embeddings"] is False
    ref, plain, got = logits_pair(tiny_model_dir, adapter, tmp_path / "out")
    assert (got - ref).abs().max() <= 1e-5 < (ref - plain).abs().max()


def test_modules_to_save_copied(tiny_model_dir, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "ad", targets=["v_proj"], modules_to_save=["lm_head"])
    res = export_merged(None, adapter, tmp_path / "out", "float32")
    assert res.meta["replaced_modules"] == 1 and res.meta["verify"]["max_abs_diff"] <= 1e-5


def test_rslora_and_rank_alpha_patterns(tiny_model_dir, tmp_path):
    """Per-module scale: alpha/sqrt(r) with rsLoRA, ranks and alphas from the patterns."""
    adapter = make_adapter(
        tiny_model_dir, tmp_path / "ad", r=4, lora_alpha=8, use_rslora=True,
        rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 3},
    )  # fmt: skip
    res = export_merged(None, adapter, tmp_path / "out", "float32")
    assert res.meta["verify"]["max_abs_diff"] <= 1e-5 < res.meta["verify"]["adapter_effect"]


def test_wrong_merge_fails_verification_and_writes_nothing(tiny_model_dir, tmp_path, monkeypatch):
    adapter = make_adapter(tiny_model_dir, tmp_path / "ad")
    real = merge_weights.LoraDelta.delta
    monkeypatch.setattr(merge_weights.LoraDelta, "delta", lambda self: real(self) * 2)  # a wrong scale
    with pytest.raises(UserError, match="FAILED, nothing was written"):
        export_merged(None, adapter, tmp_path / "out", "float32")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "ad"]


def test_verify_on_a_layer_subset(tiny_model_dir, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "ad")
    res = export_merged(None, adapter, tmp_path / "out", "float32", verify_layers=1)
    v = res.meta["verify"]
    assert (v["layers_checked"], v["num_layers"]) == (1, 2) and v["max_abs_diff"] <= 1e-5 < v[
        "adapter_effect"
    ]


def test_verify_budget_picks_what_fits(monkeypatch):
    import psutil

    sizes = {"model.embed_tokens.weight": 1000, "model.norm.weight": 10}
    sizes |= {f"model.layers.{i}.mlp.up_proj.weight": 1000 for i in range(10)}  # 11,010 parameters
    cpu = torch.device("cpu")

    def free(n):
        monkeypatch.setattr(psutil, "virtual_memory", lambda: type("V", (), {"available": (n + 1e9) / 0.8})())

    free(11_010 * 4)
    assert verify_budget(sizes, "bfloat16", 10, 0, cpu) == ("float32", 10, None)
    free(11_010 * 2)
    assert verify_budget(sizes, "bfloat16", 10, 0, cpu) == ("bfloat16", 10, None)
    assert verify_budget(sizes, "float16", 10, 0, cpu) == (
        "bfloat16",
        10,
        None,
    )  # CPU float16 matmuls are slow
    free(4_010 * 2)
    dtype, layers, notice = verify_budget(sizes, "bfloat16", 10, 0, cpu)
    assert (dtype, layers) == ("bfloat16", 3) and "first 3 of 10 layers" in notice
    free(500)
    assert verify_budget(sizes, "bfloat16", 10, 0, cpu)[1] == 0


def test_refusals(tiny_model_dir, tmp_path, sft_checkpoint):
    # DoRA
    dora = make_adapter(tiny_model_dir, tmp_path / "dora", targets=["q_proj"], use_dora=True)
    with pytest.raises(UserError, match="DoRA"):
        export_merged(None, dora, tmp_path / "o1", verify=False)
    # a module the base does not have (an adapter for a deeper model)
    from safetensors.torch import load_file, save_file

    deep = make_adapter(tiny_model_dir, tmp_path / "deep", targets=["q_proj"])
    w = load_file(str(deep / "adapter_model.safetensors"))
    w = {k.replace("layers.1.", "layers.7."): v for k, v in w.items()}
    save_file(w, str(deep / "adapter_model.safetensors"))
    with pytest.raises(
        UserError, match=r"model.layers.7.self_attn.q_proj, which the base model does not have"
    ):
        export_merged(None, deep, tmp_path / "o2", verify=False)
    # shapes of another model
    w = {k: torch.zeros(v.shape[0], 3) if "lora_A" in k else v for k, v in load_file(str(dora / "adapter_model.safetensors")).items()}  # fmt: skip
    # (the DoRA file: reuse it as a plain LoRA with wrong widths)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    cfg["use_dora"] = False
    (dora / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({k: v for k, v in w.items() if "magnitude" not in k}, str(dora / "adapter_model.safetensors"))
    with pytest.raises(UserError, match=r"is \(64, 64\) in the base model but \(64, 3\)"):
        export_merged(None, dora, tmp_path / "o3", verify=False)
    # output folder rules, through the CLI (one-line error, exit 2)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    base_argv = ["export", "--ckpt_dir", str(sft_checkpoint), "--verify", "false"]
    assert main([*base_argv, "--output_dir", str(busy)]) == 2
    assert (busy / "keep.txt").is_file()
    assert main([*base_argv, "--output_dir", str(sft_checkpoint)]) == 2
    assert main([*base_argv, "--output_dir", str(sft_checkpoint.parent)]) == 2  # would replace the checkpoint
    # a run folder stands for its newest checkpoint when it recorded no best (no validation set)
    assert (
        main(["export", "--ckpt_dir", str(sft_checkpoint.parent), "--output_dir", str(tmp_path / "o4")]) == 0
    )
    assert json.loads((tmp_path / "o4" / EXPORT_META).read_text())["adapter"] == str(sft_checkpoint.resolve())
    assert main([*base_argv, "--merge_lora", "false"]) == 2
    assert main([*base_argv, "--merge_dtype", "int8", "--output_dir", str(tmp_path / "o5")]) == 2
    assert main([*base_argv, "--output_dir", str(busy), "--overwrite", "true"]) == 0
    assert main(base_argv) == 0  # ms-swift's default output: CKPT-merged beside the checkpoint
    assert (sft_checkpoint.parent / f"{sft_checkpoint.name}-merged" / EXPORT_META).is_file()
    assert not (busy / "keep.txt").exists() and (busy / EXPORT_META).is_file()
    # no temporary folder left; the lock files beside the outputs stay (removing a flock's file is racy)
    assert (
        sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock"))
        == []
    )


def test_interrupted_export_leaves_nothing_complete(tiny_model_dir, tmp_path):
    """Killed (SIGKILL, no cleanup possible) after the weights were written: the output folder does not exist;
    the hidden temp folder is removed by the next export, which then completes."""
    adapter = make_adapter(tiny_model_dir, tmp_path / "ad")
    out = tmp_path / "out"
    code = (
        "import os, signal, sys; import mhsft.export.merge as m\n"
        "m.write_side_files = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        "m.export_merged(None, sys.argv[1], sys.argv[2], 'float32', verify=False)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    p = subprocess.run(
        [sys.executable, "-c", code, str(adapter), str(out)], env=env, capture_output=True, timeout=120
    )
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()[-2000:]
    assert not out.exists()
    (stale,) = [x for x in tmp_path.iterdir() if x.name.startswith(".out.tmp-")]
    assert list(stale.glob("*.safetensors")) and not (stale / EXPORT_META).exists()
    export_merged(None, adapter, out, "float32", verify=False)
    assert (out / EXPORT_META).is_file() and not stale.exists()


def test_merge_lora_reuses_an_identical_export(tiny_model_dir, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "ad")
    out = merge_lora(None, adapter, tmp_path / "out", dtype="float16", verify=False)
    stamp = (out / EXPORT_META).stat().st_mtime_ns
    assert merge_lora(None, adapter, out, dtype="float16", verify=False, reuse=True) == out
    assert (out / EXPORT_META).stat().st_mtime_ns == stamp
    merge_lora(None, adapter, out, dtype="bfloat16", verify=False, reuse=True)  # another dtype: redone
    assert json.loads((out / EXPORT_META).read_text())["merge_dtype"] == "bfloat16"


def test_memory_stays_near_one_shard(tmp_path):
    """A ~230 MB bf16 model in 20 MB shards merges in a fresh process adding well under half the model's size
    to its resident memory (measured: ~35 MB; a whole-model merge would add 230 MB+)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("merge_memory", REPO / "benchmarks" / "merge_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    base, adapter = bench.build(
        "test", tmp_path / "bench", "20MB", "bfloat16", 8
    )  # here: its memory is not measured
    p = subprocess.run(
        [sys.executable, spec.origin, "--_measure", str(base), str(adapter), str(tmp_path / "out"), "20MB", "bfloat16"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["base_bytes"] > 200e6 and r["base_shards"] >= 10 and r["output_shards"] >= 10
    assert r["merge_added_mb"] < r["base_bytes"] / 2e6, json.dumps(r)


def test_an_export_folder_being_written_is_refused(tiny_model_dir, tmp_path, capsys):
    """A second export into the folder another export is writing stops with one line naming it, before it touches
    the first one's temporary folder."""
    from mhsft.export.merge import export_lock_file
    from mhsft.folder_lock import hold

    adapter = make_adapter(tiny_model_dir, tmp_path / "ad")
    out = tmp_path / "out"
    tmp = out.parent / ".out.tmp-first"  # as the running export's temporary folder
    tmp.mkdir()
    with hold(export_lock_file(out), "the export folder"):
        assert (
            main(["export", "--ckpt_dir", str(adapter), "--output_dir", str(out), "--verify", "false"]) == 2
        )
    assert f"the export folder {out} is being written by pid {os.getpid()}" in capsys.readouterr().err
    assert tmp.is_dir() and not out.exists()
