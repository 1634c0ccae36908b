"""Activations in host memory (mhsft/train/offload.py): only the chosen layers go under the offloading hooks, the
layers that recompute keep their checkpoint, and a run with layers in host memory equals the one without.

On the CPU the offloading context is a recording stand-in (TRL's needs a GPU to offload from); on a GPU
(`MHSFT_TEST_DEVICE=cuda`, gpu_speed_issue.sh's check) the same run goes through TRL's context for real."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import read_log, run_sft
from mhsft.train import offload, plan
from mhsft.train.plan import Plan, set_recompute

CUDA = torch.cuda.is_available()


class Recording(torch.autograd.graph.saved_tensors_hooks):
    """Stands in for TRL's context: packs a copy of each saved tensor (as a round trip through host memory would)
    and notes the decoder layer it was saved in."""

    def __init__(self, where: list):
        self.packed: list[int | None] = []

        def pack(t):
            self.packed.append(where[-1] if where else None)
            return t if isinstance(t, torch.nn.Parameter) else t.detach().clone()

        super().__init__(pack, lambda t: t)


def _force(monkeypatch, recompute: int, carried: int, seen: list):
    """plan.choose replaced: the hooks installed (the recording stand-in on the CPU, TRL's on a GPU) and the plan
    set to `recompute` layers recomputing and `carried` in host memory."""

    def forced(args, model, *a, **k):
        layers = [m for m in plan.decoder_layers(model) if hasattr(m, "gradient_checkpointing")]
        where: list[int] = []

        def leave(*_):  # returns None: the layer's output is kept
            where.pop()

        for i, layer in enumerate(layers):  # which layer a tensor was saved in (runs before the hooks' own)
            layer.register_forward_pre_hook(lambda *_, i=i: where.append(i))
            layer.register_forward_hook(leave, always_call=True)
        make = None if CUDA else (lambda: Recording(where))
        hooks = offload.Offload(model, layers, make=make, min_bytes=1024)
        model.mhsft_offload = hooks
        seen.append((hooks, layers))
        set_recompute(model, recompute, False, carried)
        p = Plan(args.per_device_train_batch_size, args.gradient_accumulation_steps, recompute, len(layers), False,
                 carried)  # fmt: skip
        return p, "forced by the test"

    monkeypatch.setattr(plan, "choose", forced)


@pytest.mark.parametrize("recompute", [0, 1])
def test_a_run_with_a_layer_in_host_memory_equals_the_one_without(tmp_path, monkeypatch, recompute):
    """The tiny model's 2 layers, one in host memory (layer 0 with layer 1 stored; layer 1 with layer 0
    recomputing): the same losses and
    adapter as with every layer stored (float32; 1e-5 on the CPU, 1e-4 on a GPU: its attention backward's atomic
    adds differ between runs in the last bits). Only that layer's tensors went under the hooks."""
    extra = ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--lora_dropout", "0.1",
             "--packing", "true", "--max_steps", "3", "--max_length", "128", "--torch_dtype", "float32"]  # fmt: skip
    tol = 1e-4 if CUDA else 1e-5
    stored = run_sft(tmp_path / "a", *extra)
    seen: list = []
    _force(monkeypatch, recompute, 1, seen)
    carried = run_sft(tmp_path / "b", *extra)
    la, lb = read_log(stored), read_log(carried)
    assert [r["step"] for r in lb] == [1, 2, 3]
    for a, b in zip(la, lb):
        assert abs(a["loss"] - b["loss"]) < tol and abs(a["grad_norm"] - b["grad_norm"]) < tol
    wa = load_file(str(stored / "checkpoint-3" / "adapter_model.safetensors"))
    wb = load_file(str(carried / "checkpoint-3" / "adapter_model.safetensors"))
    for n in wa:
        torch.testing.assert_close(wa[n], wb[n], rtol=0, atol=tol)
    ((hooks, layers),) = seen
    assert hooks.layers == {layers[recompute]} and not hooks.active
    if CUDA:  # TRL's context numbers each tensor it packs; all came back (its tracker is empty)
        assert hooks.ctx.inner.tensor_id > 0 and not hooks.ctx.inner.tracker
    else:
        assert hooks.ctx.packed and set(hooks.ctx.packed) == {recompute}
    p = json.loads((carried / "args.json").read_text(encoding="utf-8"))["plan"]
    assert (p["recompute_layers"], p["offload_layers"]) == (recompute, 1)


def test_set_recompute_spreads_the_layers_in_host_memory_over_those_that_do_not_recompute(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="install"):
        set_recompute(model, 1, False, 1)
    layers = plan.decoder_layers(model)
    hooks = offload.Offload(model, layers, make=lambda: Recording([]))
    model.mhsft_offload = hooks
    set_recompute(model, 1, False, 1)  # layer 0 recomputes, layer 1 is the one left: in host memory
    assert layers[0].gradient_checkpointing and not layers[1].gradient_checkpointing
    assert hooks.layers == {layers[1]}
    set_recompute(model, 0, False, 0)
    assert hooks.layers == set() and not any(m.gradient_checkpointing for m in layers)
    model.train()
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    assert hooks.ctx.packed == []  # nothing to carry: the context is never entered


def test_offload_is_not_offered_off_a_single_gpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert not offload.available(cpu, 1, False)
    assert not offload.available(gpu, 2, False)  # DDP's ranks would share the host link
    assert not offload.available(gpu, 1, True)  # --fp8: its quantized weights are not parameters
    assert not offload.enabled  # off by default: measured slower (the module's docstring)
    assert not offload.available(gpu, 1, False)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: pinned host memory and the copy into it")
def test_the_host_link_is_measured():
    assert offload.host_bandwidth(torch.device("cuda", 0)) > 1e9  # any PCIe link moves more than 1 GB/s


def test_strided_views_stay_on_the_card_and_contiguous_tensors_go_through_trl():
    """TRL brings a view back contiguous, which a compiled backward rejects (its strides asserted): views are kept
    as they are, contiguous tensors go through the inner context; gradients are unchanged either way."""
    inner = Recording([])
    x = torch.randn(4, 6, requires_grad=True)
    b = torch.randn(6, 4, requires_grad=True)
    with inner:
        (x.t() * b).sum()
    assert len(inner.packed) == 2  # mul saves both inputs: x.t() (a strided view) and b (contiguous)
    inner.packed.clear()
    with offload._Contiguous(inner):
        out = (x.t() * b).sum()
    out.backward()
    assert len(inner.packed) == 1  # b only
    torch.testing.assert_close(x.grad, b.t().detach())
    torch.testing.assert_close(b.grad, x.t().detach())
