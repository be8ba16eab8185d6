"""Comparing runs: the settings that differ, their results side by side, and an image-level diff
of two runs with McNemar's exact test.

"Is B really better than A?" is answered on the images both runs were evaluated on, matched by
path and split: the images A got right and B got wrong, the reverse, and the probability that a
difference at least this large arises by chance when both are equally good (McNemar's exact
test: under that hypothesis each disagreement is a fair coin, so the smaller count follows a
binomial distribution with p = 1/2). SciPy's `binomtest` computes it; nothing here is
hand-rolled statistics. The pages and the CLI only draw what this module returns.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd

from engine import runfiles
from engine.interpret import load_predictions

# Below this p-value the verdict says one run is better; 0.05 is the convention readers expect.
SIGNIFICANCE_LEVEL = 0.05
# Settings that always differ between runs and say nothing about what was changed.
IGNORED_SETTINGS = {"name"}
DIFF_COLUMNS = ["path", "true", "predicted_a", "confidence_a", "predicted_b", "confidence_b"]


@dataclass
class ImageDiff:
    """Two runs' predictions on the images both were evaluated on.

    Attributes:
        split: The split compared ("validation" or "test").
        common: Images both runs predicted, matched by path (same true label in both).
        only_a, only_b: Images of that split only one run evaluated (different splits or data).
        label_changed: Images both evaluated under different true labels (relabelled in between);
            left out of the comparison.
        both_right, both_wrong: Counts of agreement in correctness.
        a_right_b_wrong, b_right_a_wrong: The discordant images, most confident first, with
            both runs' predictions and confidences (columns DIFF_COLUMNS).
        p_value: McNemar's exact two-sided p-value on the discordant counts (1.0 when there are none).
    """

    split: str
    common: int
    only_a: int
    only_b: int
    label_changed: int
    both_right: int
    both_wrong: int
    a_right_b_wrong: pd.DataFrame = field(repr=False)
    b_right_a_wrong: pd.DataFrame = field(repr=False)
    p_value: float

    @property
    def same_images(self) -> bool:
        """Both runs were evaluated on exactly the same images of this split."""
        return self.only_a == 0 and self.only_b == 0 and self.label_changed == 0

    def to_dict(self) -> dict:
        """A JSON-ready summary: counts, the p-value and the lists of paths."""
        return {"split": self.split, "common_images": self.common, "only_a": self.only_a, "only_b": self.only_b,
                "label_changed": self.label_changed, "same_images": self.same_images,
                "both_right": self.both_right, "both_wrong": self.both_wrong,
                "a_right_b_wrong": len(self.a_right_b_wrong), "b_right_a_wrong": len(self.b_right_a_wrong),
                "p_value": self.p_value,
                "a_right_b_wrong_paths": list(self.a_right_b_wrong["path"]),
                "b_right_a_wrong_paths": list(self.b_right_a_wrong["path"])}


def mcnemar_exact_p_value(a_right_b_wrong: int, b_right_a_wrong: int) -> float:
    """McNemar's exact two-sided p-value for two classifiers' discordant counts.

    Args:
        a_right_b_wrong: Images the first classifier got right and the second wrong.
        b_right_a_wrong: The reverse.

    Returns:
        The probability, if both classifiers were equally good, of a split of the disagreements
        at least this uneven (1.0 when they never disagree).

    Raises:
        ValueError: a count is negative.
    """
    from scipy.stats import binomtest

    if a_right_b_wrong < 0 or b_right_a_wrong < 0:
        raise ValueError(f"Counts must be ≥ 0; received {a_right_b_wrong} and {b_right_a_wrong}.")
    disagreements = a_right_b_wrong + b_right_a_wrong
    if disagreements == 0:
        return 1.0
    return float(binomtest(a_right_b_wrong, disagreements, 0.5, alternative="two-sided").pvalue)


def image_diff(run_a: str | os.PathLike, run_b: str | os.PathLike, split: str = "validation") -> ImageDiff:
    """The image-level diff of two evaluated runs on one split, with McNemar's exact p-value.

    Raises:
        FileNotFoundError: a run has no predictions.csv (it has not finished its evaluation).
        ValueError: neither run has images of `split`.
    """
    frames = []
    for run in (run_a, run_b):
        path = Path(run) / runfiles.PREDICTIONS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{Path(run).name} has no {runfiles.PREDICTIONS_FILE}: it has not finished its "
                                    "evaluation. Compare runs that finished (or were stopped and evaluated).")
        predictions = load_predictions(run)
        frames.append(predictions[predictions["split"] == split] if not predictions.empty else predictions)
    a, b = frames
    if a.empty and b.empty:
        raise ValueError(f"Neither {Path(run_a).name} nor {Path(run_b).name} has {split} images to compare; "
                         "choose another split (validation or test).")
    columns = ["path", "true", "predicted", "confidence", "correct"]
    merged = (a[columns] if not a.empty else pd.DataFrame(columns=columns)).merge(
        b[columns] if not b.empty else pd.DataFrame(columns=columns), on="path", how="inner", suffixes=("_a", "_b"))
    relabelled = merged["true_a"] != merged["true_b"]
    label_changed = int(relabelled.sum())
    merged = merged[~relabelled].rename(columns={"true_a": "true"})
    correct_a, correct_b = merged["correct_a"].astype(bool), merged["correct_b"].astype(bool)
    only_a = len(a) - len(merged) - label_changed
    only_b = len(b) - len(merged) - label_changed

    def discordant(mask) -> pd.DataFrame:
        rows = merged[mask].copy()
        rows["_order"] = rows[["confidence_a", "confidence_b"]].max(axis=1)
        return rows.sort_values("_order", ascending=False)[DIFF_COLUMNS].reset_index(drop=True)

    a_right_b_wrong = discordant(correct_a & ~correct_b)
    b_right_a_wrong = discordant(~correct_a & correct_b)
    return ImageDiff(split=split, common=len(merged), only_a=only_a, only_b=only_b, label_changed=label_changed,
                     both_right=int((correct_a & correct_b).sum()), both_wrong=int((~correct_a & ~correct_b).sum()),
                     a_right_b_wrong=a_right_b_wrong, b_right_a_wrong=b_right_a_wrong,
                     p_value=mcnemar_exact_p_value(len(a_right_b_wrong), len(b_right_a_wrong)))


def verdict(diff: ImageDiff, name_a: str = "A", name_b: str = "B", level: float = SIGNIFICANCE_LEVEL) -> str:
    """McNemar's result in plain words, naming the images it is about."""
    images = f"these {diff.common} {diff.split} images"
    if diff.common == 0:
        return f"{name_a} and {name_b} have no {diff.split} images in common: nothing to compare."
    a_better, b_better = len(diff.a_right_b_wrong), len(diff.b_right_a_wrong)
    chance = f"a difference this large would arise by chance with probability {diff.p_value:.2g}"
    if diff.p_value < level and a_better != b_better:
        better, worse = (name_b, name_a) if b_better > a_better else (name_a, name_b)
        return f"{better} is better than {worse} on {images}; {chance}."
    if a_better == b_better == 0:
        return f"{name_a} and {name_b} are right and wrong on exactly the same images ({diff.common} compared)."
    return (f"{name_a} and {name_b} are not distinguishable on {images}: only {name_a} is right on {a_better}, "
            f"only {name_b} on {b_better}, and {chance} (not below {level}).")


