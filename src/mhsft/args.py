"""Typed arguments shared by several stages, and the parser that turns a command line (or YAML) into them.

Each stage defines ONE dataclass of arguments (by inheriting the mixins below) and parses it with
`parse_args`. transformers' HfArgumentParser gives ms-swift's `--flag true` booleans and list flags
(`--dataset a b c`) for free.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from dataclasses import dataclass, field
from typing import TypeVar

from mhsft.utils import UserError, get_logger, is_secret_name, redact_args, redact_argv

T = TypeVar("T")

# ms-swift 4 renamed some flags; both spellings work. Old name -> our field name.
ALIASES = {
    "--tuner_type": "--train_type",
    "--model_id_or_path": "--model",
    "--ckpt_dir": "--adapters",
    "--model_name": "--served_model_name",
    "--early_stop_interval": "--early_stopping_patience",  # ms-swift 3's name for the same counter
}


@dataclass
class ModelArguments:
    model: str | None = field(
        default=None,
        metadata={
            "help": "Model id (ModelScope by default, Hugging Face with --use_hf true), a local directory, "
            "or builtin:tiny for the tiny locally built model."
        },
    )
    use_hf: bool = field(
        default=False, metadata={"help": "Resolve hub ids on Hugging Face instead of ModelScope."}
    )
    torch_dtype: str = field(
        default="auto",
        metadata={"help": "auto | bfloat16 | float16 | float32 (auto: the checkpoint's own dtype)."},
    )
    attn_impl: str | None = field(
        default=None,
        metadata={
            "help": "flash_attn | sdpa | eager | flex_attention. flash_attn falls back with a "
            "notice when the package is missing."
        },
    )
    hub_token: str | None = field(
        default=None, metadata={"help": "Hub token (else MODELSCOPE_API_TOKEN / HF_TOKEN)."}
    )


@dataclass
class DataArguments:
    dataset: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Datasets: local files/folders or hub ids, `#N` samples N records (e.g. data.jsonl#500)."
        },
    )
    val_dataset: list[str] = field(
        default_factory=list, metadata={"help": "Validation datasets (same syntax)."}
    )
    split_dataset_ratio: float = field(
        default=0.0,
        metadata={"help": "Hold out this share of --dataset for validation when --val_dataset is empty."},
    )
    dataset_format: str = field(
        default="auto",
        metadata={
            "help": "auto | sharegpt | messages | alpaca | emollm | cpsycound | cpsycoune | psyqa (auto: per file)."
        },
    )
    strict: bool = field(
        default=False, metadata={"help": "Stop at the first bad record instead of skipping it."}
    )
    seed: int = field(
        default=42, metadata={"help": "Random seed (sampling with #N, splits, shuffling, training)."}
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "Maximum tokens per sample; longer dialogues lose their earliest turns."},
    )


@dataclass
class QuantArguments:
    """A quantized base model (QLoRA) with ms-swift's flag names, through bitsandbytes. `mhsft sft` trains LoRA on
    it; `mhsft infer`, `deploy` and `eval` load a checkpoint's base the way it was trained unless told otherwise."""

    quant_method: str | None = field(
        default=None, metadata={"help": "bnb (bitsandbytes): load the base model quantized (QLoRA)."}
    )
    quant_bits: int | None = field(
        default=None,
        metadata={
            "help": "4 (NF4/FP4) or 8 bits; 0 = not quantized (infer/deploy/eval: overrides the checkpoint's "
            "quantization). Default for infer/deploy/eval: as the checkpoint was trained."
        },
    )
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "nf4 | fp4 (4-bit data type)."})
    bnb_4bit_use_double_quant: bool = field(
        default=True, metadata={"help": "Quantize the 4-bit quantization constants too (~0.4 bits a weight)."}
    )
    bnb_4bit_compute_dtype: str | None = field(
        default=None, metadata={"help": "dtype of the 4-bit layers' matmuls (default: the training dtype)."}
    )


BOOL_WORDS = {"true", "false", "yes", "no", "t", "f", "y", "n", "1", "0"}


def split_positional(argv: list[str], cls: type, dest: str) -> list[str]:
    """Bare words are values of the list flag `--DEST`, given before, between or after the other flags:
    `mhsft data inspect --model X a.json b.json` -> `--dataset a.json b.json --model X`.

    A bare word belongs to `--DEST` unless it is the value of the flag before it: one value for most flags, an
    optional true/false for booleans, every following word for list flags (and for `--DEST` itself)."""
    import typing

    # Resolved hints, not `Field.type`: that is a string here, and HfArgumentParser rewrites it in place.
    kinds = {k: str(v) for k, v in typing.get_type_hints(cls).items()}
    values: list[str] = []
    flags: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        i += 1
        if not a.startswith("-") or a == "-":
            values.append(a)
            continue
        name = a.lstrip("-")
        if name.startswith(dest + "="):
            values.append(name.split("=", 1)[1])
            continue
        if name == dest:
            while i < len(argv) and not argv[i].startswith("-"):
                values.append(argv[i])
                i += 1
            continue
        flags.append(a)
        kind = kinds.get(name, "")
        if "=" in a or a in ("-h", "--help") or name.startswith("no_") and name[3:] in kinds:
            continue
        if kind == str(bool):
            takes = i < len(argv) and argv[i].lower() in BOOL_WORDS
        elif kind.startswith("list"):
            takes = len(argv)
        else:
            takes = 1
        while takes and i < len(argv) and not argv[i].startswith("-"):
            flags.append(argv[i])
            i += 1
            takes -= 1
    return ([f"--{dest}", *values] if values else []) + flags


