"""Several GPUs: DDP comes from `torchrun` / `accelerate launch` through accelerate's Accelerator; DeepSpeed ZeRO
configs are built in (`--deepspeed zero2|zero3`) or read from a JSON file, as ms-swift does.

Not exercised on this project's CI (no GPU, no deepspeed package); see README "What is not tested here".
"""

from __future__ import annotations

import json
from pathlib import Path

from mhsft.utils import UserError


def zero_config(stage: int, micro_batch: int, grad_accum: int, bf16: bool, fp16: bool) -> dict:
    cfg: dict = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": "auto",
        "bf16": {"enabled": bool(bf16)},
        "fp16": {"enabled": bool(fp16), "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": {
            "stage": stage,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": "auto",
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if stage == 3:
        cfg["zero_optimization"].update(
            {
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
                "stage3_max_live_parameters": 1e9,
                "stage3_max_reuse_distance": 1e9,
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
    return cfg


def deepspeed_plugin(args):
    """An accelerate DeepSpeedPlugin for `--deepspeed`, or None."""
    spec = getattr(args, "deepspeed", None)
    if not spec:
        return None
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise UserError("--deepspeed needs the deepspeed package: pip install deepspeed") from None
    from accelerate.utils import DeepSpeedPlugin

    ga = args.gradient_accumulation_steps or 1
    if spec in ("zero2", "zero3"):
        cfg = zero_config(int(spec[-1]), args.per_device_train_batch_size, ga, args.bf16, args.fp16)
    else:
        p = Path(spec)
        if not p.is_file():
            raise UserError(f"--deepspeed {spec}: expected zero2, zero3 or a JSON config file")
        try:
            cfg = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"--deepspeed {spec}: invalid JSON ({e})") from None
    return DeepSpeedPlugin(hf_ds_config=cfg)


def zero3_enabled() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()
