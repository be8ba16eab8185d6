"""Keras layers of our own, registered so saved models load with `safe_mode=True`.

Preprocessing lives inside the model (a `Preprocess` layer), so `model.keras`
takes raw 0–255 RGB and nothing outside re-implements normalisation. A Lambda
layer would do the same but cannot be loaded in safe mode.
"""

from __future__ import annotations

import keras
from keras import ops

_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package="transfer_studio")
class Preprocess(keras.layers.Layer):
    """Maps raw 0–255 RGB to the input a backbone's ImageNet weights expect.

    Modes follow `keras.applications.imagenet_utils.preprocess_input`:
    "tf" scales to [-1, 1]; "lite" is EfficientNet-Lite's (x - 127) / 128; "caffe" converts RGB to BGR and subtracts the ImageNet
    mean; "torch" scales to [0, 1] and standardises per channel; "none" passes the
    image through for bases that normalise inside themselves (EfficientNet, ConvNeXt,
    MobileNetV3).
    """

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("tf", "caffe", "torch", "lite", "none"):
            raise ValueError(f"`mode` must be one of 'tf', 'caffe', 'torch', 'lite', 'none'; received mode={mode!r}.")
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