def flat_settings(run_dir: str | os.PathLike) -> dict:
    """The run's config.json as dotted names (`training.learning_rate`) → values."""
    config = runfiles.read_json(Path(run_dir) / runfiles.CONFIG_FILE, default={}) or {}
    flat = {}
    for section, values in config.items():
        if isinstance(values, dict):
            for name, value in values.items():
                flat[f"{section}.{name}"] = value
        elif section not in IGNORED_SETTINGS:
            flat[section] = values
    return flat


def settings_that_differ(run_dirs: list) -> pd.DataFrame:
    """Only the settings whose values are not the same in every run: one row per setting, one column per run."""
    flats = [flat_settings(run) for run in run_dirs]
    names = sorted(set().union(*flats)) if flats else []
    rows = []
    for name in names:
        values = [flat.get(name) for flat in flats]
        if any(repr(value) != repr(values[0]) for value in values[1:]):
            rows.append({"setting": name, **{Path(run).name: value for run, value in zip(run_dirs, values)}})
    return pd.DataFrame(rows, columns=["setting", *[Path(run).name for run in run_dirs]])


def results_side_by_side(run_dirs: list, split: str = "validation") -> pd.DataFrame:
    """Accuracy, macro F1 and each class's F1 on `split`, plus training time and speed, one row per run."""
    rows = []
    for run in run_dirs:
        run = Path(run)
        evaluation = runfiles.read_json(run / runfiles.EVALUATION_FILE, default={}) or {}
        result = (evaluation.get("splits") or {}).get(split) or {}
        row = {"run": run.name, "images": result.get("num_images"), "accuracy": result.get("accuracy"),
               "macro F1": result.get("macro_f1")}
        for name, scores in (result.get("per_class") or {}).items():
            row[f"F1 {name}"] = scores.get("f1") if isinstance(scores, dict) else None
        row.update(training_cost(run))
        rows.append(row)
    return pd.DataFrame(rows)


def training_cost(run_dir: str | os.PathLike) -> dict:
    """Wall time from start to finish and training images seen per second of it (features, epochs, evaluation)."""
    from datetime import datetime

    status = runfiles.read_json(Path(run_dir) / runfiles.STATUS_FILE, default={}) or {}
    seconds: Optional[float] = None
    if status.get("started") and status.get("finished"):
        seconds = (datetime.fromisoformat(status["finished"]) - datetime.fromisoformat(status["started"])).total_seconds()
    split_path = Path(run_dir) / runfiles.SPLIT_FILE
    training_images = sum(1 for row in runfiles.read_csv(split_path) if row.get("split") == "train") \
        if split_path.is_file() else None
    epochs = status.get("epoch")
    speed = None
    if seconds and training_images and epochs:
        speed = training_images * epochs / seconds
    return {"training seconds": seconds, "training images": training_images, "epochs": epochs,
            "images per second": speed}
