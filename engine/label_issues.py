"""Which labels look wrong: images whose features say they belong to another class.

Every usable image of a dataset folder goes once through the frozen backbone (the same
pooled features training caches, `engine.features`, so a folder a run already trained on
costs no backbone pass and a second call costs nothing). A logistic regression
(scikit-learn) is trained k times on the features of the training images, each time
without one fold (stratified, k = 5, fewer when a class has fewer than 5 images), so
every training image gets probabilities from a model that never saw its label: the
out-of-fold probabilities. `cleanlab.filter.find_label_issues` (cleanlab 2.9.0, pinned)
finds the images whose given label disagrees with them, ranked by self-confidence: the
out-of-fold probability of the given label, lowest (most suspect) first. That probability
is the issue's score (cleanlab's label quality score, method "self_confidence"): 0 means
the model is sure the label is wrong, 1 that it is right.

Which images: for a pre-split folder the train folder only (its validation and test
images are never relabelled by accident of a search); for a flat folder every image,
since the engine's split of it is drawn afresh from the folder's labels. The labels are
the folders' own: the user's decisions (`engine.label_decisions`) are shown beside each
issue, not folded in, so that a decision can be undone where it was made.

The report is cached next to the features, keyed by the features' key and the labels.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from engine import locations
from engine.runfiles import atomic_write_json, read_json


# Folds of the out-of-fold probabilities; fewer when the smallest class has fewer images.
FOLDS = 5
# The seed of the folds and of the logistic regression, so the ranking is the same every time.
SEED = 0
# Raised when the report's content changes, so older cached reports are not read.
REPORT_VERSION = 1
SCORE_METHOD = "self_confidence"
# The logistic regression's C (inverse regularisation) on standardised features. Measured on
# cats_vs_dogs/train with 60 of 2000 labels flipped (docs/label-issues.md): flipped images among
# the top 60 issues with C = 1, 0.1, 0.03, 0.01: EfficientNet-Lite0 48, 51, 53, 53; MobileNet
# α=0.25 32, 39, 45, 45. A strong prior keeps the out-of-fold probabilities from being overconfident
# on the 256-1280 features of 2000 images, which is what cleanlab's ranking needs.
REGULARISATION = 0.01
# Progress: called with (what is being done, done, total).
Progress = Callable[[str, int, int], None]


@dataclass
class FolderFeatures:
    """Pooled backbone features of every usable image of a dataset folder, with the folders' labels.

    Attributes:
        root: The resolved dataset folder.
        layout: "flat" or "split".
        paths, labels, splits: One entry per image; `splits` is None for a flat folder.
        classes: The class names, sorted.
        features: (N, D) float32, one row per image.
        key: The feature cache key (None when the features cannot be cached).
        backbone, alpha, image_size, weights: Where the features came from.
        seconds: How long getting the features took, and whether the backbone ran.
    """

    root: str
    layout: str
    paths: list
    labels: list
    splits: list
    classes: list
    features: np.ndarray
    key: Optional[str]
    backbone: str
    alpha: Optional[float]
    image_size: int
    weights: str
    seconds: dict = field(default_factory=dict)

    def label_indices(self) -> np.ndarray:
        """The labels as class indices."""
        index = {name: position for position, name in enumerate(self.classes)}
        return np.array([index[label] for label in self.labels], dtype=np.int64)

    def training_rows(self) -> np.ndarray:
        """The images the label search covers: the train folder of a pre-split folder, else every image."""
        if self.layout == "split":
            return np.array([row for row, split in enumerate(self.splits) if split == "train"], dtype=np.int64)
        return np.arange(len(self.paths), dtype=np.int64)

    def labels_digest(self) -> str:
        """Changes whenever any image's path, label or split changes."""
        text = json.dumps([self.paths, self.labels, self.splits])
        return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def feature_config(root: str | os.PathLike, backbone=None):
    """The RunConfig whose model section gives the features: the default run's backbone and weights.

    Args:
        root: The dataset folder (becomes `data.path`).
        backbone: None for `RunConfig()`'s backbone and weights; a registry name for that
            backbone with its defaults; or a RunConfig whose model section (and seed) is used.
    """
    from engine.config import RunConfig

    if backbone is None:
        config = RunConfig()
    elif isinstance(backbone, str):
        config = RunConfig().replace(**{"model.backbone": backbone})
    else:
        config = backbone
    # The whole folder, decoded into the disk cache, as a run over it would.
    return config.replace(**{"data.path": str(root), "data.cache": "disk"})


