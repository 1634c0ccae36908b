"""`mhsft upload`: the model card (training arguments, evaluation, safety notice, no secret), the dry run, and
both hubs up to their client's boundary (client methods replaced: no test touches the network)."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
from modelscope.hub import api as ms_api
from modelscope.hub.constants import ModelVisibility

from helpers import REPO
from mhsft.cli import main
from mhsft.export import merge, upload
from mhsft.export.modelcard import build_card, public_args

DEMO = str(REPO / "examples" / "data" / "demo_sharegpt.jsonl")
SFT_SECRETS = ("ms-SFT-hub-token-0123456789", "sk-SFT-swanlab-0123456789")
ENV_SECRETS = {"MODELSCOPE_API_TOKEN": "ms-ENV-token-abcdef987654", "HF_TOKEN": "hf_ENVtokenABCDEF987654"}


@pytest.fixture(autouse=True)
def hub_tokens(monkeypatch):
    for k, v in ENV_SECRETS.items():
        monkeypatch.setenv(k, v)
    from mhsft.utils import register_env_secrets

    register_env_secrets()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """`mhsft sft` given secret flags, then `mhsft export` of its checkpoint."""
    out = tmp_path_factory.mktemp("run")
    argv = ["sft", "--model", "builtin:tiny", "--dataset", DEMO, "--max_steps", "1", "--output_dir", str(out / "o"),
            "--report_to", "none", "--max_length", "128", "--gradient_accumulation_steps", "1",
            "--hub_token", SFT_SECRETS[0], "--swanlab_token", SFT_SECRETS[1]]  # fmt: skip
    assert main(argv) == 0
    (ckpt,) = (out / "o").glob("v*/checkpoint-*")
    assert (
        main(["export", "--ckpt_dir", str(ckpt), "--output_dir", str(out / "export"), "--verify", "false"])
        == 0
    )
    return out / "export"


def snapshot(d: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in d.iterdir()}


def test_dry_run_prints_files_and_a_card_with_training_args_and_no_secret(exported, capsys):
    before = snapshot(exported)
    argv = ["upload", "--model_dir", str(exported), "--hub", "modelscope", "--model_id", "me/qwen-sft-tiny",
            "--dry_run", "true"]  # fmt: skip
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert snapshot(exported) == before  # nothing written
    assert "would upload 9 files" in out and "model.safetensors" in out and "  README.md" in out
    card = out.split("----- README.md (generated) -----", 1)[1]
    assert card.startswith("\n---\nlicense: other\n")
    for needle in ("| lora_rank | 8 |", "| learning_rate | 0.0001 |", "| max_steps | 1 |", "demo_sharegpt.jsonl",
                   "base model", "不能替代专业的心理咨询", "not a substitute for professional counseling",
                   "builtin:tiny", "Merged in `float32`"):  # fmt: skip
        assert needle in card, needle
    for secret in (*SFT_SECRETS, *ENV_SECRETS.values()):
        assert secret not in out + err
    assert "swanlab_token" not in card and "hub_token" not in card
    assert "warning" not in err  # the export folder itself passes the secret scan


def test_upload_to_huggingface_through_the_client(exported, tmp_path, monkeypatch, capsys):
    import shutil

    d = tmp_path / "model"
    shutil.copytree(exported, d)
    (d / ".cache").mkdir()
    (d / ".cache" / "junk").write_text("x")
    calls = {}

    def create_repo(self, repo_id, **kw):
        calls["create"] = (repo_id, kw, self.token)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kw):
        calls["upload"] = kw
        calls["card"] = (Path(kw["folder_path"]) / "README.md").read_text(encoding="utf-8")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    argv = ["upload", "--model_dir", str(d), "--hub", "huggingface", "--model_id", "me/qwen-sft-tiny",
            "--private", "true", "--commit_message", "first"]  # fmt: skip
    assert main(argv) == 0
    out, err = capsys.readouterr()
    repo_id, kw, token = calls["create"]
    assert (repo_id, kw["private"], kw["exist_ok"], token) == (
        "me/qwen-sft-tiny",
        True,
        True,
        ENV_SECRETS["HF_TOKEN"],
    )
    up = calls["upload"]
    assert (
        up["repo_id"] == "me/qwen-sft-tiny"
        and up["folder_path"] == str(d)
        and up["commit_message"] == "first"
    )
    assert "README.md" in up["allow_patterns"] and "model.safetensors" in up["allow_patterns"]
    assert not any(".cache" in p for p in up["allow_patterns"])
    assert (
        "| lora_rank | 8 |" in calls["card"]
        and (d / "README.md").read_text(encoding="utf-8") == calls["card"]
    )
    assert out.strip() == "https://huggingface.co/me/qwen-sft-tiny"
    assert ENV_SECRETS["HF_TOKEN"] not in out + err and "token from HF_TOKEN" in err


def test_upload_to_modelscope_through_the_client(exported, tmp_path, monkeypatch, capsys):
    import shutil

    d = tmp_path / "model"
    shutil.copytree(exported, d)
    (d / "README.md").write_text("# my own card\n", encoding="utf-8")  # kept as it is
    calls = {}
    monkeypatch.setattr(ms_api.HubApi, "login", lambda self, token: calls.setdefault("login", token))
    monkeypatch.setattr(
        ms_api.HubApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("create", (repo_id, kw))
    )
    monkeypatch.setattr(ms_api.HubApi, "upload_folder", lambda self, **kw: calls.setdefault("upload", kw))
    argv = ["upload", "--model_dir", str(d), "--model_id", "me/qwen-sft-tiny", "--hub_private_repo", "true",
            "--hub_token", "ms-FLAG-token-5555555555"]  # fmt: skip
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert calls["login"] == "ms-FLAG-token-5555555555"  # the flag wins over MODELSCOPE_API_TOKEN
    repo_id, kw = calls["create"]
    assert repo_id == "me/qwen-sft-tiny" and kw["visibility"] == ModelVisibility.PRIVATE and kw["exist_ok"]
    assert calls["upload"]["repo_id"] == "me/qwen-sft-tiny" and calls["upload"]["folder_path"] == str(d)
    assert (d / "README.md").read_text(encoding="utf-8") == "# my own card\n"
    assert out.strip() == "https://modelscope.cn/models/me/qwen-sft-tiny"
    assert "ms-FLAG-token-5555555555" not in out + err


def test_ms_swift_folder_with_raw_secrets(tmp_path, monkeypatch, capsys):
    """ms-swift's args.json may hold a token in clear: the card drops it, and a real upload refuses the folder."""
    d = tmp_path / "swift-merged"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "qwen2"}', encoding="utf-8")
    raw = "ms-RAW-swift-token-777777777"
    args = {"model": "Qwen/Qwen2.5-7B-Instruct", "lora_rank": 8, "hub_token": raw, "learning_rate": 1e-4,
            "dataset": ["AI-ModelScope/alpaca-gpt4-data-zh#500", "/home/alice/data/private.jsonl"],
            "command": f"swift sft --model Qwen/Qwen2.5-7B-Instruct --hub_token {raw} --lora_rank 8"}  # fmt: skip
    (d / "args.json").write_text(json.dumps(args), encoding="utf-8")
    assert main(["upload", "--model_dir", str(d), "--model_id", "me/x", "--dry_run", "true"]) == 0
    out, err = capsys.readouterr()
    assert raw not in out + err
    assert (
        "base_model: Qwen/Qwen2.5-7B-Instruct" in out
        and "datasets:\n- AI-ModelScope/alpaca-gpt4-data-zh" in out
    )
    data = out.split("## 基础模型与训练数据", 1)[1].split("##", 1)[0]
    assert "- Dataset: `private.jsonl` (local file" in data and "/home/alice" not in data
    assert "--hub_token '***'" in out or "--hub_token ***" in out
    assert "args.json: secret field(s) with a value: hub_token" in err
    called = []
    monkeypatch.setattr(ms_api.HubApi, "create_repo", lambda *a, **k: called.append(1))
    assert main(["upload", "--model_dir", str(d), "--model_id", "me/x"]) == 2
    err = capsys.readouterr().err
    assert "refusing to upload: args.json" in err and raw not in err and not called
    assert not (d / "README.md").exists()


