"""Grad-CAM: where in an image a trained run's model found the evidence for a class.

Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", ICCV 2017) weighs each channel of a convolutional feature
map by how much the class score rises when that channel rises (the gradient, averaged
over the map's positions), sums the weighted channels, keeps the positive part and
scales it to [0, 1]. The result is a coarse map (7×7 for a 224-pixel input to most
backbones) that is stretched back to the image's size.

Which layer. The feature map is the output of the run's nested backbone, the layer named
"base": every backbone in the registry is built without its ImageNet top, so its output is
its last convolutional block's map (VGG16's ends in a max pool, `block5_pool`, ConvNeXt's in
a LayerNormalization: both still spatial maps of the last block's convolutions). The map is computed by taking the
saved model apart by layer names: the augmentation is skipped (inference only), then
"preprocess", then "base" called with training=False, then the head ("pool", "dropout"
with training=False, "hidden", the output Dense). All of this runs inside one
`tf.GradientTape` that watches the feature map, so nested backbones work without
rebuilding the model as one flat graph.

Which score. The pre-activation logit of the explained class, computed here from the
output Dense layer's kernel and bias: for a softmax head, z_c (the paper's y^c, taken
before the softmax); for a two-class sigmoid head, which has a single unit z, class 1's
score is z and class 0's is −z. Differentiating the squashed probability instead would
give vanishing gradients on the confidently classified images one most wants to explain.
A temperature (calibration) divides the logit by a positive constant: it scales the
gradients, not the normalised map, so the maps are the same with or without it.

A map with no positive evidence (all gradients zero, or a 1×1 feature map that cannot
localise anything) comes back as all zeros, never NaN; `is_blank` tells it apart.

Why by hand. Keras 3 has no Grad-CAM API. The keras-io example ("Grad-CAM class activation
visualization") builds `keras.Model(model.inputs, [inner_layer.output, model.output])`, which
Keras 3 refuses for a layer inside a nested base ("Output ... is not connected to `inputs`").
tf-keras-vis (0.8.8, March 2025) does import Keras 3 on TensorFlow ≥ 2.16, but its README lists
under known issues that Gradcam "with cascading model" (a model nested in a model, as every
run's is) may fail, and it would add a dependency (SciPy, imageio, deprecated) for about
a few dozen lines of arithmetic.
"""

from __future__ import annotations

import functools
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

# Layer names the model builder (`engine.modeling`) gives the parts of every run's model.
PREPROCESS_LAYER_NAME = "preprocess"
BASE_LAYER_NAME = "base"
POOL_LAYER_NAME = "pool"
HEAD_LAYER_NAMES = ("dropout", "hidden")
OUTPUT_LAYER_NAMES = ("probability", "probabilities")
OVERLAY_SUFFIX = ".gradcam.png"
# A map whose values differ by less than this fraction of its peak is constant: nothing to localise.
# The tolerance is relative because feature maps have no fixed scale (a randomly initialised
# MobileNet's last block outputs values near 1e-16, which still make a proper map).
_CONSTANT_TOLERANCE = 1e-6
# Longest side of a written overlay: large photos would make multi-megabyte PNGs.
_OVERLAY_MAX_SIDE = 512

# A perceptual colour map, matplotlib's "inferno" sampled at eleven evenly spaced points and
# interpolated linearly between them. Written out here because matplotlib is not a dependency
# of this project and should not become one for a single table of colours.
_INFERNO_STOPS = np.array([
    (0, 0, 4), (22, 11, 57), (66, 10, 104), (106, 23, 110), (147, 38, 103), (188, 55, 84),
    (221, 81, 58), (243, 120, 25), (252, 165, 10), (246, 215, 70), (252, 255, 164),
], dtype=np.float32)


@dataclass(frozen=True)
class _ModelParts:
    """The pieces of a run's model that Grad-CAM calls one after another."""

    model: object
    preprocess: object
    base: object
    head: tuple
    output: object
    num_classes: int


