"""`mhsft export`: merge a LoRA adapter into its base model, shard by shard, and check the result numerically.

    mhsft export --ckpt_dir output/v0-.../checkpoint-508 --merge_lora true --merge_dtype float16 \
        --output_dir export/qwen-sft-7b

The merge itself streams the base's safetensors one output shard at a time (mhsft.export.merge_weights), so a 7B or 32B
model merges in a few GB of memory. The output is a plain transformers model (loadable by vLLM, LMDeploy, ...):
safetensors shards with their index, config.json (dtype set, embeddings untied when the adapter changed one side of
a tied pair), generation_config.json, the tokenizer and chat template the adapter was trained with, the base
model's LICENSE, and `mhsft_export.json` describing the export (base, adapter, dtype, check, training arguments
without secrets) for `mhsft upload`'s model card. `--verify` compares its logits with base + adapter through PEFT
(mhsft.export.merge_verify). Everything is written into a hidden temporary folder beside the output and renamed into
place only once complete and verified, so an interrupted or failed export never leaves a folder that looks done.
"""

from __future__ import annotations

import gc
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from mhsft import __version__
from mhsft.args import ModelArguments, parse_args
from mhsft.checkpoint import (
    EXPORT_META,
    adapter_sha256,
    base_model_of,
    export_matches,
    quantization_of,
    read_checkpoint_args,
)
from mhsft.export.merge_verify import VerifyResult, verify_budget, verify_merge
from mhsft.export.merge_weights import (
    base_dtype,
    human_bytes,
    load_adapter,
    peak_rss_mb,
    plan_merge,
    read_base_tensors,
    reset_peak_rss,
    write_weights,
)
from mhsft.export.modelcard import public_args
from mhsft.export.upload import publish
from mhsft.files import new_temp_dir, publish_dir, read_json, write_json
from mhsft.folder_lock import hold
from mhsft.model import DTYPES, parse_adapters, resolve_model_dir
from mhsft.utils import UserError, get_logger, scrub

log = get_logger()

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
LORA_KEYS = (
    "r",
    "lora_alpha",
    "use_rslora",
    "target_modules",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
)
# ModelScope expects this file in a model repo; ms-swift writes the same.
MODELSCOPE_CONFIGURATION = {"framework": "pytorch", "task": "text-generation", "allow_remote": True}


