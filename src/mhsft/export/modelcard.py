"""The model card (README.md) `mhsft upload` writes for a model folder that has none.

It is built from what the folder says about itself: `mhsft_export.json` (written by `mhsft export`: base model,
adapter, dtype, the numeric check, the training arguments), else an `args.json` (an mhsft or ms-swift checkpoint,
or an ms-swift export). Evaluation results follow one convention: `mhsft eval` writes `results.json`, and the card
looks for it in the model folder, its `eval/` subfolder, the same two places in the checkpoint the model was merged
from (and that checkpoint's run folder), and `eval_output/*/` of the working directory (`mhsft eval`'s default
output) when the file's `model` or `adapter` names this model; `--eval_results FILE` overrides the search. Its
`metrics` (all of the file when it has none) are shown as a table of scalar values. Secrets never reach the card: secret-named arguments are dropped,
known secret values are masked, and command lines have their secret flags masked.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from mhsft.model import HUB_ID_RE
from mhsft.utils import MASK, is_secret_name, redact_argv, scrub

RESULTS_FILE = "results.json"
DATA_SUFFIXES = (".json", ".jsonl", ".txt", ".csv", ".parquet", ".arrow")
# Hyperparameters shown in the card's table (mhsft and ms-swift share these names); the rest go in a fold.
KEY_ARGS = (
    "model",
    "train_type",
    "tuner_type",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "modules_to_save",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_ratio",
    "weight_decay",
    "num_train_epochs",
    "max_steps",
    "total_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "world_size",
    "max_length",
    "packing",
    "torch_dtype",
    "dtype",
    "seed",
    "train_samples",
    "val_samples",
)
MAX_RESULT_ROWS = 60

SAFETY_NOTICE = """## ⚠️ 安全声明 / Safety notice

**本模型不能替代专业的心理咨询、诊断或治疗，也不能用于危机干预。** 它可能给出不准确、不恰当甚至有害的回答，\
不能识别或处理自杀、自伤、暴力等紧急情况。如果你或身边的人正处于危机之中，请立即联系当地急救（中国：120）或报警（110），\
或拨打心理援助热线：全国心理援助热线 12356、希望24热线 400-161-9995、北京心理危机研究与干预中心 010-82951332。

**This model is not a substitute for professional counseling, diagnosis or treatment, and must not be used for \
crisis intervention.** It can produce inaccurate, inappropriate or harmful replies and cannot recognise or handle \
emergencies such as suicide, self-harm or violence. If you or someone near you is in crisis, contact local emergency \
services (China: 120 ambulance, 110 police) or a crisis hotline right away.
"""

INTENDED_USE = """## 预期用途 / Intended use

- 心理咨询对话的研究、教学与原型开发；在专业人员监督下的陪伴式支持对话实验。
- Research, teaching and prototyping of counseling dialogue systems; supervised experiments with supportive \
conversation.

**不适用 / Out of scope:** 医疗或心理诊断、治疗建议、危机干预、面向未成年人或脆弱人群的无人监督服务、任何替代持证专业人员的场景。\
Medical or psychological diagnosis, treatment advice, crisis intervention, unsupervised services for minors or \
vulnerable people, and any use that replaces a licensed professional.

