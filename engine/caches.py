"""What the cache root holds, when each entry was last used, and what goes when it outgrows its budget.

The cache root (`engine.locations.cache_root()`) has one folder per kind: `scans`,
`images` (decoded image arrays, the large ones: 30,000 images at 224 px are 4.5 GB),
`features` and `hashes`. An entry is every file of one kind folder whose name starts with
the same key (the part before the first dot): `images/<key>.npy` with `images/<key>.json`,
for example. Beside each entry its writer leaves `<key>.entry.json`, what it is about
(dataset folder, backbone, image size); the file's modification time is the entry's last
use, refreshed by `touch` whenever the entry is read.

After every cache write the writer calls `enforce_budget`: while the cache is larger than its
budget, the least recently used entries go, except those a queued or running run needs
(entries of its dataset folder; for features, of its backbone too) and the entry just
written. Deleting an entry never breaks a process that is reading it: an array already
memory-mapped stays readable until it is closed (POSIX keeps an unlinked file's data while
it is open), and a reader that finds an entry gone computes it again, so a run whose entry
was evicted simply rebuilds it.

The budget is `$TRANSFER_STUDIO_CACHE_BUDGET` (`engine.locations.cache_budget_setting`): a
size such as `20GB`, `500MB` or `1.5TB`, or a share of the disk such as `25%`. Unset, it is
20 GB or half of what the cache could have on its disk (its free space plus what the cache
already holds), whichever is smaller: 20 GB holds a 30,000-image folder decoded at 224 px and
at a second size, with features for several backbones, and the half leaves a small disk room
for everything else.

`python -m engine cache` lists and clears entries (`add_cache_arguments`, `run_cache_command`).
This module never imports TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional

from engine import locations
from engine.runfiles import atomic_write_json, read_json

logger = logging.getLogger(__name__)

ENTRY_SUFFIX = ".entry.json"
DEFAULT_BUDGET_BYTES = 20 * 10**9
# At most this share of (free space + what the cache holds) by default.
DEFAULT_DISK_SHARE = 0.5
_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
# The scan cache (written by engine.data) names its folder near the top of the file.
_SCAN_ROOT = re.compile(r'"root":\s*("(?:[^"\\]|\\.)*")')


@dataclass(frozen=True)
class CacheEntry:
    """One cached thing: its kind, key, files, size on disk, last use and what it is about."""

    kind: str
    key: str
    files: tuple
    size: int
    last_used: float
    dataset: Optional[str] = None
    backbone: Optional[str] = None
    image_size: Optional[int] = None

    def to_dict(self) -> dict:
        """The entry as JSON-ready values (files as strings, last use also as ISO 8601 UTC)."""
        data = asdict(self)
        data["files"] = [str(path) for path in self.files]
        data["last_used_iso"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.last_used))
        return data


def _entry_file(kind: str, key: str, cache_dir=None) -> Path:
    return locations.cache_folder(kind, cache_dir) / f"{key}{ENTRY_SUFFIX}"


def touch(kind: str, key: Optional[str], cache_dir: Optional[str | os.PathLike] = None, *,
          dataset: Optional[str] = None, backbone: Optional[str] = None, image_size: Optional[int] = None) -> None:
    """Marks an entry as used now; writes its description first when it has none (or a new one is given).

    Args:
        kind: One of `engine.locations.CACHE_KINDS`.
        key: The entry's key (None: nothing to do, e.g. an in-memory cache).
        dataset, backbone, image_size: What the entry is about, for listings and for keeping
            what queued and running runs need.
    """
    if key is None:
        return
    path = _entry_file(kind, key, cache_dir)
    described = dataset is not None or backbone is not None or image_size is not None
    try:
        if described:
            earlier = read_json(path) or {}
            wanted = {"kind": kind, "key": key, "dataset": dataset, "backbone": backbone, "image_size": image_size}
            if any(earlier.get(name) != value for name, value in wanted.items()):
                atomic_write_json(path, wanted)
                return
        os.utime(path)
    except FileNotFoundError:
        if described:
            try:
                atomic_write_json(path, {"kind": kind, "key": key, "dataset": dataset, "backbone": backbone,
                                         "image_size": image_size})
            except OSError:
                pass
    except OSError:
        pass  # A read-only cache has no last use to record; eviction then goes by the files' times.


def entry_description(kind: str, key: Optional[str], cache_dir: Optional[str | os.PathLike] = None) -> dict:
    """What an entry's writer said it is about ({} when nothing was said)."""
    if key is None:
        return {}
    return read_json(_entry_file(kind, key, cache_dir)) or {}


