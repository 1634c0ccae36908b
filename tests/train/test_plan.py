"""The execution plan (mhsft/train/plan.py): the search against a fake memory probe, the probe's clean-up, the
recompute switch, and a planned run equal to the as-written one."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import DEMO as DEMO_DATA
from helpers import read_log, run_sft
from mhsft.train import plan
from mhsft.train.plan import Plan, Search, predicted_cost, search, set_recompute

LAYERS = 8
K = 1000  # the fake card's unit: bytes are integers


def fake_card(weights: float, per_row: float, per_stored_layer: float, physical: float):
    """A probe for a model whose peak is weights + rows x (per_row + stored layers x per_stored_layer), on a card
    that runs out of memory above `physical`."""
    calls = []

    def probe(p: Plan) -> int | None:
        calls.append(p)
        peak = weights + p.micro_batch * (per_row + (p.layers - p.recompute_layers) * per_stored_layer)
        return None if peak > physical else int(peak)

    return probe, calls


def run_search(
    budget: int, extra: int = 0, physical: float = 1e9, micro_batch: int = 8, accumulation: int = 4
):
    probe, calls = fake_card(10 * K, 1 * K, 0.5 * K, physical * K)
    asked = Plan(micro_batch, accumulation, LAYERS, LAYERS)
    s = Search(asked, budget * K, extra * K, 0.15, probe)
    return search(s), s, calls


def test_a_large_card_drops_recompute_at_the_asked_micro_batch():
    chosen, s, calls = run_search(budget=100)
    assert chosen == Plan(8, 4, 0, LAYERS)
    assert calls == [chosen]  # the fastest candidate fitted at once


def test_fewer_rows_without_recompute_beat_more_rows_with_it():
    """8 rows: no recompute needs 50, every layer recomputing 18, a stored layer 4 more: 4 layers fit in 35. But 4
    rows without recompute (30) fit too and are predicted faster, as on the H200 (4 x 3072 vs 8 x 3072)."""
    chosen, s, _ = run_search(budget=35)
    assert chosen == Plan(4, 8, 0, LAYERS)
    assert chosen.rows_per_rank_step == 32
    assert (
        Plan(8, 4, 4, LAYERS),
        34 * K,
        True,
    ) in s.tried  # the measured per-layer memory found the 4 layers


def test_a_small_budget_recomputes_the_fewest_layers_that_fit():
    chosen, s, _ = run_search(budget=14)
    # 4 rows fit only with every layer recomputing (14), 2 rows with 6 of 8 (14); 1 row stores 6 layers:
    # 10 + 1 x (1 + 6 x 0.5) = 14, predicted the fastest of the three
    assert chosen == Plan(1, 32, 2, LAYERS)
    assert (Plan(2, 16, 6, LAYERS), 14 * K, True) in s.tried
    assert predicted_cost(chosen, 0.15) < predicted_cost(Plan(4, 8, LAYERS, LAYERS), 0.15)
    for _plan, peak, ok in s.tried:
        assert ok == (peak is not None and peak <= 14 * K)


def test_out_of_memory_falls_back_and_extra_memory_counts():
    # the card itself fails above 25 though the budget says 100: the OOM tries are passed over
    chosen, s, _ = run_search(budget=100, physical=25)
    assert chosen is not None and chosen.micro_batch * chosen.accumulation == 32
    assert any(peak is None for _, peak, _ in s.tried)
    assert all(peak <= 25 * K for p, peak, ok in s.tried if ok)
    # optimizer states (extra) must fit beside the peak
    with_extra, _, _ = run_search(budget=35, extra=10)
    assert with_extra != Plan(4, 8, 0, LAYERS)  # 30 + 10 > 35


def test_nothing_fits():
    chosen, s, _ = run_search(budget=5)
    assert chosen is None and s.tried


def test_describe_names_the_split_and_the_way_back():
    asked = Plan(8, 4, LAYERS, LAYERS)
    line = plan.describe(Plan(4, 8, 0, LAYERS), asked, 1, 3072, "fused LoRA + Liger")
    assert line.startswith("plan: 4 x 3072 x 8 accumulation, no recompute, fused LoRA + Liger")
    assert "same 32 rows per optimizer step as 8 x 3072 x 4" in line and "--auto_plan false" in line
    assert "as written" in plan.describe(asked, asked, 2, 3072, "Liger")


def remaking_card(physical: float = 1e9):
    """`fake_card` whose stored layer costs a quarter less with the SwiGLU product remade."""
    calls = []

    def probe(p: Plan) -> int | None:
        calls.append(p)
        per_layer = 0.375 if p.remake_swiglu and p.recompute_layers < p.layers else 0.5
        peak = 10 * K + p.micro_batch * (1 * K + (p.layers - p.recompute_layers) * per_layer * K)
        return None if peak > physical * K else int(peak)

    return probe, calls


def test_the_swiglu_product_is_remade_only_where_the_plan_without_it_does_not_fit():
    """A large card: no remaking (it costs ~1% a step). 45: 8 rows without recompute need 50 kept, 42 remade, and
    beat 4 rows without either (30). 14: 1 row stores all 8 layers remade (14) instead of 6 kept (the plan
    without remaking). A model that cannot remake never gets such a plan."""
    asked = Plan(8, 4, LAYERS, LAYERS)
    expect = {100: Plan(8, 4, 0, LAYERS), 45: Plan(8, 4, 0, LAYERS, True), 14: Plan(1, 32, 0, LAYERS, True)}
    for budget, want in expect.items():
        probe, calls = remaking_card()
        assert search(Search(asked, budget * K, 0, 0.15, probe, remake=True)) == want, budget
        if budget == 100:
            assert not any(p.remake_swiglu for p in calls)
    probe, calls = remaking_card()
    assert search(Search(asked, 14 * K, 0, 0.15, probe)) == Plan(1, 32, 2, LAYERS)
    assert not any(p.remake_swiglu for p in calls)
    assert predicted_cost(Plan(8, 4, 0, LAYERS, True), 0.15) > predicted_cost(Plan(8, 4, 0, LAYERS), 0.15)
    assert Plan(2, 16, 6, LAYERS, True).recompute_text() == (
        "recompute 6 of 8 layers, SwiGLU product and norms remade in the others"
    )
    assert Plan(2, 16, LAYERS, LAYERS, True).recompute_text() == "recompute"


class _Args:
    auto_plan, deepspeed, torch_compile = True, None, False


def test_reasons_to_run_as_written():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert "nothing to gain" in plan.keep_as_written(_Args(), cpu, 7_000_000_000)
    assert "host-bound" in plan.keep_as_written(_Args(), gpu, 500_000_000)
    assert plan.keep_as_written(_Args(), gpu, 7_000_000_000) is None
    off = _Args()
    off.auto_plan = False
    assert plan.keep_as_written(off, gpu, 7_000_000_000) == "--auto_plan false"


def test_probe_frees_what_it_held_and_leaves_the_rng_as_it_was():
    from tiny import tiny_lora

    model = tiny_lora(0.1)
    ids = torch.randint(0, 300, (2, 9))
    before = torch.get_rng_state()

    def step():
        model(input_ids=ids, labels=ids).loss.backward()  # dropout draws from the RNG

    def oom():
        step()
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    for fn in (step, oom):
        assert plan.probe_peak(fn, model, torch.device("cpu")) is None  # no peak to read on the CPU
        assert torch.equal(torch.get_rng_state(), before)
        assert all(p.grad is None for p in model.parameters())


def test_set_recompute_spreads_the_layers_and_keeps_the_gradients():
    """k of n layers recompute, evenly spread, and the gradients are those of a run without recomputation; the
    switch turns transformers' checkpointing on when it was off (the plan may add recompute)."""
    from tiny import loss_and_grads, tiny_lora

    plain = tiny_lora(0.0)
    part = copy.deepcopy(plain)
    set_recompute(part, 1)
    layers = part.get_base_model().model.layers
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]
    ids = torch.randint(0, 300, (2, 17))
    la, ga = loss_and_grads(plain, ids)
    lb, gb = loss_and_grads(part, ids)
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-6)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-7)
    set_recompute(part, 0)
    assert not any(layer.gradient_checkpointing for layer in layers)


