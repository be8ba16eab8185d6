"""The data doctor: one report of everything wrong or doubtful in a dataset folder.

It builds on the scan (`engine.data.scan_dataset`: excluded files with reasons, ignored
files, conversion notes, warnings) and adds what a scan cannot see one file at a time:

  * exact duplicates: files whose bytes are identical (BLAKE2b of the content);
  * near-duplicates: the same picture resized, re-encoded or slightly brightened, found by
    a 256-bit perceptual hash (pHash, from the ImageHash library) of the upright image, at a
    Hamming distance of at most `NEAR_DUPLICATE_DISTANCE` bits, and with mean colours at most
    `COLOUR_TOLERANCE` apart (pHash sees only brightness, so a red and a blue square match);
  * leakage: the same or nearly the same picture in train and in validation or test, for
    the split training would use (a pre-split folder's own, or `make_split`'s for a flat one);
  * class imbalance, with the ratio and a suggestion; the data are never changed.

Hashes are computed in parallel threads and cached per file (path, size and modification
time) under the cache folder, so an unchanged folder is checked again without reading an
image. This module never imports TensorFlow.
"""

from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np

from engine import caches, locations
from engine.data import (
    NESTED_FOLDER_RULE,
    DataError,
    DatasetScan,
    imbalance,
    make_split,
    scan_dataset,
    split_counts,
)
from engine.images import load_rgb
from engine.near_duplicates import pairs_within
from engine.runfiles import atomic_write_json, read_json

# Two images whose 256-bit pHashes (16×16 DCT signs) differ in at most this many bits are
# near-duplicates. Measured on the 3,428 photos of ../shared/data (cats_vs_dogs and beans),
# 200 random photos per change: copies resized to 1/2 and saved as JPEG quality 75 differ by
# at most 10 bits, 1/4 at quality 60 by 24, 10 % brighter by 12, 20 % more contrast by 18,
# 20 % brighter by 34 (median 6). Of the 5.9 million pairs of different files, one pair is
# within 8 bits, and it is the same photograph saved twice (train/dogs/dog.180.jpg and
# dog.74.jpg); every other pair differs by more than 80. The 64-bit pHash separated the photos
# too, but on the built-in digits sample (8×8 scans drawn large, so little detail) it put
# 12,641 pairs within 8 of 64 bits; this hash puts 474 within 40, pairs that look the same.
HASH_SIZE = 16
NEAR_DUPLICATE_DISTANCE = 40
# pHash is computed on the grey image, so pictures that differ only in hue hash alike. Near
# duplicates must also have mean colours (0-255 per channel) at most this far apart in every
# channel. Measured as above: resized or re-encoded copies move the mean by at most 1.4,
# 20 % more contrast by 14, 10 % brighter by 17, 20 % brighter by 34.
COLOUR_TOLERANCE = 48
HASH_NAME = "pHash, 256 bits (ImageHash)"
# Images are hashed from an upright RGB copy this size (JPEGs decoded at a reduced scale).
HASH_IMAGE_SIZE = 128
HASH_CACHE_VERSION = 1
# At most this many findings of each kind are listed (closest first); the counts are always complete.
MAX_LISTED = 500
HELD_OUT_SPLITS = ("validation", "test")


