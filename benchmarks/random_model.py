"""Build a random-weight model directory with a real architecture (Qwen2.5-7B / 32B) for speed work on a GPU.

The weights are random (no hub is reachable from the GPU machine), the tokenizer is mhsft's tiny one: speed and
memory depend on the shapes only. Usage: python benchmarks/random_model.py qwen2.5-7b /tmp/qwen7b [--random_init]

--random_init writes the config and tokenizer only, with mhsft's RANDOM_INIT marker: `mhsft` draws the weights
(seeded) on the GPU when it loads the folder, so a 32B model needs no 65 GB on disk and loads in seconds.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

CONFIGS = {
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, tie_word_embeddings=False),
    "qwen2.5-32b": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                        num_key_value_heads=8, tie_word_embeddings=False),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, tie_word_embeddings=True),
    # CPU smoke tests (train_throughput.py --device cpu): the tiny tokenizer's vocabulary, rounded up
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False, vocab_size=2112),
}  # fmt: skip


def qwen_config(name: str):
    """The real architecture's config, with the tiny tokenizer's special-token ids (vocab stays 152064)."""
    from transformers import Qwen2Config

    return Qwen2Config(**{
        "vocab_size": 152064, "max_position_embeddings": 32768, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
        "bos_token_id": 2048, "eos_token_id": 2050, "pad_token_id": 2048, "torch_dtype": "bfloat16",
        "use_cache": False, **CONFIGS[name],
    })  # fmt: skip


def build(name: str, out: str | Path, device: str = "cuda", random_init: bool = False) -> Path:
    import json

    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from mhsft.builtin import resolve_model
    from mhsft.model import RANDOM_INIT

    out = Path(out)
    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(resolve_model("builtin:tiny"))
    cfg = qwen_config(name)
    assert (cfg.eos_token_id, cfg.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    if random_init:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(out)
        tok.save_pretrained(out)
        (out / RANDOM_INIT).write_text(json.dumps({"seed": 0, "architecture": name}), encoding="utf-8")
        print(f"wrote {name} (config and tokenizer; weights drawn at load) in {out}")
        return out
    t = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # build in bf16: a 32B model in fp32 would not fit
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")
    tok.save_pretrained(out)
    print(f"built {name} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params) in {out} "
          f"in {time.perf_counter() - t:.0f}s")  # fmt: skip
    return out


if __name__ == "__main__":
    flags = [a for a in sys.argv[1:] if a.startswith("--")]
    pos = [a for a in sys.argv[1:] if not a.startswith("--")]
    build(pos[0], pos[1], pos[2] if len(pos) > 2 else "cuda", random_init="--random_init" in flags)