def test_env_token_value_in_a_file_is_refused(exported, tmp_path, monkeypatch, capsys):
    import shutil

    d = tmp_path / "model"
    shutil.copytree(exported, d)
    (d / "notes.txt").write_text(f"token={ENV_SECRETS['HF_TOKEN']}\n", encoding="utf-8")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda *a, **k: pytest.fail("must not upload"))
    assert main(["upload", "--model_dir", str(d), "--hub", "hf", "--model_id", "me/x"]) == 2
    err = capsys.readouterr().err
    assert "notes.txt: holds the value of a token" in err and ENV_SECRETS["HF_TOKEN"] not in err


def test_client_error_is_one_line_without_the_token(exported, tmp_path, monkeypatch, capsys):
    import shutil

    d = tmp_path / "model"
    shutil.copytree(exported, d)

    def boom(self, repo_id, **kw):
        raise RuntimeError(f"401 Unauthorized: invalid token {self.token}\nmore detail")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", boom)
    assert main(["upload", "--model_dir", str(d), "--use_hf", "true", "--model_id", "me/x"]) == 2
    err = capsys.readouterr().err
    assert "upload to Hugging Face failed: 401 Unauthorized: invalid token ***" in err
    assert ENV_SECRETS["HF_TOKEN"] not in err and "Traceback" not in err and "more detail" not in err


