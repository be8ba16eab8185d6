"""Datasets: scan a folder of class subfolders, report on it, and split it.

Layouts:
  * flat: `ROOT/<class>/...` — the engine splits it (stratified, seeded).
  * split: `ROOT/train/<class>/...` with `ROOT/validation/` (or `val/`) and an optional
    `ROOT/test/` — used as given.
Images anywhere below a class folder belong to that class (nested subfolders are
read recursively; a linked subfolder is not followed). Hidden files and folders,
files without an image extension and files directly in the data folder are ignored
and counted; files that look like images but cannot be used are excluded with a
reason. Nothing is dropped silently. The user's label decisions (`engine.label_decisions`:
leave an image out, or move it to another class) are applied after every scan, without
touching the files. This module never imports TensorFlow.
"""

from __future__ import annotations

import hashlib
import math
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from engine import caches, locations
from engine.images import IMAGE_EXTENSIONS, check_image, has_image_extension, is_hidden
from engine.runfiles import atomic_write_json, read_json

SPLITS = ("train", "validation", "test")
VALIDATION_FOLDER_NAMES = ("validation", "val")
# 2: notes name what a conversion did (16-bit, palette, transparency).
SCAN_CACHE_VERSION = 2
# A class this many times larger than the smallest one is flagged as imbalanced.
IMBALANCE_WARNING_RATIO = 1.5


class DataError(ValueError):
    """The data cannot be trained on as it is; the message says why and what to do."""


@dataclass
class ScannedFile:
    """One usable image found by the scan."""

    path: str
    label: str
    split: Optional[str]
    width: int
    height: int
    format: str
    note: str = ""


@dataclass
class DatasetScan:
    """Everything the scan found: usable images, excluded and ignored files, warnings."""

    root: str
    layout: str
    classes: list
    fingerprint: str
    files: list = field(default_factory=list)
    excluded: list = field(default_factory=list)
    ignored: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    # Every file that was checked (usable or excluded), in scan order: the rows of the
    # whole-folder image cache (`engine.pipeline.scan_and_decode`).
    candidates: list = field(default_factory=list)
    # Images whose label a user's decision changed: {path, from, to, split, by} (engine.label_decisions).
    relabelled: list = field(default_factory=list)

    def counts(self) -> dict:
        """Usable images per class, and per split when the folder is pre-split."""
        per_class = {label: 0 for label in self.classes}
        per_split: dict = {}
        for item in self.files:
            per_class[item.label] = per_class.get(item.label, 0) + 1
            if item.split:
                per_split.setdefault(item.split, {label: 0 for label in self.classes})
                per_split[item.split][item.label] += 1
        return {"per_class": per_class, "per_split": per_split}

    def report(self) -> dict:
        """The scan as the JSON-ready dictionary saved in `data_report.json`."""
        counts = self.counts()
        widths = [item.width for item in self.files]
        heights = [item.height for item in self.files]
        nonzero = [count for count in counts["per_class"].values() if count > 0]
        imbalance = (max(nonzero) / min(nonzero)) if nonzero else None
        hidden = sum(1 for item in self.ignored if item["reason"].startswith("hidden"))
        return {
            "root": self.root,
            "layout": self.layout,
            "fingerprint": self.fingerprint,
            "classes": self.classes,
            "num_images": len(self.files),
            "class_counts": counts["per_class"],
            "split_counts_given": counts["per_split"],
            "imbalance_ratio": round(imbalance, 3) if imbalance else None,
            "image_size": {
                "width": _stats(widths),
                "height": _stats(heights),
            },
            "excluded": self.excluded,
            "num_excluded": len(self.excluded),
            "ignored": self.ignored,
            "num_ignored": len(self.ignored),
            "num_hidden_ignored": hidden,
            "notes": [{"path": item.path, "note": item.note} for item in self.files if item.note],
            "relabelled": self.relabelled,
            "num_relabelled": len(self.relabelled),
            "warnings": self.warnings,
        }


def _stats(values: list) -> dict:
    if not values:
        return {"min": None, "median": None, "max": None, "mean": None}
    return {
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
        "mean": round(statistics.fmean(values), 1),
    }


def class_names(root: str | os.PathLike) -> list[str]:
    """The class folder names of a dataset folder (flat, or the train folder of a pre-split one), sorted."""
    root = Path(root).expanduser()
    layout, folders = detect_layout(root)
    return [entry.name for entry in _list_class_folders(folders["train"] if layout == "split" else root)]


