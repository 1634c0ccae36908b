"""`--dataset` / `--val_dataset` as ms-swift spells them, turned into train and validation dialogues.

A spec is a local file or folder when one exists by that name, else a hub dataset id:

    data.jsonl   data.json#500   some/folder   ORG/NAME   ORG/NAME:subset#100   ORG/NAME:sub1/sub2

`#N` samples N records with the seed (N larger than the dataset repeats it: whole copies plus a random
rest, as ms-swift does). Hub ids resolve on ModelScope by default and on Hugging Face with `use_hf=True`,
through each client's own cache; `HF_HUB_OFFLINE=1` (Hugging Face's own switch) and `MODELSCOPE_OFFLINE=1`
(ours: the ModelScope client has no such variable, so we pass `local_files_only` for it) read only the cache.

Bad records are skipped, counted, logged (the first few) and written to a rejects JSONL, or, with
`strict=True`, the first one stops the run with a UserError.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mhsft.data.readers import DATA_SUFFIXES, FORMATS, iter_file, list_data_files
from mhsft.data.schema import DataError, Dialogue
from mhsft.files import atomic_open
from mhsft.utils import UserError, get_logger, hub_reachable

MAX_PRINTED_REJECTS = 20
HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# How `datasets` recognises a train split by file name (its default data_files patterns): when a hub
# dataset has such files, only they are read, so that its test split stays out of training.
TRAIN_FILE_RE = re.compile(r"(^|[-_./ ])(train|training)([-_./ ]|$)", re.I)


@dataclass(frozen=True)
class DatasetSpec:
    text: str  # as the user typed it
    name: str  # local path or hub id
    subsets: tuple[str, ...] = ()
    sample: int | None = None
    local: bool = True


@dataclass
class SourceStats:
    spec: str
    split: str  # "train" | "val" (where the spec was given; the ratio split moves some train to val)
    num_dialogues: int = 0  # good records read
    num_rejected: int = 0
    num_used: int = 0  # after `#N` sampling
    notices: dict[str, int] = field(default_factory=dict)  # Dialogue.notes by kind (what reading changed)


class Notices:
    """Dialogue.notes counted by kind, with the place of the first of each kind."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.first: dict[str, str] = {}

    def add(self, d: Dialogue) -> None:
        for text in d.notes:
            self.counts[text] = self.counts.get(text, 0) + 1
            self.first.setdefault(text, d.source.where())

    def lines(self) -> list[str]:
        """One line per kind: how many dialogues, and where the first is."""
        return [
            f"notice: {n:,} dialogue(s): {t} (the first: {self.first[t]})" for t, n in self.counts.items()
        ]


@dataclass
class LoadResult:
    train: list[Dialogue]
    val: list[Dialogue]
    num_rejected: int = 0
    rejects_path: Path | None = None
    sources: list[SourceStats] = field(default_factory=list)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _exists(path: str) -> bool:
    try:
        return Path(path).expanduser().exists()
    except (OSError, ValueError, RuntimeError):  # a NUL byte, an unknown ~user, a name too long
        return False


def parse_spec(text: str) -> DatasetSpec:
    """`path`, `path#N`, `ORG/NAME[:subset[/subset2]][#N]` -> DatasetSpec. Raises UserError."""
    text = text.strip()
    if not text:
        raise UserError("empty dataset name")
    if _exists(text):  # a real path wins, even one containing '#' or ':'
        return DatasetSpec(text, str(Path(text).expanduser()))
    name, sample = text, None
    m = re.fullmatch(r"(.+)#(\d+)", text)
    if m:
        name, sample = m.group(1), int(m.group(2))
        if sample == 0:
            raise UserError(f"dataset {text}: #0 samples nothing; give a positive count or drop #N")
    if _exists(name):
        return DatasetSpec(text, str(Path(name).expanduser()), sample=sample)
    repo, _, subsets = name.partition(":")
    looks_local = repo.startswith((".", "/", "~")) or repo.lower().endswith(DATA_SUFFIXES)
    if looks_local or not HUB_ID_RE.fullmatch(repo):
        raise UserError(f"dataset {text}: no such file or folder (and not a hub id like ORG/NAME)")
    subs = tuple(s for s in subsets.split("/") if s) if subsets else ()
    return DatasetSpec(text, repo, subs, sample, local=False)