def check_dataset(
    root: str | os.PathLike,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split_seed: int = 42,
    cache_dir: Optional[str | os.PathLike] = None,
    workers: Optional[int] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    scan: Optional[DatasetScan] = None,
) -> dict:
    """Checks a dataset folder and returns the doctor's report, ready for JSON.

    Args:
        root: The dataset folder.
        validation_fraction, test_fraction, split_seed: The split of a flat folder, as
            training would make it (a pre-split folder is used as given).
        cache_dir: The cache root for scans and hashes; defaults to `engine.locations.cache_root()`.
        workers: Threads used to hash (Pillow and hashlib release the GIL).
        progress: Called with (files hashed, files total) while hashing.
        scan: A scan of `root` already made, to avoid scanning again.

    Returns:
        The scan's report (`DatasetScan.report()`) plus `trainable`, `errors`, `split`,
        `imbalance`, `duplicates`, `near_duplicates`, `leakage`, their counts and `rules`.

    Raises:
        DataError: the folder does not exist or is not a folder.
    """
    scan = scan or scan_dataset(root, cache_dir)
    # The scan's cache entry (engine.data writes it) is used now: described and marked for the LRU.
    caches.touch("scans", scan.fingerprint, cache_dir, dataset=scan.root)
    report = scan.report()
    errors: list[str] = []
    split_of: dict = {}
    try:
        manifest = make_split(scan, validation_fraction, test_fraction, split_seed)
        split_of = {item.path: item.split for item in manifest}
        counts = split_counts(manifest)
    except DataError as error:
        errors.append(str(error))
        counts = {}
    report["trainable"] = not errors
    report["errors"] = errors
    report["split"] = {
        "source": "given by the folders" if scan.layout == "split" else "made by the engine",
        "validation_fraction": validation_fraction if scan.layout != "split" else None,
        "test_fraction": test_fraction if scan.layout != "split" else None,
        "seed": split_seed if scan.layout != "split" else None,
        "counts": counts,
    }
    report["imbalance"] = imbalance(report["class_counts"])

    paths = [item.path for item in scan.files]
    labels = {item.path: item.label for item in scan.files}
    hashes = file_hashes(paths, cache_dir, workers, progress, cache_key=scan.root)
    content = {path: hashes[path]["content"] for path in paths}
    perceptual = {path: hashes[path] for path in paths if hashes[path]["phash"]}

    duplicates = _exact_duplicates(paths, content, labels, split_of)
    near, near_total = _near_duplicates(paths, content, perceptual, labels, split_of)
    leakage, leakage_total = _leakage(paths, content, perceptual, labels, split_of)
    report.update({
        "duplicates": duplicates,
        "num_duplicate_groups": len(duplicates),
        "num_duplicate_files": sum(len(group["paths"]) - 1 for group in duplicates),
        "near_duplicates": near,
        "num_near_duplicate_pairs": near_total,
        "leakage": leakage,
        "num_leaks": leakage_total,
        "leakage_checked": bool(split_of),
        "near_duplicate_rule": {"hash": HASH_NAME, "max_distance": NEAR_DUPLICATE_DISTANCE,
                                "colour_tolerance": COLOUR_TOLERANCE, "listed_at_most": MAX_LISTED},
        "rules": [
            NESTED_FOLDER_RULE,
            "Hidden files and folders and files without an image extension are ignored and counted; "
            "files that look like images but cannot be used are excluded with a reason.",
            f"Near-duplicates: {HASH_NAME} of the upright image at a Hamming distance of at most "
            f"{NEAR_DUPLICATE_DISTANCE} bits, with mean colours at most {COLOUR_TOLERANCE} of 255 apart; "
            "exact duplicates are identical bytes.",
            "Leakage: the same or nearly the same picture in train and in validation or test.",
        ],
    })
    return report


def split_findings(items, cache_dir: Optional[str | os.PathLike] = None, workers: Optional[int] = None,
                   progress: Optional[Callable[[int, int], None]] = None, cache_key: Optional[str] = None) -> dict:
    """Duplicates and leakage within one split manifest, as a training run writes them into `data_report.json`.

    Args:
        items: The run's split: objects with `path`, `label` and `split` (`engine.data.SplitItem`).
        cache_key: Names the hash cache (the dataset folder), so the doctor and runs share it.

    Returns:
        {"leakage": [...], "num_leaks", "num_duplicate_files", "duplicates": [...],
        "num_near_duplicate_pairs", "checked": True, "rule": the near-duplicate rule in words}.
    """
    paths = [item.path for item in items]
    labels = {item.path: item.label for item in items}
    split_of = {item.path: item.split for item in items}
    hashes = file_hashes(paths, cache_dir, workers, progress, cache_key=cache_key)
    content = {path: hashes[path]["content"] for path in paths}
    perceptual = {path: hashes[path] for path in paths if hashes[path]["phash"]}
    duplicates = _exact_duplicates(paths, content, labels, split_of)
    _, near_total = _near_duplicates(paths, content, perceptual, labels, split_of)
    leakage, leakage_total = _leakage(paths, content, perceptual, labels, split_of)
    return {
        "checked": True,
        "leakage": leakage,
        "num_leaks": leakage_total,
        "duplicates": duplicates,
        "num_duplicate_files": sum(len(group["paths"]) - 1 for group in duplicates),
        "num_near_duplicate_pairs": near_total,
        "rule": f"{HASH_NAME} at most {NEAR_DUPLICATE_DISTANCE} bits apart, mean colours at most "
                f"{COLOUR_TOLERANCE} of 255 apart; exact duplicates are identical bytes.",
    }