def folder_features(root: str | os.PathLike, backbone=None, progress: Optional[Progress] = None) -> FolderFeatures:
    """Pooled features of every usable image of `root`, through the image cache and the feature cache.

    The rows and key are those a run over the whole folder uses (`engine.train`), so the
    features of a folder a run already trained on (with no images left out) are found in
    the cache, and a second call costs no backbone pass. No augmentation.

    Args:
        root: The dataset folder.
        backbone: See `feature_config`.
        progress: Called with (what, done, total) while decoding and computing.

    Raises:
        DataError: the folder does not exist, or has fewer than two classes with images.
        WeightsUnavailableError: the backbone's ImageNet weights cannot be had.
    """
    from engine.data import DataError, scan_dataset
    from engine.features import feature_cache_key, load_cached_features, save_cached_features
    from engine.pipeline import scan_and_decode

    config = feature_config(root, backbone)
    model = config.model
    began = time.time()
    decoded_scan, cache = scan_and_decode(root, model.resolved_image_size, cache="disk",
                                          progress=(lambda done, total: progress("Decoding images", done, total))
                                          if progress else None)
    # The folders' own labels: decisions are shown beside the issues, not folded into the search.
    scan = scan_dataset(root, apply_decisions=False)
    if scan.candidates != decoded_scan.candidates:
        # The image cache's rows follow the first listing; another listing would pair images with wrong files.
        raise DataError(f"The files in {scan.root} changed while they were being read; try again.")
    decoded = time.time()
    row_of = {path: row for row, path in enumerate(scan.candidates)}
    usable = [item for item in scan.files if row_of[item.path] not in cache.failed]
    usable.sort(key=lambda item: row_of[item.path])
    classes = sorted({item.label for item in usable})
    if len(classes) < 2:
        raise DataError(f"{scan.root} has {len(classes)} class(es) with usable images; looking for wrong labels "
                        "needs at least two.")
    positions = [row_of[item.path] for item in usable]
    key = feature_cache_key(cache.key, config, positions)
    features = load_cached_features(key)
    computed = features is None
    if computed:
        features = _compute(config, cache.images, positions, len(classes), progress)
        save_cached_features(key, features)
    finished = time.time()
    return FolderFeatures(
        root=scan.root, layout=scan.layout, paths=[item.path for item in usable],
        labels=[item.label for item in usable], splits=[item.split for item in usable], classes=classes,
        features=np.asarray(features, dtype=np.float32), key=key, backbone=model.backbone,
        alpha=model.resolved_alpha, image_size=model.resolved_image_size, weights=model.weights,
        seconds={"decode": round(decoded - began, 2), "features": round(finished - decoded, 2),
                 "backbone_ran": computed})


def _compute(config, images: np.ndarray, positions: list, num_classes: int, progress: Optional[Progress]):
    """Runs the backbone once over the images, as `engine.train` does for cached features."""
    from engine.features import build_feature_extractor, compute_features
    from engine.modeling import build_model

    # The head is never used; the extractor is preprocess → base → pool, with no augmentation.
    extractor = build_feature_extractor(build_model(config, max(2, num_classes)))
    done = [0]

    def advance(count):
        done[0] += count
        if progress:
            progress(f"Computing {config.model.backbone} features", done[0], len(positions))

    return compute_features(extractor, images, positions, progress=advance)


def fold_count(labels: np.ndarray) -> int:
    """The number of stratified folds: FOLDS, or the size of the smallest class when it is smaller.

    Raises:
        ValueError: a class has a single image (it cannot be both trained on and held out).
    """
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    smallest = int(counts.min())
    if smallest < 2:
        raise ValueError("Every class needs at least 2 images to look for wrong labels (each image is judged by a "
                         "model trained without it); one class has only 1.")
    return min(FOLDS, smallest)


def _classifier():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # Standardised features, so one regularisation strength fits every backbone's feature scale.
    return make_pipeline(StandardScaler(), LogisticRegression(C=REGULARISATION, max_iter=2000, random_state=SEED))


