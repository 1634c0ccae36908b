"""`mhsft <stage> ...`: a thin dispatcher. Each stage lives in its own folder (data/, train/, serve/, export/, eval/,
report/, pipeline/) and its verb in a module there that exposes `main(argv) -> int`."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import warnings

from mhsft import __version__
from mhsft.data.schema import DataError
from mhsft.utils import UserError, get_logger, load_dotenv_file, register_env_secrets, setup_console

# stage name -> (module, one-line description). Modules are imported lazily so that `mhsft --help`
# and `mhsft data ...` do not pay for importing torch when they do not need it.
STAGES: dict[str, tuple[str, str]] = {
    "data": (
        "mhsft.data.commands",
        "inspect | validate | convert | clean datasets (ShareGPT, messages, Alpaca, EmoLLM, CPsyCoun)",
    ),
    "sft": (
        "mhsft.train.sft",
        "LoRA / full supervised fine-tuning (ms-swift flags), packing, resume, SwanLab",
    ),
    "infer": ("mhsft.serve.infer", "chat with a model or adapter interactively, or run a JSONL batch"),
    "deploy": ("mhsft.serve.deploy", "OpenAI-compatible HTTP server (chat, completions with logprobs)"),
    "export": (
        "mhsft.export.merge",
        "merge a LoRA adapter into its base model, shard by shard, with a numeric check",
    ),
    "upload": (
        "mhsft.export.upload",
        "publish a model directory to ModelScope or Hugging Face with a model card",
    ),
    "eval": ("mhsft.eval.evaluate", "exam multiple choice, QA metrics, counseling dimensions by a judge"),
    "review": (
        "mhsft.review.commands",
        "blind side-by-side rating by clinicians: a study, its web pages, statistics",
    ),
    "report": ("mhsft.report.report", "markdown + self-contained HTML report: base vs fine-tuned"),
    "run": ("mhsft.pipeline.run", "run a whole experiment from one YAML file, resuming finished stages"),
}

USAGE = """usage: mhsft <stage> [--flag value ...]     (mhsft <stage> --help for a stage's flags)

Fine-tune, serve and evaluate Chinese mental-health counseling chat models. Flags use ms-swift's
names, so `swift sft ...` runs as `mhsft sft ...`.

stages:
{stages}

Use `--model builtin:tiny` anywhere for a tiny locally built model (no download).
A `.env` file in the working directory is loaded (SWANLAB_API_KEY, MODELSCOPE_API_TOKEN, HF_TOKEN, ...).
"""


def usage() -> str:
    return USAGE.format(stages="\n".join(f"  {name:<8} {desc}" for name, (_, desc) in STAGES.items()))


def main(argv: list[str] | None = None) -> int:
    setup_console()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"mhsft {__version__}")
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"mhsft: unknown stage {stage!r}; choose one of: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    try:
        load_dotenv_file(os.path.join(os.getcwd(), ".env"))
    except UserError as e:
        get_logger().error(f"error: {e}")
        return 2
    register_env_secrets()
    # transformers 5.x deprecation notices raised inside PEFT and transformers: nothing a user can act on
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)(\.|$)")
    # bitsandbytes' CPU backend (imported by PEFT wherever bitsandbytes is installed) tries to fetch an optional
    # kernel from a hub at import, warns on every command when it cannot, and falls back to its own code
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    module = importlib.import_module(STAGES[stage][0])
    try:
        return int(module.main(rest) or 0)
    except (UserError, DataError) as e:  # a DataError escaping a stage is still the data's fault
        get_logger().error(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        get_logger().error("interrupted")
        return 130
    except BrokenPipeError:
        # `mhsft data inspect ... | head`: the reader left; exit quietly instead of a traceback at shutdown.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    raise SystemExit(main())