def file_hashes(
    paths: list[str],
    cache_dir: Optional[str | os.PathLike] = None,
    workers: Optional[int] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    cache_key: Optional[str] = None,
) -> dict[str, dict]:
    """The content hash and perceptual hash of every file, computed once per file version.

    Args:
        cache_key: Names the cache file (the dataset folder); by default the paths' common folder.

    Returns:
        {path: {"content": BLAKE2b hex, "phash": 64 hex digits, "colour": mean [R, G, B]}};
        "phash" is "" and "colour" None when the file cannot be decoded now. Cached per file
        by path, size and modification time.
    """
    key_text = cache_key if cache_key is not None else (os.path.commonpath(paths) if paths else "")
    key = hashlib.sha256(key_text.encode("utf-8", "surrogateescape")).hexdigest()[:24]
    cache_file = locations.cache_folder("hashes", cache_dir) / f"{key}.json"
    cached = read_json(cache_file) or {}
    entries = cached.get("files", {}) if cached.get("version") == HASH_CACHE_VERSION else {}
    stamps = {path: _stamp(path) for path in paths}
    results: dict[str, dict] = {}
    missing = []
    for path in paths:
        entry = entries.get(path)
        if entry and entry.get("stamp") == stamps[path]:
            results[path] = {key: entry[key] for key in ("content", "phash", "colour")}
        else:
            missing.append(path)
    if missing:
        workers = workers or min(8, (os.cpu_count() or 2) * 2)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for done, (path, hashed) in enumerate(zip(missing, pool.map(_hash_file, missing)), start=1):
                results[path] = hashed
                if progress and (done % 25 == 0 or done == len(missing)):
                    progress(done, len(missing))
        try:
            atomic_write_json(cache_file, {"version": HASH_CACHE_VERSION, "files": {
                path: {"stamp": stamps[path], **results[path]} for path in paths}})
        except OSError:
            return results  # A read-only cache only costs hashing again next time.
        caches.touch("hashes", key, cache_dir, dataset=key_text or None)
        caches.after_write("hashes", key, cache_dir)
    else:
        caches.touch("hashes", key, cache_dir, dataset=key_text or None)
    return results


def _stamp(path: str) -> list:
    try:
        info = os.stat(path)
        return [info.st_size, info.st_mtime_ns]
    except OSError:
        return [None, None]


def _hash_file(path: str) -> dict:
    """Hashes one file's bytes and its upright picture; a file that no longer decodes has no pHash."""
    import imagehash
    from PIL import Image

    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError:
        return {"content": "", "phash": "", "colour": None}
    content = hashlib.blake2b(data, digest_size=20).hexdigest()
    try:
        pixels = load_rgb(io.BytesIO(data), HASH_IMAGE_SIZE)
        phash = str(imagehash.phash(Image.fromarray(pixels), hash_size=HASH_SIZE))
        colour = [round(float(value), 1) for value in pixels.reshape(-1, 3).mean(axis=0)]
    except Exception:  # noqa: BLE001 - changed since the scan; it then has no near-duplicates
        return {"content": content, "phash": "", "colour": None}
    return {"content": content, "phash": phash, "colour": colour}


def _exact_duplicates(paths, content, labels, split_of) -> list[dict]:
    groups: dict = {}
    for path in paths:
        if content[path]:
            groups.setdefault(content[path], []).append(path)
    found = []
    for members in groups.values():
        if len(members) < 2:
            continue
        member_labels = [labels[path] for path in members]
        found.append({
            "paths": members,
            "labels": member_labels,
            "splits": [split_of.get(path) for path in members],
            "same_class": len(set(member_labels)) == 1,
        })
    found.sort(key=lambda group: group["paths"][0])
    return found


def _hash_array(paths, perceptual) -> tuple[list, np.ndarray, np.ndarray]:
    """The paths that have a pHash, their hashes as rows of 64-bit words, and their mean colours."""
    kept = [path for path in paths if path in perceptual]
    words = HASH_SIZE * HASH_SIZE // 64
    rows = [np.frombuffer(bytes.fromhex(perceptual[path]["phash"]), dtype=">u8") for path in kept]
    hashes = np.array(rows, dtype=np.uint64) if rows else np.zeros((0, words), dtype=np.uint64)
    colours = np.array([perceptual[path]["colour"] for path in kept], dtype=np.float32).reshape(-1, 3)
    return kept, hashes, colours


