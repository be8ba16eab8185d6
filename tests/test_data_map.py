"""A map of the data: PCA then t-SNE of the cached features, mistakes marked, cached; the Data page's map."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from engine import data_map as data_map_module
from engine import label_issues
from engine.data_map import data_map, project
from tests.conftest import REPO_ROOT, make_dataset, tiny_config


@pytest.fixture
def app_data(tmp_path, monkeypatch):
    folder = tmp_path / "appdata"
    folder.mkdir()
    monkeypatch.setenv("TRANSFER_STUDIO_DATA", str(folder))
    return folder


def test_projection_keeps_apart_what_the_features_keep_apart():
    rng = np.random.default_rng(1)
    features = np.concatenate([rng.normal(0, 1, (30, 64)), rng.normal(8, 1, (30, 64))]).astype(np.float32)
    layout = project(features)
    assert layout.shape == (60, 2) and np.isfinite(layout).all()
    first, second = layout[:30], layout[30:]
    gap = np.linalg.norm(first.mean(axis=0) - second.mean(axis=0))
    assert gap > 2 * max(first.std(axis=0).max(), second.std(axis=0).max())
    assert np.array_equal(layout, project(features))  # seeded: the same map every time
    assert project(features[:5]).shape == (5, 2)  # a tiny folder gets a smaller perplexity
    with pytest.raises(ValueError, match="at least 3 images"):
        project(features[:2])


def test_data_map_of_a_folder_marks_the_mislabelled_image_and_is_cached(tmp_path, app_data, monkeypatch):
    root = make_dataset(tmp_path / "colours", classes=("birds", "cats", "dogs"), per_class=12)
    wrong = root / "dogs" / "cats_5.png"
    shutil.move(root / "cats" / "cats_5.png", wrong)
    config = tiny_config(root)
    label_issues.find_label_issues_in_folder(root, config)
    # The map shares the label search's held-out probabilities: no second k-fold.
    monkeypatch.setattr(label_issues, "_fit_held_out", lambda *arguments: pytest.fail("k-fold ran again"))
    result = data_map(root, config)
    points = {point["path"]: point for point in result["points"]}
    assert len(points) == 36 and result["classes"] == ["birds", "cats", "dogs"]
    assert all(np.isfinite([point["x"], point["y"]]).all() for point in points.values())
    moved = points[str(wrong.resolve())]
    assert moved["label"] == "dogs" and moved["predicted"] == "cats" and moved["mistake"]
    assert result["num_mistakes"] == sum(point["mistake"] for point in points.values()) < 6
    assert "t-SNE" in result["method"] and json.loads(json.dumps(result)) == result

    monkeypatch.setattr(data_map_module, "project", lambda *arguments: pytest.fail("projected again"))
    again = data_map(root, config)
    assert again["cached"] and again["points"] == result["points"]


def test_data_page_draws_the_map(app_environment):
    from streamlit.testing.v1 import AppTest

    root = make_dataset(app_environment / "appdata" / "colours", classes=("birds", "cats", "dogs"), per_class=8)
    app = AppTest.from_file(str(REPO_ROOT / "streamlit_app.py"), default_timeout=120)
    app.switch_page("app_pages/data.py")
    # The folder already chosen, and the Train form's fast backbone (random weights, 32 px).
    app.session_state["dataset_path"] = str(root)
    for key, value in {"field.model.backbone": "MobileNet", "field.model.alpha": 0.25,
                       "field.model.weights": "none", "field.model.image_size": 32}.items():
        app.session_state[key] = value
    app.session_state["data_map"] = True
    app.run()
    assert not app.exception, app.exception
    app.button(key="draw_data_map").click().run()
    assert not app.exception, app.exception
    charts = [chart for chart in app.get("plotly_chart") if "24 images" in chart.proto.spec]
    assert len(charts) == 1
    spec = json.loads(charts[0].proto.spec)
    assert {trace["name"].split(",")[0] for trace in spec["data"]} == {"birds", "cats", "dogs"}
