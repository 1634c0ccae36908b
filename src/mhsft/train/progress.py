"""Progress numbers for the trainer's one-line-per-logging-step output: throughput, memory, MFU, ETA."""

from __future__ import annotations

import time


def memory_gib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def peak_flops(device) -> float | None:
    """Dense bf16 tensor-core peak of known GPUs, for MFU."""
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in (
        ("H200", 989),
        ("H100", 989),
        ("H800", 989),
        ("A100", 312),
        ("A800", 312),
        ("L40", 181),
        ("4090", 165),
        ("A10", 125),
    ):
        if key in name:
            return tflops * 1e12
    return None


def fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def log_metrics(
    accelerator, window: dict, step: int, *, total_steps: int, per_epoch: int, lr: float, grad_norm: float,
    flops_per_token: float, t_start: float, step_at_start: int,
) -> dict:  # fmt: skip
    """One logging step's numbers, summed over ranks. `window` holds the loss sum, label tokens and tokens since
    the last logging step and when it began; `flops_per_token` is the model's FLOPs per trained token (for MFU)."""
    import torch

    device = accelerator.device
    peak = peak_flops(device)
    dt = max(time.perf_counter() - window["t0"], 1e-9)
    vals = torch.tensor(
        [window["loss"], window["label_tokens"], window["tokens"]], device=device, dtype=torch.float64
    )
    if accelerator.num_processes > 1:
        vals = accelerator.reduce(vals, reduction="sum")
    loss = float(vals[0] / max(vals[1], 1))
    tps = float(vals[2]) / dt
    elapsed = time.perf_counter() - t_start
    done = step - step_at_start
    eta = elapsed / max(done, 1) * (total_steps - step)
    m = {
        "step": step,
        "epoch": round(step / per_epoch, 4),
        "progress": round(step / total_steps, 4),
        "loss": round(loss, 6),
        "lr": lr,
        "grad_norm": round(grad_norm, 6) if grad_norm == grad_norm else None,
        "tokens_per_s": round(tps, 1),
        "memory_gib": round(memory_gib(device), 2),
        "elapsed_s": round(elapsed, 1),
        "eta_s": round(eta, 1),
    }
    if peak:
        m["mfu"] = round(tps * flops_per_token / (peak * accelerator.num_processes), 4)
    return m


def format_line(m: dict, total_steps: int) -> str:
    gn = f"{m['grad_norm']:.3f}" if m["grad_norm"] is not None else "n/a"
    line = (
        f"step {m['step']}/{total_steps} ({100 * m['progress']:.1f}%) loss {m['loss']:.4f} lr {m['lr']:.2e} "
        f"grad_norm {gn} tokens/s {m['tokens_per_s']:,.0f} mem {m['memory_gib']:.1f} GiB"
    )
    if "mfu" in m:
        line += f" MFU {100 * m['mfu']:.1f}%"
    return line + f" ETA {fmt_eta(m['eta_s'])}"
