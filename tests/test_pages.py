"""Every dashboard page under Streamlit's AppTest: smoke tests and interactions, over real run folders."""

import shutil
import time
from pathlib import Path

import pytest

from engine import jobs, runfiles
from engine.config import RunConfig
from engine.runs import create_run
from engine.status import State
from engine.train import run_training
from tests.conftest import make_dataset, open_folder_on_data_page, open_page

TITLES = {"app_pages/home.py": "Transfer Studio", "app_pages/data.py": "Data", "app_pages/train.py": "Train",
          "app_pages/monitor.py": "Monitor", "app_pages/evaluate.py": "Evaluate", "app_pages/compare.py": "Compare",
          "app_pages/sweeps.py": "Sweeps",
          "app_pages/predict.py": "Predict",
          "app_pages/demo.py": "Demo", "app_pages/export.py": "Export"}
PAGES = list(TITLES)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One small run trained for real (random weights), shared by the page tests."""
    base = tmp_path_factory.mktemp("finished")
    data = make_dataset(base / "data" / "colours", classes=("birds", "cats", "dogs"), per_class=10)
    config = RunConfig().replace(**{"data.path": str(data), "model.backbone": "MobileNet", "model.alpha": 0.25,
                                    "model.weights": "none", "model.image_size": 32, "training.epochs": 2,
                                    "training.batch_size": 8, "data.cache": "memory"})
    run_dir = create_run(config, base / "runs")
    assert run_training(run_dir) is State.FINISHED
    return run_dir


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_with_no_runs(page, app_environment):
    app = open_page(page)
    assert not app.exception, app.exception
    assert app.title[0].value == TITLES[page]


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_with_a_finished_run(page, app_environment, finished_run, monkeypatch):
    monkeypatch.setenv("TRANSFER_STUDIO_RUNS", str(finished_run.parent))
    app = open_page(page)
    assert not app.exception, app.exception
    assert not app.error, [error.value for error in app.error]


def test_data_page_opens_on_the_built_in_sample(app_environment):
    app = open_page("app_pages/data.py")
    assert not app.exception
    metrics = {metric.label: metric.value for metric in app.metric}
    assert metrics["Classes"] == "10" and metrics["Usable images"] == "1797" and metrics["Left out"] == "0"
    assert app.session_state["dataset_path"].endswith("samples/digits")


def test_data_page_refuses_a_folder_outside_the_roots(app_environment, tmp_path):
    outside = make_dataset(tmp_path / "elsewhere", per_class=3)
    app = open_page("app_pages/data.py")
    app.radio(key="data_source").set_value("Folder on the server").run()
    app.text_input(key="typed_path").set_value(str(outside)).run()
    app.button[0].click().run()
    assert any("outside the data roots" in error.value for error in app.error)
    assert app.session_state["dataset_path"].endswith("samples/digits")  # unchanged: the default sample


def test_data_page_reports_bad_files_and_imbalance(app_environment):
    root = make_dataset(app_environment / "appdata" / "messy", per_class=4)
    for number in range(8):
        shutil.copy(next((root / "cats").glob("*.png")), root / "cats" / f"extra_{number}.png")
    (root / "dogs" / "broken.jpg").write_bytes(b"")
    app = open_folder_on_data_page(root)
    assert not app.exception
    assert {metric.label: metric.value for metric in app.metric}["Left out"] == "1"
    assert any("imbalanced" in warning.value for warning in app.warning)
    tables = [table.value for table in app.dataframe if "reason" in table.value.columns]
    assert "zero bytes" in tables[0]["reason"].iloc[0]


def test_train_form_shows_a_bad_value_next_to_its_field(app_environment):
    data = make_dataset(app_environment / "appdata" / "tiny", per_class=6)
    app = open_page("app_pages/train.py")
    app.text_input(key="field.data.path").set_value(str(data))
    app.number_input(key="field.training.epochs").set_value(0)
    app.button[0].click().run()  # the form's submit button
    assert not app.exception
    messages = [error.value for error in app.error]
    assert any("`training.epochs` must be ≥ 1" in message for message in messages), messages
    runs_dir = app_environment / "runs"
    assert not runs_dir.exists() or not [entry for entry in runs_dir.iterdir() if entry.is_dir()]


def test_train_form_starts_a_real_run_through_the_queue(app_environment):
    data = make_dataset(app_environment / "appdata" / "tiny", per_class=6)
    app = open_page("app_pages/train.py")
    app.text_input(key="field.data.path").set_value(str(data))
    app.selectbox(key="field.model.backbone").set_value("MobileNet")
    app.selectbox(key="field.model.alpha").set_value(0.25)
    app.number_input(key="field.model.image_size").set_value(32)
    app.radio(key="field.model.weights").set_value("none")
    app.number_input(key="field.training.epochs").set_value(2)
    assert app.checkbox(key="field.training.cached_features").value is True  # the fast path by default
    app.checkbox(key="field.training.cached_features").uncheck()
    app.number_input(key="field.augmentation.views").set_value(3)
    app.button[0].click().run()
    assert not app.exception, app.exception
    runs = [entry for entry in (app_environment / "runs").iterdir() if entry.is_dir()]
    assert len(runs) == 1
    config = RunConfig.load(runs[0] / "config.json")
    assert (config.model.backbone, config.model.alpha, config.model.image_size) == ("MobileNet", 0.25, 32)
    assert config.training.cached_features is False and config.augmentation.views == 3
    final = jobs.wait_for(runs[0].name, timeout=180, runs_dir=app_environment / "runs")
    assert final.state is State.FINISHED, final
    assert "every image through the base every epoch" in (runs[0] / "worker.log").read_text()


def test_monitor_shows_a_finished_run_and_disables_stop(app_environment, finished_run, monkeypatch):
    monkeypatch.setenv("TRANSFER_STUDIO_RUNS", str(finished_run.parent))
    app = open_page("app_pages/monitor.py")
    metrics = {metric.label: metric.value for metric in app.metric}
    assert metrics["Epoch"] == "2 / 2"
    # A finished run can neither be stopped nor resumed.
    assert app.button(key="stop").disabled and app.button(key="resume").disabled
    assert "FINISHED" in app.success[0].value


def test_evaluate_shows_the_images_of_a_chosen_cell(app_environment, finished_run, monkeypatch):
    monkeypatch.setenv("TRANSFER_STUDIO_RUNS", str(finished_run.parent))
    app = open_page("app_pages/evaluate.py")
    predictions = runfiles.read_csv(finished_run / "predictions.csv")
    row = next(row for row in predictions if row["split"] == "validation")
    app.selectbox(key="cell_true").set_value(row["true"]).run()
    app.selectbox(key="cell_predicted").set_value(row["predicted"]).run()
    assert not app.exception
    assert any(f"True {row['true']}, answered {row['predicted']}" in markdown.value for markdown in app.markdown)
    table = next(table.value for table in app.dataframe if "precision" in table.value.columns)
    assert list(table["class"]) == ["birds", "cats", "dogs"]


def test_home_lists_a_running_run_and_reattaches_from_a_new_session(app_environment, monkeypatch):
    data = make_dataset(app_environment / "appdata" / "tiny", per_class=20)
    config = RunConfig().replace(**{"data.path": str(data), "model.backbone": "MobileNet", "model.alpha": 0.25,
                                    "model.weights": "none", "model.image_size": 32, "training.epochs": 300,
                                    "training.batch_size": 2})
    run_id = jobs.start(config, app_environment / "runs")
    deadline = time.time() + 120
    while time.time() < deadline and not runfiles.read_jsonl(app_environment / "runs" / run_id / "metrics.jsonl"):
        time.sleep(0.5)
    home = open_page("app_pages/home.py")
    assert list(home.dataframe[0].value["State"]) == ["running"]
    monitor = open_page("app_pages/monitor.py")  # a new session: nothing remembered but the run folder
    assert "RUNNING" in monitor.info[0].value
    monitor.button(key="stop").click().run()
    assert jobs.wait_for(run_id, timeout=60, runs_dir=app_environment / "runs").state is State.STOPPED


def test_train_form_names_missing_imagenet_weights_before_starting(app_environment):
    data = make_dataset(app_environment / "appdata" / "tiny", per_class=6)
    app = open_page("app_pages/train.py")
    app.text_input(key="field.data.path").set_value(str(data))
    app.selectbox(key="field.model.backbone").set_value("ResNet50")
    app.radio(key="field.model.weights").set_value("imagenet")
    app.button[0].click().run()
    messages = [error.value for error in app.error]
    assert any("resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in message for message in messages), messages
    runs_dir = app_environment / "runs"
    assert not runs_dir.exists() or not [entry for entry in runs_dir.iterdir() if entry.is_dir()]


def test_train_form_opens_on_the_offline_backbone_and_the_digits_sample(app_environment):
    app = open_page("app_pages/train.py")
    assert app.selectbox(key="field.model.backbone").value == "EfficientNetLite0"
    assert app.text_input(key="field.data.path").value.endswith("samples/digits")
    assert app.checkbox(key="field.training.cached_features").value is True
    assert any("Fully random augmentation in every epoch needs the slow path" in caption.value
               for caption in app.caption)
    assert "ready offline" in app.selectbox(key="field.model.backbone").format_func("EfficientNetLite0")


@pytest.mark.real_data
def test_defaults_switch_to_a_backbone_whose_weights_are_here(keras_home_with_mobilenet, monkeypatch):
    import dataclasses

    from engine.backbones import BACKBONES
    from engine.config import with_offline_backbone

    # Pretend Lite0's weights package is missing: the MobileNet α=0.25 file is what is on disk.
    monkeypatch.setitem(BACKBONES, "EfficientNetLite0",
                        dataclasses.replace(BACKBONES["EfficientNetLite0"], offline_weights=lambda: False))
    chosen = with_offline_backbone(RunConfig())
    assert (chosen.model.backbone, chosen.model.alpha) == ("MobileNet", 0.25)
    assert with_offline_backbone(RunConfig().replace(**{"model.weights": "none"})).model.backbone == \
        "EfficientNetLite0"


def test_evaluate_works_with_twelve_classes(app_environment, tmp_path, monkeypatch):
    import numpy as np

    from engine.evaluate import write_evaluation

    classes = [f"class_{number:02d}" for number in range(12)]
    data = make_dataset(tmp_path / "twelve", classes=tuple(classes), per_class=2)
    run_dir = create_run(RunConfig().replace(**{"data.path": str(data)}), app_environment / "runs")
    paths = sorted(str(path) for path in data.rglob("*.*"))
    true = np.array([classes.index(Path(path).parent.name) for path in paths])
    probabilities = np.random.default_rng(0).dirichlet(np.ones(12), size=len(paths))
    write_evaluation(run_dir, classes, {"validation": (paths, true, probabilities)})
    app = open_page("app_pages/evaluate.py")
    assert not app.exception, app.exception
    table = next(table.value for table in app.dataframe if "precision" in table.value.columns)
    assert len(table) == 12
    assert app.selectbox(key="cell_true").options == classes


def test_train_page_lists_which_backbones_are_ready_offline(app_environment):
    app = open_page("app_pages/train.py")
    table = next(table.value for table in app.dataframe if "weights file" in table.value.columns)
    rows = table.set_index("backbone")
    assert bool(rows.loc["EfficientNetLite0", "ready offline"]) is True
    assert bool(rows.loc["VGG16", "ready offline"]) is False
    assert rows.loc["VGG16", "weights file"] == "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"


def test_data_page_says_when_the_download_sample_cannot_be_had(app_environment):
    app = open_page("app_pages/data.py")
    app.selectbox[0].set_value("cats_vs_dogs").run()
    app.button[0].click().run()
    assert not app.exception
    assert any("cannot reach" in error.value and "digits" in error.value for error in app.error)