def _list_class_folders(folder: Path) -> list[Path]:
    return sorted(
        (entry for entry in folder.iterdir() if entry.is_dir() and not is_hidden(entry.name)),
        key=lambda entry: entry.name,
    )


def detect_layout(root: Path) -> tuple[str, dict]:
    """Decides whether `root` is flat or pre-split.

    Returns:
        ("split", {split: folder}) or ("flat", {None: root}).
    """
    children = {entry.name.lower(): entry for entry in root.iterdir() if entry.is_dir()}
    validation = next((children[name] for name in VALIDATION_FOLDER_NAMES if name in children), None)
    if "train" in children and validation is not None:
        folders = {"train": children["train"], "validation": validation}
        if "test" in children:
            folders["test"] = children["test"]
        return "split", folders
    return "flat", {None: root}


# The rule for nested folders, said in the scan's module docstring, the doctor's report and the README.
NESTED_FOLDER_RULE = ("Images anywhere below a class folder belong to that class: nested subfolders are read "
                      "recursively (a linked subfolder is not followed). Files directly in the data folder "
                      "belong to no class and are ignored.")


def _walk_files(folder: Path):
    """Yields (path, skipped) for every file below `folder`.

    Hidden folders and linked folders are not entered (a link could lead anywhere, even
    back up the tree); each is yielded once with the reason it was skipped, so it is counted.
    """
    for current, directories, files in os.walk(folder):
        kept = []
        for name in sorted(directories):
            if is_hidden(name):
                yield Path(current) / name, "hidden folder: not read"
            elif os.path.islink(os.path.join(current, name)):
                yield Path(current) / name, "linked folder: not followed (copy its images in, or link the class folder)"
            else:
                kept.append(name)
        directories[:] = kept
        for name in sorted(files):
            yield Path(current) / name, None


def list_candidate_files(root: Path) -> tuple[str, list, list, list]:
    """Finds every file of the dataset without decoding anything.

    Returns:
        layout, candidates [(path, label, split)], ignored [{path, reason}], warnings.
    """
    layout, split_folders = detect_layout(root)
    candidates, ignored, warnings = [], [], []
    for split, split_folder in split_folders.items():
        class_folders = _list_class_folders(split_folder)
        where = f"{split}/" if split else ""
        for entry in split_folder.iterdir():
            if entry.is_file():
                reason = "hidden file" if is_hidden(entry.name) else "not inside a class folder"
                ignored.append({"path": str(entry), "reason": reason})
        for class_folder in class_folders:
            found_image = False
            for path, skipped in _walk_files(class_folder):
                if skipped:
                    ignored.append({"path": str(path), "reason": skipped})
                elif is_hidden(path.name):
                    ignored.append({"path": str(path), "reason": "hidden file"})
                elif not has_image_extension(path.name):
                    ignored.append({
                        "path": str(path),
                        "reason": f"not an image file type ({path.suffix or 'no extension'}; "
                                  f"accepted: {', '.join(IMAGE_EXTENSIONS)})",
                    })
                else:
                    found_image = True
                    candidates.append((str(path), class_folder.name, split))
            if not found_image:
                warnings.append(f"Class folder {where}{class_folder.name} has no images.")
    return layout, candidates, ignored, warnings


def fingerprint_files(paths: list[str]) -> str:
    """A hash of every file's path, size and modification time: changes when the data changes."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        try:
            info = os.stat(path)
            digest.update(f"{path}\0{info.st_size}\0{info.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        except OSError:
            digest.update(f"{path}\0missing\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:24]


def dataset_fingerprint(root: str | os.PathLike) -> str:
    """The fingerprint of a dataset folder's image files, without decoding anything (cheap)."""
    _, candidates, _, _ = list_candidate_files(Path(root).expanduser().resolve())
    return fingerprint_files([path for path, _, _ in candidates])