def _probabilities(classifier, features: np.ndarray, num_classes: int) -> np.ndarray:
    """Predicted probabilities with one column per class, also for classes absent from the fit."""
    output = np.zeros((len(features), num_classes), dtype=np.float64)
    output[:, classifier.classes_] = classifier.predict_proba(features)
    return output


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, num_classes: int,
                              folds: Optional[int] = None) -> np.ndarray:
    """Each image's class probabilities from a logistic regression trained on the other folds.

    Args:
        features: (N, D) features.
        labels: (N,) class indices.
        num_classes: Columns of the result.
        folds: Stratified folds; default `fold_count(labels)`.

    Returns:
        (N, num_classes) probabilities; row i comes from a model that never saw image i.
    """
    from sklearn.model_selection import StratifiedKFold

    folds = folds or fold_count(labels)
    output = np.zeros((len(labels), num_classes), dtype=np.float64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=SEED)
    for fitted_rows, held_rows in splitter.split(features, labels):
        classifier = _classifier().fit(features[fitted_rows], labels[fitted_rows])
        output[held_rows] = _probabilities(classifier, features[held_rows], num_classes)
    return output


def held_out_probabilities(folder: FolderFeatures) -> tuple[np.ndarray, int]:
    """Probabilities for every image from a model that never saw its label (cached with the features).

    The searched images (`training_rows`) get out-of-fold probabilities; the validation and
    test images of a pre-split folder get those of a model fitted on all the training images.
    The label search and the data map share them, so the k-fold runs once per folder and labels.

    Returns:
        (N, classes) probabilities and the number of folds used.
    """
    cached = load_cached_result(folder, "held-out")
    if cached is not None:
        return np.asarray(cached["probabilities"], dtype=np.float64), int(cached["folds"])
    probabilities, folds = _fit_held_out(folder)
    save_cached_result(folder, "held-out", {"probabilities": probabilities.round(6).tolist(), "folds": folds})
    return probabilities, folds


def _fit_held_out(folder: FolderFeatures) -> tuple[np.ndarray, int]:
    labels = folder.label_indices()
    rows = folder.training_rows()
    folds = fold_count(labels[rows])
    output = np.zeros((len(labels), len(folder.classes)), dtype=np.float64)
    output[rows] = out_of_fold_probabilities(folder.features[rows], labels[rows], len(folder.classes), folds)
    others = np.setdiff1d(np.arange(len(labels)), rows)
    if len(others):
        classifier = _classifier().fit(folder.features[rows], labels[rows])
        output[others] = _probabilities(classifier, folder.features[others], len(folder.classes))
    return output, folds


