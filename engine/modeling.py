"""Building the transfer-learning model, as the keras-io transfer-learning guide writes it.

raw 0–255 RGB → augmentation (training only) → backbone's own preprocessing (Keras's
built-in layers, so `model.keras` loads with nothing but Keras) → frozen base called with training=False → GlobalAveragePooling2D → Dropout →
optional Dense+ReLU → Dense(1, sigmoid) for two classes, Dense(n, softmax) otherwise.
"""

from __future__ import annotations

import keras

from engine.backbones import build_base, get_backbone
from engine.config import RunConfig
from engine.layers import build_preprocessing

BASE_LAYER_NAME = "base"
PREPROCESS_LAYER_NAME = "preprocess"
POOL_LAYER_NAME = "pool"


def build_augmentation(config: RunConfig, seed: int):
    """The augmentation layers of the config, or None when augmentation is off."""
    augmentation = config.augmentation
    if not augmentation.enabled:
        return None
    layers = []
    if augmentation.flip != "none":
        layers.append(keras.layers.RandomFlip(augmentation.flip, seed=seed))
    if augmentation.rotation > 0:
        layers.append(keras.layers.RandomRotation(augmentation.rotation, seed=seed + 1))
    if augmentation.zoom > 0:
        layers.append(keras.layers.RandomZoom(augmentation.zoom, seed=seed + 2))
    if augmentation.contrast > 0:
        # RandomContrast works on the 0–255 scale (value_range), before preprocessing.
        layers.append(keras.layers.RandomContrast(augmentation.contrast, value_range=(0, 255), seed=seed + 3))
    return keras.Sequential(layers, name="augmentation")


def build_model(config: RunConfig, num_classes: int) -> keras.Model:
    """Builds the full model (base frozen) for `num_classes` classes.

    Raises:
        ValueError: fewer than two classes.
        engine.backbones.WeightsUnavailableError: ImageNet weights cannot be had.
    """
    if num_classes < 2:
        raise ValueError(f"`num_classes` must be ≥ 2; received num_classes={num_classes}.")
    model_config = config.model
    image_size = model_config.resolved_image_size
    spec = get_backbone(model_config.backbone)
    keras.utils.set_random_seed(config.training.seed)
    base = build_base(model_config.backbone, image_size, model_config.resolved_alpha, model_config.weights)
    base.trainable = False
    base.name = BASE_LAYER_NAME

    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    features = inputs
    augmentation = build_augmentation(config, config.training.seed)
    if augmentation is not None:
        features = augmentation(features)
    features = build_preprocessing(spec.preprocess, name=PREPROCESS_LAYER_NAME)(features)
    # training=False keeps BatchNorm in inference mode even when layers are unfrozen later.
    features = base(features, training=False)
    features = keras.layers.GlobalAveragePooling2D(name=POOL_LAYER_NAME)(features)
    outputs = _add_head(features, config, num_classes)
    return keras.Model(inputs, outputs, name=f"transfer_{model_config.backbone.lower()}")


def _add_head(features, config: RunConfig, num_classes: int):
    """The new head on pooled features: Dropout → [Dense + ReLU] → the classifier."""
    model_config = config.model
    if model_config.dropout > 0:
        features = keras.layers.Dropout(model_config.dropout, name="dropout")(features)
    if model_config.hidden_units > 0:
        features = keras.layers.Dense(model_config.hidden_units, activation="relu", name="hidden")(features)
    if num_classes == 2:
        return keras.layers.Dense(1, activation="sigmoid", name="probability")(features)
    return keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(features)


def build_head(config: RunConfig, num_classes: int, feature_size: int) -> keras.Model:
    """The head alone, on pooled features: the same layers (and names) as the full model's head.

    Phase 1 on cached features trains this small model; `copy_head_weights` then moves
    its weights into the full model.
    """
    if num_classes < 2:
        raise ValueError(f"`num_classes` must be ≥ 2; received num_classes={num_classes}.")
    keras.utils.set_random_seed(config.training.seed)
    inputs = keras.Input(shape=(feature_size,), name="features")
    return keras.Model(inputs, _add_head(inputs, config, num_classes), name="head")


def copy_head_weights(head: keras.Model, model: keras.Model) -> None:
    """Copies every weighted layer of `head` into the layer of the same name in the full model."""
    for layer in head.layers:
        if layer.weights:
            model.get_layer(layer.name).set_weights(layer.get_weights())


def make_optimizer(name: str, learning_rate: float):
    """Builds an optimizer by its config name."""
    optimizers = {
        "adam": keras.optimizers.Adam,
        "rmsprop": keras.optimizers.RMSprop,
        "sgd": lambda learning_rate: keras.optimizers.SGD(learning_rate=learning_rate, momentum=0.9),
    }
    return optimizers[name](learning_rate=learning_rate)


def compile_model(model: keras.Model, optimizer_name: str, learning_rate: float, num_classes: int,
                  steps_per_execution: int = 1) -> None:
    """Compiles with the loss that matches the output layer.

    Args:
        steps_per_execution: Batches per call into TensorFlow. A head on cached features
            takes about a millisecond a batch, so per-call overhead dominates unless many
            batches run per call; progress callbacks then see every Nth batch.
    """
    loss = "binary_crossentropy" if num_classes == 2 else "sparse_categorical_crossentropy"
    model.compile(optimizer=make_optimizer(optimizer_name, learning_rate), loss=loss, metrics=["accuracy"],
                  steps_per_execution=steps_per_execution)


def unfreeze_top_layers(model: keras.Model, layer_count: int) -> int:
    """Makes the last `layer_count` layers of the base trainable, BatchNorm kept frozen.

    Returns:
        How many layers became trainable (BatchNorm and weightless layers excluded).
    """
    base = model.get_layer(BASE_LAYER_NAME)
    base.trainable = True
    cut = max(0, len(base.layers) - layer_count)
    unfrozen = 0
    for index, layer in enumerate(base.layers):
        trainable = index >= cut and not isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = trainable
        if trainable and layer.weights:
            unfrozen += 1
    return unfrozen


def probabilities_per_class(raw_outputs, num_classes: int):
    """Turns the model's outputs into one probability column per class (binary gives [1-p, p])."""
    import numpy as np

    raw_outputs = np.asarray(raw_outputs, dtype=np.float64)
    if num_classes == 2:
        positive = raw_outputs.reshape(-1)
        return np.stack([1.0 - positive, positive], axis=1)
    return raw_outputs
