"""The settings schema: one declaration per setting drives validation, CLI flags and the pages' widgets."""

import argparse
import dataclasses
import pickle

import pytest

from engine.backbones import BACKBONES
from engine.config import (ALPHAS, ConfigError, RunConfig, Setting, add_arguments, get_setting,
                           overrides_from_arguments, settings)
from tests.conftest import make_dataset, open_folder_on_data_page, open_page

# The CLI's flags by dotted name: those it has always had (engine/cli.py's TRAIN_FLAGS), and --gpus.
CLI_FLAGS = {
    "name": "--name", "data.path": "--data", "data.validation_fraction": "--validation-fraction",
    "data.test_fraction": "--test-fraction", "data.split_seed": "--split-seed",
    "data.subset_fraction": "--subset-fraction", "data.cache": "--cache", "model.backbone": "--backbone",
    "model.alpha": "--alpha", "model.weights": "--weights", "model.image_size": "--image-size",
    "model.dropout": "--dropout", "model.hidden_units": "--hidden-units", "training.epochs": "--epochs",
    "training.batch_size": "--batch-size", "training.optimizer": "--optimizer",
    "training.learning_rate": "--learning-rate", "training.seed": "--seed", "training.class_weight": "--class-weight",
    "training.gpus": "--gpus",
    "fine_tuning.layers": "--fine-tune-layers", "fine_tuning.epochs": "--fine-tune-epochs",
    "fine_tuning.learning_rate": "--fine-tune-learning-rate",
}


def leaf_names(data: dict, prefix: str = "") -> list:
    names = []
    for key, value in data.items():
        names += leaf_names(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
    return names


def test_every_leaf_setting_is_declared_once_with_its_default_and_help():
    declared = settings()
    assert [setting.name for setting in declared] == leaf_names(RunConfig().to_dict())
    defaults = RunConfig()
    for setting in declared:
        assert isinstance(setting, Setting) and setting.help and setting.label, setting.name
        value = defaults
        for part in setting.name.split("."):
            value = getattr(value, part)
        assert value == setting.default, setting.name
    with pytest.raises(dataclasses.FrozenInstanceError):
        declared[0].help = "changed"


def test_declarations_carry_types_ranges_and_choices():
    epochs = get_setting("training.epochs")
    assert (epochs.type, epochs.low, epochs.high, epochs.flag) == (int, 1, 10000, "--epochs")
    learning_rate = get_setting("training.learning_rate")
    assert (learning_rate.type, learning_rate.low, learning_rate.low_inclusive) == (float, 0.0, False)
    assert get_setting("model.backbone").choices == tuple(BACKBONES)
    alpha = get_setting("model.alpha")
    # The widths come from the backbone registry, not from a list of their own.
    assert alpha.optional and alpha.choices == ALPHAS
    assert set(ALPHAS) == {value for spec in BACKBONES.values() for value in spec.alphas}
    assert get_setting("model.image_size").low == min(spec.min_image_size for spec in BACKBONES.values())
    with pytest.raises(ConfigError, match="Unknown setting `training.epoch`"):
        get_setting("training.epoch")


def test_one_validation_share_range_for_config_pages_and_cli():
    validation = get_setting("data.validation_fraction")
    assert (validation.low, validation.low_inclusive, validation.high) == (0.0, False, 0.5)
    RunConfig().replace(**{"data.validation_fraction": 0.5, "data.test_fraction": 0.3})
    with pytest.raises(ConfigError, match=r"`data.validation_fraction` must be > 0.0 and ≤ 0.5"):
        RunConfig().replace(**{"data.validation_fraction": 0.6})


@pytest.mark.parametrize(
    "values, field, value",
    [
        ({"training.epochs": 0}, "training.epochs", 0),
        ({"training.epochs": "ten"}, "training.epochs", "ten"),
        ({"model.backbone": "ResNet9000"}, "model.backbone", "ResNet9000"),
        ({"model.backbone": "MobileNet", "model.alpha": 0.35}, "model.alpha", 0.35),
        ({"model.backbone": "Xception", "model.image_size": 64}, "model.image_size", 64),
        ({"model.weights": ""}, "model.weights", ""),
        ({"data.split_seed": -1}, "data.split_seed", -1),
        ({"data.validation_fraction": 0.5, "data.test_fraction": 0.5}, "data.validation_fraction", 1.0),
        ({"callbacks.reduce_lr.factor": 1.0}, "callbacks.reduce_lr.factor", 1.0),
        ({"training.speed": 3}, "training.speed", 3),
    ],
)
def test_every_refusal_is_a_config_error_naming_the_field_and_value(values, field, value):
    with pytest.raises(ConfigError) as caught:
        RunConfig().replace(**values)
    assert (caught.value.field, caught.value.value) == (field, value)
    assert isinstance(caught.value, ValueError)
    assert str(caught.value).startswith("`") or str(caught.value).startswith("Unknown setting")


def test_a_config_error_keeps_its_field_across_processes():
    error = ConfigError("`training.epochs` must be ≥ 1; received `training.epochs=0`.", "training.epochs", 0)
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.field, copy.value) == (str(error), "training.epochs", 0)