def rank_label_issues(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's label issues, most suspect first, and every image's label quality score.

    Args:
        labels: (N,) given class indices.
        probabilities: (N, classes) out-of-fold probabilities.

    Returns:
        (indices of the issues ranked by self-confidence, (N,) scores: the probability of the
        given label, cleanlab's `get_label_quality_scores(method="self_confidence")`).
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    # n_jobs=1: cleanlab would otherwise start a process pool, which a dashboard server should not do.
    ranked = find_label_issues(labels, probabilities, return_indices_ranked_by=SCORE_METHOD, n_jobs=1)
    scores = get_label_quality_scores(labels, probabilities, method=SCORE_METHOD)
    return np.asarray(ranked, dtype=np.int64), np.asarray(scores, dtype=np.float64)


def _cache_path(folder: FolderFeatures, kind: str) -> Optional[Path]:
    """Where a result derived from these features and labels is cached (None when the features are not)."""
    if folder.key is None:
        return None
    return locations.cache_folder("features") / f"{folder.key}.{kind}-v{REPORT_VERSION}-{folder.labels_digest()}.json"


def load_cached_result(folder: FolderFeatures, kind: str) -> Optional[dict]:
    """A cached label-issue report or data map of these features and labels, or None."""
    path = _cache_path(folder, kind)
    return read_json(path) if path is not None else None


def save_cached_result(folder: FolderFeatures, kind: str, result: dict) -> None:
    """Caches a result next to its features; a read-only cache only costs recomputing it."""
    path = _cache_path(folder, kind)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, result)
    except OSError:
        pass


def find_label_issues_in_folder(root: str | os.PathLike, backbone=None, progress: Optional[Progress] = None) -> dict:
    """Ranks the images of a dataset folder whose label looks wrong (cached with the features).

    Args:
        root: The dataset folder.
        backbone: None for the default run's backbone and weights; a registry name; or a RunConfig.
        progress: Called with (what, done, total) while decoding and computing features.

    Returns:
        A JSON-ready report: `root`, `layout`, `scope` (which images were searched), `backbone`,
        `alpha`, `image_size`, `weights`, `classes`, `num_images` (searched), `folds`,
        `folds_note`, `score` (what the score means), `num_issues`, `issues_per_class`,
        `out_of_fold_accuracy`, `issues` (most suspect first: `rank`, `path`, `given`,
        `suggested`, `score`, `suggested_probability`), `timings` (seconds), `cached`.

    Raises:
        DataError: the folder is missing or has fewer than two classes.
        ValueError: a class has only one image to search.
    """
    folder = folder_features(root, backbone, progress)
    cached = load_cached_result(folder, "label-issues")
    if cached is not None:
        cached["cached"] = True
        cached["timings"] = {**cached.get("timings", {}), **folder.seconds}
        return cached
    report = label_issue_report(folder)
    save_cached_result(folder, "label-issues", report)
    return report


def label_issue_report(folder: FolderFeatures) -> dict:
    """The label-issue report of features already computed (see `find_label_issues_in_folder`)."""
    began = time.time()
    labels = folder.label_indices()
    rows = folder.training_rows()
    probabilities, folds = held_out_probabilities(folder)
    fitted = time.time()
    searched_labels, searched = labels[rows], probabilities[rows]
    ranked, scores = rank_label_issues(searched_labels, searched)
    ranked_at = time.time()
    suggested = searched.argmax(axis=1)
    issues = []
    for rank, position in enumerate(ranked, start=1):
        row = int(rows[position])
        issues.append({
            "rank": rank,
            "path": folder.paths[row],
            "given": folder.labels[row],
            "suggested": folder.classes[int(suggested[position])],
            "score": round(float(scores[position]), 6),
            "suggested_probability": round(float(searched[position].max()), 6),
        })
    per_class = {name: 0 for name in folder.classes}
    for issue in issues:
        per_class[issue["given"]] += 1
    smallest = int(np.bincount(searched_labels).min())
    return {
        "root": folder.root,
        "layout": folder.layout,
        "scope": ("the train folder (validation and test images are not searched)" if folder.layout == "split"
                  else "every image (a flat folder: the engine splits it afresh from these labels)"),
        "backbone": folder.backbone,
        "alpha": folder.alpha,
        "image_size": folder.image_size,
        "weights": folder.weights,
        "classes": folder.classes,
        "num_images": int(len(rows)),
        "folds": folds,
        "folds_note": (f"{folds} stratified folds" if folds == FOLDS else
                       f"{folds} stratified folds, not {FOLDS}: the smallest class has {smallest} images"),
        "method": ("out-of-fold probabilities of a logistic regression on the backbone's pooled features, "
                   f"ranked by cleanlab.filter.find_label_issues(return_indices_ranked_by={SCORE_METHOD!r})"),
        "score": ("label quality (cleanlab, self-confidence): the out-of-fold probability of the given label; "
                  "near 0 the label is most likely wrong, near 1 it looks right"),
        "num_issues": len(issues),
        "issues_per_class": per_class,
        "out_of_fold_accuracy": round(float((searched.argmax(axis=1) == searched_labels).mean()), 4),
        "issues": issues,
        "timings": {**folder.seconds, "k_fold": round(fitted - began, 2), "cleanlab": round(ranked_at - fitted, 2)},
        "cached": False,
    }


def format_label_issues(report: dict, limit: int = 50) -> str:
    """The label-issue report as text for a terminal: what was searched, then the ranked issues.

    Args:
        report: From `find_label_issues_in_folder`.
        limit: Issues listed at most (the count is always complete).
    """
    root = report["root"]

    def short(path: str) -> str:
        return os.path.relpath(path, root) if path.startswith(root + os.sep) else path

    alpha = f" α={report['alpha']:g}" if report.get("alpha") else ""
    lines = [
        f"Labels that look wrong: {root}",
        f"Searched: {report['num_images']} images, {report['scope']}",
        f"Features: {report['backbone']}{alpha} at {report['image_size']} px, weights {report['weights']}",
        f"Method: {report['method']}; {report['folds_note']}",
        f"Out-of-fold accuracy: {report['out_of_fold_accuracy']:.1%}",
        f"Score: {report['score']}",
    ]
    total = report["num_issues"]
    if not total:
        lines.append("\nIssues: none")
        return "\n".join(lines)
    per_class = ", ".join(f"{name}: {count}" for name, count in report["issues_per_class"].items())
    shown = f", the first {limit} listed" if total > limit else ""
    lines.append(f"\nIssues: {total} ({per_class}){shown}")
    width = max(len(short(issue["path"])) for issue in report["issues"][:limit])
    lines.append(f"  {'rank':>4}  {'file':<{width}}  {'given':<12} {'suggested':<12} score")
    for issue in report["issues"][:limit]:
        lines.append(f"  {issue['rank']:>4}  {short(issue['path']):<{width}}  {issue['given']:<12} "
                     f"{issue['suggested']:<12} {issue['score']:.3f}")
    return "\n".join(lines)
