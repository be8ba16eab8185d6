"""Runs a TFLite export with the LiteRT interpreter alone (`ai_edge_litert`), built-in ops only."""

import importlib.metadata

import numpy as np
from ai_edge_litert.interpreter import Interpreter

import runner_common


def load(path):
    """An interpreter with its tensors allocated for one image."""
    interpreter = Interpreter(model_path=path, num_threads=2)
    interpreter.allocate_tensors()
    return interpreter


def predict(interpreter, images):
    """The model's output for a batch, resizing the input when the batch size changes.

    An integer input (the int8 export takes uint8) is quantised with the input's own scale
    and zero point, and an integer output is dequantised, so callers always see probabilities.
    """
    input_detail = interpreter.get_input_details()[0]
    if tuple(input_detail["shape"]) != images.shape:
        interpreter.resize_tensor_input(input_detail["index"], images.shape)
        interpreter.allocate_tensors()
        input_detail = interpreter.get_input_details()[0]
    values = images
    if np.issubdtype(input_detail["dtype"], np.integer):
        scale, zero_point = input_detail["quantization"]
        if scale:
            values = np.round(images.astype(np.float32) / scale + zero_point)
        info = np.iinfo(input_detail["dtype"])
        values = np.clip(values, info.min, info.max)
    interpreter.set_tensor(input_detail["index"], values.astype(input_detail["dtype"]))
    interpreter.invoke()
    output_detail = interpreter.get_output_details()[0]
    output = interpreter.get_tensor(output_detail["index"])
    if np.issubdtype(output_detail["dtype"], np.integer):
        scale, zero_point = output_detail["quantization"]
        output = (output.astype(np.float32) - zero_point) * scale
    return output


if __name__ == "__main__":
    runner_common.run(load, predict, "ai-edge-litert", importlib.metadata.version("ai-edge-litert"))