def list_entries(cache_dir: Optional[str | os.PathLike] = None) -> list[CacheEntry]:
    """Every entry of the cache root, least recently used first.

    Temporaries being written (names starting with a dot) are not entries and are never listed.
    """
    entries = []
    for kind in locations.CACHE_KINDS:
        folder = locations.cache_folder(kind, cache_dir)
        groups: dict[str, list] = {}
        try:
            scanned = list(os.scandir(folder))
        except OSError:
            continue
        for item in scanned:
            if item.name.startswith(".") or not item.is_file(follow_symlinks=False):
                continue
            groups.setdefault(item.name.split(".", 1)[0], []).append(item)
        for key, items in groups.items():
            entry = _entry(kind, key, items)
            if entry is not None:
                entries.append(entry)
    return sorted(entries, key=lambda entry: (entry.last_used, entry.kind, entry.key))


def _entry(kind: str, key: str, items: list) -> Optional[CacheEntry]:
    size, newest, description, described_at = 0, 0.0, {}, None
    for item in items:
        try:
            details = item.stat(follow_symlinks=False)
        except OSError:
            continue  # deleted meanwhile
        size += details.st_size
        newest = max(newest, details.st_mtime)
        if item.name.endswith(ENTRY_SUFFIX):
            description = read_json(item.path) or {}
            described_at = details.st_mtime
    if not size and not newest:
        return None
    dataset = description.get("dataset")
    if kind == "scans" and dataset is None:
        dataset = _scan_root(Path(items[0].path).with_name(f"{key}.json"))
    return CacheEntry(kind=kind, key=key, files=tuple(sorted(Path(item.path) for item in items)), size=size,
                      last_used=described_at if described_at is not None else newest, dataset=dataset,
                      backbone=description.get("backbone"), image_size=description.get("image_size"))


def _scan_root(path: Path) -> Optional[str]:
    """The folder a cached scan is of, read from the start of the file (the rest lists every image)."""
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as handle:
            head = handle.read(8192)
    except OSError:
        return None
    match = _SCAN_ROOT.search(head)
    if not match:
        return None
    try:
        return json.loads(match.group(1))
    except ValueError:
        return None


def cache_size(cache_dir: Optional[str | os.PathLike] = None) -> int:
    """Bytes on disk of every entry of the cache root."""
    return sum(entry.size for entry in list_entries(cache_dir))


def parse_size(text: str) -> tuple[Optional[int], Optional[float]]:
    """A budget as written: (bytes, None) for a size such as "20GB", (None, share) for a share such as "25%".

    Raises:
        ValueError: the text is neither, naming the variable and what is accepted.
    """
    cleaned = text.strip().upper().replace(" ", "")
    share = re.fullmatch(r"(\d+(?:\.\d+)?)%", cleaned)
    if share:
        value = float(share.group(1)) / 100
        if 0 < value <= 1:
            return None, value
    size = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?I?B?)", cleaned)
    if size and size.group(2) in _UNITS:
        return int(float(size.group(1)) * _UNITS[size.group(2)]), None
    raise ValueError(
        f"{locations.CACHE_BUDGET_VARIABLE}={text!r} is not a cache budget; expected a size such as 20GB, 500MB "
        f"or 1.5TB (GiB units too), or a share of the cache's disk from 1% to 100% such as 25%.")


def budget_bytes(cache_dir: Optional[str | os.PathLike] = None, used: Optional[int] = None) -> int:
    """The cache root's budget in bytes: the setting, else min(20 GB, half of free space + what the cache holds)."""
    root = Path(cache_dir or locations.cache_root())
    setting = locations.cache_budget_setting()
    disk_of = root
    while not disk_of.exists() and disk_of != disk_of.parent:
        disk_of = disk_of.parent
    if setting:
        size, share = parse_size(setting)
        if size is not None:
            return size
        return int(shutil.disk_usage(disk_of).total * share)
    used = cache_size(cache_dir) if used is None else used
    return int(min(DEFAULT_BUDGET_BYTES, DEFAULT_DISK_SHARE * (shutil.disk_usage(disk_of).free + used)))


def _resolved(path: Optional[str]) -> Optional[str]:
    if not path:
        return None
    try:
        return str(Path(path).expanduser().resolve())
    except (OSError, RuntimeError):
        return str(path)


def runs_in_progress(runs_dirs: Optional[Iterable] = None) -> list:
    """The queued and running runs (their `RunStatus`) under the default runs root and `runs_dirs`."""
    from engine.runs import list_runs
    from engine.status import State

    roots = {_resolved(str(locations.runs_root()))}
    roots |= {_resolved(str(folder)) for folder in (runs_dirs or [])}
    found = []
    for root in sorted(root for root in roots if root):
        found += [run for run in list_runs(root) if run.state in (State.QUEUED, State.RUNNING)]
    return found