def download_dataset(repo_id: str, use_hf: bool = False) -> Path:
    """A hub dataset's snapshot folder, from the client's cache or downloaded. Raises a one-line UserError."""
    hub = "Hugging Face" if use_hf else "ModelScope"
    offline_var = "HF_HUB_OFFLINE" if use_hf else "MODELSCOPE_OFFLINE"
    offline = _env_true(offline_var)
    if not offline:
        # no network: answer from the client's cache, or fail in seconds instead of after its retries
        offline = not hub_reachable(use_hf)
        if offline:
            offline_var = f"{hub} is unreachable from this machine"
    try:
        if use_hf:
            from huggingface_hub import snapshot_download

            path = snapshot_download(repo_id, repo_type="dataset", local_files_only=offline)
        else:
            from modelscope.hub.snapshot_download import snapshot_download

            path = snapshot_download(repo_id, repo_type="dataset", local_files_only=offline)
    except Exception as e:  # each client raises its own zoo of types; the user needs one line
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        hint = (
            (
                f"it is not in the local cache and {offline_var}"
                + ("=1; unset it to download" if offline_var.isupper() else "; check your network or proxy")
            )
            if offline
            else "check the id and your network"
            + ("" if use_hf else ", or add --use_hf true if it lives on Hugging Face")
        )
        raise UserError(
            f"dataset {repo_id}: cannot get it from {hub} ({reason}); {hint}, or pass a local file"
        ) from e
    return Path(path)


def _readme_configs(root: Path) -> dict[str, list[str]]:
    """Subset name -> glob patterns of its train split, default subset first, from the dataset card's YAML
    `configs:` (how Hugging Face and ModelScope cards declare the subsets of script-less datasets)."""
    readme = root / "README.md"
    if not readme.is_file():
        return {}
    try:
        import yaml

        m = re.match(r"---\s*\n(.*?)\n---", readme.read_text(encoding="utf-8"), re.S)
        configs = (yaml.safe_load(m.group(1)) or {}).get("configs") if m else None
    except Exception:  # a broken card must not stop reading the data
        return {}
    configs = (
        [c for c in configs if isinstance(c, dict) and "config_name" in c]
        if isinstance(configs, list)
        else []
    )
    configs.sort(key=lambda c: not c.get("default"))
    out: dict[str, list[str]] = {}
    for c in configs:
        files = c.get("data_files", [])
        files = [files] if isinstance(files, (str, dict)) else files if isinstance(files, list) else []
        splits = [f for f in files if isinstance(f, dict)]
        if splits:  # [{split: train, path: ...}, ...]: the train split, else every split
            chosen = [f for f in splits if f.get("split") == "train"] or splits
            files = [
                p
                for f in chosen
                for p in (f.get("path") if isinstance(f.get("path"), list) else [f.get("path")])
            ]
        out[str(c["config_name"])] = [f for f in files if isinstance(f, str)]
    return out


def _glob(root: Path, patterns: list[str]) -> list[Path]:
    out = []
    for pat in patterns:
        try:
            out += sorted(root.glob(pat))
        except (ValueError, NotImplementedError):  # an absolute or malformed pattern in the card
            continue
    return out


