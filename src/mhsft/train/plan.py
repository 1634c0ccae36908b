"""The execution plan: `mhsft sft` runs the configuration the user asked for at the card's best speed.

The problem. Users type the command from their notes: Qwen2.5-7B, 8 rows x 3072 per micro-batch, 4 accumulation
steps, `--gradient_checkpointing true`. On one H200 that command ran at 10,034 tokens/s with 26 GiB of the
card's 141 in use, while the same 32 rows per optimizer step, split as 4 rows x 8 accumulation steps without
recomputation, ran at 16,165 tokens/s (benchmarks/NOTES.md). Recomputing activations is a third of a
checkpointed LoRA step's arithmetic (forward + recomputed forward + input gradients = 6 N T instead of 4 N T):
memory the card has spare buys it back. ms-swift, LLaMA-Factory and TRL run what was typed; the speed table in
a README is not where users look, so the tool chooses.

What may change, and what may not. The optimization stays the user's: the rows per optimizer step (micro-batch x
accumulation x ranks), the rows themselves and their order (the epoch plan is made with the user's micro-batch and
only re-split), the token-mean loss over the whole step, the learning-rate schedule. What the plan changes is
how a step's rows are split into micro-batches (never more rows per micro-batch than asked), how many decoder
layers recompute, and whether the layers that store remake their SwiGLU product in the backward instead of keeping
it (mhsft.train.swiglu_down: a quarter less memory per stored layer for ~1% of a step, so tried only where the
plan without it does not fit); the fused kernels are chosen elsewhere (`speedups`). Losses equal the as-written run's up to
summation order (tests/train/test_plan.py, float32, 1e-5).

Memory is measured, not guessed: each candidate is tried on real rows (the fullest rows of the epoch, so no later
micro-batch is larger) and its peak read back; a candidate that runs out of memory is freed and the next one is
tried. The recompute share comes from two such probes: with every layer recomputing and with a few layers
storing their activations, which gives the memory one stored layer costs; the plan then stores as many layers as
the budget holds and checks that by a third probe (when that does not fit, fewer, bisecting between the counts
that fitted and did not). Where the model's MLPs can (mhsft.train.swiglu_down's mode "mlp", with the norms'
outputs remade, mhsft.train.remade_norms) and `RECOMPUTE_MLP` is on (the default since session 16), a layer may
instead recompute only its MLP's gate and up: 58% of a recomputed forward for about a quarter of a stored layer's
memory, so the plan first moves as many layers as fit from recomputing to that mode, then as many of those as fit
to storing, each count measured as above. Speed is
predicted from the measured costs above
(`predicted_cost`): recomputation first, then the per-micro-batch host overhead that made 2-row micro-batches 8%
slower per token than 4-row ones on the H200.

On the CPU, under DeepSpeed or torch.compile, with --auto_plan false, and for models under 1B parameters (host
bound: nothing to gain) the plan is what was typed.
"""

from __future__ import annotations

import dataclasses
import gc
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mhsft.model import parameter_count
from mhsft.train import remade_norms, swiglu_down

# Per-micro-batch host overhead in units of a 7B step's per-token cost without recompute, at 3072-token rows: a
# 2-row micro-batch cost 67.1 us a token and a 4-row one 61.9 on the H200 (NOTES), i.e. 1 + o/2 = 1.08 (1 + o/4).
# The overhead scales with the layers launched per micro-batch and shrinks with the work per layer.
HOST_OVERHEAD_7B = 0.15
# Remaking the SwiGLU product in a stored layer's backward, in the same unit: one pass over [tokens, intermediate]
# x 3 (gate, up read; the product written) by bandwidth, ~16 ms of a 7B 8 x 3072 step of ~1.33 s on an H200 (an
# estimate until measured; benchmarks/NOTES.md)
REMAKE_SWIGLU = 0.012
# Recomputing only the MLP's gate and up, in units of a recomputed layer's forward: their two GEMMs' share of a
# Qwen2.5 layer's multiply-adds (283M of 488M a token at 32B, 136M of 244M at 7B with 3072-token rows)
MLP_RECOMPUTE = 0.58
# Session 15's memory modes: the plan may make layers recompute only their MLP's gate/up, and the layers that remake
# their SwiGLU product also remake their norms' outputs. On since session 16 measured them on an H100 (the users'
# 32B command at 80 GB: 3,295 tokens/s against 2,954-3,006 without, peak 75.1 GiB, losses equal within bf16
# noise; benchmarks/NOTES.md); benchmarks switch both off with `+nomlp` for the A/B
RECOMPUTE_MLP = True
REMAKE_NORMS = True
MIN_PARAMETERS = 1_000_000_000
GIB = 2**30


