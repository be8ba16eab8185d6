"""The inference graph of a run's model: the same layers without the augmentation block.

Random augmentation layers are identities at inference, but exporting them would still carry
their seed-generator state and (for some converters) random ops into the artefact. The
model is a chain (input → [augmentation] → preprocess → base → pool → head), so it is rebuilt
by calling the same layer objects, with the same weights, on a new input, skipping augmentation.
"""

from __future__ import annotations

AUGMENTATION_LAYER_NAME = "augmentation"


def inference_model(model):
    """`model` without its augmentation layer, sharing its weights.

    Args:
        model: A run's functional Keras model (raw 0–255 RGB in, probabilities out).

    Returns:
        A functional model with the same input spec and outputs. When the model is not a
        plain chain of single-input layers it is returned unchanged (inference calls skip
        augmentation anyway).
    """
    import keras

    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if not any(layer.name == AUGMENTATION_LAYER_NAME for layer in layers) or not _is_chain(model, layers):
        return model
    inputs = keras.Input(shape=model.input_shape[1:], name=model.inputs[0].name.split(":")[0] or "image")
    features = inputs
    for layer in layers:
        if layer.name == AUGMENTATION_LAYER_NAME:
            continue
        # training=False for every layer: the graph is for inference only (BatchNorm, Dropout).
        features = layer(features, training=False) if _accepts_training(layer) else layer(features)
    return keras.Model(inputs, features, name=model.name)


def _is_chain(model, layers) -> bool:
    """Whether each layer takes exactly the previous layer's single output."""
    previous = model.inputs[0]
    for layer in layers:
        nodes = [node for node in layer._inbound_nodes if node.operation is layer]
        if len(nodes) != 1 or len(nodes[0].input_tensors) != 1:
            return False
        if nodes[0].input_tensors[0] is not previous:
            return False
        outputs = nodes[0].output_tensors
        if len(outputs) != 1:
            return False
        previous = outputs[0]
    return previous is model.outputs[0]


def _accepts_training(layer) -> bool:
    import inspect

    try:
        return "training" in inspect.signature(layer.call).parameters
    except (TypeError, ValueError):
        return False