def needed_by_runs(entries: list[CacheEntry], runs: list) -> set[tuple[str, str]]:
    """The (kind, key) of every entry a queued or running run may read.

    A run needs the entries of its dataset folder (its scan, hashes and decoded images, at any
    size) and, of the features of that folder, those of its backbone. An entry whose dataset is
    unknown (written before entries were described) is not kept for any run.
    """
    wanted = {(_resolved(run.dataset), run.backbone) for run in runs if run.dataset}
    folders = {folder for folder, _ in wanted}
    needed = set()
    for entry in entries:
        folder = _resolved(entry.dataset)
        if folder not in folders:
            continue
        if entry.kind != "features" or entry.backbone is None or (folder, entry.backbone) in wanted:
            needed.add((entry.kind, entry.key))
    return needed


def remove_entry(entry: CacheEntry) -> int:
    """Deletes an entry's files (its description last); returns the bytes freed."""
    freed = 0
    for path in sorted(entry.files, key=lambda path: path.name.endswith(ENTRY_SUFFIX)):
        try:
            freed += path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue  # another process evicted it first
        except OSError as error:
            logger.warning("Could not delete cache file %s: %s", path, error)
    return freed


def enforce_budget(cache_dir: Optional[str | os.PathLike] = None, keep: Iterable[tuple[str, str]] = (),
                   runs_dirs: Optional[Iterable] = None, budget: Optional[int] = None) -> list[CacheEntry]:
    """Evicts least recently used entries until the cache fits its budget; returns what was evicted.

    Args:
        cache_dir: The cache root; defaults to `engine.locations.cache_root()`.
        keep: (kind, key) of entries never evicted now (the one just written).
        runs_dirs: Runs roots besides the default one whose queued and running runs keep their entries.
        budget: Bytes allowed; by default `budget_bytes(cache_dir)`.

    Entries that queued or running runs need, and `keep`, stay even when the cache is still
    over budget then; a warning says so.
    """
    entries = list_entries(cache_dir)
    total = sum(entry.size for entry in entries)
    budget = budget_bytes(cache_dir, used=total) if budget is None else budget
    if total <= budget:
        return []
    kept = set(keep) | needed_by_runs(entries, runs_in_progress(runs_dirs))
    evicted = []
    for entry in entries:  # least recently used first
        if total <= budget:
            break
        if (entry.kind, entry.key) in kept:
            continue
        remove_entry(entry)
        total -= entry.size
        evicted.append(entry)
    if evicted:
        logger.info("Cache over its budget of %s: evicted %d entr%s (%s), least recently used first.",
                    describe_size(budget), len(evicted), "y" if len(evicted) == 1 else "ies",
                    describe_size(sum(entry.size for entry in evicted)))
    if total > budget:
        logger.warning("The cache holds %s, more than its budget of %s: what is left is in use by queued or "
                       "running runs (or was just written).", describe_size(total), describe_size(budget))
    return evicted


def after_write(kind: str, key: Optional[str], cache_dir: Optional[str | os.PathLike] = None) -> None:
    """What every cache writer calls once an entry is complete: keep the cache within its budget.

    Never raises: a cache that cannot be trimmed (a bad setting, a read-only folder) only
    costs disk space, and says why in the log.
    """
    try:
        enforce_budget(cache_dir, keep=[(kind, key)] if key else [])
    except Exception as error:  # noqa: BLE001 - trimming is housekeeping; the run goes on
        logger.warning("The cache was not trimmed to its budget: %s", " ".join(str(error).split()))


def select(entries: list[CacheEntry], dataset: Optional[str] = None, backbone: Optional[str] = None,
           kind: Optional[str] = None, older_than_days: Optional[float] = None) -> list[CacheEntry]:
    """The entries matching every filter given (dataset folder, backbone, kind, unused for more than N days)."""
    if kind is not None and kind not in locations.CACHE_KINDS:
        raise ValueError(f"Unknown cache kind {kind!r}; expected one of: {', '.join(locations.CACHE_KINDS)}.")
    if older_than_days is not None and older_than_days < 0:
        raise ValueError(f"--older-than must be ≥ 0 days; received {older_than_days}.")
    folder = _resolved(dataset)
    cutoff = time.time() - older_than_days * 86400 if older_than_days is not None else None
    return [entry for entry in entries
            if (folder is None or _resolved(entry.dataset) == folder)
            and (backbone is None or entry.backbone == backbone)
            and (kind is None or entry.kind == kind)
            and (cutoff is None or entry.last_used < cutoff)]


