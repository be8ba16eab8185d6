"""The images an export is checked and calibrated on, read from the run's `split.csv`.

Both samples are deterministic (every k-th row in the file's order), so two exports of a
run are compared on the same images, and a rerun gives the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine import runfiles


@dataclass(frozen=True)
class Sample:
    """Decoded images of one split.

    Attributes:
        pixels: (N, size, size, 3) uint8 raw RGB, decoded as the app feeds the model.
        labels: (N,) class indices.
        paths: The N files.
        skipped: Files listed in split.csv that no longer read (moved, deleted, damaged).
        split: The split they come from.
    """

    pixels: np.ndarray
    labels: np.ndarray
    paths: list[str]
    skipped: int
    split: str


def every_kth(rows: list, limit: int) -> list:
    """At most `limit` rows, spread evenly over `rows` (every k-th, from the first)."""
    if limit <= 0 or not rows:
        return []
    step = max(1, math.ceil(len(rows) / limit))
    return rows[::step][:limit]


def read_sample(run_dir: str | Path, class_names: list[str], image_size: int, split: str, limit: int) -> Sample:
    """Decodes at most `limit` images of `split` from the run's split.csv; unreadable files are counted.

    Raises:
        ValueError: the run has no split.csv, or no image of `split` reads.
    """
    from engine.images import load_rgb

    split_path = Path(run_dir) / runfiles.SPLIT_FILE
    if not split_path.is_file():
        raise ValueError(f"Run {Path(run_dir).name} has no {runfiles.SPLIT_FILE}; expected the split the run "
                         f"trained on. Re-train the run to check its exports.")
    index = {name: position for position, name in enumerate(class_names)}
    rows = [row for row in runfiles.read_csv(split_path) if row.get("split") == split and row.get("label") in index]
    pixels, labels, paths, skipped = [], [], [], 0
    for row in every_kth(rows, limit):
        try:
            pixels.append(load_rgb(row["path"], image_size))
        except Exception:  # noqa: BLE001 - a file gone or damaged since training is counted, not fatal
            skipped += 1
            continue
        labels.append(index[row["label"]])
        paths.append(row["path"])
    if not pixels:
        raise ValueError(f"No {split} image of run {Path(run_dir).name} could be read ({len(rows)} listed in "
                         f"{runfiles.SPLIT_FILE}, {skipped} unreadable); expected at least one. Check that the "
                         f"run's data folder is still in place.")
    return Sample(np.stack(pixels), np.asarray(labels, dtype=np.int64), paths, skipped, split)
