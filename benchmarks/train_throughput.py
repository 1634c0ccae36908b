"""Training throughput on one GPU: (a) HF + PEFT, (b) HF + PEFT + Liger, (c) mhsft's trainer step, same batches.

The batches are packed rows of real-length samples: dialogues from the given files rendered with the chat
template (the tiny tokenizer: no hub here), truncated to --seq, packed best-fit-decreasing into rows of --seq.
Every stack sees the same micro-batches in the same order and starts from the same random weights (seeded);
tokens/s counts real tokens only (row padding excluded). Each stack runs in its own process, so an out-of-memory
stack does not disturb the next. Prints a table; writes JSON.

    python benchmarks/train_throughput.py --config qwen2.5-7b --micro_batch 8 --seq 3072 \
        --data DATA.json [more files] --stacks hf,liger,mhsft --out results.json

--profile runs one more step (the last micro-batch again) under torch.profiler after the timed ones and reports
where the device time goes (benchmarks/profile_summary.py): the top kernels, kernel time by category, GPU busy
time against the step's wall time, launches, idle gaps and the ops that synchronized the host; the same goes into
each stack's JSON under "profile". --trace_dir DIR also writes DIR/STACK.json.gz (a chrome trace). --device cpu
--config tiny is the smoke test (tests/test_train_throughput.py).

mhsft's stack takes variants after a colon, joined by +: `mhsft:liger` (Liger's kernels, with the trainer's loss:
Liger's fused linear cross-entropy), `+fp8`, `+compile`; the A/B switches `+chunked` (the chunked loss instead) or
`+flce` (the fused loss), `+nogroup` (q/k/v and gate/up one linear at a time: a kernel and an input gradient
each), `+nofold` (the LoRA update added into the base's output after its GEMM), `+twopass` (FP8's two-pass
quantization), `+philox7` (the dropout masks from 7 Philox rounds instead of 10), `+maskbits` / `+nomaskbits` (the
masks stored as bits for the backward, or drawn again there), `+gqanative` / `+expandkv` (k/v handed to torch
2.10/2.11's varlen_attn with their own heads, the default since session 13, or expanded to the query heads),
`+concat` (the LoRA update inside the base GEMM, [x | h] @ [W | bt^T]^T, for gate/up).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def make_batches(args) -> str:
    """Render, truncate and pack the data once; save the micro-batches' rows to a file the workers read."""
    import random

    import torch

    from mhsft.builtin import resolve_model
    from mhsft.data.binpack import pack_bfd
    from mhsft.data.loader import load_datasets
    from mhsft.data.render import render_dialogue
    from mhsft.model import load_tokenizer

    tok = load_tokenizer(resolve_model("builtin:tiny"))
    data = load_datasets(args.data, seed=0)
    samples = []
    for d in data.train:
        r = render_dialogue(tok, d, args.seq)
        if any(x != -100 for x in r.labels):
            samples.append({"input_ids": r.input_ids, "labels": r.labels})
    rng = random.Random(0)
    rng.shuffle(samples)
    bins = pack_bfd([len(s["input_ids"]) for s in samples], args.seq)
    rng.shuffle(bins)
    need = (args.warmup + args.steps) * args.micro_batch
    rows = [[samples[i] for i in b] for b in bins[:need]]
    if len(rows) < need:
        raise SystemExit(f"only {len(rows)} packed rows, need {need}: give more data")
    micro = [rows[i : i + args.micro_batch] for i in range(0, need, args.micro_batch)]
    lengths = [len(s["input_ids"]) for s in samples]
    path = Path(args.workdir) / f"batches-{args.config}-{args.micro_batch}x{args.seq}.pt"
    torch.save({"micro": micro, "lengths": lengths}, path)
    fill = sum(len(s["input_ids"]) for r in rows for s in r) / (len(rows) * args.seq)
    print(f"{len(samples)} samples (median {sorted(lengths)[len(lengths) // 2]} tokens), row fill {fill:.1%}")
    return str(path)


