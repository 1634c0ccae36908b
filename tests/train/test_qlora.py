"""QLoRA (`--quant_method bnb --quant_bits 4|8`) on the CPU through bitsandbytes' CPU backend: training, the
checkpoint recording its quantization, infer loading the base as it was trained (or unquantized with
--quant_bits 0), export merging into the unquantized weights, mhsft's fused LoRA path on a 4-bit base equal to
PEFT's, and the one-line refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from helpers import DEMO, run_cli
from mhsft import lora_forward
from mhsft.model import load_model, parameter_count
from mhsft.train import fused_lora

pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (pip install bitsandbytes)")
QUANT4 = {"method": "bnb", "bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": None}


def _sft(tmp_path, capsys, *extra):
    out = tmp_path / "out"
    rc, so, se = run_cli(["sft", "--model", "builtin:tiny", "--dataset", DEMO + "#12", "--output_dir", str(out),
                          "--report_to", "none", "--max_steps", "2", "--logging_steps", "1", "--max_length", "256",
                          "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", *extra], capsys)  # fmt: skip
    return rc, so + se, out


@pytest.mark.parametrize("bits", ["4", "8"])
def test_qlora_trains_and_the_checkpoint_records_it(tmp_path, capsys, bits):
    rc, text, out = _sft(tmp_path, capsys, "--quant_method", "bnb", "--quant_bits", bits)
    assert rc == 0, text[-2000:]
    assert f"base model loaded in {bits} bits by bitsandbytes" in text
    (run,) = [d for d in out.iterdir() if d.name.startswith("v")]
    args = json.loads((run / "checkpoint-2" / "args.json").read_text(encoding="utf-8"))
    assert args["quant_method"] == "bnb" and args["quant_bits"] == int(bits)
    run_args = json.loads((run / "args.json").read_text(encoding="utf-8"))
    unquantized = sum(p.numel() for p in load_model("builtin:tiny", dtype="float32").parameters())
    # a 4-bit weight counts as one parameter, not half a byte (the total holds the LoRA parameters too)
    assert run_args["total_parameters"] - run_args["trainable_parameters"] == unquantized
    losses = [
        json.loads(x)["loss"] for x in (run / "logging.jsonl").read_text().splitlines() if '"loss"' in x
    ]
    assert len(losses) == 2 and all(loss == loss for loss in losses)


def test_infer_and_export_take_the_checkpoints_quantization(tmp_path, capsys):
    rc, text, out = _sft(tmp_path, capsys, "--quant_method", "bnb", "--quant_bits", "4")
    assert rc == 0, text[-2000:]
    ckpt = next(out.glob("v*/checkpoint-2"))
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"query": "你好"}, ensure_ascii=False) + "\n", encoding="utf-8")
    base = ["infer", "--adapters", str(ckpt), "--infer_data", str(data), "--max_new_tokens", "4"]
    rc, so, se = run_cli([*base, "--result_path", str(tmp_path / "a.jsonl")], capsys)
    assert rc == 0 and "loading the base model in 4 bits, as" in so + se
    rc, so, se = run_cli([*base, "--quant_bits", "0", "--result_path", str(tmp_path / "b.jsonl")], capsys)
    assert rc == 0 and "4 bits" not in so + se
    rc, so, se = run_cli(["export", "--ckpt_dir", str(ckpt), "--merge_lora", "true", "--merge_dtype", "float32",
                          "--output_dir", str(tmp_path / "merged")], capsys)  # fmt: skip
    assert rc == 0, (so + se)[-2000:]
    assert "merging into the unquantized weights" in so + se
    meta = json.loads((tmp_path / "merged" / "mhsft_export.json").read_text(encoding="utf-8"))
    assert meta["trained_quantization"]["quant_bits"] == 4 and meta["verify"]


def test_fused_lora_on_a_4bit_base_equals_peft(monkeypatch):
    """mhsft's LoRA path (bf16-style update in place, the fused kernel's autograd function) on bitsandbytes' 4-bit
    layers gives PEFT's outputs and gradients (float32 compute on the CPU, dropout 0)."""
    from peft import LoraConfig, get_peft_model

    monkeypatch.setattr(fused_lora, "on_cpu", True)
    torch.manual_seed(0)
    base = load_model("builtin:tiny", dtype="float32", quant=QUANT4)
    peft_model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    )
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    fast = copy.deepcopy(peft_model)
    assert lora_forward.fast_lora_forward(fast, fused=fused_lora) > 0
    layer = fast.get_base_model().model.layers[0].self_attn.q_proj
    ids = torch.randint(0, 2000, (1, 24))
    assert fused_lora.usable(layer, torch.zeros(1, 4, 128))  # the 4-bit layer takes the fused path
    results = []
    for m in (peft_model, fast):
        m.train()
        m.zero_grad()
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append(
            (loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
        )
    (la, ga), (lb, gb) = results
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-5)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-3, atol=1e-5)