def clear(cache_dir: Optional[str | os.PathLike] = None, dataset: Optional[str] = None,
          backbone: Optional[str] = None, kind: Optional[str] = None, older_than_days: Optional[float] = None,
          runs_dirs: Optional[Iterable] = None) -> tuple[list[CacheEntry], list[CacheEntry]]:
    """Deletes the entries matching every filter given (all of them with no filter).

    Entries that queued or running runs need are kept.

    Returns:
        (removed, kept because a run needs them).
    """
    chosen = select(list_entries(cache_dir), dataset, backbone, kind, older_than_days)
    needed = needed_by_runs(chosen, runs_in_progress(runs_dirs)) if chosen else set()
    removed, kept = [], []
    for entry in chosen:
        if (entry.kind, entry.key) in needed:
            kept.append(entry)
        else:
            remove_entry(entry)
            removed.append(entry)
    return removed, kept


def describe_size(size: int) -> str:
    """Bytes in words: 512 B, 3.4 MB, 6.0 GB (powers of 1000, as disks are sold)."""
    for unit, factor in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} B"


def _ago(timestamp: float) -> str:
    seconds = max(0.0, time.time() - timestamp)
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f} {unit} ago"
    return "just now"


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `python -m engine cache [list|clear|trim]`."""
    parser.add_argument("action", nargs="?", choices=("list", "clear", "trim"), default="list",
                        help="list the entries (default); clear the ones the filters choose (--all for every "
                             "one); trim the cache to its budget now")
    parser.add_argument("--cache-dir", help="the cache root (default: $TRANSFER_STUDIO_CACHE, else "
                                            "~/.cache/transfer-studio)")
    parser.add_argument("--dataset", help="only entries of this dataset folder")
    parser.add_argument("--backbone", help="only entries of this backbone (features)")
    parser.add_argument("--kind", choices=locations.CACHE_KINDS, help="only entries of this kind")
    parser.add_argument("--older-than", type=float, metavar="DAYS", help="only entries unused for more than DAYS")
    parser.add_argument("--all", action="store_true", help="with clear: every entry (no filter needed)")
    parser.add_argument("--runs-dir", action="append", default=[],
                        help="a runs root whose queued and running runs keep their entries (besides "
                             "$TRANSFER_STUDIO_RUNS or ./runs); may be repeated")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_cache_command(arguments: argparse.Namespace) -> int:
    """Runs `python -m engine cache`; returns the exit status.

    Raises:
        ValueError: a bad filter or budget setting, or clear without a filter or --all.
    """
    filters = dict(dataset=arguments.dataset, backbone=arguments.backbone, kind=arguments.kind,
                   older_than_days=arguments.older_than)
    if arguments.action == "clear":
        if not arguments.all and all(value is None for value in filters.values()):
            raise ValueError("cache clear needs --all, or a filter: --dataset, --backbone, --kind or --older-than.")
        removed, kept = clear(arguments.cache_dir, runs_dirs=arguments.runs_dir, **filters)
        if arguments.json:
            print(json.dumps({"removed": [entry.to_dict() for entry in removed],
                              "kept": [entry.to_dict() for entry in kept]}, indent=2))
            return 0
        print(f"Removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'} "
              f"({describe_size(sum(entry.size for entry in removed))}).")
        for entry in kept:
            print(f"Kept {entry.kind} {entry.key}: a queued or running run uses {entry.dataset}.")
        return 0
    if arguments.action == "trim":
        evicted = enforce_budget(arguments.cache_dir, runs_dirs=arguments.runs_dir)
        print(f"Evicted {len(evicted)} entr{'y' if len(evicted) == 1 else 'ies'} "
              f"({describe_size(sum(entry.size for entry in evicted))}); the cache holds "
              f"{describe_size(cache_size(arguments.cache_dir))} of {describe_size(budget_bytes(arguments.cache_dir))}.")
        return 0
    entries = select(list_entries(arguments.cache_dir), **filters)
    total = sum(entry.size for entry in list_entries(arguments.cache_dir))
    budget = budget_bytes(arguments.cache_dir, used=total)
    if arguments.json:
        print(json.dumps({"root": str(Path(arguments.cache_dir or locations.cache_root())), "size": total,
                          "budget": budget, "entries": [entry.to_dict() for entry in entries]}, indent=2))
        return 0
    root = Path(arguments.cache_dir or locations.cache_root())
    print(f"Cache {root}: {describe_size(total)} of a {describe_size(budget)} budget "
          f"({locations.CACHE_BUDGET_VARIABLE}); least recently used first.")
    if not entries:
        print("Nothing cached" + (" matches." if any(value is not None for value in filters.values()) else "."))
        return 0
    print(f"{'kind':<9} {'size':>9}  {'last use':<12} {'backbone':<18} dataset")
    for entry in entries:
        print(f"{entry.kind:<9} {describe_size(entry.size):>9}  {_ago(entry.last_used):<12} "
              f"{entry.backbone or '-':<18} {entry.dataset or '-'}")
    return 0
