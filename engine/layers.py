"""A backbone's input preprocessing as a layer inside the model.

Preprocessing lives inside the model, so `model.keras` takes raw 0–255 RGB and
nothing outside re-implements normalisation. New models get it from
`build_preprocessing`: Keras's own layers only, so `keras.models.load_model` reads
`model.keras` in a Python that has never imported `engine` (safe mode on). A Lambda
layer would do the same but cannot be loaded in safe mode.

`Preprocess`, our one custom layer, is what models saved before that change contain.
It stays here, registered, so those older `model.keras` files still load wherever
this module is imported first (`engine.predict.load_run_model` does).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

_MODES = ("tf", "caffe", "torch", "lite", "none")
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


def build_preprocessing(mode: str, name: str = "preprocess") -> keras.Sequential:
    """Maps raw 0–255 RGB to what a backbone's ImageNet weights expect, with built-in Keras layers only.

    The same numbers as `Preprocess(mode)` to float rounding (`tests/test_portable_model.py`):
    "tf" is Rescaling(1/127.5, offset=-1); "lite" is Rescaling(1/128, offset=-127/128);
    "torch" is one Rescaling with per-channel scale 1/(255·std) and offset −mean/std;
    "caffe" is a cast then one fixed linear map over the channel axis (a Dense(3) whose
    kernel swaps R and B and whose bias is minus the BGR mean); "none" is Rescaling(1.0).
    Every mode starts with a Rescaling, which casts uint8 input to float32.

    Args:
        mode: One of "tf", "caffe", "torch", "lite", "none" (`BackboneSpec.preprocess`).
        name: The Sequential's name; other modules find it by `model.get_layer("preprocess")`.

    Returns:
        A built, frozen `keras.Sequential` for (batch, height, width, 3) images of any size.

    Raises:
        ValueError: an unknown mode.
    """
    if mode not in _MODES:
        raise ValueError(f"`mode` must be one of {', '.join(map(repr, _MODES))}; received mode={mode!r}.")
    if mode == "tf":
        layers = [keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale")]
    elif mode == "lite":
        # EfficientNet-Lite's own normalisation, (x - 127) / 128; both constants are exact in float32.
        layers = [keras.layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name="scale")]
    elif mode == "torch":
        # (x / 255 − mean) / std as one per-channel Rescaling. Not a Normalization layer: tf2onnx
        # turns its mean and variance into extra ONNX graph inputs (checked: the ONNX export
        # then asks for `…/normalization/Sub/y:0`), so DenseNet121 would not export to ONNX.
        layers = [keras.layers.Rescaling([1.0 / (255.0 * std) for std in _TORCH_STD],
                                         offset=[-mean / std for mean, std in zip(_TORCH_MEAN, _TORCH_STD)],
                                         name="scale")]
    elif mode == "caffe":
        layers = [keras.layers.Rescaling(1.0, name="to_float"),
                  keras.layers.Dense(3, name="rgb_to_bgr_minus_mean")]
    else:
        layers = [keras.layers.Rescaling(1.0, name="to_float")]
    preprocessing = keras.Sequential(layers, name=name)
    preprocessing.build((None, None, None, 3))
    if mode == "caffe":
        # Output channel j is input channel 2 - j (RGB → BGR), then the BGR mean is subtracted.
        flip = np.eye(3, dtype=np.float32)[::-1]
        preprocessing.get_layer("rgb_to_bgr_minus_mean").set_weights(
            [flip, -np.asarray(_CAFFE_MEAN_BGR, dtype=np.float32)])
    # Frozen for good: fine-tuning unfreezes layers of the base only, never these constants.
    preprocessing.trainable = False
    return preprocessing


@keras.saving.register_keras_serializable(package="transfer_studio")
class Preprocess(keras.layers.Layer):
    """Maps raw 0–255 RGB to the input a backbone's ImageNet weights expect (models saved before
    `build_preprocessing`; new models do not use it).

    Modes follow `keras.applications.imagenet_utils.preprocess_input`:
    "tf" scales to [-1, 1]; "lite" is EfficientNet-Lite's (x - 127) / 128; "caffe" converts RGB to BGR and subtracts the ImageNet
    mean; "torch" scales to [0, 1] and standardises per channel; "none" passes the
    image through for bases that normalise inside themselves (EfficientNet, ConvNeXt,
    MobileNetV3).
    """

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in _MODES:
            raise ValueError(f"`mode` must be one of {', '.join(map(repr, _MODES))}; received mode={mode!r}.")
        self.mode = mode

    def call(self, inputs):
        images = ops.cast(inputs, "float32")
        if self.mode == "tf":
            return images / 127.5 - 1.0
        if self.mode == "lite":
            # EfficientNet-Lite's own normalisation: mean 127, standard deviation 128.
            return (images - 127.0) / 128.0
        if self.mode == "caffe":
            bgr = ops.flip(images, axis=-1)
            return bgr - ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype="float32")
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_TORCH_MEAN, dtype="float32")
            std = ops.convert_to_tensor(_TORCH_STD, dtype="float32")
            return (images / 255.0 - mean) / std
        return images

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config["mode"] = self.mode
        return config
