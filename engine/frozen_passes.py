"""The frozen base's passes over a run's images: phase 1's pooled features, phase 2's activations.

Both are computed once per image (and per augmented view), cached (`engine.features`,
`engine.activations`), and read back by any later run with the same images and base. When a run
will fine-tune on cached activations and neither is in the cache yet, one pass computes both:
the activations at the cut are on the way from the image to the pooled features, so the
frozen base runs once instead of twice (docs/performance.md, "Fine-tuning on cached
activations", measures what that saves).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

from engine.status import LaunchStatus, Stage

if TYPE_CHECKING:
    from engine.activations import Cut

# `training` below is engine.train.Training (its config, data, status and `say`); it is not
# imported, not even for type checking, so that engine.train alone imports this module.

logger = logging.getLogger("engine.train")


@dataclass
class FeatureJob:
    """One cached array: its image rows, its augmented views (0 = none), its cache key and contents."""

    positions: list
    views: int
    key: Optional[str] = None
    array: Optional[np.ndarray] = None

    @property
    def images(self) -> int:
        """How many images the array holds, views counted as images."""
        return len(self.positions) * max(1, self.views)


def cached_features(training, full_model: Callable, check_stop: Callable[[], None],
                    cut: Optional["Cut"] = None) -> tuple[dict, Optional[dict]]:
    """The frozen base's pooled features per split, from the cache or computed once now.

    Args:
        full_model: Returns the full model (built on first call).
        cut: Where phase 2 will cut the base, when it will train on cached activations: if
            neither the features nor those activations are cached, one pass computes both.

    Returns:
        ({split: (N, D) features} for the splits that have images, with augmentation "train"
        holding (K, N, D) augmented views; the activations as `cached_activations` returns
        them when this pass computed them, else None).
    """
    from engine.features import (build_feature_extractor, compute_features, feature_cache_key,
                                 load_cached_features, save_cached_features)

    config, data = training.config, training.data
    views, image_key = _views_and_image_key(training)
    # The un-augmented features of every image the run uses, by image-cache row: another
    # split, seed or head of the same folder finds them under the same key. With
    # augmentation, also K augmented views of the training images.
    used_rows = sorted({row for rows in data.positions.values() for row in rows})
    jobs = [FeatureJob(used_rows, 0)]
    if views:
        jobs.append(FeatureJob(data.positions["train"], views))
    for job in jobs:
        job.key = feature_cache_key(image_key, config, job.positions, job.views)
        job.array = load_cached_features(job.key)
    missing = [job for job in jobs if job.array is None]
    total = sum(job.images for job in missing)
    activations = None
    if total:
        model = full_model()
        augmentation = model.get_layer("augmentation") if views else None
        activation_jobs = _activation_jobs(training, cut) if cut is not None and len(missing) == len(jobs) else None
        if activation_jobs is not None and all(job.array is None for job in activation_jobs.values()):
            activations = _features_and_activations(training, model, cut, jobs, activation_jobs, augmentation,
                                                    check_stop)
        else:
            extractor = build_feature_extractor(model)
            training.say(Stage.COMPUTING_FEATURES,
                         f"Computing {config.model.backbone} features of {total} images once"
                         + (f" ({views} augmented views of each training image)." if views else "."))
            began = time.time()
            progress = counting_progress(training.status, check_stop, "Computing features", total)
            for job in missing:
                job.array = compute_features(extractor, data.images, job.positions, augmentation, job.views,
                                             progress)
                save_cached_features(job.key, job.array)
            seconds = time.time() - began
            logger.info("Features of %d images computed in %.1f s (%.0f images/s).", total, seconds,
                        total / max(seconds, 1e-9))
    else:
        training.say(Stage.COMPUTING_FEATURES, "Backbone features found in the cache; nothing to compute.")
    index_of_row = {row: index for index, row in enumerate(used_rows)}
    features = {split: jobs[0].array[[index_of_row[row] for row in rows]]
                for split, rows in data.positions.items() if rows}
    if views:
        features["train"] = jobs[1].array
    return features, activations


def _features_and_activations(training, model, cut: "Cut", feature_jobs: list, activation_jobs: dict,
                              augmentation, check_stop: Callable[[], None]) -> dict:
    """One pass over the images filling the feature jobs and the activation jobs; the activations per split.

    The first feature job covers every image the run uses, un-augmented: it gives the validation
    activations, and the training ones when there is no augmentation. With augmentation, the
    second feature job (the training images' K views) gives the training activations of the
    same views.
    """
    from engine.activations import ACTIVATION_DTYPE, build_features_and_activations_extractor
    from engine.features import OutputTarget, compute_outputs, save_cached_features

    config, data = training.config, training.data
    plain = feature_jobs[0]
    views = feature_jobs[1].views if len(feature_jobs) > 1 else 0
    total = sum(job.images for job in feature_jobs)
    index_of_row = {row: index for index, row in enumerate(plain.positions)}

    def kept(split):
        return OutputTarget(output=1, rows=[index_of_row[row] for row in data.positions[split]],
                            dtype=ACTIVATION_DTYPE)

    training.say(Stage.COMPUTING_FEATURES,
                 f"Computing {config.model.backbone} features of {total} images once"
                 + (f" ({views} augmented views of each training image)" if views else "")
                 + f", and on the way the frozen layers' output for phase 2 ({_where(cut)}).")
    extractor = build_features_and_activations_extractor(model, cut)
    began = time.time()
    progress = counting_progress(training.status, check_stop, "Computing features and activations", total)
    targets = [OutputTarget(output=0), kept("validation")] + ([] if views else [kept("train")])
    plain.array, activation_jobs["validation"].array, *train = compute_outputs(
        extractor, data.images, plain.positions, targets, progress=progress)
    if views:
        augmented = feature_jobs[1]
        augmented.array, activation_jobs["train"].array = compute_outputs(
            extractor, data.images, augmented.positions,
            [OutputTarget(output=0), OutputTarget(output=1, dtype=ACTIVATION_DTYPE)], augmentation, views, progress)
    else:
        activation_jobs["train"].array = train[0]
    for job in feature_jobs + list(activation_jobs.values()):
        save_cached_features(job.key, job.array)
    seconds = time.time() - began
    logger.info("Features and activations of %d images computed in %.1f s (%.0f images/s).", total, seconds,
                total / max(seconds, 1e-9))
    return {split: job.array for split, job in activation_jobs.items()}


def cached_activations(training, model, cut: "Cut", check_stop: Callable[[], None]) -> Optional[dict]:
    """{"train": (N, H, W, C) or (K, N, H, W, C) views, "validation": (N, H, W, C)} at the cut, float16.

    From the cache or computed once now; None when they would not fit the cache budget.
    """
    from engine.activations import ACTIVATION_DTYPE, build_activation_extractor
    from engine.features import compute_features, save_cached_features

    jobs = _activation_jobs(training, cut)
    if jobs is None:
        return None
    missing = [job for job in jobs.values() if job.array is None]
    total = sum(job.images for job in missing)
    if not total:
        training.say(Stage.COMPUTING_FEATURES, f"Activations at {_where(cut)} found in the cache.")
    else:
        views = jobs["train"].views
        training.say(Stage.COMPUTING_FEATURES,
                     f"Computing the frozen layers' output ({_where(cut)}) of {total} images once"
                     + (f" ({views} augmented views of each training image)." if views else "."))
        extractor = build_activation_extractor(model, cut)
        augmentation = model.get_layer("augmentation") if views else None
        began = time.time()
        progress = counting_progress(training.status, check_stop, "Computing activations", total)
        for job in missing:
            job.array = compute_features(extractor, training.data.images, job.positions, augmentation, job.views,
                                         progress, dtype=ACTIVATION_DTYPE)
            save_cached_features(job.key, job.array)
        logger.info("Activations of %d images computed in %.1f s.", total, time.time() - began)
    return {split: job.array for split, job in jobs.items()}


def _activation_jobs(training, cut: "Cut") -> Optional[dict]:
    """{"validation": job, "train": job} for the activations at `cut`, with what the cache holds
    loaded (memory-mapped); None when they would take more than their share of the cache budget."""
    from engine import caches
    from engine.activations import activation_cache_key, fits_the_budget
    from engine.features import feature_cache_key, load_cached_features

    config, data = training.config, training.data
    views, image_key = _views_and_image_key(training)
    jobs = {"validation": FeatureJob(data.positions["validation"], 0), "train": FeatureJob(data.positions["train"],
                                                                                           views)}
    if not fits_the_budget(cut, sum(job.images for job in jobs.values()), caches.budget_bytes()):
        return None
    for job in jobs.values():
        job.key = activation_cache_key(feature_cache_key(image_key, config, job.positions, job.views), cut)
        job.array = load_cached_features(job.key, memory_map=True)
    return jobs


def _views_and_image_key(training) -> tuple[int, Optional[str]]:
    """(the training images' augmented views, 0 without augmentation; the image cache's key, None
    for an in-memory image cache, whose features and activations are not cached either)."""
    config = training.config
    views = config.augmentation.views if config.augmentation.enabled else 0
    return views, training.data.image_key if config.data.cache == "disk" else None


def _where(cut: "Cut") -> str:
    """"the output of conv_pw_10_bn 14×14×128"."""
    return f"the output of {cut.producer} {'×'.join(map(str, cut.shape))}"


def counting_progress(status: LaunchStatus, check_stop: Callable[[], None], what: str, total: int):
    """A `compute_features` progress callback: checks for a stop, then writes "WHAT: done/total images (rate/s)"
    with the rate and the time left into the status."""
    done, began = [0], time.time()

    def progress(count):
        check_stop()
        done[0] += count
        rate = done[0] / max(time.time() - began, 1e-9)
        status.update(message=f"{what}: {done[0]}/{total} images ({rate:.0f}/s).", images_per_second=round(rate, 1),
                      eta_seconds=round((total - done[0]) / max(rate, 1e-9), 1))

    return progress