def pick_subcommand(
    argv: list[str], verb: str, usage: str, table: dict[str, str]
) -> tuple[str, list[str]] | None:
    """`mhsft VERB SUB ...` for the verbs with subcommands (data, review): (SUB, the rest), or None after printing
    the list of subcommands for no argument or --help; an unknown SUB is a one-line error."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: mhsft {verb} <command> {usage}   (mhsft {verb} <command> --help)\n")
        width = max(map(len, table)) + 2
        for name, desc in table.items():
            print(f"  {name:<{width}} {desc}")
        return None
    if argv[0] not in table:
        raise UserError(f"unknown {verb} command {argv[0]!r}; choose one of: {', '.join(table)}")
    return argv[0], list(argv[1:])


def _normalize_argv(argv: list[str]) -> list[str]:
    """ms-swift renames -> our names; a secret flag left without a value (`--swanlab_token ${SWANLAB_API_KEY}`
    with the variable unset expands to nothing) is dropped with a notice instead of swallowing the next flag,
    so that the key is then looked up in the environment and `.env` as usual."""
    out = []
    for i, a in enumerate(argv):
        name, eq, val = a.partition("=")
        if name in ALIASES:
            a = ALIASES[name] + (eq + val if eq else "")
            name = ALIASES[name]
        if name.startswith("--") and is_secret_name(name) and not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or (nxt.startswith("--") and len(nxt) > 2):
                get_logger().info(f"{name} was given no value (an unset environment variable?): ignoring it")
                continue
        out.append(a)
    return out


def parse_args(cls: type[T], argv: list[str], prog: str, yaml_overrides: dict | None = None) -> T:
    """Parse `argv` into `cls`. `yaml_overrides` (from an experiment file) set defaults that flags override."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(cls, prog=prog)
    if yaml_overrides:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(yaml_overrides) - names)
        if unknown:
            raise UserError(f"{prog}: unknown setting(s) {', '.join(unknown)}")
        parser.set_defaults(**yaml_overrides)
    args, extra = parser.parse_args_into_dataclasses(
        args=_normalize_argv(argv), return_remaining_strings=True
    )
    if extra:
        raise UserError(f"{prog}: unrecognized argument(s) {' '.join(extra)}; see {prog} --help")
    return args


def args_to_dict(args) -> dict:
    """All fields of an arguments dataclass, secrets masked."""
    return redact_args(dataclasses.asdict(args))


def command_line() -> str:
    """The command line as typed, secrets masked, for logs and args.json."""
    return "mhsft " + " ".join(shlex.quote(a) for a in redact_argv(sys.argv[1:]))


@dataclass
class GenerationArguments:
    """Sampling settings shared by `mhsft infer`, `mhsft deploy` (request defaults) and `mhsft eval`."""

    max_new_tokens: int = field(default=512, metadata={"help": "Most tokens to generate per reply."})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy (deterministic)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0 = off)."})
    repetition_penalty: float = field(
        default=1.0, metadata={"help": "Penalty for repeated tokens (1 = off)."}
    )
    seed: int | None = field(default=None, metadata={"help": "Sampling seed (None: nondeterministic)."})
    stream: bool = field(default=False, metadata={"help": "Stream the reply as it is generated."})
    system: str | None = field(
        default=None, metadata={"help": "System prompt (else the chat template's default)."}
    )


@dataclass
class EngineArguments:
    """What the generation engine runs: the adapters beside the base model, and its batch, context and device.
    Shared by `mhsft infer`, `mhsft deploy` and `mhsft eval` (in-process), which run the same engine."""

    adapters: list[str] = field(
        default_factory=list,
        metadata={
            "help": "LoRA checkpoints: `ckpt` or `name1=ckpt1 name2=ckpt2` (each served as model `name`); "
            "--model may be left out when the checkpoint names its base."
        },
    )
    max_batch_size: int | None = field(
        default=None, metadata={"help": "Requests generated at once (default 64 on a GPU, 8 on the CPU)."}
    )
    max_model_len: int | None = field(
        default=None,
        metadata={"help": "Longest prompt + reply in tokens (default: the model's limit, at most 4096)."},
    )
    device: str | None = field(default=None, metadata={"help": "cuda, cuda:1 or cpu (default: cuda if any)."})
    cuda_graphs: bool = field(
        default=True, metadata={"help": "On CUDA: replay decode steps as CUDA graphs (false: eager steps)."}
    )