def _model_parts(model) -> _ModelParts:
    """Finds the named layers of a run's model, or says which one is missing."""
    names = {layer.name: layer for layer in model.layers}
    missing = [name for name in (PREPROCESS_LAYER_NAME, BASE_LAYER_NAME, POOL_LAYER_NAME) if name not in names]
    outputs = [names[name] for name in OUTPUT_LAYER_NAMES if name in names]
    if missing or not outputs:
        missing += [] if outputs else [" or ".join(OUTPUT_LAYER_NAMES)]
        raise ValueError(
            f"Grad-CAM needs a model built by Transfer Studio (layers 'preprocess', 'base', 'pool' and "
            f"'probability' or 'probabilities'); model {model.name!r} has no layer named {', '.join(missing)}.")
    head = tuple([names[POOL_LAYER_NAME]] + [names[name] for name in HEAD_LAYER_NAMES if name in names])
    output = outputs[0]
    units = int(output.kernel.shape[-1])
    return _ModelParts(model, names[PREPROCESS_LAYER_NAME], names[BASE_LAYER_NAME], head, output,
                       2 if units == 1 else units)


def _class_scores(parts: _ModelParts, features, class_indices):
    """The pre-activation logit of each image's explained class (see the module docstring)."""
    import tensorflow as tf

    pooled = features
    for layer in parts.head:
        pooled = layer(pooled, training=False)
    kernel = tf.convert_to_tensor(parts.output.kernel)
    bias = tf.convert_to_tensor(parts.output.bias)
    logits = tf.matmul(tf.cast(pooled, kernel.dtype), kernel) + bias
    if parts.num_classes == 2:
        # One sigmoid unit: its logit z is the evidence for class 1, −z the evidence for class 0.
        sign = tf.where(tf.equal(class_indices, 1), 1.0, -1.0)
        return logits[:, 0] * tf.cast(sign, logits.dtype), logits
    return tf.gather(logits, class_indices, axis=1, batch_dims=1), logits


def _maps_for_batch(parts: _ModelParts, images: np.ndarray, class_indices: Optional[np.ndarray], compiled: bool):
    """Grad-CAM maps at the feature map's resolution, and the class each one explains."""
    import tensorflow as tf

    explain_predicted = class_indices is None
    if explain_predicted:
        class_indices = np.zeros(len(images), dtype=np.int32)
    images = tf.convert_to_tensor(np.asarray(images, dtype=np.float32))
    class_indices = tf.convert_to_tensor(np.asarray(class_indices, dtype=np.int32))
    if compiled:
        maps, chosen = _compiled_grad_cam(parts, explain_predicted)(images, class_indices)
    else:
        maps, chosen = _grad_cam(parts, images, class_indices, explain_predicted)
    return maps.numpy().astype(np.float32), chosen.numpy()


# One traced function per model and mode, kept as long as the model lives. Tracing costs
# seconds on a large backbone, so it pays only when one loaded model explains many batches.
_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _compiled_grad_cam(parts: _ModelParts, explain_predicted: bool):
    """`_grad_cam` traced once for this model and mode, batch size left open."""
    import tensorflow as tf

    per_model = _COMPILED.setdefault(parts.model, {})
    if explain_predicted not in per_model:
        height, width = parts.model.input_shape[1:3]
        signature = [tf.TensorSpec((None, height, width, 3), tf.float32), tf.TensorSpec((None,), tf.int32)]
        # The function reaches the model only through a weak reference: a strong one in the
        # cached value would keep its own key, the model, alive for ever.
        model_reference = weakref.ref(parts.model)

        def grad_cam(images, classes):
            return _grad_cam(_model_parts(model_reference()), images, classes, explain_predicted)

        per_model[explain_predicted] = tf.function(grad_cam, input_signature=signature)
    return per_model[explain_predicted]


