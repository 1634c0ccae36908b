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

import json
import math
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mhsft.data.readers import DATA_SUFFIXES, FORMATS, iter_file, list_data_files
from mhsft.data.schema import DataError, Dialogue
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


class _Rejects:
    """Counts bad records, logs the first few, writes all of them to a JSONL file, or stops when strict."""

    def __init__(self, path: str | os.PathLike | None, strict: bool):
        self.path = Path(path) if path else None
        self.strict = strict
        self.count = 0
        self.file = None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def add(self, err: DataError) -> None:
        if self.strict:
            raise UserError(f"{err} (--strict: stopping at the first bad record)")
        self.count += 1
        if self.count <= MAX_PRINTED_REJECTS:
            get_logger().warning(f"skipped {err}")
        if self.file:
            self.file.write(_reject_line(err) + "\n")

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.count > MAX_PRINTED_REJECTS:
            where = f"; all are in {self.path}" if self.path else ""
            get_logger().warning(f"... {self.count - MAX_PRINTED_REJECTS} more bad records skipped{where}")


def _reject_line(err: DataError) -> str:
    rec = err.to_reject()
    try:
        line = json.dumps(rec, ensure_ascii=False, default=str)
        line.encode("utf-8")
        return line
    except UnicodeEncodeError:  # an unpaired surrogate: escaped, the line is still valid JSON
        return json.dumps(rec, default=str)
    except (ValueError, RecursionError):  # circular or absurdly deep raw record
        return json.dumps({**rec, "record": None}, ensure_ascii=False, default=str)


def _read_spec(
    text: str, split: str, fmt: str, use_hf: bool, seed: int, rejects: _Rejects
) -> tuple[list, SourceStats]:
    spec = parse_spec(text)
    stats = SourceStats(text, split)
    good: list[Dialogue] = []
    first_err = None
    for path in resolve_spec(spec, use_hf):
        for item in iter_file(path, fmt):
            if isinstance(item, DataError):
                stats.num_rejected += 1
                first_err = first_err or item
                rejects.add(item)
            else:
                good.append(item)
    stats.num_dialogues = len(good)
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
    rejects = _Rejects(rejects_path, strict)
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