def assert_same_run(written, planned, steps: int, tol: float = 1e-5, grad_norm: bool = False) -> None:
    """Two runs logged the same steps 1..steps with the same losses (and gradient norms), and saved the same
    adapter, within tol."""
    la, lb = read_log(written), read_log(planned)
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(1, steps + 1))
    for a, b in zip(la, lb):
        assert abs(a["loss"] - b["loss"]) < tol
        assert not grad_norm or abs(a["grad_norm"] - b["grad_norm"]) < tol
    wa = load_file(str(written / f"checkpoint-{steps}" / "adapter_model.safetensors"))
    wb = load_file(str(planned / f"checkpoint-{steps}" / "adapter_model.safetensors"))
    for n in wa:
        torch.testing.assert_close(wa[n], wb[n], rtol=0, atol=tol)


@pytest.mark.parametrize("packing", ["true", "false"])
def test_a_planned_run_equals_the_as_written_one(tmp_path, monkeypatch, packing):
    """The as-written run (4 rows x 2 accumulation, every layer recomputing) against the plan a large card would
    get (1 row x 8, no recompute): same rows per step, same losses and adapter (float32, 1e-5)."""
    extra = ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--lora_dropout", "0",
             "--gradient_checkpointing", "true", "--packing", packing, "--max_steps", "4", "--max_length", "128"]  # fmt: skip
    written = run_sft(tmp_path / "a", *extra)

    def forced(args, model, *a, **k):
        p = Plan(1, 8, 0, len(plan.decoder_layers(model)))
        set_recompute(model, 0)
        return p, "forced by the test"

    monkeypatch.setattr(plan, "choose", forced)
    planned = run_sft(tmp_path / "b", *extra)
    assert_same_run(written, planned, 4)
    args = json.loads((planned / "args.json").read_text(encoding="utf-8"))
    assert args["plan"]["micro_batch"] == 1 and args["plan"]["accumulation"] == 8
    assert args["per_device_train_batch_size"] == 4  # what the user typed is kept beside the plan
    assert "same 8 rows per optimizer step as 4 x 128 x 2" in args["plan"]["line"]
    written_args = json.loads((written / "args.json").read_text(encoding="utf-8"))
    assert "as written" in written_args["plan"]["line"] and "on cpu" in written_args["plan"]["line"]


