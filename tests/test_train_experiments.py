"""The Train page's experiments under AppTest: a sweep, "Which backbone fits my data?", the learning-rate finder.

Sweep runs are started for real (run folders, the sweep file, the audit) but the queue is kept
from launching workers: what a worker does with a queued run is tested in tests/test_sweeps.py.
"""

import pytest

from engine.config import RunConfig
from engine.status import State, read_status
from engine.sweeps import list_sweeps
from engine.users import Role, User
from tests.conftest import make_dataset, open_page


@pytest.fixture
def queue_without_workers(monkeypatch):
    """Started runs stay queued: the queue launches no worker process (nothing to stop afterwards)."""
    from engine import jobs

    monkeypatch.setattr(jobs, "schedule", lambda runs_dir=None: [])


@pytest.fixture
def tiny_form(app_environment):
    """The Train page, and a tiny dataset inside the app's data folder."""
    return open_page("app_pages/train.py"), make_dataset(app_environment / "appdata" / "tiny", per_class=8)


def fill_in(app, data):
    """Types a tiny, fast config into the form; as in a browser, it is sent when a form button is pressed."""
    app.text_input(key="field.data.path").set_value(str(data))
    app.selectbox(key="field.model.backbone").set_value("MobileNet")
    app.selectbox(key="field.model.alpha").set_value(0.25)
    app.number_input(key="field.model.image_size").set_value(32)
    app.radio(key="field.model.weights").set_value("none")
    app.number_input(key="field.training.epochs").set_value(2)
    app.number_input(key="field.training.batch_size").set_value(8)
    return app


def run_configs(runs_dir, sweep: dict) -> list[RunConfig]:
    return [RunConfig.load(runs_dir / entry["run_id"] / "config.json") for entry in sweep["runs"]]


def test_the_sweep_section_starts_one_queued_run_per_combination(tiny_form, app_environment, queue_without_workers):
    app, data = tiny_form
    start = app.button(key="start_sweep")
    assert start.disabled and start.proto.label == "Start sweep"  # nothing to vary yet
    app.text_input(key="sweep.learning_rates").set_value("0.001, 0.01").run()
    app.text_input(key="sweep.dropouts").set_value("0.1 0.3").run()
    app.text_input(key="sweep.name").set_value("tiny sweep").run()
    assert any("4 runs" in markdown.value for markdown in app.markdown)
    assert app.button(key="start_sweep").proto.label == "Start sweep (4 runs)"

    fill_in(app, data).button(key="start_sweep").click().run()
    assert not app.exception, app.exception
    runs_dir = app_environment / "runs"
    [sweep] = list_sweeps(runs_dir)
    assert sweep["name"] == "tiny sweep"
    assert sweep["grid"] == {"training.learning_rate": ["0.001", "0.01"], "model.dropout": ["0.1", "0.3"]}
    configs = run_configs(runs_dir, sweep)
    assert sorted((config.training.learning_rate, config.model.dropout) for config in configs) == [
        (0.001, 0.1), (0.001, 0.3), (0.01, 0.1), (0.01, 0.3)]
    # Everything else is the form's.
    assert {(config.data.path, config.model.backbone, config.model.alpha, config.model.weights,
             config.model.image_size, config.training.epochs) for config in configs} == {
        (str(data), "MobileNet", 0.25, "none", 32, 2)}
    assert {read_status(runs_dir / entry["run_id"]).state for entry in sweep["runs"]} == {State.QUEUED}
    # The page switched to Sweeps, on this sweep.
    assert app.title[0].value == "Sweeps"
    assert app.selectbox(key="sweep_choice").value == sweep["id"]


def test_a_sweep_checks_the_form_and_the_grid_before_starting_anything(tiny_form, app_environment,
                                                                       queue_without_workers):
    app, data = tiny_form
    app.text_area(key="sweep.other").set_value("training.epochs=0,3").run()
    assert any("Grid value refused" in error.value and "training.epochs" in error.value for error in app.error)
    fill_in(app, data).button(key="start_sweep").click().run()
    assert any("Grid value refused" in error.value for error in app.error)

    # A bad form value is shown under its field, as Start training shows it.
    app.text_area(key="sweep.other").set_value("training.epochs=2,3").run()
    fill_in(app, data).number_input(key="field.model.dropout").set_value(1.0)
    app.button(key="start_sweep").click().run()
    assert any("`model.dropout`" in error.value for error in app.error), [error.value for error in app.error]
    assert app.title[0].value == "Train"
    assert not list_sweeps(app_environment / "runs")
    assert not [path for path in (app_environment / "runs").rglob("status.json")]


def test_a_sweep_names_a_run_whose_weights_are_missing_and_starts_none(tiny_form, app_environment,
                                                                       queue_without_workers):
    app, data = tiny_form
    # Lite0's ImageNet weights install with the app; MobileNet's (α=0.25) are not in this test's Keras home.
    app.text_area(key="sweep.other").set_value("model.backbone=EfficientNetLite0,MobileNet").run()
    fill_in(app, data).radio(key="field.model.weights").set_value("imagenet")
    app.button(key="start_sweep").click().run()
    messages = [error.value for error in app.error]
    assert any("model.backbone=MobileNet" in message and "mobilenet_2_5_224_tf_no_top.h5" in message
               for message in messages), messages
    assert not list_sweeps(app_environment / "runs")
    assert not [path for path in (app_environment / "runs").rglob("status.json")]


