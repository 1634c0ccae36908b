"""Peak memory of `mhsft export`'s shard-by-shard LoRA merge, measured on a generated multi-shard model.

    python benchmarks/merge_memory.py                       # ~230 MB bf16 model in 20 MB shards (seconds)
    python benchmarks/merge_memory.py --preset qwen2.5-7b   # 15 GB on disk twice, ~5 min on 2 CPU cores
    python benchmarks/merge_memory.py --preset qwen2.5-32b --shard_size 5GB   # 65 GB on disk twice

It writes a random-weight Qwen2 model of the preset's shape straight to safetensors shards (never holding the
model in memory), a random LoRA adapter on every linear layer, then runs `mhsft.export.merge.merge_lora(verify=False)`
in a fresh process and reports the resident memory it added over the process's baseline (torch + transformers
imported), from the kernel's high-water mark (VmHWM). Expected: about one output shard (--shard_size, default 5 GB in
`mhsft export`) plus the largest single tensor (the embedding: 1.1 GB in bf16 for Qwen2.5-7B, 2.2 GB once upcast
to float32 when the adapter changes it) plus the adapter, independent of the model's total size; so a 7B merges
in well under 24 GB, and so does a 32B. The numeric check (--verify) is separate and needs one model's memory.
The output is one JSON object; `--keep` keeps the generated folders.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRESETS = {
    # ~114M parameters, 227 MB in bf16: big enough that a whole-model merge would stand out from the baseline.
    "test": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=12,
                 num_key_value_heads=4, vocab_size=16384, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "qwen2.5-32b": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                        num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
}  # fmt: skip
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build(preset: str, root: Path, shard_size: str, dtype: str, rank: int) -> tuple[Path, Path]:
    """Base model (random, sharded, written shard by shard) and a LoRA adapter for it."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    base, adapter = root / "base", root / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir()
    cfg = Qwen2Config(**PRESETS[preset], max_position_embeddings=32768, rope_theta=1e6, dtype=dtype)
    cfg.architectures = ["Qwen2ForCausalLM"]
    with torch.device("meta"):
        meta_model = Qwen2ForCausalLM(cfg)
    tdtype = getattr(torch, dtype)
    meta = {k: v.to(tdtype) for k, v in meta_model.state_dict().items()}
    if cfg.tie_word_embeddings:
        meta.pop("lm_head.weight", None)
    split = split_torch_state_dict_into_shards(meta, max_shard_size=shard_size)
    gen = torch.Generator().manual_seed(0)
    for filename, names in split.filename_to_tensors.items():
        shard = {n: (torch.randn(meta[n].shape, generator=gen) * 0.02).to(tdtype) for n in names}
        save_file(shard, str(base / filename), metadata={"format": "pt"})
        del shard
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (base / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg.save_pretrained(base)

    lora, targets = {}, []
    for name, mod in meta_model.named_modules():
        if name.rsplit(".", 1)[-1] in LINEAR:
            targets.append(name)
            lora[f"base_model.model.{name}.lora_A.weight"] = (
                torch.randn(rank, mod.in_features, generator=gen) * 0.01
            )
            lora[f"base_model.model.{name}.lora_B.weight"] = (
                torch.randn(mod.out_features, rank, generator=gen) * 0.01
            )
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, task_type="CAUSAL_LM",
               base_model_name_or_path=str(base)).save_pretrained(adapter)  # fmt: skip
    (adapter / "args.json").write_text(
        json.dumps({"model": str(base), "train_type": "lora", "lora_rank": rank})
    )
    return base, adapter


def measure(base: str, adapter: str, out: str, shard_size: str, dtype: str) -> dict:
    """Run in a fresh process: the merge's memory over the baseline of an idle process with everything imported."""
    import peft  # noqa: F401  (imported before the baseline is taken: ~150 MB of code the merge needs anyway)
    import psutil
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from mhsft.export.merge import merge_lora
    from mhsft.export.merge_weights import peak_rss_mb

    rss_before = psutil.Process().memory_info().rss / 1e6
    peak_before = peak_rss_mb()
    t = time.perf_counter()
    merge_lora(base, adapter, out, dtype=dtype, verify=False, max_shard_size=shard_size)
    seconds = time.perf_counter() - t
    peak_after = peak_rss_mb()
    files = sorted(Path(base).glob("*.safetensors"))
    return {
        "base_bytes": sum(f.stat().st_size for f in files),
        "base_shards": len(files),
        "largest_base_shard_bytes": max(f.stat().st_size for f in files),
        "adapter_bytes": (Path(adapter) / "adapter_model.safetensors").stat().st_size,
        "output_shards": len(list(Path(out).glob("*.safetensors"))),
        "rss_before_mb": round(rss_before, 1),
        "peak_before_mb": round(peak_before, 1),
        "peak_after_mb": round(peak_after, 1),
        "merge_added_mb": round(peak_after - max(rss_before, 0.0), 1),
        "seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="test", choices=sorted(PRESETS))
    p.add_argument("--shard_size", default="20MB", help="shard size of the generated base and of the output")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true")
    p.add_argument(
        "--_measure", nargs=5, metavar=("BASE", "ADAPTER", "OUT", "SHARD", "DTYPE"), help=argparse.SUPPRESS
    )
    a = p.parse_args(argv)
    if a._measure:
        print(json.dumps(measure(*a._measure)))
        return 0
    root = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="mhsft-merge-mem-"))
    try:
        t = time.perf_counter()
        # Built in a child too, so that the build's own memory never counts as the merge's.
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]); import merge_memory as m; "
            "from pathlib import Path; m.build(sys.argv[2], Path(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6]))"
        )
        here = str(Path(__file__).resolve().parent)
        subprocess.run(
            [sys.executable, "-c", code, here, a.preset, str(root), a.shard_size, a.dtype, str(a.rank)],
            check=True,
        )
        built = time.perf_counter() - t
        res = subprocess.run(
            [sys.executable, __file__, "--_measure", str(root / "base"), str(root / "adapter"), str(root / "out"),
             a.shard_size, a.dtype],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        report = {
            "preset": a.preset,
            "shard_size": a.shard_size,
            "dtype": a.dtype,
            "build_seconds": round(built, 1),
        }
        report |= json.loads(res.stdout.strip().splitlines()[-1])
        print(json.dumps(report, indent=2))
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
