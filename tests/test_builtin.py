"""The built-in tiny model, its tokenizer and chat template, model loading, and the demo data files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO
from mhsft import builtin
from mhsft.builtin import QWEN25_CHAT_TEMPLATE, demo_corpus_path, ensure_tiny, resolve_model
from mhsft.utils import UserError

EXAMPLES = REPO / "examples" / "data"


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _hashes(d: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(d).iterdir()) if p.is_file()
    }


# --- resolve / cache -------------------------------------------------------------------------------------


def test_resolve_leaves_other_names_alone():
    for name in ("Qwen/Qwen2.5-7B-Instruct", "./out/checkpoint-10", "/abs/dir"):
        assert resolve_model(name) == name


def test_unknown_builtin_is_a_user_error():
    with pytest.raises(UserError, match="builtin:tiny"):
        resolve_model("builtin:huge")


def test_tiny_is_cached_in_a_versioned_folder(tiny_model_dir, monkeypatch):
    from mhsft.utils import cache_dir

    assert tiny_model_dir.parent == cache_dir() / "builtin"
    assert tiny_model_dir.name == f"tiny-{builtin.recipe_hash()}"

    def boom(out):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(builtin, "build_tiny", boom)
    assert resolve_model("builtin:tiny") == str(tiny_model_dir)


def test_build_is_deterministic_across_processes(tiny_model_dir, tmp_path):
    # A fresh process has other hash seeds (Python and the Rust BPE trainer), so this also catches
    # ordering that depends on them.
    out = tmp_path / "again"
    code = f"from mhsft.builtin import build_tiny; build_tiny({str(out)!r})"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, timeout=120)
    assert _hashes(out) == _hashes(tiny_model_dir)


def test_concurrent_builds_build_once(tmp_path):
    """torchrun starts every rank at once: one process builds, the others wait on the lock and reuse it."""
    root = tmp_path / "builtin"
    code = "import sys; from mhsft.builtin import ensure_tiny; print(ensure_tiny(sys.argv[1]))"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )  # fmt: skip
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    paths = {o.strip() for o, _ in outs}
    assert len(paths) == 1
    assert sum("building the built-in tiny model" in e for _, e in outs) == 1
    final = Path(paths.pop())
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == [final.name]
    assert all((final / f).is_file() for f in builtin.MODEL_FILES)


def test_damaged_cache_folder_is_rebuilt(tiny_model_dir, tmp_path, monkeypatch):
    root = tmp_path / "builtin"
    final = root / tiny_model_dir.name
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    calls = []

    def fake_build(out):
        calls.append(out)
        shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)

    monkeypatch.setattr(builtin, "build_tiny", fake_build)
    assert ensure_tiny(root) == final
    assert len(calls) == 1 and _hashes(final) == _hashes(tiny_model_dir)


# --- the model and tokenizer -----------------------------------------------------------------------------


def test_tiny_model_is_qwen2_shaped(tiny_model_dir, tok):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    assert cfg.model_type == "qwen2" and cfg.architectures == ["Qwen2ForCausalLM"]
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        2,
        64,
        4,
        2,
    )
    assert cfg.tie_word_embeddings is True
    assert cfg.max_position_embeddings >= 4096
    theta = cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") else cfg.rope_theta
    assert theta == 1e6
    assert 1000 <= len(tok) <= 4200 and cfg.vocab_size >= len(tok)
    with safe_open(tiny_model_dir / "model.safetensors", "pt") as f:
        names = f.keys()  # a safetensors handle, not a dict: it does not iterate
        assert {f.get_slice(k).get_dtype() for k in names} == {"F32"}
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    ids = tok("你好，我最近睡不好。", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size) and torch.isfinite(logits).all()


def test_special_tokens_and_generation_config(tiny_model_dir, tok):
    from transformers import GenerationConfig

    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    for t, i in zip(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], ids, strict=True):
        assert tok.encode(t, add_special_tokens=False) == [i]
    assert tok.encode("a", add_special_tokens=True) == tok.encode("a", add_special_tokens=False)  # no BOS
    gen = GenerationConfig.from_pretrained(tiny_model_dir)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert eos[0] == tok.eos_token_id and gen.pad_token_id == tok.pad_token_id


@pytest.mark.parametrize(
    "text",
    [
        "我最近总是失眠，心里很烦。",
        "生僻字：龘靐齉爩，还有表情😀和English 123！",
        "  多个  空格\n\n换行\t制表 ",
        "ｆｕｌｌ ｗｉｄｔｈ",
    ],
)
def test_chinese_round_trips(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert max(ids) < len(tok)


def test_common_chinese_is_compressed(tok):
    text = "我最近工作压力很大，晚上睡不着，心里很焦虑。"
    assert len(tok.encode(text, add_special_tokens=False)) < len(text)


def test_chat_template_is_qwen25(tok):
    assert tok.chat_template == QWEN25_CHAT_TEMPLATE
    msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好，请说。"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n你好，请说。<|im_end|>\n"
    )
    with_system = [{"role": "system", "content": "你是咨询师。"}] + msgs[:1]
    assert tok.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\n你是咨询师。<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    )
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {}}}]
    out = tok.apply_chat_template(msgs[:1], tools=tools, tokenize=False)
    assert "# Tools" in out and '"name": "f"' in out and out.startswith("<|im_start|>system\nYou are Qwen")


def test_generate_stops_and_returns_new_tokens(tiny_model_dir, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True)[
        "input_ids"
    ]
    out = model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= len(prompt) + 4 and out[0, : len(prompt)].tolist() == prompt


def test_build_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    builtin.build_tiny(tmp_path / "m")
    assert torch.equal(torch.rand(3), expected)


# --- model.py --------------------------------------------------------------------------------------------


def test_load_model_and_tokenizer_builtin():
    from mhsft.model import load_model, load_tokenizer

    tok = load_tokenizer("builtin:tiny")
    assert tok.pad_token_id is not None
    assert load_model("builtin:tiny").dtype == torch.float32
    assert load_model("builtin:tiny", dtype="bfloat16", attn_impl="eager").dtype == torch.bfloat16


def test_load_model_from_local_folder(tiny_model_dir):
    from mhsft.model import load_model

    m = load_model(str(tiny_model_dir), dtype="float32", attn_impl="sdpa", device="cpu")
    assert m.config.model_type == "qwen2"


@pytest.mark.parametrize(
    ("name", "msg"),
    [
        ("./no/such/folder", "no such folder"),
        ("not a hub id", "not a hub id"),
        ("a/b/c", "no such folder"),
        ("", "no model given"),
    ],
)
def test_bad_model_names_are_user_errors(name, msg):
    from mhsft.model import resolve_model_dir

    with pytest.raises(UserError, match=msg):
        resolve_model_dir(name)


def test_model_file_instead_of_folder(tmp_path):
    from mhsft.model import resolve_model_dir

    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(UserError, match="is a file"):
        resolve_model_dir(str(f))


def test_folder_that_is_not_a_model(tmp_path):
    from mhsft.model import load_model, load_tokenizer

    with pytest.raises(UserError, match="cannot load a causal LM"):
        load_model(str(tmp_path))
    with pytest.raises(UserError, match="cannot load a tokenizer"):
        load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("use_hf", [False, True])
def test_hub_failures_become_one_line_user_errors(monkeypatch, use_hf):
    import huggingface_hub
    import modelscope

    from mhsft.model import resolve_model_dir
    from mhsft.utils import register_secret

    secret = "tok-SECRET-1234"
    register_secret(secret)

    def offline(*a, **k):
        raise ConnectionError(f"Max retries exceeded (token={secret})\n  traceback details")

    monkeypatch.setattr(modelscope, "snapshot_download", offline)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError) as e:
        resolve_model_dir("Qwen/Qwen2.5-0.5B-Instruct", use_hf=use_hf, token=secret)
    msg = str(e.value)
    assert "\n" not in msg and secret not in msg and "Max retries exceeded" in msg
    assert ("Hugging Face" if use_hf else "ModelScope") in msg


def test_hub_download_returns_its_folder(monkeypatch, tiny_model_dir):
    import modelscope

    from mhsft.model import resolve_model_dir

    seen = {}

    def fake(model_id, **kw):
        seen["id"] = model_id
        return str(tiny_model_dir)

    monkeypatch.setattr(modelscope, "snapshot_download", fake)
    assert resolve_model_dir("Qwen/Qwen2.5-0.5B-Instruct") == str(tiny_model_dir)
    assert seen["id"] == "Qwen/Qwen2.5-0.5B-Instruct"


def test_dtype_and_attn_names():
    from mhsft.model import attn_implementation, torch_dtype

    assert torch_dtype("auto") == "auto" and torch_dtype("bf16") is torch.bfloat16
    assert torch_dtype("float16") is torch.float16
    with pytest.raises(UserError, match="torch_dtype"):
        torch_dtype("int3")
    assert attn_implementation(None) is None and attn_implementation("sdpa") == "sdpa"
    with pytest.raises(UserError, match="attn_impl"):
        attn_implementation("magic")


def test_flash_attn_falls_back_when_missing(monkeypatch):
    import importlib.util

    from mhsft import model as model_mod

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "flash_attn" else real(n, *a))
    assert model_mod.attn_implementation("flash_attn") == "sdpa"


# --- demo data -------------------------------------------------------------------------------------------


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_demo_corpus_is_valid_counseling_sharegpt():
    recs = _jsonl(demo_corpus_path())
    assert 35 <= len(recs) <= 60
    for r in recs:
        conv = r["conversations"]
        assert 2 <= len(conv) // 2 <= 4 and len(conv) % 2 == 0
        assert [c["from"] for c in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert all(c["value"].strip() for c in conv)
    assert sum("system" in r for r in recs) >= len(recs) // 2
    assert any("system" not in r for r in recs)  # exercises the template's default system prompt
    crisis = [r for r in recs if any("400-161-9995" in c["value"] for c in r["conversations"])]
    assert len(crisis) == 1
    replies = " ".join(c["value"] for c in crisis[0]["conversations"] if c["from"] == "gpt")
    assert "010-82951332" in replies and "110" in replies and "120" in replies


def test_example_files_match_and_are_well_formed():
    assert (EXAMPLES / "demo_sharegpt.jsonl").read_bytes() == demo_corpus_path().read_bytes()
    mcq = _jsonl(EXAMPLES / "demo_mcq.jsonl")
    assert len(mcq) >= 15 and len({q["id"] for q in mcq}) == len(mcq)
    multi = 0
    for q in mcq:
        letters = q["answer"].split(",")
        multi += len(letters) > 1
        assert all(x in "ABCDEFG"[: len(q["choices"])] for x in letters), q
        assert letters == sorted(set(letters))
    assert multi >= 3
    qa = _jsonl(EXAMPLES / "demo_qa.jsonl")
    assert len(qa) >= 8 and all(q["question"] and q["answer"] and q["key_points"] for q in qa)
