"""The Evaluate page's new sections: calibration, the operating point, Grad-CAM overlays and the model card."""

import pytest

from engine import runfiles
from engine.operating_point import NOT_SURE, Decision, read_decision
from engine.users import Role, User
from tests.conftest import make_dataset, open_page, tiny_config

pytestmark = pytest.mark.training


@pytest.fixture(scope="module")
def two_class_run(tmp_path_factory):
    """A small finished two-class run (random weights), shared by this module's tests."""
    from engine import train_run

    base = tmp_path_factory.mktemp("evaluate_page")
    data = make_dataset(base / "data", per_class=12)
    return train_run(tiny_config(data, **{"data.cache": "memory"}), base / "runs")


@pytest.fixture
def signed_in_as(monkeypatch):
    """Pages see `user` as the signed-in user (the real sign-in is tested in tests/test_signin.py)."""
    import signin

    def sign_in(user):
        monkeypatch.setattr(signin, "current_user", lambda: user)

    return sign_in


def evaluate_page(run_dir, monkeypatch):
    monkeypatch.setenv("TRANSFER_STUDIO_RUNS", str(run_dir.parent))
    app = open_page("app_pages/evaluate.py")
    assert not app.exception, app.exception
    return app


def metric(app, label):
    return next(item.value for item in app.metric if item.label == label)


def test_calibration_and_the_operating_point_round_trip_through_the_run_folder(app_environment, two_class_run,
                                                                                monkeypatch):
    (two_class_run / runfiles.DECISION_FILE).unlink(missing_ok=True)
    app = evaluate_page(two_class_run, monkeypatch)
    assert metric(app, "Temperature") == f"{runfiles.read_json(two_class_run / 'evaluation.json')['calibration']['temperature']:.2f}"
    assert metric(app, "Answered") == "100%"
    assert NOT_SURE not in app.selectbox(key="cell_predicted").options

    # A minimum confidence no image reaches: every answer becomes "not sure", live, before saving.
    app.slider(key=f"minimum_{two_class_run}").set_value(0.99).run()
    assert metric(app, "Answered") == "0%"
    assert NOT_SURE in app.selectbox(key="cell_predicted").options
    assert read_decision(two_class_run) == Decision()  # nothing saved yet
    app.slider(key=f"threshold_{two_class_run}").set_value(0.3).run()
    app.button(key="save_decision").click().run()
    assert not app.exception, app.exception
    assert read_decision(two_class_run) == Decision(0.3, 0.99)

    again = evaluate_page(two_class_run, monkeypatch)  # a new session reads the saved point
    assert again.slider(key=f"threshold_{two_class_run}").value == 0.3
    assert again.slider(key=f"minimum_{two_class_run}").value == 0.99
    (two_class_run / runfiles.DECISION_FILE).unlink()


def test_a_viewer_sees_the_page_but_cannot_save_or_write_the_card(app_environment, two_class_run, monkeypatch,
                                                                   signed_in_as):
    signed_in_as(User("issuer|vic", "Vic", role=Role.VIEWER))
    app = evaluate_page(two_class_run, monkeypatch)
    app.slider(key=f"minimum_{two_class_run}").set_value(0.9).run()
    assert app.button(key="save_decision").disabled
    assert not [area for area in app.text_area if area.key.startswith("intended_use")]
    assert len([button for button in app.get("download_button")]) == 3


def test_overlays_draw_over_the_cell_images_and_the_top_losses(app_environment, two_class_run, monkeypatch):
    app = evaluate_page(two_class_run, monkeypatch)
    shown = len(app.get("imgs"))
    app.toggle(key="evaluate_overlay_show").set_value(True).run()
    assert not app.exception, app.exception
    assert app.slider(key="evaluate_overlay_opacity").value == 0.45
    assert len(app.get("imgs")) == shown  # the same images, now with the overlay


def test_the_owner_writes_what_the_model_is_for_and_the_card_carries_it(app_environment, two_class_run,
                                                                        monkeypatch):
    from engine.model_card import intended_use

    app = evaluate_page(two_class_run, monkeypatch)
    app.text_area(key=f"intended_use_{two_class_run.name}").input("Sorting our own photos of cats and dogs.")
    next(button for button in app.button if button.label == "Save").click().run()
    assert not app.exception, app.exception
    assert intended_use(two_class_run) == "Sorting our own photos of cats and dogs."
    labels = [button.proto.label for button in app.get("download_button")]
    assert labels == ["Model card (HTML, printable)", "Markdown", "The facts (JSON)"]