@dataclass(frozen=True)
class Plan:
    micro_batch: int  # rows per micro-batch on each rank
    accumulation: int  # micro-batches per optimizer step on each rank
    recompute_layers: int  # decoder layers that recompute their activations in the backward
    layers: int  # decoder layers in the model
    # the layers that store remake the MLP's SwiGLU product (mhsft.train.swiglu_down), with REMAKE_NORMS also the
    # norms' outputs (mhsft.train.remade_norms)
    remake_swiglu: bool = False
    mlp_layers: int = (
        0  # of the layers that do not recompute, those that recompute only their MLP's gate and up
    )

    @property
    def stored_layers(self) -> int:  # layers that keep their activations (the SwiGLU product aside)
        return self.layers - self.recompute_layers - self.mlp_layers

    @property
    def rows_per_rank_step(self) -> int:
        return self.micro_batch * self.accumulation

    def recompute_text(self) -> str:
        if self.recompute_layers >= self.layers:
            return "recompute"
        what = "SwiGLU product and norms" if REMAKE_NORMS else "SwiGLU product"
        remade = f", {what} remade in the backward" if self.remake_swiglu else ""
        if self.recompute_layers == 0 and not self.mlp_layers:
            return "no recompute" + remade
        parts = (
            [f"recompute {self.recompute_layers} of {self.layers} layers"] if self.recompute_layers else []
        )
        if self.mlp_layers:
            parts.append(f"{'only ' if self.recompute_layers else ''}the MLP's gate/up in {self.mlp_layers}"
                         f"{'' if self.recompute_layers else f' of {self.layers} layers'}")  # fmt: skip
        text = ", ".join(parts) if self.recompute_layers else "recompute " + parts[0]
        if self.stored_layers and self.remake_swiglu:
            text += f", {what} remade in the others"
        return text

    def split_text(self, seq_len: int) -> str:
        return f"{self.micro_batch} x {seq_len} x {self.accumulation} accumulation, {self.recompute_text()}"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def predicted_cost(plan: Plan, overhead: float) -> float:
    """Time per token, relative to a step without recompute and without host overhead: a LoRA step is forward +
    input gradients (4 N T) plus the recomputed forward of the share of layers that recompute (2 N T)."""
    n = max(plan.layers, 1)
    share = (plan.recompute_layers + MLP_RECOMPUTE * plan.mlp_layers) / n
    remake = REMAKE_SWIGLU * plan.stored_layers / n if plan.remake_swiglu else 0.0
    return (4 + 2 * share) / 4 + remake + overhead / plan.micro_batch


def host_overhead(parameters: int, layers: int, seq_len: int) -> float:
    """HOST_OVERHEAD_7B scaled to another model: launches grow with the layers, GPU work per token with the
    parameters and the row length."""
    return HOST_OVERHEAD_7B * (layers / 28) * (7.6e9 / max(parameters, 1)) * (3072 / max(seq_len, 1))


def as_written(micro_batch: int, accumulation: int, recompute: bool, ratio: float, layers: int) -> Plan:
    k = round(max(0.0, min(1.0, ratio)) * layers) if recompute else 0
    return Plan(micro_batch, accumulation, k, layers)