def test_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "notmodel").mkdir()
    cases = [
        (["--model_dir", str(tmp_path / "missing"), "--model_id", "me/x"], "no such folder"),
        (["--model_dir", str(tmp_path / "notmodel"), "--model_id", "me/x"], "not a model folder"),
        (["--model_id", "me/x"], "give --model_dir"),
    ]
    for argv, why in cases:
        assert main(["upload", *argv]) == 2
        assert why in capsys.readouterr().err
    (tmp_path / "notmodel" / "config.json").write_text("{}")
    for argv, why in [
        (["--model_id", "no-slash"], "ORG/NAME"),
        (["--model_id", "me/x", "--hub", "github"], "--hub"),
    ]:
        assert main(["upload", "--model_dir", str(tmp_path / "notmodel"), *argv]) == 2
        assert why in capsys.readouterr().err


def test_checkpoint_upload_skips_training_state_and_replaces_peft_template(exported, tmp_path):
    meta = json.loads((exported / "mhsft_export.json").read_text(encoding="utf-8"))
    ckpt = Path(meta["adapter"])
    assert (ckpt / "optimizer.pt").is_file() and "Model Card for Model ID" in (ckpt / "README.md").read_text()
    plan = upload.plan_upload(ckpt, "hf", "me/adapter")
    assert "optimizer.pt" not in plan.files and "rng_state.pt" not in plan.files
    assert "adapter_model.safetensors" in plan.files and plan.card_is_new
    assert "library_name: peft" in plan.card and "| lora_rank | 8 |" in plan.card


def test_eval_results_found_near_the_run(exported, tmp_path, monkeypatch):
    """`mhsft eval` writes eval_output/NAME-HASH/results.json naming the model: the card shows its metrics."""
    meta = json.loads((exported / "mhsft_export.json").read_text(encoding="utf-8"))
    mine, other = tmp_path / "eval_output" / "tiny-1234", tmp_path / "eval_output" / "base-9999"
    mine.mkdir(parents=True)
    other.mkdir()
    metrics = {"cpsyexam": {"multiple_choice": {"accuracy": 0.4321, "n": 50}}}
    (mine / "results.json").write_text(json.dumps({"model": "builtin:tiny", "adapter": meta["adapter"],
                                                   "metrics": metrics}))  # fmt: skip
    (other / "results.json").write_text(json.dumps({"model": "builtin:tiny", "adapter": None,
                                                    "metrics": {"x": {"accuracy": 0.9999}}}))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    card = build_card(exported)
    assert "| cpsyexam.multiple_choice.accuracy | 0.4321 |" in card and "0.9999" not in card
    explicit = build_card(exported, eval_results=[str(other / "results.json")])
    assert "0.9999" in explicit


def test_public_args_drop_secrets():
    d = {"hub_token": "abc-secret-1", "max_new_tokens": 512, "nested": {"api_key": "k-1234567"}, "lr": 1e-4,
         "command": "mhsft sft --swanlab_token=sk-zzzzzzzz --lr 1"}  # fmt: skip
    p = public_args(d)
    assert p == {
        "max_new_tokens": 512,
        "nested": {},
        "lr": 1e-4,
        "command": "mhsft sft '--swanlab_token=***' --lr 1",
    }


def test_export_push_to_hub_calls_upload(exported, tmp_path, monkeypatch):
    meta = json.loads((exported / "mhsft_export.json").read_text(encoding="utf-8"))
    seen = {}
    monkeypatch.setattr(merge, "publish", lambda path, **kw: seen.update(kw, path=path))
    argv = ["export", "--ckpt_dir", meta["adapter"], "--output_dir", str(tmp_path / "o"), "--verify", "false",
            "--push_to_hub", "true", "--hub_model_id", "me/x", "--use_hf", "true", "--hub_private_repo", "true"]  # fmt: skip
    assert main(argv) == 0
    assert seen["path"] == tmp_path / "o" and seen["hub"] == "huggingface" and seen["model_id"] == "me/x"
    assert seen["private"] is True
