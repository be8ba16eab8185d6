"""A map of the data: every image's backbone features drawn as a point in two dimensions.

The pooled features of every usable image (`engine.label_issues.folder_features`: the
feature cache training uses) are reduced with PCA to at most 50 dimensions, then laid out
in 2-D with scikit-learn's t-SNE (perplexity 30, or less for a small folder; seeded, so
the same folder gives the same map). Images the backbone sees alike land close together:
clusters, outliers far from their class and classes that overlap show at a glance. Each
point carries its folder label and whether a model that never saw its label predicts
another class (a "mistake": out-of-fold for the searched images, see `engine.label_issues`).

UMAP was measured as an alternative (docs/label-issues.md): it installs cleanly and, once
loaded and compiled, was up to about twice as fast on 2000 images on busy cores (about even on
quiet ones), but it pulls numba and llvmlite (about 210 MB installed) and compiles on first use,
so t-SNE it is.
The map is cached next to the features, keyed by the features and the labels.
"""

from __future__ import annotations

import os
import time
from typing import Optional

import numpy as np

from engine.label_issues import (Progress, folder_features, held_out_probabilities, load_cached_result,
                                 save_cached_result)

PCA_DIMENSIONS = 50
PERPLEXITY = 30.0
SEED = 0


def project(features: np.ndarray, seed: int = SEED) -> np.ndarray:
    """PCA to at most 50 dimensions, then t-SNE to 2; (N, D) → (N, 2).

    t-SNE needs the perplexity below the number of points, so a small folder gets a
    smaller one (a third of the points).
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    count = len(features)
    if count < 3:
        raise ValueError(f"A map needs at least 3 images; received {count}.")
    dimensions = min(PCA_DIMENSIONS, count, features.shape[1])
    reduced = PCA(n_components=dimensions, random_state=seed).fit_transform(features)
    perplexity = min(PERPLEXITY, (count - 1) / 3)
    layout = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(reduced)
    return layout.astype(np.float32)


def data_map(root: str | os.PathLike, backbone=None, progress: Optional[Progress] = None) -> dict:
    """Every usable image of `root` as a point of a 2-D map of its backbone features (cached with them).

    Args:
        root: The dataset folder.
        backbone: None for the default run's backbone and weights; a registry name; or a RunConfig.
        progress: Called with (what, done, total) while decoding and computing features.

    Returns:
        A JSON-ready dict: `root`, `classes`, `backbone`, `method`, `points` (one per image:
        `x`, `y`, `path`, `label` (the folder's), `split`, `predicted`, `mistake` (the
        held-out prediction differs from the label)), `num_mistakes`, `timings`, `cached`.
        `pandas.DataFrame(result["points"])` is the table to plot.

    Raises:
        DataError: the folder is missing or has fewer than two classes.
        ValueError: a class has only one image to search.
    """
    folder = folder_features(root, backbone, progress)
    cached = load_cached_result(folder, "data-map")
    if cached is not None:
        cached["cached"] = True
        return cached
    began = time.time()
    probabilities, folds = held_out_probabilities(folder)
    predicted = probabilities.argmax(axis=1)
    fitted = time.time()
    layout = project(folder.features)
    projected = time.time()
    labels = folder.label_indices()
    points = [{
        "x": round(float(layout[row, 0]), 4),
        "y": round(float(layout[row, 1]), 4),
        "path": folder.paths[row],
        "label": folder.labels[row],
        "split": folder.splits[row] or "",
        "predicted": folder.classes[int(predicted[row])],
        "mistake": bool(predicted[row] != labels[row]),
    } for row in range(len(folder.paths))]
    result = {
        "root": folder.root,
        "classes": folder.classes,
        "backbone": folder.backbone,
        "image_size": folder.image_size,
        "method": (f"PCA to {min(PCA_DIMENSIONS, *folder.features.shape)} dimensions, then t-SNE "
                   f"(scikit-learn, perplexity {min(PERPLEXITY, (len(points) - 1) / 3):g}, seed {SEED}); "
                   f"mistakes: held-out logistic regression ({folds} folds) disagrees with the folder's label"),
        "points": points,
        "num_mistakes": sum(point["mistake"] for point in points),
        "timings": {**folder.seconds, "k_fold": round(fitted - began, 2), "projection": round(projected - fitted, 2)},
        "cached": False,
    }
    save_cached_result(folder, "data-map", result)
    return result
