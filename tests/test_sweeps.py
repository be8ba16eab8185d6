"""Sweeps: the grid, a real small sweep through the queue sharing feature computations, and its leaderboard."""

import json

import pytest

from engine import runfiles
from engine.config import RunConfig
from engine.latency import measure_latency, read_latency
from engine.run_details import filter_runs
from engine.runs import list_runs
from engine.samples import ensure_sample
from engine.status import State
from engine.sweeps import expand, leaderboard, list_sweeps, parse_grid, read_sweep, start_sweep, wait_for_sweep
from engine.users import Role, User


def test_the_grid_is_read_from_name_equals_values():
    assert parse_grid(["model.backbone=MobileNet, MobileNetV2", "training.learning_rate=1e-3,3e-3"]) == {
        "model.backbone": ["MobileNet", "MobileNetV2"], "training.learning_rate": ["1e-3", "3e-3"]}
    for bad in ("model.backbone", "model.backbone=", "=1,2"):
        with pytest.raises(ValueError, match="NAME=VALUE,VALUE"):
            parse_grid([bad])
    with pytest.raises(ValueError, match="given twice"):
        parse_grid(["training.epochs=1", "training.epochs=2"])


def test_every_combination_is_a_valid_config_with_runs_of_one_backbone_together():
    grid = {"training.learning_rate": ["1e-3", "3e-3"], "model.backbone": ["MobileNet", "MobileNetV2"]}
    runs = expand(RunConfig().replace(**{"data.path": "/data/x"}), grid)
    assert len(runs) == 4
    assert [config.model.backbone for config, _ in runs] == ["MobileNet", "MobileNet", "MobileNetV2", "MobileNetV2"]
    assert {(varied["model.backbone"], varied["training.learning_rate"]) for _, varied in runs} == {
        ("MobileNet", 0.001), ("MobileNet", 0.003), ("MobileNetV2", 0.001), ("MobileNetV2", 0.003)}
    with pytest.raises(ValueError, match="training.learning_rate"):
        expand(RunConfig(), {"training.learning_rate": ["fast"]})
    with pytest.raises(ValueError, match="at most 64"):
        expand(RunConfig(), {"training.seed": [str(seed) for seed in range(65)]})


def test_a_grid_over_backbones_keeps_a_width_where_it_exists_and_drops_it_where_not():
    base = RunConfig().replace(**{"data.path": "/data/x", "model.backbone": "MobileNet", "model.alpha": 0.25})
    runs = expand(base, {"model.backbone": ["MobileNet", "EfficientNetLite0", "MobileNetV2"]})
    assert [(config.model.backbone, config.model.alpha) for config, _ in runs] == [
        ("MobileNet", 0.25), ("EfficientNetLite0", None), ("MobileNetV2", None)]  # V2 has no 0.25: its default


def test_a_viewer_cannot_start_a_sweep(tmp_path):
    viewer = User("issuer|vic", "Vic", role=Role.VIEWER)
    with pytest.raises(PermissionError, match="viewer"):
        start_sweep(RunConfig().replace(**{"data.path": "/data/x"}), {"training.epochs": ["1", "2"]}, tmp_path,
                    user=viewer)
    assert not [path for path in tmp_path.rglob("status.json")]
    assert list_sweeps(tmp_path) == []  # no empty sweep left behind to be listed


@pytest.mark.training
def test_a_real_sweep_runs_four_runs_on_two_feature_computations(runs_dir, tmp_path, app_environment, monkeypatch):
    digits = ensure_sample("digits", tmp_path / "appdata")
    base = RunConfig().replace(**{"data.path": str(digits), "data.subset_fraction": 0.15, "model.weights": "none",
                                  "model.image_size": 32, "training.epochs": 1})
    grid = parse_grid(["model.backbone=MobileNetV2,MobileNet", "training.learning_rate=1e-3,1e-2"])
    sweep = start_sweep(base, grid, runs_dir, name="digits sweep")
    statuses = wait_for_sweep(sweep, runs_dir, timeout=600)
    assert [status.state for status in statuses] == [State.FINISHED] * 4, [status.message for status in statuses]

    # Runs of one backbone ran one after the other: the first computed its features, the second found them.
    logs = [(runs_dir / entry["run_id"] / runfiles.LOG_FILE).read_text() for entry in sweep["runs"]]
    computed = ["features of" in log and "computed in" in log for log in logs]
    found = ["found in the cache" in log for log in logs]
    assert computed == [True, False, True, False] and found == [False, True, False, True], logs

    # The sweep is recorded, and its runs carry its tag and say what they vary.
    assert read_sweep(sweep["id"], runs_dir) == sweep and list_sweeps(runs_dir)[0]["id"] == sweep["id"]
    tagged = filter_runs(list_runs(runs_dir), tag=f"sweep-{sweep['id']}")
    assert len(tagged) == 4
    assert all(run.name.startswith("digits sweep · backbone=") for run in tagged)

    measure_latency(runs_dir / sweep["runs"][0]["run_id"], repeats=3)
    table, chosen = leaderboard(sweep, runs_dir)
    assert list(table["validation accuracy"]) == sorted(table["validation accuracy"], reverse=True)
    assert {"model.backbone", "training.learning_rate", "model MB", "latency ms (1 image)"} <= set(table.columns)
    assert table["latency ms (1 image)"].notna().sum() == 1 and read_latency(runs_dir / sweep["runs"][0]["run_id"])
    evaluation = json.loads((runs_dir / chosen["run_id"] / runfiles.EVALUATION_FILE).read_text())
    assert chosen["run_id"] == table.iloc[0]["run_id"]
    assert chosen["test_accuracy"] == evaluation["splits"]["test"]["accuracy"]
    assert "optimistic" in chosen["why"]

    # The Sweeps page draws the same leaderboard and points at the chosen run.
    from tests.conftest import open_page

    monkeypatch.setenv("TRANSFER_STUDIO_RUNS", str(runs_dir))
    page = open_page("app_pages/sweeps.py")
    assert not page.exception, page.exception
    shown = next(frame.value for frame in page.dataframe if "validation accuracy" in frame.value.columns)
    assert list(shown["run_id"]) == list(table["run_id"])
    from signin import escape_markdown

    assert any(escape_markdown(chosen["name"]) in message.value and "test accuracy" in message.value
               for message in page.success)
    assert page.button(key="measure_latency").label == "Measure latency (3 runs)"
    page.button(key="measure_latency").click().run()
    assert all(read_latency(runs_dir / entry["run_id"]) for entry in sweep["runs"])

    # Someone else cannot write into these runs' folders, whatever a page offers.
    stranger = User("issuer|sam", "Sam")
    with pytest.raises(PermissionError, match="only its owner or an admin"):
        measure_latency(runs_dir / sweep["runs"][1]["run_id"], repeats=1, user=stranger)
