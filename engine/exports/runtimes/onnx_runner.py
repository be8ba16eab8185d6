"""Runs an ONNX export with ONNX Runtime alone, on the CPU."""

import numpy as np
import onnxruntime

import runner_common


def load(path):
    """An inference session on the CPU execution provider."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def predict(session, images):
    """The model's first output on raw 0-255 pixels as float32."""
    input_name = session.get_inputs()[0].name
    return session.run(None, {input_name: images.astype(np.float32)})[0]


if __name__ == "__main__":
    runner_common.run(load, predict, "onnxruntime", onnxruntime.__version__)