def _grad_cam(parts: _ModelParts, images, class_indices, explain_predicted: bool):
    """The Grad-CAM computation on tensors, run eagerly or traced by `_compiled_grad_cam`."""
    import tensorflow as tf

    # Nothing before the feature map needs a gradient; only the map itself is watched.
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        features = parts.base(parts.preprocess(images), training=False)
        tape.watch(features)
        if explain_predicted:
            # The predicted class: the largest logit (softmax), or the sign of the single logit.
            _, logits = _class_scores(parts, features, class_indices)
            if parts.num_classes == 2:
                class_indices = tf.cast(logits[:, 0] > 0, tf.int32)
            else:
                class_indices = tf.argmax(logits, axis=1, output_type=tf.int32)
        scores, _ = _class_scores(parts, features, class_indices)
    gradients = tape.gradient(scores, features)
    if gradients is None:
        gradients = tf.zeros_like(features)
    # Each channel's weight: its gradient averaged over the map's positions (the paper's alpha_k^c).
    channel_weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    maps = tf.nn.relu(tf.reduce_sum(channel_weights * tf.cast(features, channel_weights.dtype), axis=-1))
    return maps, class_indices


def _normalise(maps: np.ndarray) -> np.ndarray:
    """Scales each map so its peak is 1; maps with no positive or no varying evidence become zeros."""
    result = np.zeros_like(maps, dtype=np.float32)
    for index, single in enumerate(maps):
        peak, low = float(single.max()), float(single.min())
        if not np.isfinite(peak) or peak <= np.finfo(np.float32).tiny or peak - low <= _CONSTANT_TOLERANCE * peak:
            continue
        result[index] = np.clip(single / peak, 0.0, 1.0)
    return result


def class_activation_maps(model, images: np.ndarray, class_indices: Optional[Sequence[int]] = None,
                          batch_size: int = 32, compiled: bool = False) -> np.ndarray:
    """Grad-CAM heatmaps of a run's model over a batch of images.

    Args:
        model: A run's model (from `engine.predict.load_run_model` or `engine.modeling.build_model`).
        images: Raw 0–255 RGB, shape (N, H, W, 3), at the model's input size (uint8 or float).
        class_indices: The class to explain for each image (N integers in output order);
            None explains each image's predicted class.
        batch_size: Images per pass, to bound memory on large backbones.
        compiled: Trace the computation with `tf.function`, once per model (seconds on a large
            backbone), and run the traced graph: worth it when one loaded model (a page's
            cached model) explains batch after batch; eager is faster for a single call.

    Returns:
        (N, H, W) float32 maps in [0, 1], each scaled so its peak is 1; an all-zero map
        means the model gave no localisable evidence (see `is_blank`).

    Raises:
        ValueError: the images have the wrong shape, a class index is out of range, or the
            model lacks the layers a Transfer Studio model has.
    """
    return maps_and_classes(model, images, class_indices, batch_size, compiled)[0]


