"""The run config: defaults, validation messages, JSON/YAML round-trip and the shipped recipes."""

from pathlib import Path

import pytest

from engine.config import RunConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_valid_and_resolve_backbone_defaults():
    config = RunConfig()
    assert config.model.backbone == "EfficientNetLite0"
    assert config.model.resolved_image_size == 224
    assert config.model.resolved_alpha is None
    mobilenet = config.replace(**{"model.backbone": "MobileNetV2"})
    assert mobilenet.model.resolved_alpha == 1.0
    assert config.fine_tuning.enabled is False
    assert config.fine_tuning.learning_rate == 1e-5


@pytest.mark.parametrize(
    "dotted, value, expected_fragment",
    [
        ("training.epochs", 0, "`training.epochs` must be ≥ 1 and ≤ 10000; received `training.epochs=0`"),
        ("training.batch_size", -4, "`training.batch_size` must be ≥ 1"),
        ("training.optimizer", "adagrad", "one of 'adam', 'rmsprop', 'sgd'"),
        ("training.learning_rate", 0, "`training.learning_rate` must be > 0.0"),
        ("model.backbone", "ResNet9000", "`model.backbone` must be one of"),
        ("model.alpha", 0.3, "`model.alpha` must be null (None): EfficientNetLite0 has no width multiplier"),
        ("model.image_size", 8, "`model.image_size` must be ≥ 32"),
        ("model.dropout", 1.0, "`model.dropout` must be ≥ 0.0 and < 1.0"),
        ("data.validation_fraction", 0, "`data.validation_fraction` must be > 0.0"),
        ("data.subset_fraction", 0, "`data.subset_fraction` must be > 0.0"),
        ("data.cache", "gpu", "`data.cache` must be one of 'disk', 'memory'"),
        ("augmentation.flip", "sideways", "`augmentation.flip` must be one of"),
        ("callbacks.reduce_lr.factor", 1.5, "`callbacks.reduce_lr.factor` must be > 0.0 and < 1.0"),
        ("callbacks.early_stopping.monitor", "loss", "`callbacks.early_stopping.monitor` must be one of"),
        ("training.epochs", "ten", "`training.epochs` must be a whole number; received `training.epochs='ten'`"),
    ],
)
def test_invalid_values_name_the_field_the_value_and_what_is_allowed(dotted, value, expected_fragment):
    with pytest.raises(ValueError) as caught:
        RunConfig().replace(**{dotted: value})
    assert expected_fragment in str(caught.value)


def test_alpha_is_refused_for_a_backbone_without_one():
    with pytest.raises(ValueError, match="VGG16 has no width multiplier"):
        RunConfig.from_dict({"model": {"backbone": "VGG16", "alpha": 0.5}})


def test_fractions_must_leave_training_images():
    with pytest.raises(ValueError, match="validation_fraction \\+ data.test_fraction"):
        RunConfig.from_dict({"data": {"validation_fraction": 0.5, "test_fraction": 0.5}})


def test_unknown_setting_is_named():
    with pytest.raises(ValueError, match="Unknown setting `training.epoch`"):
        RunConfig.from_dict({"training": {"epoch": 3}})


def test_strings_from_the_command_line_are_converted():
    config = RunConfig().replace(**{"training.epochs": "7", "model.backbone": "MobileNet", "model.alpha": "0.5",
                                    "callbacks.checkpoint.enabled": "true", "model.image_size": "null"})
    assert config.training.epochs == 7
    assert config.model.alpha == 0.5
    assert config.callbacks.checkpoint.enabled is True
    assert config.model.image_size is None


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trip_through_files(tmp_path, suffix):
    config = RunConfig().replace(**{
        "name": "round trip", "data.path": "/data/x", "model.backbone": "MobileNet", "model.alpha": 0.25,
        "fine_tuning.layers": 12, "augmentation.flip": "horizontal", "callbacks.reduce_lr.enabled": True,
    })
    path = tmp_path / f"config{suffix}"
    config.save(path)
    assert RunConfig.load(path) == config


def test_unreadable_config_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        RunConfig.load(path)


@pytest.mark.parametrize("name", sorted(path.name for path in CONFIGS.glob("*.yaml")))
def test_shipped_recipe_configs_load(name):
    config = RunConfig.load(CONFIGS / name)
    assert config.name.startswith("recipe")


def test_recipe_settings_are_expressed():
    recipe1 = RunConfig.load(CONFIGS / "recipe1_mobilenetv2_cats_vs_dogs.yaml")
    assert (recipe1.model.backbone, recipe1.model.image_size, recipe1.training.optimizer,
            recipe1.training.learning_rate, recipe1.training.epochs) == ("MobileNetV2", 160, "rmsprop", 1e-4, 3)
    recipe2 = RunConfig.load(CONFIGS / "recipe2_vgg16_small_subset.yaml")
    assert (recipe2.model.backbone, recipe2.data.subset_fraction) == ("VGG16", 0.05)
    recipe3 = RunConfig.load(CONFIGS / "recipe3_mobilenetv2_finetune.yaml")
    assert recipe3.fine_tuning.layers == 50 and recipe3.fine_tuning.learning_rate == 1e-5
    assert recipe3.model.hidden_units == 128
    assert recipe3.callbacks.early_stopping.enabled and recipe3.callbacks.early_stopping.patience == 5
    assert recipe3.callbacks.reduce_lr.factor == 0.5 and recipe3.callbacks.reduce_lr.patience == 3
    assert recipe3.callbacks.checkpoint.enabled