**局限 / Limitations:** 模型继承基础模型与训练数据的偏差；训练数据中的对话可能经过改写或合成，不代表真实临床实践。\
请勿输入可识别身份的个人信息。The model inherits biases of its base model and training data; training dialogues \
may be rewritten or synthetic and do not represent clinical practice. Do not enter personally identifying \
information. Deployers are responsible for human oversight, escalation paths and local regulations.
"""


# ------------------------------------------------------------------------------------------- secrets
def public_args(d: dict) -> dict:
    """Training arguments fit to publish: secret-named keys holding text dropped (not even masked: a reader
    learns nothing from `***`; numbers such as max_new_tokens stay), known secret values masked everywhere,
    secret flags in command lines masked."""
    out = {}
    for k, v in d.items():
        if is_secret_name(str(k)) and isinstance(v, (str, dict, list)):
            continue
        if isinstance(v, dict):
            out[k] = public_args(v)
        elif isinstance(v, list):
            out[k] = [public_args(x) if isinstance(x, dict) else _public_str(x) for x in v]
        elif isinstance(v, str):
            out[k] = _public_command(v) if k in ("command", "cmd", "command_line") else _public_str(v)
        else:
            out[k] = v
    return out


def _public_str(v):
    return scrub(v) if isinstance(v, str) else v


def _public_command(cmd: str) -> str:
    try:
        parts = shlex.split(cmd)
    except ValueError:  # unbalanced quotes: mask every flag-like value to be safe
        return scrub(
            re.sub(r"(--\S*(?:token|key|secret|password)\S*)[ =]\S+", rf"\1 {MASK}", cmd, flags=re.I)
        )
    return " ".join(shlex.quote(a) for a in redact_argv(parts))


# ------------------------------------------------------------------------------------------- inputs
def _read_json(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def describe(model_dir: Path) -> dict:
    """What the folder says about itself: the export metadata, else a checkpoint's args.json."""
    meta = _read_json(model_dir / "mhsft_export.json")
    if isinstance(meta, dict):
        return meta
    args = _read_json(model_dir / "args.json")
    if isinstance(args, dict):
        return {
            "base_model": args.get("model"),
            "training_args": public_args(args),
            "adapter": str(model_dir),
        }
    return {}


def _same_path(a, b) -> bool:
    try:
        return (
            bool(a) and bool(b) and Path(str(a)).expanduser().resolve() == Path(str(b)).expanduser().resolve()
        )
    except (OSError, RuntimeError, ValueError):
        return False


def find_eval_results(model_dir: Path, meta: dict, search_root: Path | None = None) -> list[Path]:
    """`results.json` files from `mhsft eval` that belong to this model (see the module docstring)."""
    places = [model_dir, model_dir / "eval"]
    if meta.get("adapter"):
        ckpt = Path(meta["adapter"])
        places += [ckpt, ckpt / "eval", ckpt.parent / "eval"]
    found = [p / RESULTS_FILE for p in places if (p / RESULTS_FILE).is_file()]
    # `mhsft eval`'s default output, eval_output/NAME-HASH/results.json in the working directory: taken when it
    # names this model folder or the adapter it was merged from.
    for f in sorted(((search_root or Path.cwd()) / "eval_output").glob(f"*/{RESULTS_FILE}")):
        data = _read_json(f)
        if isinstance(data, dict) and (
            _same_path(data.get("model"), model_dir) or _same_path(data.get("adapter"), meta.get("adapter"))
        ):
            found.append(f)
    unique: dict[Path, Path] = {}
    for f in found:
        unique.setdefault(f.resolve(), f)
    return list(unique.values())


def base_license(meta: dict) -> str | None:
    """The `license:` of the base model's own card when it is on disk."""
    d = meta.get("base_model_dir")
    if not d:
        return None
    try:
        text = (Path(d) / "README.md").read_text(encoding="utf-8")
    except OSError:
        return None
    m = re.match(r"---\s*\n(.*?)\n---", text, re.S)
    if not m:
        return None
    import yaml

    try:
        front = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError:
        return None
    lic = front.get("license") if isinstance(front, dict) else None
    return str(lic) if lic else None


def dataset_names(args: dict) -> tuple[list[str], list[str]]:
    """(hub ids, local dataset names) from the training arguments. Local paths are cut to their file name:
    a path on the trainer's machine means nothing to a reader and may hold a user name."""
    hub, local = [], []
    for spec in [*(args.get("dataset") or []), *(args.get("val_dataset") or [])]:
        name = re.sub(r"#\d+$", "", str(spec)).strip()
        repo = name.split(":", 1)[0]
        is_local = (
            repo.startswith((".", "/", "~"))
            or repo.lower().endswith(DATA_SUFFIXES)
            or repo.count("/") != 1
            or not HUB_ID_RE.fullmatch(repo)
        )
        (local if is_local else hub).append(Path(name).name if is_local else repo)
    return list(dict.fromkeys(hub)), list(dict.fromkeys(local))