def test_a_run_with_layers_recomputing_only_their_mlp_equals_the_as_written_one(tmp_path, monkeypatch):
    """Through the CLI with the fused LoRA path (Triton's interpreter on the CPU) and LoRA dropout: the as-written
    run (every layer recomputing) against one layer recomputing only its MLP's gate/up and the other storing with
    its SwiGLU product and norms remade: the same losses and adapter (float32, 1e-5), and the plan in args.json.
    LoRA on the MLP's projections only: the modes change nothing else, and each kernel launch costs ~0.7 s in
    Triton's interpreter (7 targets x 3 steps took 2 minutes)."""
    from mhsft.train import fused_lora, swiglu_down

    pytest.importorskip("triton", reason="the fused LoRA kernels need Triton (pip install triton)")
    monkeypatch.setattr(fused_lora, "on_cpu", True)
    extra = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--lora_dropout", "0.1",
             "--gradient_checkpointing", "true", "--max_steps", "2", "--max_length", "64",
             "--target_modules", "gate_proj", "up_proj", "down_proj"]  # fmt: skip
    written = run_sft(tmp_path / "a", *extra)
    ran = []
    apply = swiglu_down._SwiGLUMLP.apply
    monkeypatch.setattr(swiglu_down._SwiGLUMLP, "apply", lambda *a: (ran.append(1), apply(*a))[1])

    def forced(args, model, *a, **k):
        p = Plan(2, 2, 0, len(plan.decoder_layers(model)), True, 1)
        set_recompute(model, 0, True, 1)
        return p, "forced by the test"

    monkeypatch.setattr(plan, "choose", forced)
    planned = run_sft(tmp_path / "b", *extra)
    assert ran  # the mode ran (once per micro-batch)
    assert_same_run(written, planned, 2)
    args = json.loads((planned / "args.json").read_text(encoding="utf-8"))
    assert args["plan"]["mlp_layers"] == 1
    assert (
        "recompute the MLP's gate/up in 1 of 2 layers, SwiGLU product and norms remade in the others"
        in (args["plan"]["line"])
    )