def test_a_viewer_sees_the_experiments_disabled_and_is_refused(tiny_form, app_environment, monkeypatch,
                                                               queue_without_workers):
    import signin

    app, data = tiny_form
    app.text_input(key="sweep.learning_rates").set_value("0.001, 0.01").run()
    assert not app.button(key="start_sweep").disabled  # drawn for a member…
    # …who is made a viewer (in secrets.toml) before pressing it: the page, drawn again for a viewer,
    # disables the button, and Streamlit discards a press of a disabled button.
    viewer = User("issuer|vic", "Vic", role=Role.VIEWER)
    monkeypatch.setattr(signin, "current_user", lambda: viewer)
    fill_in(app, data).button(key="start_sweep").click().run()
    assert not app.exception, app.exception
    assert any("viewer" in warning.value for warning in app.warning)
    for key in ("start_sweep", "which_backbone", "find_learning_rate"):
        assert app.button(key=key).disabled, key
    assert app.title[0].value == "Train"  # (behind the page the engine refuses a viewer too: tests/test_sweeps.py)
    assert not list_sweeps(app_environment / "runs")
    assert not [path for path in (app_environment / "runs").rglob("status.json")]


def test_a_queue_limit_reached_part_way_is_said_and_the_started_runs_stay_listed(tiny_form, app_environment,
                                                                               queue_without_workers):
    app, data = tiny_form
    app.secrets["max_queued_per_user"] = 2
    app.text_input(key="sweep.learning_rates").set_value("0.001, 0.003, 0.01").run()
    fill_in(app, data).button(key="start_sweep").click().run()
    assert not app.exception, app.exception
    assert any("the most this server allows one person (2)" in error.value for error in app.error), \
        [error.value for error in app.error]
    assert app.title[0].value == "Train"
    [sweep] = list_sweeps(app_environment / "runs")
    assert len(sweep["runs"]) == 2


@pytest.mark.real_data
def test_which_backbone_starts_one_run_per_backbone_ready_offline(keras_home_with_mobilenet, tiny_form,
                                                                   app_environment, queue_without_workers):
    from engine.backbones import weights_status

    ready = {row["name"] for row in weights_status() if row["available"] or row["available_alphas"]}
    assert ready == {"EfficientNetLite0", "MobileNet"}  # Lite0's weights install with the app; MobileNet α=0.25 copied
    app, data = tiny_form
    caption = next(caption.value for caption in app.caption if "Which backbone fits my data?" in caption.value)
    assert "starts 2 runs" in caption and "MobileNet (α=0.25)" in caption and "EfficientNetLite0" in caption

    fill_in(app, data).button(key="which_backbone").click().run()
    assert not app.exception, app.exception
    runs_dir = app_environment / "runs"
    [sweep] = list_sweeps(runs_dir)
    assert sweep["name"] == "which backbone · tiny"
    configs = run_configs(runs_dir, sweep)
    # Each backbone at the width its offline weights have, with ImageNet weights and otherwise the defaults.
    assert sorted((config.model.backbone, config.model.alpha) for config in configs) == [
        ("EfficientNetLite0", None), ("MobileNet", 0.25)]
    defaults = RunConfig()
    for config in configs:
        assert config.data.path == str(data) and config.model.weights == "imagenet"
        assert config.model.image_size is None and config.training.epochs == defaults.training.epochs
        assert config.training.learning_rate == defaults.training.learning_rate
    assert app.title[0].value == "Sweeps" and app.selectbox(key="sweep_choice").value == sweep["id"]


@pytest.mark.training
def test_the_learning_rate_finder_suggests_a_rate_and_fills_it_in(tiny_form):
    app, data = tiny_form
    fill_in(app, data).button(key="find_learning_rate").click().run(timeout=300)
    assert not app.exception, app.exception
    result = app.session_state["lr_finder_result"]
    assert result["data_path"] == str(data) and result["images"] == 16 and result["suggested"] is not None
    words = next(markdown.value for markdown in app.markdown if "Suggested learning rate" in markdown.value)
    suggested = float(f"{result['suggested']:.2g}")
    assert f"**{suggested:g}**" in words
    chart = app.get("plotly_chart")[0].proto
    assert '"type":"log"' in chart.spec.replace(" ", "")  # the rate on a log axis
    table = next(frame.value for frame in app.dataframe if "smoothed loss" in frame.value.columns)
    assert len(table) == result["steps"]

    # The result survives a rerun; "Use this rate" writes it into the form's field.
    app.run()
    app.button(key="use_learning_rate").click().run()
    assert not app.exception, app.exception
    assert app.number_input(key="field.training.learning_rate").value == pytest.approx(suggested)