@dataclass
class ExportArguments(ModelArguments):
    adapters: list[str] = field(
        default_factory=list,
        metadata={"help": "The LoRA checkpoint to merge (ours or ms-swift's); --ckpt_dir is the same flag."},
    )
    merge_lora: bool = field(
        default=True, metadata={"help": "Merge the adapter into the base model (the only export mhsft does)."}
    )
    merge_dtype: str | None = field(
        default=None,
        metadata={
            "help": "float16 | bfloat16 | float32 for the merged weights (default: --torch_dtype, else the "
            "base model's own dtype)."
        },
    )
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where the merged model goes (default: CKPT_DIR-merged, as ms-swift)."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty --output_dir."})
    verify: bool = field(
        default=True,
        metadata={
            "help": "Compare logits of base + adapter (PEFT) and the merged model; fail above tolerance."
        },
    )
    verify_layers: int = field(
        default=0,
        metadata={
            "help": "Check only the first N decoder layers (0: all of them when the model fits in memory "
            "once, else as many as fit)."
        },
    )
    max_shard_size: str = field(
        default="5GB", metadata={"help": "Largest output shard; peak memory is about one shard."}
    )
    push_to_hub: bool = field(
        default=False, metadata={"help": "Upload the merged model afterwards (as `mhsft upload`)."}
    )
    hub_model_id: str | None = field(default=None, metadata={"help": "ORG/NAME for --push_to_hub."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the repository private."})
    commit_message: str = field(
        default="upload with mhsft", metadata={"help": "Commit message for the upload."}
    )


def write_side_files(base_dir: Path, adapter_dir: Path, out: Path, merge_dtype: str, untie: bool) -> str:
    """config.json (dtype, tie), generation config, tokenizer + chat template, license. Returns where the
    tokenizer came from."""
    config = read_json(base_dir / "config.json")
    keys = [k for k in ("dtype", "torch_dtype") if k in config]
    if not keys:  # neither: write the name the installed transformers reads natively
        import transformers

        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        keys = ["dtype" if (major, minor) >= (4, 56) else "torch_dtype"]
    for k in keys:
        config[k] = merge_dtype
    if untie:
        config["tie_word_embeddings"] = False
    config.pop("_name_or_path", None)
    write_json(out / "config.json", config)
    # The tokenizer the adapter was trained with (its checkpoint saved one), else the base model's.
    tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    copied = [n for n in TOKENIZER_FILES if (tok_src / n).is_file()]
    for name in copied:
        shutil.copy2(tok_src / name, out / name)
    if not copied:
        log.info(f"no tokenizer files in {tok_src}: the merged model has no tokenizer")
    for p in base_dir.iterdir():
        if p.name == "generation_config.json" or (
            p.is_file() and p.name.upper().startswith(("LICENSE", "NOTICE"))
        ):
            shutil.copy2(p, out / p.name)
    if (base_dir / "configuration.json").is_file():
        shutil.copy2(base_dir / "configuration.json", out / "configuration.json")
    else:
        write_json(out / "configuration.json", MODELSCOPE_CONFIGURATION)
    return str(tok_src)


# ------------------------------------------------------------------------------------------- the export
@dataclass
class ExportResult:
    path: Path
    meta: dict


def _check_output(out: Path, overwrite: bool, sources: list[Path]) -> None:
    out_r = out.resolve()
    for s in sources:
        s_r = s.resolve()
        if out_r == s_r or out_r in s_r.parents:
            raise UserError(
                f"--output_dir {out} would replace {s}, which the export reads: choose another folder"
            )
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--output_dir {out} is not empty: pass --overwrite true to replace it")


def export_lock_file(out: Path) -> Path:
    """Beside the output, not in it: the output folder is replaced whole when the export is published."""
    return out.parent / f".{out.name}.lock"


def _clean_stale(out: Path) -> None:
    """Temp folders a killed export left beside the output (hidden, never mistaken for a model)."""
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        log.info(f"removing {p}, left by an interrupted export")
        shutil.rmtree(p, ignore_errors=True)
    for p in out.parent.glob(f".{out.name}.old-*"):
        shutil.rmtree(p, ignore_errors=True)


def export_merged(
    base: str | None,
    adapter: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str | None = None,
    *,
    verify: bool = True,
    verify_layers: int = 0,
    overwrite: bool = False,
    max_shard_size: str = "5GB",
    use_hf: bool = False,
    token: str | None = None,
) -> ExportResult:
    """Merge `adapter` into `base` (None: the base the checkpoint names) and write a plain model to `out_dir`."""
    t0 = time.perf_counter()
    reset_peak_rss()
    adapter_dir = Path(adapter).expanduser()
    base_spec = base or _base_of(adapter_dir)
    base_dir = Path(resolve_model_dir(base_spec, use_hf=use_hf, token=token))
    out = Path(out_dir).expanduser()
    # one export into a folder at a time: a second one would delete the first one's temporary folder
    with hold(export_lock_file(out), f"the export folder {out}"):
        _check_output(out, overwrite, [adapter_dir, base_dir])
        config = read_json(base_dir / "config.json")
        base_tensors = read_base_tensors(base_dir)
        merge_dtype = _merge_dtype(dtype, config, base_tensors)
        trained = _trained_quantization(adapter_dir, base_spec)
        ad, plan, untie = _load_plan(adapter_dir, base_spec, base_tensors, config, merge_dtype)
        out.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(out)
        tmp = new_temp_dir(out)
        try:
            stats = write_weights(plan, base_tensors, tmp, merge_dtype, max_shard_size)
            merge_peak = peak_rss_mb()
            tok_src = write_side_files(base_dir, adapter_dir, tmp, merge_dtype, untie)
            sizes = {t.name: base_tensors[t.source].numel for t in plan}
            del ad, plan  # the adapter's tensors: verification loads its own copy through PEFT
            gc.collect()
            check = (
                _verify(base_dir, adapter_dir, tmp, merge_dtype, verify_layers, config, sizes)
                if verify
                else None
            )
            meta = {
                **_source_meta(base_spec, base_dir, adapter_dir, merge_dtype, trained, untie, tok_src),
                **stats,
                "verify": check.__dict__ if check else None,
                "peak_rss_mb": {"merge": round(merge_peak), "total": round(peak_rss_mb())},
                "seconds": round(time.perf_counter() - t0, 1),
                "training_args": public_args(read_checkpoint_args(adapter_dir)),
            }
            write_json(tmp / EXPORT_META, meta)  # last: its presence marks a complete export
            publish_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _log_written(out, meta)
    return ExportResult(out, meta)


def _merge_dtype(dtype: str | None, config: dict, base_tensors: dict) -> str:
    """--merge_dtype by its name (torch.float16 also), else the base model's own dtype."""
    merge_dtype = (
        DTYPES.get(str(dtype).lower().removeprefix("torch.")) if dtype else base_dtype(config, base_tensors)
    )
    if merge_dtype is None:
        raise UserError(f"unknown --merge_dtype {dtype!r}: use float16, bfloat16 or float32")
    return merge_dtype


def _trained_quantization(adapter_dir: Path, base_spec: str) -> dict:
    """The quantization the adapter was trained on ({} if none), said in the log: the merge goes into the full
    weights either way."""
    trained = quantization_of(adapter_dir)
    if trained:  # QLoRA: the base's own weights, not a 4-bit copy of them, receive the update
        log.info(
            f"{adapter_dir} was trained on a {trained.get('quant_bits')}-bit base: merging into the unquantized "
            f"weights of {base_spec} (merging into quantized weights would round the update away)"
        )
    return trained


def _load_plan(adapter_dir: Path, base_spec: str, base_tensors: dict, config: dict, merge_dtype: str):
    """The adapter, the plan of output tensors and whether the embeddings get untied; logs what is merged."""
    import torch

    ad = load_adapter(adapter_dir)
    plan, untie = plan_merge(base_tensors, ad, config)
    base_bytes = sum(t.numel * torch.empty(0, dtype=getattr(torch, t.dtype)).element_size()
                     for t in base_tensors.values())  # fmt: skip
    log.info(
        f"merging {adapter_dir} into {base_spec} ({human_bytes(base_bytes)}, {len(ad.deltas)} LoRA modules"
        f"{f', {len(ad.replacements)} saved modules' if ad.replacements else ''}) as {merge_dtype}"
        + (" (untying the embeddings the adapter changed)" if untie else "")
    )
    return ad, plan, untie


def _source_meta(
    base_spec: str,
    base_dir: Path,
    adapter_dir: Path,
    merge_dtype: str,
    trained: dict,
    untie: bool,
    tok_src: str,
) -> dict:
    """The first part of mhsft_export.json: what was merged into what, and how."""
    lora_cfg = read_json(adapter_dir / "adapter_config.json")
    return {
        "mhsft_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "base_model": base_spec,
        "base_model_dir": str(base_dir),
        "adapter": str(adapter_dir.resolve()),
        "adapter_sha256": adapter_sha256(adapter_dir),
        "merge_dtype": merge_dtype,
        "trained_quantization": trained or None,
        "lora": {k: lora_cfg.get(k) for k in LORA_KEYS},
        "untied_embeddings": untie,
        "tokenizer_from": tok_src,
    }


def _log_written(out: Path, meta: dict) -> None:
    peak = meta["peak_rss_mb"]
    log.info(
        f"wrote {out} ({meta['shards']} shard(s), {human_bytes(meta['total_size'])} {meta['merge_dtype']}); peak "
        f"memory {peak['merge']:,} MB while merging, {peak['total']:,} MB overall"
    )


def _base_of(adapter_dir: Path) -> str:
    base = base_model_of(adapter_dir)
    if not base:
        raise UserError(f"{adapter_dir}: the checkpoint does not name its base model; give --model")
    return base


def _verify(base_dir, adapter_dir, tmp, merge_dtype, verify_layers, config, sizes) -> VerifyResult | None:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    num_layers = int(config.get("num_hidden_layers") or 0)
    compute, layers, notice = verify_budget(sizes, merge_dtype, num_layers, verify_layers, device)
    if notice:
        log.info(notice)
    if layers < 1:
        log.info(
            "verify: skipped, not even one layer of the model fits in the free memory; the merged weights were "
            "written unchecked (export again on a machine with more memory to check them)"
        )
        return None
    part = "" if layers == num_layers else f", first {layers} of {num_layers} layers"
    log.info(
        f"verify: comparing logits of base + adapter (PEFT) and the merged model ({compute} on {device}{part})"
    )
    try:
        check = verify_merge(base_dir, adapter_dir, tmp, merge_dtype, compute, layers, device)
    except torch.OutOfMemoryError:
        raise UserError(
            "verify: out of memory; pass --verify_layers 1 (or fewer layers) or --verify false"
        ) from None
    except (OSError, ValueError, RuntimeError, KeyError) as e:  # a model transformers or PEFT cannot load
        why = scrub(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        raise UserError(f"verify: cannot run the check ({why}); --verify false skips it") from e
    line = (
        f"verify: max |logit difference| {check.max_abs_diff:.3g} (tolerance {check.tolerance:.3g} for "
        f"{merge_dtype}{'' if compute == 'float32' else f' run in {compute}'}; logits up to {check.logit_scale:.3g}, the adapter moves them by up to "
        f"{check.adapter_effect:.3g}) over {check.tokens} tokens of {check.prompts} dialogues"
    )
    if not check.ok:
        raise UserError(f"{line}: FAILED, nothing was written")
    log.info(line + ": ok")
    if check.adapter_effect <= check.tolerance:
        log.info(
            "verify: the adapter changes logits less than the tolerance, so this check cannot tell a merged "
            "adapter from a missing one (an untrained adapter?); --merge_dtype float32 checks to 1e-5"
        )
    return check


def merge_lora(
    base: str | None,
    adapter: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str | None = "float16",
    verify: bool = True,
    *,
    overwrite: bool = False,
    reuse: bool = False,
    max_shard_size: str = "5GB",
    use_hf: bool = False,
    token: str | None = None,
) -> Path:
    """Merge a LoRA checkpoint into its base model and return the merged folder (for engines that cannot apply
    LoRA, e.g. LMDeploy). `base=None` takes the base the checkpoint names; `dtype=None` the base's own dtype.
    `reuse=True` returns an existing export of the same adapter, base and dtype instead of redoing it."""
    out = Path(out_dir).expanduser()
    if reuse and (out / EXPORT_META).is_file():
        want = DTYPES.get(str(dtype).lower()) if dtype else None
        if export_matches(out, Path(adapter).expanduser(), want, base):
            log.info(f"reusing the merged model in {out}")
            return out
        overwrite = True  # a stale export of another adapter: replace it
    return export_merged(
        base,
        adapter,
        out,
        dtype,
        verify=verify,
        overwrite=overwrite,
        max_shard_size=max_shard_size,
        use_hf=use_hf,
        token=token,
    ).path


# ------------------------------------------------------------------------------------------- CLI
def _checkpoint_dir(args: ExportArguments) -> Path:
    if not args.adapters:
        raise UserError("give --ckpt_dir (or --adapters): the LoRA checkpoint to merge")
    if len(args.adapters) > 1:
        raise UserError("mhsft export merges one adapter: give a single --ckpt_dir")
    p = Path(args.adapters[0].partition("=")[2] or args.adapters[0]).expanduser()
    if p.is_dir() and not (p / "adapter_config.json").is_file() and (p / "config.json").is_file():
        raise UserError(f"--ckpt_dir {p} holds full model weights, not a LoRA adapter: nothing to merge")
    # a run folder stands for its best checkpoint (best.json), else its newest; parse_adapters says which
    return Path(next(iter(parse_adapters([str(p)]).values())))


def main(argv: list[str]) -> int:
    args = parse_args(ExportArguments, argv, prog="mhsft export")
    if not args.merge_lora:
        raise UserError("mhsft export only merges LoRA adapters: pass --merge_lora true (the default)")
    ckpt = _checkpoint_dir(args)
    if args.push_to_hub and not args.hub_model_id:
        raise UserError("--push_to_hub true needs --hub_model_id ORG/NAME")
    dtype = args.merge_dtype or (args.torch_dtype if args.torch_dtype not in (None, "", "auto") else None)
    out = Path(args.output_dir) if args.output_dir else ckpt.parent / f"{ckpt.name}-merged"
    result = export_merged(
        args.model,
        ckpt,
        out,
        dtype,
        verify=args.verify,
        verify_layers=args.verify_layers,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
        use_hf=args.use_hf,
        token=args.hub_token,
    )
    print(result.path)
    if args.push_to_hub:
        publish(
            result.path,
            hub="huggingface" if args.use_hf else "modelscope",
            model_id=args.hub_model_id,
            private=args.hub_private_repo,
            commit_message=args.commit_message,
            token=args.hub_token,
        )
    return 0