class _Rank:
    def __init__(self, world: int, rank: int):
        self.num_processes, self.process_index = world, rank


@pytest.mark.parametrize("packing", [True, False])
def test_a_step_is_re_split_into_the_same_rows_in_the_same_order(packing):
    """step_batches with the asked micro-batch gives the epoch plan's micro-batches; with fewer rows per micro-batch
    the same rows on the same rank, in the same order, for every rank of 2."""
    from types import SimpleNamespace

    from mhsft.train.batches import collate, epoch_plan
    from mhsft.train.sft import step_batches
    from tiny import random_samples

    samples = random_samples([20, 33, 17, 50, 41, 12, 28, 60, 9, 30, 44, 21, 15, 38, 26, 19] * 6)
    args = SimpleNamespace(seed=3, packing=packing, max_length=64, per_device_train_batch_size=4,
                           gradient_accumulation_steps=2)  # fmt: skip
    epoch = epoch_plan(samples, 0, args)
    for world in (1, 2):
        per_step = 2 * world
        for rank in range(world):
            acc = _Rank(world, rank)
            asked = step_batches(epoch, 1, samples, args, acc, 0, 4)
            mine = epoch[per_step : 2 * per_step][rank::world]
            assert len(asked) == len(mine) == 2
            for got, mb in zip(asked, mine):
                want = collate(samples, mb, args, 0)
                assert torch.equal(got["input_ids"], want["input_ids"])
            split = step_batches(epoch, 1, samples, args, acc, 0, 1)
            assert len(split) == sum(len(mb) for mb in mine)
            ids = lambda bs: torch.cat([b["input_ids"][b["input_ids"] != 0] for b in bs]).tolist()  # noqa: E731
            assert ids(split) == ids(asked)


def test_when_an_eighth_of_the_layers_do_not_fit_fewer_are_measured():
    """16 layers: the second probe stores 2 layers; when they do not fit it stores 1 (the 32B on an 80 GB card:
    every layer recomputing fits with little to spare)."""
    probe, _ = fake_card(10 * K, 1 * K, 2 * K, 1e9)
    s = Search(Plan(2, 4, 16, 16), 14 * K, 0, 0.0, probe)
    chosen = search(s)
    assert chosen == Plan(1, 8, 15, 16)  # 10 + 1 x (1 + 1 x 2) = 13 <= 14; 2 stored layers would be 15
    assert (Plan(1, 8, 14, 16), 15 * K, False) in s.tried and (Plan(1, 8, 15, 16), 13 * K, True) in s.tried


def test_retreat_recomputes_more_layers_then_splits_finer():
    """Out of memory mid-run: a quarter more layers recompute at a time, then the micro-batch halves at every layer
    recomputing (the rows per optimizer step kept), until one row recomputing everything has nowhere to go."""
    ladder, p = [], Plan(4, 8, 0, 28, remake_swiglu=True)
    while (p := plan.retreat(p)) is not None:
        ladder.append((p.micro_batch, p.accumulation, p.recompute_layers))
    assert ladder == [(4, 8, 7), (4, 8, 14), (4, 8, 21), (4, 8, 28), (2, 16, 28), (1, 32, 28)]
    assert plan.retreat(Plan(6, 2, 2, 2)) == Plan(3, 4, 2, 2)  # the divisors of the micro-batch
    assert plan.retreat(Plan(1, 4, 1, 2)) == Plan(1, 4, 2, 2)


def test_retreat_takes_stored_layers_first_then_the_ones_recomputing_their_mlp():
    """With layers recomputing only their MLP's gate/up, the layers that recompute everything come from those
    stored first, then from those, a quarter of the layers at a time; then the micro-batch halves."""
    ladder, p = [], Plan(2, 8, 30, 64, True, mlp_layers=20)
    while (p := plan.retreat(p)) is not None:
        ladder.append((p.micro_batch, p.recompute_layers, p.mlp_layers, p.stored_layers))
    assert ladder == [(2, 44, 20, 0), (2, 60, 4, 0), (2, 64, 0, 0), (1, 64, 0, 0)]


