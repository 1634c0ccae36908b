"""benchmarks/train_throughput.py --profile on the CPU (tiny config): the profile's table and summary are there and
its categories add up to the kernel total; the profile's kernel categorizer on real kernel names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))


def test_profile_on_cpu_tiny(tmp_path):
    out, trace = tmp_path / "out.json", tmp_path / "trace"
    cmd = [sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--device", "cpu", "--config", "tiny",
           "--micro_batch", "1", "--seq", "128", "--steps", "1", "--warmup", "0", "--stacks", "mhsft", "--profile",
           "--data", str(REPO / "examples" / "data" / "demo_sharegpt.jsonl"), "--workdir", str(tmp_path),
           "--out", str(out), "--trace_dir", str(trace)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (r,) = json.loads(out.read_text())
    assert "error" not in r, r.get("error")
    for key in ("tokens_per_s", "step_s_median", "peak_gib", "losses", "gpu", "torch"):  # existing keys stay
        assert key in r
    prof = r["profile"]
    for key in ("top_kernels", "categories_s", "category_launches", "kernel_time_s", "gpu_busy_s", "step_wall_s",
                "busy_share_of_wall", "launches", "phases_s", "syncs", "step_s_median_unprofiled"):  # fmt: skip
        assert key in prof, key
    assert 0 < len(prof["top_kernels"]) <= 30
    assert {"name", "ms", "n", "cat", "op"} <= set(prof["top_kernels"][0])
    total = prof["kernel_time_s"]
    assert total > 0 and abs(sum(prof["categories_s"].values()) - total) <= 1e-3 + 1e-3 * total
    assert sum(prof["category_launches"].values()) == prof["launches"] + prof["memcpy_memset"]
    assert prof["categories_s"]["gemm_small_lora"] > 0 and prof["categories_s"]["attention"] > 0
    assert {"forward", "backward", "optimizer"} <= set(prof["phases_s"])
    assert prof["trace"].endswith(".json.gz") and Path(prof["trace"]).is_file()
    assert "--- profile mhsft" in p.stdout and "category" in p.stdout


@pytest.mark.parametrize(
    ("name", "op", "shapes", "want"),
    [
        ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN", "aten::mm", [[24576, 3584], [3584, 18944]], "gemm_big"),
        (
            "nvjet_hsh_64x8_64x16_4x1_v_bz_TNT",
            "aten::addmm",
            [[24576, 512], [24576, 8], [8, 512], [], []],
            "gemm_small_lora",
        ),  # fmt: skip
        ("sm90_xmma_gemm_bf16bf16_bf16f32", "aten::mm", [[4096, 3584], [3584, 152064]], "gemm_lm_head"),
        (
            "void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>",
            "aten::_flash_attention_forward",
            None,
            "attention",
        ),  # fmt: skip
        (
            "void at::native::(anonymous namespace)::fused_dropout_kernel_vec<c10::BFloat16>",
            "aten::native_dropout",
            None,
            "dropout",
        ),  # fmt: skip
        ("_rms_norm_forward_kernel", "", None, "norm_reduce"),
        ("_swiglu_forward_kernel", "", None, "fused_triton"),
        (
            "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>",
            "aten::copy_",
            None,
            "copy_cast",
        ),  # fmt: skip
        ("Memcpy HtoD (Pinned -> Device)", "aten::copy_", None, "copy_cast"),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>",
            "aten::add_",
            None,
            "elementwise",
        ),  # fmt: skip
        (
            "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>",
            "aten::_log_softmax",
            None,
            "loss",
        ),
        ("void at::native::index_elementwise_kernel<128, 4>", "aten::index", None, "index_mask"),
        (
            "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>",
            "aten::_fused_adamw_",
            None,
            "optimizer",
        ),  # fmt: skip
        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "", None, "nccl"),
        ("Memset (Device)", "aten::zero_", None, "fill_memset"),
    ],
)
def test_kernel_categories(name, op, shapes, want):
    from profile_summary import categorize

    assert categorize(name, op, shapes, vocab=152064) == want