def _close_pairs(left: tuple, right: tuple, same: bool, limit: int) -> tuple[np.ndarray, int]:
    """Pairs (i, j, distance) with Hamming distance ≤ the threshold and mean colours within the
    tolerance, closest first, and their count.

    `left` and `right` are (hashes, colours) from `_hash_array`. With `same`, they are the
    same arrays and only pairs i < j are counted. The pairs come from the multi-index of
    `engine.near_duplicates` (the same pairs as comparing every pair, at a cost that grows
    about linearly with the number of images); only the `limit` closest are kept, so a
    folder of near-identical pictures cannot flood the report.
    """
    (left, left_colours), (right, right_colours) = left, right
    pairs = pairs_within(left, None if same else right, NEAR_DUPLICATE_DISTANCE)
    if len(pairs):
        gap = np.abs(left_colours[pairs[:, 0]] - right_colours[pairs[:, 1]]).max(axis=1)
        pairs = pairs[gap <= COLOUR_TOLERANCE]
    order = np.lexsort((pairs[:, 1], pairs[:, 0], pairs[:, 2]))
    return pairs[order][:limit], len(pairs)


def _near_duplicates(paths, content, perceptual, labels, split_of) -> tuple[list[dict], int]:
    """Pairs of different files that are nearly the same picture (exact copies are listed as duplicates)."""
    # One file per distinct content, so every copy of a file does not repeat its pairs.
    seen, unique = set(), []
    for path in paths:
        if content[path] not in seen:
            seen.add(content[path])
            unique.append(path)
    kept, hashes, colours = _hash_array(unique, perceptual)
    pairs, total = _close_pairs((hashes, colours), (hashes, colours), True, MAX_LISTED)
    return [_pair(kept[first], kept[second], int(distance), labels, split_of)
            for first, second, distance in pairs], total


def _leakage(paths, content, perceptual, labels, split_of) -> tuple[list[dict], int]:
    """Pictures in train that are the same, or nearly the same, as one in validation or test."""
    if not split_of:
        return [], 0
    train, *train_arrays = _hash_array([path for path in paths if split_of.get(path) == "train"], perceptual)
    others, *other_arrays = _hash_array([path for path in paths if split_of.get(path) in HELD_OUT_SPLITS],
                                        perceptual)
    pairs, total = _close_pairs(tuple(train_arrays), tuple(other_arrays), False, MAX_LISTED)
    found = []
    for first, second, distance in pairs:
        leak = _pair(train[first], others[second], int(distance), labels, split_of)
        leak["exact"] = content[train[first]] == content[others[second]]
        found.append(leak)
    return found, total


def _pair(first: str, second: str, distance: int, labels, split_of) -> dict:
    return {"paths": [first, second], "labels": [labels[first], labels[second]],
            "splits": [split_of.get(first), split_of.get(second)], "distance": distance,
            "same_class": labels[first] == labels[second]}


def finding_pairs(report: dict) -> dict[str, list[dict]]:
    """Every finding of a report as a pair of files, per kind, for a table or side-by-side view.

    An exact-duplicate group of n files gives n - 1 pairs, each with the group's first file.
    """
    duplicates = [
        _row(group["paths"][0], other, group["labels"][0], label, "identical")
        for group in report["duplicates"]
        for other, label in zip(group["paths"][1:], group["labels"][1:])
    ]
    near = [_row(*pair["paths"], *pair["labels"], f"{pair['distance']} bits apart")
            for pair in report["near_duplicates"]]
    leakage = [_row(*leak["paths"], f"train · {leak['labels'][0]}", f"{leak['splits'][1]} · {leak['labels'][1]}",
                    "identical" if leak["exact"] else f"{leak['distance']} bits apart")
               for leak in report["leakage"]]
    return {"Exact duplicates": duplicates, "Near-duplicates": near, "Leakage": leakage}


def _row(first: str, second: str, first_class: str, second_class: str, closeness: str) -> dict:
    return {"first": first, "second": second, "first class": first_class, "second class": second_class,
            "how close": closeness}