def maps_and_classes(model, images: np.ndarray, class_indices: Optional[Sequence[int]] = None,
                     batch_size: int = 32, compiled: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`class_activation_maps`, and the class index each map explains (the predicted one by default).

    One pass gives both, so a caller explaining the predicted class needs no separate prediction.
    """
    import tensorflow as tf

    parts = _model_parts(model)
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"`images` must have shape (N, height, width, 3); received shape {images.shape}.")
    expected = tuple(model.input_shape[1:3])
    if None not in expected and tuple(images.shape[1:3]) != expected:
        raise ValueError(f"`images` must be {expected[0]}×{expected[1]} (the model's input size); "
                         f"received {images.shape[1]}×{images.shape[2]}.")
    if class_indices is not None:
        class_indices = np.asarray(class_indices, dtype=np.int64).reshape(-1)
        if len(class_indices) != len(images):
            raise ValueError(f"`class_indices` must give one class per image; received {len(class_indices)} "
                             f"for {len(images)} images.")
        if len(class_indices) and (class_indices.min() < 0 or class_indices.max() >= parts.num_classes):
            raise ValueError(f"`class_indices` must lie in 0…{parts.num_classes - 1}; "
                             f"received {class_indices.tolist()}.")
    height, width = images.shape[1:3]
    if len(images) == 0:
        return np.zeros((0, height, width), dtype=np.float32), np.zeros(0, dtype=np.int64)
    heatmaps, classes = [], []
    for start in range(0, len(images), max(1, batch_size)):
        chunk = images[start:start + batch_size]
        chunk_classes = None if class_indices is None else class_indices[start:start + batch_size]
        small, chosen = _maps_for_batch(parts, chunk, chunk_classes, compiled)
        # Normalise before and after the resize: the first decides which maps are blank on the
        # coarse map itself, the second restores a peak of exactly 1 after interpolation.
        small = _normalise(small)
        resized = tf.image.resize(small[..., None], (height, width), method="bilinear").numpy()[..., 0]
        heatmaps.append(_normalise(resized))
        classes.append(chosen.astype(np.int64))
    return np.concatenate(heatmaps).astype(np.float32), np.concatenate(classes)


def is_blank(heatmap: np.ndarray) -> bool:
    """True for a map with no evidence to show (all zeros, as `class_activation_maps` returns it)."""
    return not np.any(np.asarray(heatmap) > 0)


def colourise(heatmap: np.ndarray) -> np.ndarray:
    """Maps values in [0, 1] to uint8 RGB through the inferno-like table (dark = 0, pale yellow = 1)."""
    values = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0)
    # 256 levels are as many as an 8-bit image can show; a table lookup is many times faster
    # than interpolating every pixel.
    return _colour_table()[np.rint(values * 255.0).astype(np.uint8)]


@functools.lru_cache(maxsize=1)
def _colour_table() -> np.ndarray:
    """The colour map as 256 uint8 RGB rows, interpolated linearly between its stops."""
    positions = np.linspace(0.0, 1.0, len(_INFERNO_STOPS))
    levels = np.linspace(0.0, 1.0, 256)
    table = np.stack([np.interp(levels, positions, _INFERNO_STOPS[:, channel]) for channel in range(3)], axis=1)
    table = np.round(table).astype(np.uint8)
    table.setflags(write=False)
    return table


def overlay(image: np.ndarray, heatmap: np.ndarray, opacity: float = 0.45) -> np.ndarray:
    """The heatmap, coloured, blended over the image.

    Args:
        image: uint8 RGB, shape (H, W, 3), any size (the heatmap is stretched to it).
        heatmap: A map in [0, 1] of shape (h, w).
        opacity: 0 shows only the image, 1 only the colour map.

    Returns:
        uint8 RGB of the image's shape.

    Raises:
        ValueError: the opacity is outside [0, 1] or the arrays have the wrong shapes.
    """
    if not 0.0 <= float(opacity) <= 1.0:
        raise ValueError(f"`opacity` must lie between 0 and 1; received opacity={opacity}.")
    image = np.asarray(image)
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"`image` must be RGB of shape (height, width, 3); received shape {image.shape}.")
    if heatmap.ndim != 2:
        raise ValueError(f"`heatmap` must be 2-D (height, width); received shape {heatmap.shape}.")
    image = image.astype(np.uint8)
    if float(opacity) == 0.0:
        return image.copy()
    if heatmap.shape != image.shape[:2]:
        heatmap = _resize_map(heatmap, image.shape[0], image.shape[1])
    blended = (1.0 - opacity) * image.astype(np.float32) + opacity * colourise(heatmap).astype(np.float32)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def _resize_map(heatmap: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a float map with Pillow (no TensorFlow needed to draw an overlay)."""
    from PIL import Image

    resized = Image.fromarray(heatmap.astype(np.float32), mode="F").resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def central_share(heatmap: np.ndarray, fraction: float = 0.5) -> float:
    """The share of the map's mass inside the central box covering `fraction` of each side.

    A uniform map gives about fraction**2 (0.25 for the default), so a larger value means
    the map concentrates on the centre of the image. A blank map has no mass: NaN.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"`fraction` must lie in (0, 1]; received fraction={fraction}.")
    heatmap = np.asarray(heatmap, dtype=np.float64)
    if heatmap.ndim != 2:
        raise ValueError(f"`heatmap` must be 2-D (height, width); received shape {heatmap.shape}.")
    total = float(heatmap.sum())
    if total <= 0.0 or not np.isfinite(total):
        return float("nan")
    rows = _coverage(heatmap.shape[0], fraction)
    columns = _coverage(heatmap.shape[1], fraction)
    return float((rows[:, None] * columns[None, :] * heatmap).sum() / total)


def _coverage(side: int, fraction: float) -> np.ndarray:
    """How much of each pixel along one side lies inside the central interval of `fraction` of it.

    Pixels cut by the box's edge count in part, so a uniform map gives exactly fraction**2
    at any size (a 7×7 map has no whole-pixel box covering half of each side).
    """
    start = side * (1.0 - fraction) / 2.0
    end = side - start
    edges = np.arange(side, dtype=np.float64)
    return np.clip(np.minimum(edges + 1.0, end) - np.maximum(edges, start), 0.0, 1.0)


def explain_images(run_dir: str | os.PathLike, image_paths: list[str], out_dir: str | os.PathLike,
                   opacity: float = 0.45, loaded=None) -> list[dict]:
    """Writes a Grad-CAM overlay PNG for each image file, explaining the run's predicted class.

    Args:
        run_dir: The run whose model to explain.
        image_paths: Image files.
        out_dir: Folder for the overlays, created when missing; each is `<stem>.gradcam.png`
            (`<stem>-2.gradcam.png` and so on when stems repeat).
        opacity: Opacity of the colour map over the image (0–1).
        loaded: The result of `engine.predict.load_run_model(run_dir)`, when the caller keeps it loaded.

    Returns:
        One dictionary per image, in order: path, and either `overlay` (the written PNG),
        `class` (the explained class: the predicted one), `central_share` (see
        `central_share`; None for a blank map) and `blank` (see `is_blank`), or `error`
        naming why the file could not be used.
    """
    from PIL import Image

    from engine.images import load_usable_images
    from engine.predict import load_run_model

    if not 0.0 <= float(opacity) <= 1.0:
        raise ValueError(f"`opacity` must lie between 0 and 1; received opacity={opacity}.")
    model, class_names, image_size = loaded or load_run_model(run_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, arrays, positions = load_usable_images(image_paths, image_size)
    if not arrays:
        return results
    heatmaps, predicted = maps_and_classes(model, np.stack(arrays))
    used_names: set[str] = set()
    for position, heatmap, class_index in zip(positions, heatmaps, predicted):
        path = results[position]["path"]
        picture = _display_image(path)
        target = out_dir / _unique_name(Path(path).stem, used_names)
        # The fastest zlib level: several times quicker than the default, files about a third larger.
        Image.fromarray(overlay(picture, heatmap, opacity)).save(target, format="PNG", compress_level=1)
        share = central_share(heatmap)
        results[position].update({
            "overlay": str(target),
            "class": class_names[int(class_index)],
            "central_share": None if np.isnan(share) else share,
            "blank": is_blank(heatmap),
        })
    return results


def _display_image(path: str) -> np.ndarray:
    """The upright image, shrunk so its longer side is at most `_OVERLAY_MAX_SIDE` pixels."""
    from PIL import Image

    from engine.images import load_rgb

    picture = load_rgb(path)
    height, width = picture.shape[:2]
    scale = _OVERLAY_MAX_SIDE / max(height, width)
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        picture = np.asarray(Image.fromarray(picture).resize(size, Image.Resampling.BILINEAR), dtype=np.uint8)
    return picture


def _unique_name(stem: str, used_names: set[str]) -> str:
    """`<stem>.gradcam.png`, numbered when this call already wrote that name."""
    name, number = stem + OVERLAY_SUFFIX, 1
    while name in used_names:
        number += 1
        name = f"{stem}-{number}{OVERLAY_SUFFIX}"
    used_names.add(name)
    return name