def test_parameter_count_of_a_4bit_model():
    plain = sum(p.numel() for p in load_model("builtin:tiny", dtype="float32").parameters())
    assert (
        sum(
            parameter_count(p) for p in load_model("builtin:tiny", dtype="float32", quant=QUANT4).parameters()
        )
        == plain
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--quant_method", "awq", "--quant_bits", "4"], "bitsandbytes only"),
        (["--quant_method", "bnb", "--quant_bits", "3"], "--quant_bits 4 or 8"),
        (["--quant_bits", "4", "--train_type", "full"], "needs --train_type lora"),
        (["--quant_bits", "4", "--fp8", "true"], "choose one"),
        (["--quant_bits", "4", "--bnb_4bit_quant_type", "int4"], "nf4 or fp4"),
    ],
)
def test_bad_quantization_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    rc, text, _ = _sft(tmp_path, capsys, *flags)
    assert rc == 2 and message in text


def test_missing_bitsandbytes_names_the_fix(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    rc, text, _ = _sft(tmp_path, capsys, "--quant_bits", "4")
    assert rc == 2 and "pip install bitsandbytes" in text


def test_a_random_weight_folder_loads_quantized_as_its_saved_weights_would(tmp_path):
    """The benchmarks' config-only folders (random_model.py --random_init) in 4 bits: the same packed weights,
    quantization statistics and logits as from_pretrained quantizing the same weights saved to disk."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import random_model

    folder = random_model.build("tiny", tmp_path / "rand", "cpu", random_init=True)
    saved = tmp_path / "saved"
    load_model(str(folder), dtype="bfloat16").save_pretrained(saved)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (folder / name).is_file():
            (saved / name).write_bytes((folder / name).read_bytes())
    a = load_model(str(folder), dtype="bfloat16", quant=QUANT4)
    b = load_model(str(saved), dtype="bfloat16", quant=QUANT4)
    assert a.is_loaded_in_4bit and type(a.model.layers[1].mlp.down_proj).__name__ == "Linear4bit"
    wa, wb = a.model.layers[1].mlp.down_proj.weight, b.model.layers[1].mlp.down_proj.weight
    assert torch.equal(wa.data, wb.data) and wa.quant_state.shape == wb.quant_state.shape
    assert torch.equal(wa.quant_state.absmax, wb.quant_state.absmax)
    assert type(a.lm_head) is torch.nn.Linear
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_memory_modes_on_a_4bit_base_equal_the_kept_path(monkeypatch):
    """The plan's memory modes (on by default since session 16) on bitsandbytes' 4-bit layers: a layer recomputing
    only its MLP's gate/up (its 4-bit base GEMMs run again in the backward) and one remaking its SwiGLU product and
    norms give the kept path's loss and gradients (float32 on the CPU, dropout on)."""
    from peft import LoraConfig, get_peft_model

    from mhsft.train import remade_norms, swiglu_down
    from mhsft.train.plan import decoder_layers, set_recompute
    from tiny import loss_and_grads

    monkeypatch.setattr(fused_lora, "on_cpu", True)
    torch.manual_seed(0)
    base = load_model("builtin:tiny", dtype="float32", quant=QUANT4)
    kept = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules="all-linear"))
    for n, p in kept.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    assert lora_forward.fast_lora_forward(kept, fused=fused_lora) > 0
    layers = len(decoder_layers(kept))
    assert swiglu_down.install(kept, liger=False) == layers and remade_norms.install(kept) == layers
    kept.train()
    modes = copy.deepcopy(kept)
    set_recompute(modes, 0, remake_swiglu=True, mlp_layers=1)
    ran = []
    apply = swiglu_down._SwiGLUMLP.apply
    monkeypatch.setattr(swiglu_down._SwiGLUMLP, "apply", lambda *a: (ran.append(1), apply(*a))[1])
    ids = torch.randint(0, 2000, (2, 24))
    la, ga = loss_and_grads(kept, ids, seed=3)
    assert not ran
    lb, gb = loss_and_grads(modes, ids, seed=3)
    assert len(ran) == 1
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-6, msg=n)
