"""Runs a SavedModel export with TensorFlow alone (its `serving_default` signature)."""

import numpy as np
import tensorflow as tf

import runner_common


def load(path):
    """The SavedModel's serving signature."""
    return tf.saved_model.load(path).signatures["serving_default"]


def predict(signature, images):
    """The signature's one output on raw 0-255 pixels as float32."""
    input_name = list(signature.structured_input_signature[1])[0]
    outputs = signature(**{input_name: tf.constant(images.astype(np.float32))})
    return next(iter(outputs.values())).numpy()


if __name__ == "__main__":
    runner_common.run(load, predict, "tensorflow", tf.__version__)