def test_the_plan_line_names_the_layers_recomputing_their_mlp():
    assert Plan(1, 16, 30, 64, True, 20).recompute_text() == (
        "recompute 30 of 64 layers, only the MLP's gate/up in 20, SwiGLU product and norms remade in the others"
    )
    assert Plan(1, 16, 30, 64, True, 34).recompute_text() == (
        "recompute 30 of 64 layers, only the MLP's gate/up in 34"
    )
    assert Plan(1, 16, 0, 64, True, 64).recompute_text() == "recompute the MLP's gate/up in 64 of 64 layers"
    assert Plan(1, 16, 0, 64, True, 60).recompute_text() == (
        "recompute the MLP's gate/up in 60 of 64 layers, SwiGLU product and norms remade in the others"
    )
    assert Plan(1, 16, 0, 64).recompute_text() == "no recompute"


def mlp_card(physical: float, stored: float = 0.52, mlp: float = 0.14, recomputing: float = 0.04):
    """A 64-layer model at one row: 61 + per layer 0.04 recomputing, 0.14 recomputing only the MLP's gate/up, 0.52
    stored (the 32B at 4096 tokens in GiB, session 14's measured 0.56 a stored layer and the arithmetic of NOTES),
    on a card of `physical`."""
    calls = []

    def probe(p: Plan) -> int | None:
        calls.append(p)
        peak = 61 + p.recompute_layers * recomputing + p.mlp_layers * mlp + p.stored_layers * stored
        return None if peak > physical else int(peak * K)

    return probe, calls


def test_layers_recompute_only_their_mlp_where_that_fits_then_store():
    """75 units (the 32B on an 80 GB card): every layer recomputing needs 63.6; all 64 recomputing only gate/up
    need 70.0, and 13 of them stored on top fit (74.9); at 68 units only 44 fit in that mode, the rest recompute.
    Without the mode (a model whose MLPs cannot) the same card stores 23 and recomputes 41, predicted slower."""
    asked = Plan(1, 16, 64, 64)
    probe, calls = mlp_card(75)
    chosen = search(Search(asked, 75 * K, 0, 0.0, probe, remake=True, mlp=True))
    assert chosen == Plan(1, 16, 0, 64, True, 51)
    assert chosen.stored_layers == 13 and chosen in calls
    probe, _ = mlp_card(68)
    assert search(Search(asked, 68 * K, 0, 0.0, probe, remake=True, mlp=True)) == Plan(
        1, 16, 20, 64, True, 44
    )
    probe, _ = mlp_card(75)
    without = search(Search(asked, 75 * K, 0, 0.0, probe, remake=True))
    assert without == Plan(1, 16, 41, 64, True)
    assert predicted_cost(chosen, 0.0) < predicted_cost(without, 0.0)
    # the arithmetic of predicted_cost: 51 layers at 0.58 of a forward, and 13 remaking their product
    assert predicted_cost(chosen, 0.0) == pytest.approx(
        1 + 2 * 51 * 0.58 / 64 / 4 + plan.REMAKE_SWIGLU * 13 / 64
    )


def test_when_not_even_an_eighth_recomputing_only_their_mlp_fits_every_layer_recomputes():
    asked = Plan(1, 16, 64, 64)
    probe, calls = mlp_card(
        63.6
    )  # every layer recomputing: 63.56; one more layer in the mode: +0.1, too much
    assert search(Search(asked, 63.6 * K, 0, 0.0, probe, remake=True, mlp=True)) == Plan(1, 16, 64, 64)
    assert [c.mlp_layers for c in calls if c.mlp_layers] == [8, 4, 2, 1]