def _hub_paths(root: Path, spec: DatasetSpec) -> list[Path]:
    """The files or folders of a downloaded dataset that make up its (sub)set's train split."""
    configs = _readme_configs(root)
    if spec.subsets:
        paths = []
        for s in spec.subsets:
            if s in configs:
                paths += _glob(root, configs[s])
            elif (root / s).is_dir():
                paths.append(root / s)
            else:
                names = sorted(configs) or sorted(
                    p.name for p in root.iterdir() if p.is_dir() and p.name[0] != "."
                )
                raise UserError(
                    f"dataset {spec.name}: no subset {s!r}; available: {', '.join(names) or 'none'}"
                )
    elif configs:
        paths = _glob(root, next(iter(configs.values())))
    else:
        paths = list_data_files(root)
        train = [p for p in paths if TRAIN_FILE_RE.search(str(p.relative_to(root)))]
        paths = train or paths
    readable = [p for p in paths if p.is_dir() or p.name.lower().endswith(DATA_SUFFIXES)]
    if not readable:
        found = sorted({p.suffix for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")})
        raise UserError(
            f"dataset {spec.name}: no .json/.jsonl/.txt data files in {root} (found: {', '.join(found) or 'nothing'}); "
            "convert it to JSONL and pass the file"
        )
    return readable


def resolve_spec(spec: DatasetSpec, use_hf: bool = False) -> list[Path]:
    """Files and folders to read for one spec (downloading a hub dataset first)."""
    if spec.local:
        return [Path(spec.name)]
    return _hub_paths(download_dataset(spec.name, use_hf), spec)


def _check_format(fmt: str) -> None:
    if fmt != "auto" and fmt not in FORMATS:
        raise UserError(f"unknown dataset format {fmt!r}; choose auto or one of {', '.join(FORMATS)}")


def iter_datasets(
    specs: Sequence[str] | str, *, fmt: str = "auto", use_hf: bool = False, seed: int = 42
) -> Iterator[Dialogue | DataError]:
    """Every record of every spec, good (Dialogue) and bad (DataError), for `mhsft data inspect/validate`.
    Streams, except that a spec with `#N` holds its dialogues to sample them as `load_datasets` does."""
    _check_format(fmt)
    for text in [specs] if isinstance(specs, str) else specs:
        spec = parse_spec(text)
        good: list[Dialogue] = []
        for path in resolve_spec(spec, use_hf):
            for item in iter_file(path, fmt):
                if spec.sample is None or isinstance(item, DataError):
                    yield item
                else:
                    good.append(item)
        if spec.sample is not None:
            yield from sample_records(good, spec.sample, random.Random(seed))


def sample_records(items: list, n: int, rng: random.Random) -> list:
    """N items: whole copies while N exceeds the list, then a random rest (ms-swift's `#N`)."""
    if not items:
        return []
    copies, rest = divmod(n, len(items))
    return items * copies + [items[i] for i in sorted(rng.sample(range(len(items)), rest))]


def split_val(items: list, ratio: float, rng: random.Random) -> tuple[list, list]:
    """(train, val) with ceil(ratio * n) random items in val (at least one left to train), order kept."""
    n = len(items)
    k = min(max(math.ceil(ratio * n), 1), n - 1) if ratio > 0 and n >= 2 else 0
    val_idx = set(rng.sample(range(n), k))
    return [x for i, x in enumerate(items) if i not in val_idx], [
        x for i, x in enumerate(items) if i in val_idx
    ]


class Rejects:
    """Counts bad records, prints the first few (`echo`: one line out, the logger's warning by default, each
    record after `prefix`), writes every one to a JSONL file, or stops at the first when strict. The file is written atomically when closed; it is written even with no rejects when
    `keep_empty` (a run folder's rejects.jsonl then says "none"), else only when there are some. The one place
    a reject line is written, for `mhsft data` and for training alike."""

    def __init__(self, path, strict: bool, echo=None, prefix: str = "skipped ", keep_empty: bool = False):
        self.path = Path(path) if path else None
        self.strict, self.keep_empty, self.count = strict, keep_empty, 0
        self.echo, self.prefix = echo or get_logger().warning, prefix
        self._stack = contextlib.ExitStack()
        self.file = None
        if self.path and keep_empty:
            self._open()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self._stack.enter_context(atomic_open(self.path))

    def add(self, err: DataError) -> None:
        if self.strict:
            raise UserError(f"{err} (--strict: stopping at the first bad record)")
        self.count += 1
        if self.count <= MAX_PRINTED_REJECTS:
            self.echo(f"{self.prefix}{err}")
        if self.path:
            if self.file is None:
                self._open()
            self.file.write(err.to_reject_line() + "\n")

    def close(self) -> str:
        """Write the file; returns a summary (`3 rejected record(s) written to PATH`)."""
        self._stack.close()
        if self.count > MAX_PRINTED_REJECTS:
            where = f"; all are in {self.path}" if self.path else ""
            self.echo(f"... and {self.count - MAX_PRINTED_REJECTS:,} more bad records{where}")
        if self.count and self.path:
            return f"{self.count:,} rejected record(s) written to {self.path}"
        return f"{self.count:,} rejected record(s)" if self.count else "no rejected records"


def _read_spec(
    text: str, split: str, fmt: str, use_hf: bool, seed: int, rejects: Rejects
) -> tuple[list, SourceStats]:
    spec = parse_spec(text)
    stats = SourceStats(text, split)
    good: list[Dialogue] = []
    first_err, notices = None, Notices()
    for path in resolve_spec(spec, use_hf):
        for item in iter_file(path, fmt):
            if isinstance(item, DataError):
                stats.num_rejected += 1
                first_err = first_err or item
                rejects.add(item)
            else:
                good.append(item)
                notices.add(item)
    stats.num_dialogues, stats.notices = len(good), notices.counts
    for line in notices.lines():
        get_logger().warning(f"{split} dataset {text}: {line}")
    if not good:
        why = f"; all {stats.num_rejected} records are bad, the first: {first_err}" if first_err else ""
        raise UserError(f"dataset {text}: no usable dialogues{why}")
    if spec.sample is not None:
        good = sample_records(good, spec.sample, random.Random(seed))
    stats.num_used = len(good)
    msg = f"{split} dataset {text}: {stats.num_dialogues} dialogues"
    msg += f", {stats.num_rejected} bad records skipped" if stats.num_rejected else ""
    msg += f", sampled to {stats.num_used}" if spec.sample is not None else ""
    get_logger().info(msg)
    return good, stats


def load_datasets(
    specs: Sequence[str] | str,
    *,
    fmt: str = "auto",
    use_hf: bool = False,
    seed: int = 42,
    strict: bool = False,
    val_specs: Sequence[str] | str = (),
    split_ratio: float = 0.0,
    rejects_path: str | os.PathLike | None = None,
) -> LoadResult:
    """Read, validate, sample and concatenate datasets; make the validation set from `val_specs`, else
    from `split_ratio` of each training dataset (seeded). Raises UserError for anything the user must fix."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    val_specs = [val_specs] if isinstance(val_specs, str) else list(val_specs)
    _check_format(fmt)
    if not specs:
        raise UserError("no dataset given: pass --dataset FILE_OR_HUB_ID")
    if not 0.0 <= split_ratio < 1.0:
        raise UserError(f"split_dataset_ratio must be in [0, 1), got {split_ratio}")
    result = LoadResult([], [], rejects_path=Path(rejects_path) if rejects_path else None)
    rejects = Rejects(rejects_path, strict, keep_empty=True)
    try:
        for text in specs:
            good, stats = _read_spec(text, "train", fmt, use_hf, seed, rejects)
            if split_ratio > 0 and not val_specs:
                # Split each dataset on its own so that every one is represented in validation.
                good, val = split_val(good, split_ratio, random.Random(seed + 1))
                result.val += val
            result.train += good
            result.sources.append(stats)
        for text in val_specs:
            good, stats = _read_spec(text, "val", fmt, use_hf, seed, rejects)
            result.val += good
            result.sources.append(stats)
    finally:
        rejects.close()
    result.num_rejected = rejects.count
    if split_ratio > 0 and not val_specs and not result.val:
        get_logger().warning(
            "split_dataset_ratio > 0 but the datasets are too small to hold out a validation set"
        )
    return result