def scan_dataset(
    root: str | os.PathLike,
    cache_dir: Optional[str | os.PathLike] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    workers: Optional[int] = None,
    check_files: Optional[Callable[[list], list]] = None,
    apply_decisions: bool = True,
) -> DatasetScan:
    """Scans a dataset folder, decoding every candidate image once to check it.

    The result is cached by the folder's fingerprint, so an unchanged folder is not
    decoded again. The user's label decisions are applied afterwards (cached scan or not):
    a left-out image is listed in `excluded` with its reason, a moved one takes its new label
    and is listed in `relabelled`.

    Args:
        root: The dataset folder.
        cache_dir: The cache root to use; defaults to `engine.locations.cache_root()`.
        progress: Called with (files checked, files total) while checking.
        workers: Threads used to decode (Pillow releases the GIL while decoding).
        check_files: Called instead of the plain check, on a cache miss, with the candidate
            paths; returns one `ImageCheck` dictionary per path. The training worker uses it
            to check and decode every file in a single pass.
        apply_decisions: Apply the recorded label decisions (`engine.label_decisions`); False
            gives the labels the folders give.

    Raises:
        DataError: the folder does not exist or is not a folder.
    """
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise DataError(f"Data folder {str(root_path)!r} does not exist. Give a folder of class subfolders.")
    if not root_path.is_dir():
        raise DataError(f"Data path {str(root_path)!r} is a file, not a folder. Give a folder of class subfolders.")
    root_path = root_path.resolve()
    layout, candidates, ignored, warnings = list_candidate_files(root_path)
    fingerprint = fingerprint_files([path for path, _, _ in candidates])
    cache_file = locations.cache_folder("scans", cache_dir) / f"{fingerprint}.json"
    cached = read_json(cache_file)
    if cached and cached.get("version") == SCAN_CACHE_VERSION and cached.get("root") == str(root_path):
        checks = cached["checks"]
        caches.touch("scans", fingerprint, cache_dir, dataset=str(root_path))
    else:
        paths = [path for path, _, _ in candidates]
        checks = check_files(paths) if check_files else check_all(paths, progress, workers)
        # Files that changed or vanished while being checked (a folder moved away and back)
        # would leave wrong results under the old fingerprint: such a scan is not cached.
        if fingerprint_files(paths) == fingerprint:
            try:
                atomic_write_json(cache_file, {"version": SCAN_CACHE_VERSION, "root": str(root_path),
                                               "checks": checks})
            except OSError:
                pass  # A read-only cache only costs a re-scan next time.
            else:
                caches.touch("scans", fingerprint, cache_dir, dataset=str(root_path))
                caches.after_write("scans", fingerprint, cache_dir)
    files, excluded = [], []
    for (path, label, split), check in zip(candidates, checks):
        if check["ok"]:
            files.append(ScannedFile(path, label, split, check["width"], check["height"], check["format"], check["note"]))
        else:
            excluded.append({"path": path, "label": label, "split": split, "reason": check["reason"]})
    classes = sorted({label for _, label, _ in candidates} | _class_names(root_path, layout))
    scan = DatasetScan(str(root_path), layout, classes, fingerprint, files, excluded, ignored, warnings,
                       [path for path, _, _ in candidates])
    if apply_decisions:
        from engine.label_decisions import apply_decisions as apply_label_decisions

        apply_label_decisions(scan)
    _add_balance_warnings(scan)
    return scan


def _class_names(root: Path, layout: str) -> set:
    _, folders = detect_layout(root)
    names = set()
    for split, folder in folders.items():
        if split in (None, "train"):
            names |= {entry.name for entry in _list_class_folders(folder)}
    return names


def check_all(paths: list[str], progress=None, workers=None) -> list[dict]:
    """Checks every file in parallel threads; returns one `ImageCheck` dictionary per path."""
    total = len(paths)
    results: list[dict] = [None] * total  # type: ignore[list-item]
    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for index, check in enumerate(pool.map(check_image, paths, chunksize=8)):
            results[index] = asdict(check)
            if progress and (index % 25 == 0 or index == total - 1):
                progress(index + 1, total)
    return results


def imbalance(class_counts: dict) -> dict:
    """The largest and smallest classes with images, their ratio, and what to do about it.

    Nothing is resampled or dropped: the suggestion is class weights, which the user chooses.
    """
    nonzero = {label: count for label, count in class_counts.items() if count > 0}
    if len(nonzero) < 2:
        return {"ratio": None, "largest": None, "smallest": None, "imbalanced": False, "suggestion": ""}
    largest = max(nonzero, key=nonzero.get)
    smallest = min(nonzero, key=nonzero.get)
    ratio = nonzero[largest] / nonzero[smallest]
    imbalanced = ratio >= IMBALANCE_WARNING_RATIO
    suggestion = (
        f"{largest} has {nonzero[largest]} images and {smallest} {nonzero[smallest]} ({ratio:.1f}×). "
        "Train with class weights 'balanced' (Train page: class weights; CLI: --class-weight balanced) so "
        "every class counts as much; the data are left as they are."
    ) if imbalanced else ""
    return {"ratio": round(ratio, 3), "largest": largest, "smallest": smallest, "imbalanced": imbalanced,
            "suggestion": suggestion}