def _oom_on_call(monkeypatch, n: int) -> list:
    """ChunkedLMLoss.forward raises CUDA's out-of-memory error on its n-th call (once), as a step past the probed
    peak would; returns the list of calls."""
    from mhsft.train.loss import ChunkedLMLoss

    calls, forward = [], ChunkedLMLoss.forward

    def flaky(self, *a, **k):
        calls.append(len(calls) + 1)
        if len(calls) == n:
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)"
            )
        return forward(self, *a, **k)

    monkeypatch.setattr(ChunkedLMLoss, "forward", flaky)
    return calls


def test_a_step_out_of_memory_mid_run_runs_again_under_a_plan_that_holds_less(tmp_path, monkeypatch, caplog):
    """Step 2's second micro-batch runs out of memory after the first one's gradients accumulated: the step is done
    again from its start, its dropout masks drawn again the same (RNG put back), under 1 of 2 layers recomputing;
    losses and adapter equal the uninterrupted run's (float32, 1e-5), and args.json says what happened.
    On a GPU (gpu_speed_issue.sh's check) the same in float32 at 1e-4: the attention backward's atomic adds make two
    CUDA runs differ in the last bits; a mask drawn anew or a failed try's gradients kept differ by ~1e-2."""
    extra = ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--lora_dropout", "0.1",
             "--packing", "true", "--max_steps", "4", "--max_length", "128",
             "--torch_dtype", "float32"]  # fmt: skip  # on CUDA the tiny model would otherwise train in bfloat16
    tol = 1e-4 if torch.cuda.is_available() else 1e-5
    whole = run_sft(tmp_path / "a", *extra)
    calls = _oom_on_call(monkeypatch, 4)
    with caplog.at_level("INFO", logger="mhsft"):
        retreated = run_sft(tmp_path / "b", *extra)
    assert len(calls) == 10  # 4 steps x 2 micro-batches, the one that failed and the one before it again
    # the gradient norm too: the failed try's gradients must not count
    assert_same_run(whole, retreated, 4, tol, grad_norm=True)
    said = [r.getMessage() for r in caplog.records if "out of memory in step" in r.getMessage()]
    assert said == [
        "plan: out of memory in step 2 under 4 x 128 x 2 accumulation, no recompute; the step runs again, and the "
        "rest of the run, as 4 x 128 x 2 accumulation, recompute 1 of 2 layers (the same 8 rows per step)"
    ]
    for args_json in (retreated / "args.json", retreated / "checkpoint-4" / "args.json"):
        p = json.loads(args_json.read_text(encoding="utf-8"))["plan"]
        assert (p["micro_batch"], p["recompute_layers"], p["retreated_at"]) == (4, 1, 2)
        assert (
            p["line"].startswith(said[0])
            and "before: plan: 4 x 128 x 2 accumulation, no recompute" in p["line"]
        )


def test_with_auto_plan_false_out_of_memory_is_the_one_line_advice(tmp_path, monkeypatch, capsys):
    from mhsft import cli

    _oom_on_call(monkeypatch, 2)
    argv = ["sft", "--model", "builtin:tiny", "--dataset", DEMO_DATA, "--output_dir", str(tmp_path / "out"),
            "--report_to", "none", "--max_steps", "2", "--max_length", "128", "--auto_plan", "false"]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "CUDA out of memory. Unless --auto_plan false" in err and "Traceback" not in err


def test_the_stored_layers_fill_the_budget_when_the_step_down_skipped_some():
    """A stored layer costs 0.5 and 20 or more of them 1.5 more at once (an allocation crossing a size class): the
    linear estimate asks for 20, which does not fit; the step down to 18 fits, and the bisect finds that 19 does
    too (the 32B on an 80 GB card had left two layers' worth of its budget unused)."""
    calls = []

    def probe(p: Plan) -> int | None:
        calls.append(p.layers - p.recompute_layers)
        stored = p.layers - p.recompute_layers
        return int((10 + 0.5 * stored + (1.5 if stored >= 20 else 0)) * K)

    s = Search(Plan(1, 16, 64, 64), 20 * K, 0, 0.0, probe)
    assert search(s) == Plan(1, 16, 64 - 19, 64)
    assert calls == [64, 0, 8, 20, 18, 19]  # no recompute, all, the second point, then 20 / 18 / 19
