"""Fine-tuning at the cost of the layers that learn: the base's activations at the cut, cached.

Phase 2 unfreezes the base's last N layers. Everything below them is frozen and runs in
inference mode (the base is called with training=False, batch norms included), so its output
for an image never changes during phase 2. Like phase 1's features, it is computed once per
image (and per augmented view), cached, and only the part above the cut trains on it.

The cut is found from the graph, not by counting layers: it must be one tensor that every
layer above it depends on, so that "the layers above" form a model with a single input. In
MobileNet any layer boundary is such a point; inside a residual block (ResNet, EfficientNet,
MobileNetV2) the skip connection crosses it, and the cut moves down to the block's input
(`find_cut`). The model that trains (`build_top_model`) calls the full model's own layer
objects, so its training changes the full model's weights directly; the saved model is the
whole model, raw pixels in.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Optional

import numpy as np

# Stored in float16 (half the disk and memory of float32): measured in docs/performance.md
# ("Fine-tuning on cached activations"), the same validation accuracy within the seeds' noise.
ACTIVATION_DTYPE = np.float16
ACTIVATION_CACHE_VERSION = 1
# At most this share of the cache budget: activations of a large dataset would otherwise evict
# every other cache entry (features, decoded images) for one run.
BUDGET_SHARE = 0.5


@dataclass
class Cut:
    """Where the base is split for phase 2.

    Attributes:
        index: The first layer of `base.layers` above the cut (the trainable part starts here or higher).
        requested_index: Where "the last N layers" would start; `index` ≤ it.
        tensor: The single tensor crossing the cut (a KerasTensor of the base's graph).
        producer: The name of the layer whose output the cut is (the base's input layer for index 1).
    """

    index: int
    requested_index: int
    tensor: object
    producer: str

    @property
    def moved(self) -> int:
        """How many layers the cut moved down from where the layer count put it."""
        return self.requested_index - self.index

    @property
    def shape(self) -> tuple:
        """One image's activation shape at the cut."""
        return tuple(int(size) for size in self.tensor.shape[1:])


def crossing_tensors(base, index: int) -> dict:
    """The tensors of the base's graph that base.layers[index:] (and the ops among them) read and the part below produces.

    Only the base's own graph counts: a layer also holds the nodes of every other model it was
    called in (a model built from part of the base adds nodes to the same layer objects).
    """
    graph_nodes = {id(node) for nodes in base._nodes_by_depth.values() for node in nodes}
    # The graph's operations in order: its layers and the plain ops between them (MobileNetV3's
    # `x + 3`, ConvNeXt's layer scale), which `base.layers` leaves out.
    operations = base._operations
    first_above = operations.index(base.layers[index]) if index < len(base.layers) else len(operations)
    above = {id(operation) for operation in operations[first_above:]}
    crossing = {}
    for operation in operations[first_above:]:
        for node in operation._inbound_nodes:  # Keras 3 keeps the call graph on each operation's nodes
            if id(node) not in graph_nodes:
                continue
            for tensor in node.input_tensors:
                if id(tensor._keras_history.operation) not in above:
                    crossing[id(tensor)] = tensor
    return crossing


def find_cut(base, layer_count: int) -> Cut:
    """The highest valid cut at or below the base's last `layer_count` layers.

    Args:
        base: The backbone, a functional Keras model whose `layers` are in graph order.
        layer_count: How many of its last layers fine-tuning unfreezes (≥ 1).

    Returns:
        The cut; when no single tensor crosses above the base's input, the cut is the input
        itself (index 1: every layer above it).
    """
    requested = max(1, len(base.layers) - int(layer_count))
    index = requested
    while index > 1 and len(crossing_tensors(base, index)) != 1:
        index -= 1
    crossing = crossing_tensors(base, index)
    if len(crossing) != 1:
        raise ValueError(f"The {base.name} graph has {len(crossing)} tensors entering its top layers at its input; "
                         f"expected one (a single-input backbone).")
    tensor = next(iter(crossing.values()))
    return Cut(index=index, requested_index=requested, tensor=tensor,
               producer=tensor._keras_history.operation.name)


def bottom_model(base, cut: Cut):
    """The frozen part below the cut: base input → activations at the cut (shares the base's layers)."""
    import keras

    return keras.Model(base.inputs, cut.tensor, name=f"{base.name}_below_cut")


def top_of_base(base, cut: Cut):
    """The part of the base above the cut: activations → the base's output (shares the base's layers)."""
    import keras

    return keras.Model(cut.tensor, base.output, name=f"{base.name}_above_cut")


def build_top_model(model, cut: Cut):
    """What phase 2 trains on cached activations: the base above the cut, then the full model's head.

    The layers are the full model's own objects, so training this changes the full model.
    The base part is called with training=False (batch norms in inference mode, as in the full
    model); the head's dropout trains as usual.
    """
    import keras

    from engine.modeling import BASE_LAYER_NAME

    base = model.get_layer(BASE_LAYER_NAME)
    activations = keras.Input(shape=cut.shape, name="activations")
    outputs = top_of_base(base, cut)(activations, training=False)
    for layer in head_layers(model):
        outputs = layer(outputs)
    return keras.Model(activations, outputs, name="above_cut")


def head_layers(model) -> list:
    """The full model's layers after the base (pooling and the head), in order."""
    from engine.modeling import BASE_LAYER_NAME

    names = [layer.name for layer in model.layers]
    return model.layers[names.index(BASE_LAYER_NAME) + 1:]


def build_activation_extractor(model, cut: Cut, fold: bool = True):
    """raw image → preprocess → the base below the cut, batch norms folded (`engine.folding`) when `fold`."""
    import keras

    from engine.modeling import BASE_LAYER_NAME, PREPROCESS_LAYER_NAME

    bottom = bottom_model(model.get_layer(BASE_LAYER_NAME), cut)
    if fold:
        from engine.folding import fold_batch_norms

        bottom, _ = fold_batch_norms(bottom)
    image = keras.Input(shape=model.input_shape[1:], name="image")
    activations = bottom(model.get_layer(PREPROCESS_LAYER_NAME)(image), training=False)
    return keras.Model(image, activations, name="activation_extractor")


def build_features_and_activations_extractor(model, cut: Cut):
    """raw image → preprocess → the base, batch norms folded → [pooled features, activations at the cut].

    One pass through the frozen base gives phase 1 its features and phase 2 its activations,
    which it would otherwise compute in a second pass (the activations are on the way).
    """
    import keras

    from engine.folding import fold_batch_norms
    from engine.modeling import BASE_LAYER_NAME, POOL_LAYER_NAME, PREPROCESS_LAYER_NAME

    base = model.get_layer(BASE_LAYER_NAME)
    both = keras.Model(base.inputs, [base.output, cut.tensor], name=f"{base.name}_and_cut")
    both, _ = fold_batch_norms(both)
    image = keras.Input(shape=model.input_shape[1:], name="image")
    base_output, activations = both(model.get_layer(PREPROCESS_LAYER_NAME)(image), training=False)
    features = model.get_layer(POOL_LAYER_NAME)(base_output)
    return keras.Model(image, [features, activations], name="features_and_activations_extractor")


def activation_cache_key(feature_key: Optional[str], cut: Cut) -> Optional[str]:
    """The cache key of activations at `cut`: the matching feature key (images, backbone, weights,
    preprocessing, rows, views and augmentation) plus the cut and the stored type."""
    if feature_key is None:
        return None
    parts = {"features": feature_key, "version": ACTIVATION_CACHE_VERSION, "cut": cut.producer,
             "shape": list(cut.shape), "dtype": np.dtype(ACTIVATION_DTYPE).name}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()[:24]


def activation_bytes(cut: Cut, images: int) -> int:
    """How many bytes the activations of `images` images (views counted as images) take."""
    return int(np.prod(cut.shape)) * np.dtype(ACTIVATION_DTYPE).itemsize * int(images)


def fits_the_budget(cut: Cut, images: int, budget: int) -> bool:
    """True when the activations take at most BUDGET_SHARE of the cache budget."""
    return activation_bytes(cut, images) <= BUDGET_SHARE * budget


def copy_top_weights(top_model, model) -> None:
    """Copies a phase 2 model's weights (the base above the cut, then the head) into the full model, by name."""
    import keras

    from engine.modeling import BASE_LAYER_NAME

    base = model.get_layer(BASE_LAYER_NAME)
    for layer in top_model.layers:
        if isinstance(layer, keras.Model):  # the base above the cut: its layers keep the base's names
            for inner in layer.layers:
                if inner.weights:
                    base.get_layer(inner.name).set_weights(inner.get_weights())
        elif layer.weights:
            model.get_layer(layer.name).set_weights(layer.get_weights())