def _hub_id(name: str | None) -> str | None:
    if name and HUB_ID_RE.fullmatch(name) and not Path(name).expanduser().exists():
        return name
    return None


def _flatten(obj, prefix: str = "") -> list[tuple[str, object]]:
    """Scalar leaves of an evaluation result as (dotted key, value); per-sample lists are skipped."""
    rows: list[tuple[str, object]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if is_secret_name(str(k)):
                continue
            rows += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (int, float, bool)) or (isinstance(obj, str) and len(obj) <= 80):
        rows.append((prefix, obj))
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v).replace("|", "\\|").replace("\n", " ")


# ------------------------------------------------------------------------------------------- the card
def build_card(
    model_dir: str | Path, model_id: str | None = None, license: str | None = None, eval_results=None
) -> str:
    """The README.md for `model_dir`: front matter, what the model is, its base and data, the training arguments,
    its evaluation results, how it was exported, how to use it, its license."""
    model_dir = Path(model_dir)
    meta = describe(model_dir)
    args = meta.get("training_args") or {}
    home = str(Path.home())

    def tidy(s: str) -> str:  # the trainer's home folder tells a reader nothing
        return scrub(s.replace(home, "~")) if home not in ("/", "") else scrub(s)

    base = meta.get("base_model") or args.get("model")
    lic = license or base_license(meta) or "other"
    is_adapter = (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file()
    full = str(args.get("train_type") or args.get("tuner_type") or "lora").lower() == "full"
    name = model_id or model_dir.name
    base_txt = f"`{tidy(str(base))}`" if base else "an unrecorded base model"
    out = _front_matter(base, lic, dataset_names(args)[0], is_adapter, full) + [f"# {name}", ""]
    out += _what_it_is(base_txt, is_adapter, full)
    out += _base_and_data(base_txt, args, tidy)
    out += _training_arguments(args, tidy)
    files = [Path(p) for p in eval_results] if eval_results else find_eval_results(model_dir, meta)
    out += _evaluation(files, tidy)
    out += _export(meta)
    out += _usage_and_license(name, lic)
    return tidy("\n".join(out))


def _front_matter(base, lic: str, hub_sets: list[str], is_adapter: bool, full: bool) -> list[str]:
    """The YAML header both hubs read (Hugging Face's and ModelScope's field names)."""
    import yaml  # deferred: only a card needs it

    base_id = _hub_id(base)
    front = {
        "license": lic,
        **({"base_model": base_id} if base_id else {}),
        "language": ["zh", "en"],
        "library_name": "peft" if is_adapter else "transformers",
        "pipeline_tag": "text-generation",
        "tags": [
            "mhsft",
            *([] if full else ["lora"]),
            "mental-health",
            "psychological-counseling",
            "chinese",
            "conversational",
        ],  # fmt: skip
        **({"datasets": hub_sets} if hub_sets else {}),
        "tasks": ["text-generation"],  # ModelScope's card fields
        "frameworks": ["pytorch"],
    }
    return ["---", yaml.safe_dump(front, allow_unicode=True, sort_keys=False).strip(), "---", ""]


def _what_it_is(base_txt: str, is_adapter: bool, full: bool) -> list[str]:
    method, method_zh = ("full-parameter fine-tuning", "全参数微调") if full else ("LoRA", "LoRA 监督微调")
    what = "LoRA 适配器" if is_adapter else ("完整模型" if full else "已合并 LoRA 的完整模型")
    what_en = (
        "the LoRA adapter" if is_adapter else ("the full model" if full else "LoRA merged into the model")
    )
    return [
        f"中文心理咨询多轮对话模型：在 {base_txt} 上进行{method_zh}（{what}）。",
        "",
        f"A Chinese mental-health counseling chat model: {base_txt} fine-tuned with {method} ({what_en}).",
        "",
        SAFETY_NOTICE,
        INTENDED_USE,
    ]


def _base_and_data(base_txt: str, args: dict, tidy) -> list[str]:
    hub_sets, local_sets = dataset_names(args)
    out = ["## 基础模型与训练数据 / Base model and data", "", f"- Base model: {base_txt}"]
    for ds in hub_sets:
        out.append(f"- Dataset: [{ds}](https://huggingface.co/datasets/{ds}) (hub id)")
    for ds in local_sets:
        out.append(f"- Dataset: `{tidy(ds)}` (local file, not published with the model)")
    if not hub_sets and not local_sets:
        out.append("- Datasets: not recorded")
    return [*out, ""]


def _training_arguments(args: dict, tidy) -> list[str]:
    out = ["## 训练参数 / Training arguments", ""]
    if not args:
        return [*out, "Not recorded (no mhsft_export.json or args.json in the model folder).", ""]
    rows = [(k, args[k]) for k in KEY_ARGS if args.get(k) not in (None, "", [])]
    out += ["| argument | value |", "|---|---|"]
    out += [f"| {k} | {tidy(_fmt(v))} |" for k, v in rows]
    full = tidy(json.dumps(args, ensure_ascii=False, indent=2, default=str))
    out += [
        "",
        "<details><summary>All training arguments</summary>",
        "",
        "```json",
        full,
        "```",
        "",
        "</details>",
    ]
    return [*out, ""]


def _evaluation(files: list[Path], tidy) -> list[str]:
    out = ["## 评测 / Evaluation", ""]
    shown = False
    for f in files:
        data = _read_json(f)
        if isinstance(data, dict) and isinstance(data.get("metrics"), dict):
            data = data["metrics"]
        rows = _flatten(data)[:MAX_RESULT_ROWS] if isinstance(data, dict) else []
        if rows:
            shown = True
            out += [f"From `{f.name}` ({tidy(str(f.parent.name))}):", "", "| metric | value |", "|---|---|"]
            out += [f"| {tidy(_fmt(k))} | {tidy(_fmt(v))} |" for k, v in rows]
            out.append("")
    if not shown:
        out += [
            "No evaluation results were recorded for this model (`mhsft eval` writes `results.json`).",
            "",
        ]
    return out


def _export(meta: dict) -> list[str]:
    if not meta.get("merge_dtype"):
        return []
    out = ["## 导出 / Export", ""]
    out.append(f"- Merged in `{meta['merge_dtype']}` by mhsft {meta.get('mhsft_version', '')}".rstrip())
    if check := meta.get("verify"):
        out.append(
            f"- Checked against base + adapter (PEFT): max |logit difference| {check['max_abs_diff']:.3g} "
            f"(tolerance {check['tolerance']:.3g}) on {check['tokens']} tokens"
        )
    return [*out, ""]


def _usage_and_license(name: str, lic: str) -> list[str]:
    return [
        "## 使用 / Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'tok = AutoTokenizer.from_pretrained("{name}")',
        f'model = AutoModelForCausalLM.from_pretrained("{name}", dtype="auto", device_map="auto")',
        'messages = [{"role": "user", "content": "最近总是失眠，心里很乱。"}]',
        "ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt').to(model.device)",
        "print(tok.decode(model.generate(ids, max_new_tokens=256)[0][ids.shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        "## 许可 / License",
        "",
        f"`{lic}`" + ("; 遵循基础模型的许可 / follows the base model's license." if lic == "other" else "."),
        "使用者还须遵守训练数据集各自的许可。Users must also respect the licenses of the training datasets.",
        "",
    ]