def _add_balance_warnings(scan: DatasetScan) -> None:
    counts = scan.counts()["per_class"]
    if scan.layout == "split":
        given = scan.counts()["per_split"]
        for label in scan.classes:
            if given.get("train", {}).get(label, 0) == 0:
                scan.warnings.append(f"Class {label} has no training images.")
            if "validation" in given and given["validation"].get(label, 0) == 0:
                scan.warnings.append(f"Class {label} has no validation images: its validation metrics will be empty.")
    balance = imbalance(counts)
    if balance["imbalanced"]:
        scan.warnings.append(f"Classes are imbalanced: {balance['suggestion']}")


@dataclass
class SplitItem:
    """One image of the split manifest."""

    path: str
    label: str
    split: str


def make_split(
    scan: DatasetScan,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 42,
    subset_fraction: float = 1.0,
) -> list[SplitItem]:
    """Assigns every usable image to train, validation or test.

    Flat folders are split per class (stratified) with a seeded shuffle; pre-split
    folders are used as given. `subset_fraction` < 1 keeps a seeded, stratified share
    of every split.

    Raises:
        DataError: fewer than two classes have images, or a class is too small for the split.
    """
    classes_with_images = sorted({item.label for item in scan.files})
    if len(classes_with_images) < 2:
        found = ", ".join(classes_with_images) or "none"
        raise DataError(
            f"At least two classes with images are needed to train a classifier; {scan.root} has "
            f"{len(classes_with_images)} ({found}). Put each class's images in its own subfolder."
        )
    by_class: dict = {}
    for item in scan.files:
        by_class.setdefault((item.label, item.split), []).append(item.path)
    manifest: list[SplitItem] = []
    rng = np.random.default_rng(seed)
    if scan.layout == "split":
        for (label, split), paths in sorted(by_class.items(), key=lambda pair: (pair[0][0], pair[0][1] or "")):
            manifest += [SplitItem(path, label, split) for path in sorted(paths)]
        if not any(item.split == "validation" for item in manifest):
            raise DataError(f"The validation folder of {scan.root} has no usable images; add some.")
    else:
        needed = 1 + (validation_fraction > 0) + (test_fraction > 0)
        for (label, _), paths in sorted(by_class.items(), key=lambda pair: pair[0][0]):
            paths = sorted(paths)
            if len(paths) < needed:
                raise DataError(
                    f"Class {label} has {len(paths)} usable image(s); the split "
                    f"(validation {validation_fraction:g}, test {test_fraction:g}) needs at least {needed}, "
                    f"one per split. Add images to {label}, or set the fractions to 0."
                )
            order = rng.permutation(len(paths))
            count = len(paths)
            validation_count = _share(count, validation_fraction)
            test_count = _share(count, test_fraction)
            # Keep at least one training image when rounding ate them all.
            while validation_count + test_count >= count:
                if test_count > (1 if test_fraction > 0 else 0):
                    test_count -= 1
                else:
                    validation_count -= 1
            for position, index in enumerate(order):
                if position < validation_count:
                    split = "validation"
                elif position < validation_count + test_count:
                    split = "test"
                else:
                    split = "train"
                manifest.append(SplitItem(paths[index], label, split))
    if subset_fraction < 1.0:
        manifest = _subset(manifest, subset_fraction, rng)
    order = {name: index for index, name in enumerate(SPLITS)}
    manifest.sort(key=lambda item: (order[item.split], item.label, item.path))
    return manifest


def _share(count: int, fraction: float) -> int:
    """Images of a class that go to a held-out split: at least one when the fraction is not 0."""
    if fraction <= 0:
        return 0
    return max(1, int(round(count * fraction)))


def _subset(manifest: list[SplitItem], fraction: float, rng) -> list[SplitItem]:
    groups: dict = {}
    for item in manifest:
        groups.setdefault((item.split, item.label), []).append(item)
    kept = []
    for key in sorted(groups):
        items = groups[key]
        keep = max(1, math.ceil(len(items) * fraction))
        chosen = sorted(rng.choice(len(items), size=keep, replace=False))
        kept += [items[index] for index in chosen]
    return kept


def split_counts(manifest: list[SplitItem]) -> dict:
    """Images per split and class, e.g. {"train": {"cats": 800, ...}, ...}."""
    counts: dict = {}
    for item in manifest:
        counts.setdefault(item.split, {}).setdefault(item.label, 0)
        counts[item.split][item.label] += 1
    return counts