def retreat(p: Plan) -> Plan | None:
    """The plan that holds less memory than `p`, for a step that ran out of memory in the middle of a run (the
    probe measured the fullest rows, but the allocator's cache can outgrow its margin): a quarter more of the layers
    recomputing, taken from those stored, then from those recomputing only their MLP's gate/up; with every layer
    recomputing, the next smaller micro-batch (the same rows per optimizer step); None when one row per
    micro-batch already recomputes everything."""
    n, step = p.layers, max(1, p.layers // 4)
    if p.stored_layers > 0:
        return dataclasses.replace(p, recompute_layers=p.recompute_layers + min(p.stored_layers, step))
    if p.mlp_layers > 0:
        j = min(p.mlp_layers, step)
        return dataclasses.replace(p, recompute_layers=p.recompute_layers + j, mlp_layers=p.mlp_layers - j)
    smaller = micro_batch_options(p.micro_batch)[1:]
    if not smaller:
        return None
    return Plan(smaller[0], p.rows_per_rank_step // smaller[0], n, n)


def micro_batch_options(micro_batch: int) -> list[int]:
    """Rows per micro-batch the plan may use: the divisors of the asked micro-batch, largest first (a step's rows
    regroup exactly; more rows than asked gained nothing measurable: 4 and 6 rows ran at the same speed)."""
    return [b for b in range(micro_batch, 0, -1) if micro_batch % b == 0]


@dataclass
class Search:
    """The search's inputs: the asked plan, the memory budget in bytes, memory needed beyond the probe's peak
    (optimizer states) and the host-overhead coefficient. `probe(plan)` returns the peak bytes of one forward and
    backward on the fullest rows under `plan`, or None when it ran out of memory."""

    asked: Plan
    budget: int
    extra: int
    overhead: float
    probe: Callable[[Plan], int | None]
    remake: bool = False  # the model's MLPs can remake their SwiGLU product (mhsft.train.swiglu_down)
    mlp: bool = False  # ... and recompute only their gate and up (swiglu_down's mode "mlp")
    tried: list = dataclasses.field(default_factory=list)

    def fits(self, plan: Plan) -> tuple[bool, int | None]:
        peak = self.probe(plan)
        ok = peak is not None and peak + self.extra <= self.budget
        self.tried.append((plan, peak, ok))
        return ok, peak


def search(s: Search) -> Plan | None:
    """The fastest plan (by `predicted_cost`) that fits the budget, or None when not even the asked one does."""
    best: Plan | None = None
    for b in micro_batch_options(s.asked.micro_batch):
        acc = s.asked.rows_per_rank_step // b
        fastest = Plan(b, acc, 0, s.asked.layers)
        if best is not None and predicted_cost(fastest, s.overhead) >= predicted_cost(best, s.overhead):
            break  # fewer rows only add overhead: nothing below can win
        found = _best_recompute(s, b, acc)
        if found is not None and (best is None or _cost(found, s) < _cost(best, s)):
            best = found
    return best


def _cost(plan: Plan, s: Search) -> float:
    return predicted_cost(plan, s.overhead)


def _best_recompute(s: Search, b: int, acc: int) -> Plan | None:
    """At b rows per micro-batch: no recompute if it fits (with the SwiGLU product remade if it fits only so), else
    as few layer-forwards recomputed as fit, else None. Where the MLPs can (`s.mlp`): as many layers as fit
    recompute only their MLP's gate/up instead of everything, and where all of them fit so, as many of those as fit
    store; else as many stored layers as fit, the others recomputing. Each count from the memory one more layer
    costs (measured between two probes), checked by a probe and bisected (`_most_that_fit`)."""
    n, remake = s.asked.layers, s.remake
    for plan in [Plan(b, acc, 0, n)] + ([Plan(b, acc, 0, n, True)] if remake else []):
        if s.fits(plan)[0]:
            return plan
    full_ok, full_peak = s.fits(Plan(b, acc, n, n))
    if not full_ok:
        return None
    if not s.mlp:
        stored, _ = _most_that_fit(s, lambda j: Plan(b, acc, n - j, n, remake), full_peak, n - 1)
        return Plan(b, acc, n - stored, n, remake)
    m, mlp_peak = _most_that_fit(s, lambda j: Plan(b, acc, n - j, n, remake, j), full_peak, n)
    if m < n:
        return Plan(b, acc, n - m, n, remake, m) if m else Plan(b, acc, n, n)
    stored, _ = _most_that_fit(s, lambda j: Plan(b, acc, 0, n, remake, n - j), mlp_peak, n - 1)
    return Plan(b, acc, 0, n, remake, n - stored)


def _most_that_fit(
    s: Search, make: Callable[[int], Plan], base_peak: int, cap: int
) -> tuple[int, int | None]:
    """(the largest j <= cap whose plan `make(j)` fits, 0 when none does; that plan's peak, base_peak at 0). The
    first probe moves an eighth of the layers (halved until they fit) to measure what one costs over `base_peak`; the count the
    budget then holds is probed, stepping down by an eighth while it does not fit, then bisected between the count
    that fitted and the one that did not (steps alone left the 32B at 80 GB two 0.56 GiB layers short, session 14)."""
    j = max(1, s.asked.layers // 8)
    while not (probed := s.fits(make(j)))[0]:
        if j == 1:
            return 0, base_peak
        j //= 2
    lo, peaks, hi = j, {j: probed[1]}, None  # the most known to fit, their peaks, the fewest known not to
    per = max((probed[1] - base_peak) / j, 1.0)
    k = min(cap, math.floor((s.budget - s.extra - base_peak) / per))
    while k > lo:
        ok, peak = s.fits(make(k))
        if ok:
            lo, peaks[k] = k, peak
            break
        hi, k = k, k - max(1, k // 8)
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        ok, peak = s.fits(make(mid))
        if ok:
            lo, peaks[mid] = mid, peak
        else:
            hi = mid
    return lo, peaks[lo]


# ------------------------------------------------------------------------------------------- on the model
def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(base.get_decoder().layers)


def checkpointing_on(model: torch.nn.Module) -> None:
    """transformers' non-reentrant activation checkpointing on, for every decoder layer (set_recompute then picks
    which recompute). transformers 5.2x renamed the API and warns on the old name; 5.17 (the GPU image) has only it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def set_recompute(model: torch.nn.Module, k: int, remake_swiglu: bool = False, mlp_layers: int = 0) -> None:
    """Make k of the decoder layers, evenly spread, recompute their activations in the backward, `mlp_layers` of
    the others, evenly spread, only their MLP's gate and up (with their norms' outputs remade); the rest keep them
    (remaking their SwiGLU product and norms' outputs with `remake_swiglu`). Turns transformers' (non-reentrant)
    checkpointing on when k > 0 and it was off."""
    layers = [m for m in decoder_layers(model) if hasattr(m, "gradient_checkpointing")]
    if k > 0 and not all(hasattr(m, "_gradient_checkpointing_func") for m in layers):
        checkpointing_on(model)
    n = len(layers)
    keep = {i * n // k for i in range(k)} if k else set()
    others = [i for i in range(n) if i not in keep]
    mlp = {others[i * len(others) // mlp_layers] for i in range(mlp_layers)} if mlp_layers else set()
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i in keep
        mode = None if i in keep else "mlp" if i in mlp else "product" if remake_swiglu else None
        swiglu_down.set_mode(layer, mode)
        remade_norms.set_remade(layer, mode == "mlp" or (mode == "product" and REMAKE_NORMS))


def probe_peak(run_step: Callable[[], None], model: torch.nn.Module, device) -> int | None:
    """Peak bytes allocated by one forward and backward (`run_step`), or None when it ran out of memory. What the
    try held is freed either way, the gradients are dropped and the RNG is left as it was, so the run that
    follows is the one it would have been without the probe."""
    rng = rng_state(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    oom = False
    try:
        run_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except torch.OutOfMemoryError:
        oom = True  # leave the except block first: its traceback holds the failed step's tensors
    peak = None if oom or device.type != "cuda" else torch.cuda.max_memory_allocated(device)
    undo_step(model, device, rng)
    return peak


def rng_state(device) -> tuple:
    """The CPU and CUDA generators' states: where the dropout masks (and the fused kernels' seeds) come from."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if device.type == "cuda" else None)


def undo_step(model: torch.nn.Module, device, rng: tuple) -> None:
    """Drop a tried step's gradients, free what it held and put the generators back to `rng`, so that the step
    run next is the one it would have been without the try."""
    model.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.set_rng_state_all(rng[1])
    torch.set_rng_state(rng[0])


def memory_budget(device, plan_memory_gib: float | None) -> int:
    """Bytes the plan may use: --plan_memory_gib when given (enforced: the allocator refuses more, so a smaller
    card is emulated faithfully), else what this process holds plus what is free; either less a margin for the
    allocator's caching (4%, at least 2 GiB)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    if plan_memory_gib:
        torch.cuda.set_per_process_memory_fraction(min(1.0, plan_memory_gib * GIB / total), index)
        usable = plan_memory_gib * GIB
    else:
        usable = free + torch.cuda.memory_reserved(index)
    # the probe reads allocated bytes, the allocator holds reserved ones (a 32B plan at 77.9 of 78 GiB allocated
    # ran out of memory in its first real step)
    return int(usable - max(2 * GIB, 0.04 * usable))


def describe(chosen: Plan, asked: Plan, world: int, seq_len: int, kernels: str) -> str:
    """The one line that says what runs and why."""
    rows = asked.rows_per_rank_step * world
    line = (
        f"plan: {chosen.micro_batch} x {seq_len} x {chosen.accumulation} accumulation"
        f"{f' x {world} GPUs' if world > 1 else ''}, {chosen.recompute_text()}, {kernels}"
    )
    if chosen == asked:
        return line + f" (as written: {rows} rows per optimizer step)"
    return (
        line + f" (same {rows} rows per optimizer step as {asked.micro_batch} x {seq_len} x "
        f"{asked.accumulation}, {asked.recompute_text()}; --auto_plan false runs as given)"
    )


# ------------------------------------------------------------------------------------------- the decision
def keep_as_written(args, device, parameters: int) -> str | None:
    """Why the plan is what was typed, or None when the search runs."""
    if not args.auto_plan:
        return "--auto_plan false"
    if device.type != "cuda":
        return f"on {device.type}: nothing to gain"
    if args.deepspeed:
        return "under DeepSpeed the micro-batches are DeepSpeed's"
    if args.torch_compile:
        return "--torch_compile: compiled layers keep their recompute setting"
    if parameters < MIN_PARAMETERS:
        return f"{parameters / 1e9:.2f}B parameters: the step is host-bound, nothing to gain"
    return None


def choose(
    args, model, fullest: Callable[[int], dict], wrapped, device, agree, extra: int
) -> tuple[Plan, str]:
    """(the plan, why) for this model and data. `fullest(b)` is a device batch of the b fullest rows of the epoch,
    `wrapped` the model with its loss, `agree(peak)` makes every rank see the same probe result (the largest peak,
    None when any rank ran out of memory), `extra` the bytes needed beyond a step's peak (optimizer states)."""
    layers = len(decoder_layers(model))
    asked = as_written(args.per_device_train_batch_size, args.gradient_accumulation_steps,
                       args.gradient_checkpointing, args.gradient_checkpointing_ratio, layers)  # fmt: skip
    parameters = sum(parameter_count(p) for p in model.parameters())
    if reason := keep_as_written(args, device, parameters):
        return asked, reason

    def probe(plan: Plan) -> int | None:
        set_recompute(model, plan.recompute_layers, plan.remake_swiglu, plan.mlp_layers)
        batch = fullest(plan.micro_batch)
        return agree(probe_peak(lambda: wrapped(**batch).backward(), model, device))

    budget = memory_budget(device, args.plan_memory_gib)
    overhead = host_overhead(parameters, layers, args.max_length)
    # the modes run on the fused LoRA path only (mhsft.train.speedups names it where it runs)
    remake = swiglu_down.installed(model) and "fused LoRA" in getattr(model, "mhsft_kernels", ())
    s = Search(asked, budget, extra, overhead, probe, remake=remake, mlp=remake and RECOMPUTE_MLP)
    chosen = search(s)
    if chosen is None:
        set_recompute(model, asked.recompute_layers)
        # the budget keeps a margin for the allocator's cache, so the command as written may still run in the rest
        return asked, (
            f"no split fits the plan's {budget / GIB:.1f} GiB (the card's memory less a margin), "
            "not even as written: running as written"
        )
    set_recompute(model, chosen.recompute_layers, chosen.remake_swiglu, chosen.mlp_layers)
    peak = next(p for plan, p, ok in s.tried if plan == chosen and ok)
    return chosen, f"measured peak {(peak + extra) / GIB:.1f} of {budget / GIB:.1f} GiB, {len(s.tried)} tries"
