"""`mhsft upload`: publish a model folder (a merged export or a LoRA checkpoint) to ModelScope or Hugging Face.

    mhsft upload --model_dir export/qwen-sft-7b --hub modelscope --model_id yourname/qwen-sft-7b
    mhsft upload --model_dir export/qwen-sft-7b --hub huggingface --model_id yourname/qwen-sft-7b --private true

Uploads go through the hubs' own clients (huggingface_hub's HfApi, modelscope's HubApi): create the repository if
needed, then upload the folder in one commit. A model card (README.md) is written first when the folder has none
(see mhsft.export.modelcard). The uploaded files are exactly the ones listed: hidden files and training state
(optimizer, scheduler, RNG) are left out. Before anything leaves the machine the folder's text files are scanned
for secrets (known token values, secret-named JSON fields with a value); one found stops the upload. Tokens come
from --hub_token, else MODELSCOPE_API_TOKEN / HF_TOKEN (environment or .env), else the hub client's saved login,
and are never printed.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from mhsft.args import parse_args
from mhsft.export.merge_weights import human_bytes
from mhsft.export.modelcard import build_card
from mhsft.files import write_text
from mhsft.model import HUB_ID_RE
from mhsft.utils import MASK, UserError, get_logger, register_secret, scrub

log = get_logger()

HUBS = {"modelscope": "modelscope", "ms": "modelscope", "huggingface": "huggingface", "hf": "huggingface"}
TOKEN_ENV = {"modelscope": ("MODELSCOPE_API_TOKEN",), "huggingface": ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
# Checkpoint files needed only to resume training: large (the optimizer is 2x the adapter) and of no use to users.
TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pt", "training_args.bin")
TEXT_SUFFIXES = (".json", ".jsonl", ".md", ".txt", ".jinja", ".yaml", ".yml", ".py", ".cfg", ".ini", ".sh")
MAX_SCAN_BYTES = 20 << 20
# ms-swift's names for the same flags (swift export --push_to_hub ...).
UPLOAD_ALIASES = {
    "--hub_model_id": "--model_id",
    "--hub_private_repo": "--private",
    "--ckpt_dir": "--model_dir",
}
# A JSON field holds a secret when its name ends like one and its value looks like one. Plain `is_secret_name`
# (any "token" substring) would flag every tokenizer file: eos_token, pad_token, tokenizer_class ...
SECRET_FIELD_RE = re.compile(r"(?i)(^|[_-])(token|api[_-]?key|apikey|secret|password|passwd)$")
TOKENIZER_FIELD_RE = re.compile(r"(?i)^(bos|eos|pad|unk|sep|cls|mask|image|video|audio|vision)_token$")
PEFT_CARD_MARKER = "<!-- Provide a quick summary of what the model is/does. -->"


@dataclass
class UploadArguments:
    model_dir: str | None = field(default=None, metadata={"help": "The folder to publish (a merged export)."})
    hub: str = field(default="modelscope", metadata={"help": "modelscope | huggingface."})
    model_id: str | None = field(default=None, metadata={"help": "Repository ORG/NAME (created if missing)."})
    private: bool = field(default=False, metadata={"help": "Create the repository private."})
    commit_message: str = field(default="upload with mhsft", metadata={"help": "Commit message."})
    hub_token: str | None = field(
        default=None,
        metadata={"help": "Hub token (else MODELSCOPE_API_TOKEN / HF_TOKEN, else a saved login)."},
    )
    use_hf: bool = field(default=False, metadata={"help": "Same as --hub huggingface (ms-swift's flag)."})
    license: str | None = field(
        default=None, metadata={"help": "License for the card (default: the base model's, else `other`)."}
    )
    eval_results: list[str] = field(
        default_factory=list,
        metadata={"help": "results.json files for the card (default: found near the run)."},
    )
    dry_run: bool = field(
        default=False, metadata={"help": "Print the file list and the card; upload and write nothing."}
    )


@dataclass
class UploadPlan:
    model_dir: Path
    hub: str
    model_id: str
    files: list[str]  # relative posix paths
    card: str
    card_is_new: bool
    problems: list[str]

    def size(self, f: str) -> int:
        if f == "README.md" and self.card_is_new:  # not written yet
            return len(self.card.encode("utf-8"))
        return (self.model_dir / f).stat().st_size

    @property
    def total_bytes(self) -> int:
        return sum(self.size(f) for f in self.files)


# ------------------------------------------------------------------------------------------- planning
def list_files(model_dir: Path) -> list[str]:
    """Files to publish: everything but hidden files/folders, caches and training state."""
    out = []
    for root, dirs, files in os.walk(model_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for f in sorted(files):
            if f.startswith(".") or f in TRAINING_STATE or f.startswith("rng_state"):
                continue
            out.append((Path(root) / f).relative_to(model_dir).as_posix())
    return out


def is_secret_field(key: str, value) -> bool:
    if not SECRET_FIELD_RE.search(key) or TOKENIZER_FIELD_RE.match(key) or not isinstance(value, str):
        return False
    v = value.strip()
    return bool(v) and v != MASK and not (v.startswith("<") and v.endswith(">")) and " " not in v


def _json_secrets(obj, path: str = "") -> list[str]:
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            where = f"{path}.{k}" if path else str(k)
            if is_secret_field(str(k), v):
                found.append(where)
            else:
                found += _json_secrets(v, where)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += _json_secrets(v, f"{path}[{i}]")
    return found


def find_secrets(model_dir: Path, files: list[str]) -> list[str]:
    """`FILE: reason` for every text file that holds a known secret value or a filled-in secret-named field."""
    problems = []
    for rel in files:
        p = model_dir / rel
        if not rel.lower().endswith(TEXT_SUFFIXES) or p.stat().st_size > MAX_SCAN_BYTES:
            continue
        try:
            text = p.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if scrub(text) != text:
            problems.append(f"{rel}: holds the value of a token or API key from your environment")
        if rel.lower().endswith(".json"):
            try:
                fields = _json_secrets(json.loads(text))
            except ValueError:
                fields = []
            if fields:
                problems.append(f"{rel}: secret field(s) with a value: {', '.join(fields[:5])}")
    return problems


def plan_upload(
    model_dir: str | Path,
    hub: str,
    model_id: str,
    license: str | None = None,
    eval_results: list[str] | None = None,
) -> UploadPlan:
    d = Path(model_dir).expanduser()
    if not d.is_dir():
        raise UserError(f"--model_dir {model_dir}: no such folder")
    if not ((d / "config.json").is_file() or (d / "adapter_config.json").is_file()):
        raise UserError(f"--model_dir {d}: no config.json or adapter_config.json (not a model folder)")
    hub_name = HUBS.get(hub.lower())
    if hub_name is None:
        raise UserError(f"--hub {hub}: choose modelscope or huggingface")
    if not model_id or not HUB_ID_RE.fullmatch(model_id):
        raise UserError(
            f"--model_id {model_id!r}: give the repository as ORG/NAME (e.g. yourname/qwen-sft-7b)"
        )
    for f in eval_results or []:
        if not Path(f).is_file():
            raise UserError(f"--eval_results {f}: no such file")
    readme = d / "README.md"
    existing = readme.read_text(encoding="utf-8", errors="replace") if readme.is_file() else None
    if existing is not None and PEFT_CARD_MARKER not in existing:  # PEFT's empty template counts as no card
        card, new = existing, False
    else:
        card, new = build_card(d, model_id=model_id, license=license, eval_results=eval_results), True
    files = list_files(d)
    if new and "README.md" not in files:
        files.append("README.md")
    problems = find_secrets(d, [f for f in files if not (new and f == "README.md")])
    if scrub(card) != card:
        problems.append("README.md: holds the value of a token or API key from your environment")
    return UploadPlan(d, hub_name, model_id, sorted(files), card, new, problems)


def resolve_token(hub: str, token: str | None) -> tuple[str | None, str]:
    """(token, where it came from); None lets the hub client use its saved login."""
    if token:
        register_secret(token)
        return token, "--hub_token"
    for name in TOKEN_ENV[hub]:
        if os.environ.get(name):
            register_secret(os.environ[name])
            return os.environ[name], name
    return None, "the hub client's saved login"


# ------------------------------------------------------------------------------------------- clients
def _patterns(files: list[str]) -> list[str]:
    return [glob.escape(f) for f in files]  # exact names for the clients' fnmatch filters


def upload_huggingface(plan: UploadPlan, private: bool, commit_message: str, token: str | None) -> str:
    from huggingface_hub import HfApi

    api = HfApi(token=token)  # HF_ENDPOINT selects a mirror or a test server
    repo_url = api.create_repo(plan.model_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(
        repo_id=plan.model_id,
        folder_path=str(plan.model_dir),
        repo_type="model",
        commit_message=commit_message,
        allow_patterns=_patterns(plan.files),
        ignore_patterns=[".*", "*/.*"],
    )
    return str(repo_url)


def upload_modelscope(plan: UploadPlan, private: bool, commit_message: str, token: str | None) -> str:
    from modelscope.hub.api import HubApi
    from modelscope.hub.constants import ModelVisibility

    api = HubApi()
    if token:
        api.login(token)
    visibility = ModelVisibility.PRIVATE if private else ModelVisibility.PUBLIC
    api.create_repo(plan.model_id, token=token, visibility=visibility, exist_ok=True)
    api.upload_folder(
        repo_id=plan.model_id,
        folder_path=str(plan.model_dir),
        commit_message=commit_message,
        allow_patterns=_patterns(plan.files),
        ignore_patterns=[".*", "*/.*"],
        token=token,
    )
    return f"https://modelscope.cn/models/{plan.model_id}"


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return scrub(lines[0] if lines else type(e).__name__)


def print_plan(plan: UploadPlan, private: bool) -> None:
    where = f"{plan.hub} {plan.model_id} ({'private' if private else 'public'})"
    print(f"would upload {len(plan.files)} files ({human_bytes(plan.total_bytes)}) to {where}:")
    for f in plan.files:
        print(f"  {f}  ({human_bytes(plan.size(f))})")
    print(f"\n----- README.md ({'generated' if plan.card_is_new else 'existing'}) -----")
    print(plan.card)


def publish(
    model_dir: str | Path,
    hub: str,
    model_id: str,
    private: bool = False,
    commit_message: str = "upload with mhsft",
    token: str | None = None,
    license: str | None = None,
    eval_results: list[str] | None = None,
    dry_run: bool = False,
) -> str | None:
    """Upload `model_dir` to `hub` as `model_id`; returns the repository URL (None on a dry run)."""
    token, token_from = resolve_token(HUBS.get(hub.lower(), "modelscope"), token)
    plan = plan_upload(model_dir, hub, model_id, license, eval_results)
    if dry_run:
        print_plan(plan, private)
        for p in plan.problems:
            log.info(f"warning: {p}; a real upload would stop here")
        return None
    if plan.problems:
        raise UserError(f"refusing to upload: {plan.problems[0]} (remove it, then retry)")
    if plan.card_is_new:
        try:
            write_text(plan.model_dir / "README.md", plan.card)
        except OSError as e:
            raise UserError(f"cannot write the model card into {plan.model_dir}: {e.strerror or e}") from None
        log.info(f"wrote the model card {plan.model_dir / 'README.md'}")
    hub_label = "Hugging Face" if plan.hub == "huggingface" else "ModelScope"
    log.info(
        f"uploading {len(plan.files)} files ({human_bytes(plan.total_bytes)}) to {hub_label} {model_id} "
        f"({'private' if private else 'public'}; token from {token_from})"
    )
    upload = upload_huggingface if plan.hub == "huggingface" else upload_modelscope
    try:
        url = upload(plan, private, commit_message, token)
    except Exception as e:  # auth, network, quota: each client raises its own types
        env = TOKEN_ENV[plan.hub][0]
        raise UserError(
            f"upload to {hub_label} failed: {_first_line(e)} (check the token: --hub_token or {env}, "
            f"that it may write to {model_id.split('/')[0]}, and your network)"
        ) from e
    log.info(f"uploaded: {url}")
    return url


def _alias(argv: list[str]) -> list[str]:
    out = []
    for a in argv:
        name, eq, val = a.partition("=")
        out.append(UPLOAD_ALIASES[name] + eq + val if name in UPLOAD_ALIASES else a)
    return out


def main(argv: list[str]) -> int:
    args = parse_args(UploadArguments, _alias(argv), prog="mhsft upload")
    if not args.model_dir:
        raise UserError("give --model_dir: the folder to publish (e.g. the output of mhsft export)")
    hub = "huggingface" if args.use_hf else args.hub
    url = publish(
        args.model_dir,
        hub,
        args.model_id,
        private=args.private,
        commit_message=args.commit_message,
        token=args.hub_token,
        license=args.license,
        eval_results=args.eval_results,
        dry_run=args.dry_run,
    )
    if url:
        print(url)
    return 0