def padded_rows(rows, seq: int, pad_id: int):
    """HF layout: [B, seq] rows, position ids restarting per sample (transformers detects packing from them and
    masks attention per document), padding at the end of each row with labels -100."""
    import torch

    ids, labels, pos = [], [], []
    for row in rows:
        i, lab, p = [], [], []
        for s in row:
            i += s["input_ids"]
            lab += [-100] + s["labels"][1:]  # never predict across a sample boundary
            p += list(range(len(s["input_ids"])))
        n = seq - len(i)
        ids.append(i + [pad_id] * n)
        labels.append(lab + [-100] * n)
        pos.append(p + list(range(n)))
    return torch.tensor(ids), torch.tensor(labels), torch.tensor(pos)


def load_bnb4(model_dir: str, dev, checkpointing: bool):
    """The QLoRA anchor's stack: NF4 with double quantization, bf16 compute, then PEFT's k-bit preparation (which
    upcasts the unquantized parameters to float32 and turns checkpointing on). A config-only folder
    (random_model.py --random_init) is quantized by mhsft's loader into the same model from_pretrained would give
    for those weights saved (tests/train/test_qlora.py), without 15 GB written and read back."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from mhsft.model import RANDOM_INIT, load_model

    if (Path(model_dir) / RANDOM_INIT).is_file():
        quant = {"method": "bnb", "bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": None}
        model = load_model(model_dir, "bfloat16", "sdpa", device=str(dev), quant=quant)
    else:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, dtype=torch.bfloat16,
                                                     device_map={"": str(dev)}, attn_implementation="sdpa")  # fmt: skip
    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def worker(args) -> dict:
    import torch
    from random_model import qwen_config
    from transformers import Qwen2ForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = True
    stack, variant = args.worker.split(":") if ":" in args.worker else (args.worker, "")
    data = torch.load(args.batches, weights_only=False)
    micro = data["micro"]
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    cfg = qwen_config(args.config)
    if stack == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)  # fmt: skip
    attn = "sdpa"
    mhsft_args = None
    if stack == "mhsft":
        from mhsft.packed_attention import register_packed_attention, select_attn_backend
        from mhsft.train.sft import SftArguments

        backend, _ = select_attn_backend(dev, "flash_attn")
        attn = register_packed_attention(backend)
        opts = set(variant.split("+")) if variant else set()
        if "nogroup" in opts:  # one linear at a time, autograd adding the input gradients (the groups' A/B)
            import mhsft.train.fused_lora

            mhsft.train.fused_lora.group_siblings = False
        if "nofold" in opts:  # the update added after the base GEMM (the fold's A/B)
            import mhsft.train.fused_lora

            mhsft.train.fused_lora.fold_update = False
        if "philox7" in opts:  # the masks' Philox rounds (the rounds' A/B in a whole step)
            import mhsft.train.fused_lora

            mhsft.train.fused_lora.PHILOX_ROUNDS = 7
        if opts & {"maskbits", "nomaskbits"}:  # the masks stored as bits, or drawn again (the A/B)
            import mhsft.train.fused_lora

            mhsft.train.fused_lora.store_masks = "maskbits" in opts
        if "concat" in opts:  # the LoRA update inside the base GEMM for gate/up (mhsft.train.concat_update)
            import mhsft.train.concat_update

            mhsft.train.concat_update.enabled = True
        # k/v handed to varlen with their own heads (the default since session 13), or expanded (the A/B)
        if opts & {"gqanative", "expandkv"}:
            import mhsft.packed_attention

            mhsft.packed_attention._gqa_native[0] = "gqanative" in opts
        if "twopass" in opts:  # the FP8 quantization's two-pass kernel, for the one-read kernel's A/B
            import mhsft.train.fp8

            mhsft.train.fp8.one_pass = False
        mhsft_args = SftArguments(model="bench", dataset=["bench"], lora_dropout=args.lora_dropout,
                                  gradient_checkpointing=not args.no_gc, max_length=args.seq,
                                  use_liger_kernel="liger" in opts, torch_compile="compile" in opts,
                                  gradient_checkpointing_ratio=args.gc_ratio, fp8="fp8" in opts,
                                  loss_chunk_size=args.loss_chunk)  # fmt: skip
        if (
            "peft" in opts
        ):  # PEFT's own LoRA forward, for comparison with mhsft.lora_forward.fast_lora_forward
            import mhsft.train.speedups

            mhsft.train.speedups.fast_lora_forward = lambda model, fused=None: 0
        if "nofused" in opts:  # mhsft's bf16 LoRA forward with nn.Dropout, not mhsft.train.fused_lora
            import mhsft.train.fused_lora

            mhsft.train.fused_lora.usable = lambda module, x: False
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if variant == "bnb4":  # HF + PEFT + bitsandbytes QLoRA: saved weights, quantized as they load
        model = load_bnb4(args.model_dir, dev, not args.no_gc)
    else:
        # build in bf16: a 32B model in fp32 would not fit (the CPU smoke test runs in fp32: bf16 is slow there)
        torch.set_default_dtype(torch.bfloat16 if cuda else torch.float32)
        with torch.device(dev):
            model = Qwen2ForCausalLM(cfg)
        torch.set_default_dtype(torch.float32)
    init_s = time.perf_counter() - t0
    if stack == "mhsft":
        from mhsft.train.loss import ChunkedLMLoss
        from mhsft.train.sft import prepare_model

        notes: list[str] = []
        model = prepare_model(model, mhsft_args, notes)
        for n in notes:
            print(n, file=sys.stderr)
        from mhsft.train.loss import liger_fused_loss

        # the trainer's loss (Liger's fused loss where Liger runs); +chunked / +flce force one side of the A/B
        fused = getattr(model, "mhsft_fused_loss", None)
        if "chunked" in opts or "flce" in opts:
            fused = liger_fused_loss if "flce" in opts else None
        wrapped = ChunkedLMLoss(model, mhsft_args.loss_chunk_size, fused)
    else:
        from peft import LoraConfig, get_peft_model

        model.config.use_cache = False
        if not args.no_gc and variant != "bnb4":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=args.lora_dropout, target_modules="all-linear",
                          task_type="CAUSAL_LM")  # fmt: skip
        model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), fused=cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses, times, real_tokens = [], [], []
    from torch.profiler import record_function

    from mhsft.train.batches import batch_to_device, collate_packed

    def step(rows) -> float:
        """One optimizer step over one micro-batch, as the trainer's loop does it (mhsft: `batch_to_device`, the
        step's label count from the host batch); the phases are named for the profiler."""
        with record_function("mhsft::collate_h2d"):
            if stack == "mhsft":
                host = collate_packed(rows, 0, 16 if mhsft_args.fp8 else None)
                n_label = int((host["labels"][..., 1:] != -100).sum())
                b = batch_to_device(host, dev)
            else:
                ids, labels, pos = (x.to(dev) for x in padded_rows(rows, args.seq, 0))
        with record_function("mhsft::forward"):
            if stack == "mhsft":
                loss = wrapped(**b) / n_label
            else:
                loss = model(input_ids=ids, labels=labels, position_ids=pos).loss
        with record_function("mhsft::backward"):
            loss.backward()
        with record_function("mhsft::optimizer"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def timed(fn):
        sync()
        t = time.perf_counter()
        value = fn()
        sync()
        return value, time.perf_counter() - t

    for i, rows in enumerate(micro):
        n_real = sum(len(s["input_ids"]) for r in rows for s in r)
        lv, dt = timed(lambda rows=rows: step(rows))
        losses.append(lv)
        if i >= args.warmup:
            times.append(dt)
            real_tokens.append(n_real)
    profile = None
    if args.profile:
        from profile_summary import profile_step

        trace = (
            str(Path(args.trace_dir) / f"{args.worker.replace(':', '_')}.json") if args.trace_dir else None
        )
        profile = profile_step(lambda: step(micro[-1]), dev.type, lambda f: timed(f)[1], vocab=cfg.vocab_size,
                               top=args.profile_top, trace_path=trace)  # fmt: skip
        profile["step_s_median_unprofiled"] = round(sorted(times)[len(times) // 2], 4)
    out = {
        "stack": args.worker,
        "config": args.config,
        "micro_batch": args.micro_batch,
        "seq": args.seq,
        "gradient_checkpointing": not args.no_gc,
        "gc_ratio": args.gc_ratio,
        "loss_chunk": args.loss_chunk,
        "lora_dropout": args.lora_dropout,
        "tokens_per_s": round(sum(real_tokens) / sum(times), 1),
        "step_s_median": round(sorted(times)[len(times) // 2], 3),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "losses": [round(x, 5) for x in losses],
        "init_s": round(init_s, 1),
        "gpu": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
    }
    if profile is not None:
        out["profile"] = profile
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="qwen2.5-7b")
    ap.add_argument("--micro_batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=3072)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lora_dropout", type=float, default=0.05)
    ap.add_argument("--no_gc", action="store_true")
    ap.add_argument("--loss_chunk", type=int, default=2048, help="mhsft: tokens per LM-head + loss chunk")
    ap.add_argument("--gc_ratio", type=float, default=1.0, help="mhsft: share of layers that recompute")
    ap.add_argument("--stacks", default="hf,liger,mhsft")
    ap.add_argument("--data", nargs="+", default=[str(ROOT.parent / "shared/data/train/emollm_data.json")])
    ap.add_argument("--workdir", default="/tmp")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test (with --config tiny)")
    ap.add_argument("--profile", action="store_true", help="profile one more step after the timed ones")
    ap.add_argument("--profile_top", type=int, default=30, help="kernels in the profile's table")
    ap.add_argument("--trace_dir", help="with --profile: write a gzipped chrome trace per stack here")
    ap.add_argument("--out", default="train_throughput.json")
    ap.add_argument("--model_dir", help="hf:bnb4: a saved model folder to load in 4 bits")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--batches", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    batches = make_batches(args)
    results = []
    for stack in args.stacks.split(","):
        cmd = [sys.executable, __file__, "--worker", stack, "--batches", batches, *sys.argv[1:]]
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line:
            r = json.loads(line[7:])
        else:
            oom = "OutOfMemoryError" in p.stderr or "out of memory" in p.stderr
            r = {"stack": stack, "config": args.config, "error": "out of memory" if oom else p.stderr[-1500:]}
        r["wall_s"] = round(time.perf_counter() - t, 1)
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k not in ("losses", "profile")}), flush=True)
        if "profile" in r:
            from profile_summary import format_profile

            print(format_profile(r["profile"], r["stack"]), flush=True)
    base = next((r for r in results if r["stack"] == "hf" and "losses" in r), None)
    print(f"\n{args.config}  micro-batch {args.micro_batch} x {args.seq}  checkpointing {not args.no_gc} "
          f"(mhsft ratio {args.gc_ratio})  "
          f"LoRA dropout {args.lora_dropout}")  # fmt: skip
    print(f"{'stack':<14}{'tokens/s':>10}{'peak GiB':>10}{'vs hf':>8}{'loss[0]':>10}{'|dloss| max':>13}")
    for r in results:
        if "tokens_per_s" not in r:
            print(f"{r['stack']:<14}{r['error'][:60]}")
            continue
        rel = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        dl = max(abs(a - b) for a, b in zip(r["losses"], base["losses"])) if base else float("nan")
        print(f"{r['stack']:<14}{r['tokens_per_s']:>10,.0f}{r['peak_gib'] or 0:>10.1f}{rel:>8}{r['losses'][0]:>10.4f}"
              f"{dl:>13.4f}")  # fmt: skip
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