def test_backbone_dependent_limits_name_the_backbone():
    with pytest.raises(ConfigError, match="one of 0.25, 0.5, 0.75, 1.0; received `model.alpha=0.35`"):
        RunConfig().replace(**{"model.backbone": "MobileNet", "model.alpha": 0.35})
    with pytest.raises(ConfigError, match="`model.image_size` must be ≥ 71"):
        RunConfig().replace(**{"model.backbone": "Xception", "model.image_size": 64})


def parser_with_settings() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train")
    add_arguments(parser, extra_help={"data.path": "Or sample:NAME."})
    return parser


def test_cli_flags_are_the_old_ones_with_help_and_choices_from_the_declarations():
    assert {setting.name: setting.flag for setting in settings() if setting.flag} == CLI_FLAGS
    parser = parser_with_settings()
    actions = {action.option_strings[0]: action for action in parser._actions if action.option_strings}
    assert actions["--backbone"].choices == list(BACKBONES)
    assert actions["--alpha"].choices == [*ALPHAS, None]
    assert actions["--optimizer"].choices == ["adam", "rmsprop", "sgd"]
    assert actions["--epochs"].help == "Passes over the training images. Allowed: ≥ 1 and ≤ 10000."
    assert actions["--data"].help.endswith("Or sample:NAME.")
    assert "±10%" in parser.format_help() or "--dropout" in parser.format_help()  # help formats without error


def test_flags_become_dotted_overrides_and_absent_flags_override_nothing():
    parser = parser_with_settings()
    arguments = parser.parse_args(["--epochs", "3", "--backbone", "MobileNet", "--alpha", "null",
                                   "--validation-fraction", "0.2", "--fine-tune-layers", "12"])
    overrides = overrides_from_arguments(arguments)
    assert overrides == {"training.epochs": 3, "model.backbone": "MobileNet", "model.alpha": None,
                         "data.validation_fraction": 0.2, "fine_tuning.layers": 12}
    config = RunConfig().replace(**overrides)
    assert (config.training.epochs, config.fine_tuning.layers, config.model.resolved_alpha) == (3, 12, 1.0)
    assert overrides_from_arguments(parser.parse_args([])) == {}


def test_flags_refuse_what_the_config_refuses(capsys):
    parser = parser_with_settings()
    with pytest.raises(SystemExit):
        parser.parse_args(["--optimizer", "adagrad"])
    assert "invalid choice: 'adagrad'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--epochs", "ten"])
    assert "`training.epochs` must be a whole number" in capsys.readouterr().err
    # Ranges are the config's to check, with its own sentence.
    with pytest.raises(ConfigError, match="`training.epochs` must be ≥ 1"):
        RunConfig().replace(**overrides_from_arguments(parser.parse_args(["--epochs", "0"])))


def test_the_split_chosen_on_the_data_page_is_the_one_the_train_form_holds(app_environment):
    app = open_page("app_pages/data.py")
    validation = app.slider(key="field.data.validation_fraction")
    assert (validation.min, validation.max) == (0.0, get_setting("data.validation_fraction").high)
    validation.set_value(0.3).run()
    app.slider(key="field.data.test_fraction").set_value(0.15).run()
    assert not app.exception, app.exception
    app.switch_page("app_pages/train.py")
    app.run()
    assert not app.exception, app.exception
    assert app.number_input(key="field.data.validation_fraction").value == 0.3
    assert app.number_input(key="field.data.test_fraction").value == 0.15
    assert app.number_input(key="field.data.validation_fraction").max == 0.5
    # And back: the Data page's sliders still show it.
    app.switch_page("app_pages/data.py")
    app.run()
    assert app.slider(key="field.data.validation_fraction").value == 0.3


def test_a_refused_split_on_the_data_page_is_said_in_the_configs_words(app_environment):
    app = open_page("app_pages/data.py")
    app.slider(key="field.data.validation_fraction").set_value(0.0).run()
    assert any("`data.validation_fraction` must be > 0.0" in error.value for error in app.error)


def test_imbalance_advice_is_given_once_on_the_data_page(app_environment):
    root = make_dataset(app_environment / "appdata" / "lopsided", per_class=3)
    make_dataset(app_environment / "appdata" / "more_cats", classes=("cats",), per_class=12)
    for path in (app_environment / "appdata" / "more_cats" / "cats").iterdir():
        path.rename(root / "cats" / f"more_{path.name}")
    app = open_folder_on_data_page(root)
    assert not app.exception, app.exception
    advice = [warning.value for warning in app.warning if "imbalanced" in warning.value]
    assert len(advice) == 1, advice


def test_the_train_form_places_a_config_error_by_its_field(app_environment):
    app = open_page("app_pages/train.py")
    app.selectbox(key="field.model.backbone").set_value("VGG16")
    app.selectbox(key="field.model.alpha").set_value(0.5)
    app.button[0].click().run()
    assert not app.exception, app.exception
    assert app.session_state["train_errors"].keys() == {"model.alpha"}
    # The alpha list is the registry's, with "default" for null.
    assert app.selectbox(key="field.model.alpha").options == ["default", *map(str, ALPHAS)]
