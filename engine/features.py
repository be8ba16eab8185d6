"""Cached backbone features: phase 1 runs the frozen base over every image once, not every epoch.

In phase 1 the base is frozen and called in inference mode, so its pooled output for an
image never changes. The recipes still run the whole base over every image in every
epoch; here each image goes through the base once, the pooled features are cached on
disk, and the head trains on them. The cache key covers everything the features depend
on: the decoded images (file fingerprint, order and size, via the image cache's key),
the backbone, its width, its starting weights, its preprocessing, and, for augmented
views, the augmentation settings, the number of views and the seed. A run that changes
only head settings (learning rate, epochs, dropout, optimizer…) finds its features ready.

With augmentation on, K randomly augmented views of every training image are computed
once; each epoch the head sees one view per image, drawn at random. Validation and test
images are never augmented.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from engine import caches, locations
from engine.runfiles import atomic_write_json, process_tag, read_json, remove_orphaned_temporaries

# 2: computed with batch norms folded into the convolutions (engine.folding).
FEATURE_CACHE_VERSION = 2
# Images per feature-extraction batch at 224 px. Measured on 2 cores (bench/README): MobileNet
# α=0.25 ran at 865 images/s with batches of 32, 790 with 128 and 738 with 256;
# EfficientNet-Lite0 at 159, 159 and 157. On a CPU, larger batches bought nothing here.
EXTRACTION_BATCH_AT_224 = 32
# Feature cache key → what its entry is about (dataset, backbone, image size), filled by
# `feature_cache_key` so the loader and saver, which get only the key, can describe the entry.
# Facts about a key never change, so sharing them across threads is safe.
_DESCRIPTIONS: dict[str, dict] = {}


def extraction_batch_size(image_size: int) -> int:
    """Images per feature-extraction batch, scaled with the image area to keep the work per batch even."""
    return int(max(8, min(256, EXTRACTION_BATCH_AT_224 * (224 / image_size) ** 2)))


def feature_cache_key(image_key: Optional[str], config, positions: list[int], views: int = 0) -> Optional[str]:
    """The cache key of one feature array, or None when it cannot be cached safely.

    Args:
        image_key: The image cache's key (files, order, size); None for an in-memory image cache.
        config: The run's RunConfig.
        positions: The rows of the image cache the features are computed for.
        views: 0 for plain features; K for K augmented views (the augmentation settings
            and the seed then join the key).
    """
    from engine.backbones import get_backbone, weights_identity

    if image_key is None:
        return None
    model = config.model
    weights = weights_identity(model.backbone, model.resolved_alpha, model.resolved_image_size, model.weights)
    if weights is None:
        return None
    if model.weights == "none":
        # Random starting weights depend on the seed the model is built with.
        weights += f"|seed {config.training.seed}"
    parts = {
        "version": FEATURE_CACHE_VERSION,
        "images": image_key,
        "backbone": model.backbone,
        "alpha": model.resolved_alpha,
        "image_size": model.resolved_image_size,
        "preprocess": get_backbone(model.backbone).preprocess,
        "weights": weights,
        "positions": hashlib.sha256(np.asarray(positions, dtype=np.int64).tobytes()).hexdigest(),
    }
    if views:
        augmentation = config.augmentation
        parts["augmentation"] = [augmentation.flip, augmentation.rotation, augmentation.zoom, augmentation.contrast]
        parts["views"] = views
        parts["seed"] = config.training.seed
    text = json.dumps(parts, sort_keys=True)
    key = hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]
    # What the entry is about, recorded when it is saved or read (engine.caches lists by it and keeps a
    # queued run's features): the dataset comes from the image cache entry the features are made from.
    _DESCRIPTIONS[key] = {"dataset": caches.entry_description("images", image_key).get("dataset"),
                          "backbone": model.backbone, "image_size": model.resolved_image_size}
    return key


def load_cached_features(key: Optional[str], cache_dir: Optional[str | os.PathLike] = None,
                         memory_map: bool = False) -> Optional[np.ndarray]:
    """The cached feature array under `key`, or None when there is none (or it is unreadable).

    Args:
        memory_map: Map the file read-only instead of reading it (large activation arrays).
    """
    if key is None:
        return None
    folder = locations.cache_folder("features", cache_dir)
    meta = read_json(folder / f"{key}.json")
    if not meta:
        return None
    try:
        features = np.load(folder / f"{key}.npy", mmap_mode="r" if memory_map else None)
    except (OSError, ValueError):
        return None  # A damaged or evicted cache file only costs a recomputation.
    if list(features.shape) != meta.get("shape"):
        return None
    caches.touch("features", key, cache_dir, **_DESCRIPTIONS.get(key, {}))
    return features


def save_cached_features(key: Optional[str], features: np.ndarray,
                         cache_dir: Optional[str | os.PathLike] = None) -> None:
    """Stores features under `key`; the array appears under its final name only once complete."""
    if key is None:
        return
    folder = locations.cache_folder("features", cache_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        remove_orphaned_temporaries(folder, f".{key}.")
        temporary = folder / f".{key}.{process_tag()}.npy"
        np.save(temporary, features)
        os.replace(temporary, folder / f"{key}.npy")
        # The metadata is written last: a reader trusts the array only once it exists.
        atomic_write_json(folder / f"{key}.json", {"shape": list(features.shape), "dtype": str(features.dtype)})
    except OSError:
        return  # A read-only or full cache only costs a recomputation next time.
    caches.touch("features", key, cache_dir, **_DESCRIPTIONS.get(key, {}))
    caches.after_write("features", key, cache_dir)


def build_feature_extractor(model, fold: bool = True):
    """The part of the full model that makes pooled features: raw image → preprocess → base → pool.

    Args:
        model: The full model (base + head).
        fold: Run a copy of the base with its batch norms folded into the convolutions
            (`engine.folding`): the same function to float rounding, 1.4–1.7× faster on a CPU.
            With False, the extractor shares the model's own layers (nothing copied).
    """
    import keras

    from engine.modeling import BASE_LAYER_NAME, POOL_LAYER_NAME, PREPROCESS_LAYER_NAME

    base = model.get_layer(BASE_LAYER_NAME)
    if fold:
        from engine.folding import fold_batch_norms

        base, _ = fold_batch_norms(base)
    image = keras.Input(shape=model.input_shape[1:], name="image")
    features = model.get_layer(PREPROCESS_LAYER_NAME)(image)
    features = base(features, training=False)
    features = model.get_layer(POOL_LAYER_NAME)(features)
    return keras.Model(image, features, name="feature_extractor")


@dataclass
class OutputTarget:
    """One array `compute_outputs` fills from one of the extractor's outputs.

    Attributes:
        output: Which of the extractor's outputs (0 for a single-output extractor).
        rows: Indices into the `positions` computed whose results are kept, in the order
            wanted; None keeps every position. (One pass over every image a run uses can
            then keep the activations of its training and validation images only.)
        dtype: The stored type.
    """

    output: int = 0
    rows: Optional[Sequence[int]] = None
    dtype: object = np.float32


def compute_features(
    extractor,
    images: np.ndarray,
    positions: list[int],
    augmentation=None,
    views: int = 0,
    progress: Optional[Callable[[int], None]] = None,
    dtype=np.float32,
) -> np.ndarray:
    """Runs the extractor over the images at `positions`, in large batches.

    Args:
        extractor: From `build_feature_extractor` (one output).
        images: (N, size, size, 3) uint8 image cache (may be memory-mapped).
        positions: Rows of `images` to compute, in the order wanted.
        augmentation: Keras augmentation layers applied (in training mode) before the
            extractor; used with `views`.
        views: 0 for plain features, shape (N, D); K for K augmented views, shape (K, N, D).
            (D is the extractor's output shape: one number for pooled features, (H, W, C) for
            activations at a fine-tuning cut.)
        progress: Called with the number of images just finished, after every batch.
        dtype: The stored type (activations are kept in float16).
    """
    return compute_outputs(extractor, images, positions, [OutputTarget(dtype=dtype)], augmentation, views,
                           progress)[0]


def compute_outputs(
    extractor,
    images: np.ndarray,
    positions: list[int],
    targets: Sequence[OutputTarget],
    augmentation=None,
    views: int = 0,
    progress: Optional[Callable[[int], None]] = None,
) -> list[np.ndarray]:
    """`compute_features` for an extractor with several outputs: one pass, an array per target.

    Returns:
        One array per target, in order: (len(rows), *output shape), or with `views`
        (K, len(rows), *output shape).
    """
    import tensorflow as tf

    batch_size = extraction_batch_size(images.shape[1])
    output_shapes = extractor.output_shape if len(extractor.outputs) > 1 else [extractor.output_shape]
    augment = augmentation is not None and views > 0
    positions = np.asarray(positions, dtype=np.int64)
    arrays, slots = [], []
    for target in targets:
        item_shape = tuple(int(size) for size in output_shapes[target.output][1:])
        kept = len(positions) if target.rows is None else len(target.rows)
        arrays.append(np.empty((max(views, 1), kept) + item_shape, dtype=target.dtype))
        if target.rows is None:
            slots.append(None)
        else:
            # slot[i]: where position i's result goes in this target's array, -1 when it is not kept.
            slot = np.full(len(positions), -1, dtype=np.int64)
            slot[np.asarray(target.rows, dtype=np.int64)] = np.arange(kept)
            slots.append(slot)

    # One traced function for every batch and view: a short last batch is padded to the full
    # size (and the padding's features dropped), since a new shape would cost a second trace.
    @tf.function
    def run(batch):
        batch = tf.cast(batch, tf.float32)
        if augment:
            batch = augmentation(batch, training=True)
        outputs = extractor(batch, training=False)
        return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]

    from engine.pipeline import RELEASE_EVERY_IMAGES, release_mapped_pages

    read = 0
    for view in range(max(views, 1)):
        for start in range(0, len(positions), batch_size):
            rows = positions[start:start + batch_size]
            batch = np.ascontiguousarray(images[rows])
            read += len(rows)
            if read >= RELEASE_EVERY_IMAGES:
                # The image cache is mapped, never loaded whole: pages already read leave this process.
                read = 0
                release_mapped_pages(images)
            if len(rows) < batch_size and len(positions) > batch_size:
                batch = np.concatenate([batch, np.zeros((batch_size - len(rows),) + batch.shape[1:], batch.dtype)])
            results = [output.numpy()[:len(rows)] for output in run(batch)]
            for target, array, slot in zip(targets, arrays, slots):
                if slot is None:
                    array[view, start:start + len(rows)] = results[target.output]
                else:
                    batch_slots = slot[start:start + len(rows)]
                    kept = batch_slots >= 0
                    array[view, batch_slots[kept]] = results[target.output][kept]
            if progress is not None:
                progress(len(rows))
    return arrays if views else [array[0] for array in arrays]


def make_feature_dataset(features: np.ndarray, labels: np.ndarray, batch_size: int, shuffle: bool = False,
                         seed: int = 42, binary: bool = False, item_rank: int = 1):
    """A tf.data pipeline over cached features.

    Args:
        features: (N, D) features, or (K, N, D) augmented views: each time an image is
            drawn, one of its K views is picked at random.
        labels: (N,) class indices.
        batch_size: Features per batch.
        shuffle: Reshuffle every epoch (training).
        seed: Seed of the shuffle and of the view choice.
        binary: Labels shaped (batch, 1) float32 for a one-unit sigmoid output.
        item_rank: The rank of one image's features: 1 for pooled features, 3 for activations
            (H, W, C); float16 activations stay float16 in memory and are widened per batch.
    """
    import tensorflow as tf

    views = features if features.ndim == item_rank + 2 else features[None]
    view_count, count = views.shape[:2]
    # Everything stays inside TensorFlow (no Python call per batch): measured 2.5× less time
    # per head epoch than gathering the batches in NumPy.
    views = tf.constant(views, dtype=tf.float16 if views.dtype == np.float16 else tf.float32)
    labels = tf.constant(np.asarray(labels), dtype=tf.int32)
    indices = tf.data.Dataset.range(count)
    if shuffle:
        indices = indices.shuffle(count, seed=seed, reshuffle_each_iteration=True)
    if view_count > 1:
        # One view per image each time it is drawn, a fresh draw every epoch.
        choices = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).map(
            lambda value: value % view_count)
    else:
        choices = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)).repeat()

    def load(batch_views, batch_indices):
        batch_features = tf.cast(tf.gather_nd(views, tf.stack([batch_views, batch_indices], axis=1)), tf.float32)
        batch_labels = tf.gather(labels, batch_indices)
        if binary:
            batch_labels = tf.cast(tf.expand_dims(batch_labels, -1), tf.float32)
        return batch_features, batch_labels

    pairs = tf.data.Dataset.zip(choices, indices)
    return pairs.batch(batch_size).map(load).prefetch(tf.data.AUTOTUNE)
