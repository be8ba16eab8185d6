"""The experiment commands as a user types them: compare, describe, sweep, lr-find, cache."""

import json

import pytest

from engine import runfiles
from engine.config import RunConfig
from engine.runs import create_run
from engine.status import read_status
from tests.conftest import make_dataset, run_cli


def predictions(runs_dir, name, rows):
    """A run folder with predictions.csv from (path, true, predicted) rows of the validation split."""
    folder = create_run(RunConfig().replace(**{"data.path": "/data", "name": name}), runs_dir)
    lines = [[path, "validation", true, predicted, f"{0.9 if predicted == 'cats' else 0.1:.2f}",
              f"{0.1 if predicted == 'cats' else 0.9:.2f}"] for path, true, predicted in rows]
    runfiles.write_csv(folder / runfiles.PREDICTIONS_FILE, ["path", "split", "true", "predicted", "prob_cats",
                                                            "prob_dogs"], lines)
    return folder


def test_compare_prints_the_counts_the_paths_and_the_p_value(tmp_path):
    rows = [(f"/data/{n}.jpg", "cats", "cats") for n in range(6)]
    run_a = predictions(tmp_path, "a", rows + [("/data/x.jpg", "dogs", "dogs"), ("/data/y.jpg", "dogs", "cats")])
    run_b = predictions(tmp_path, "b", rows + [("/data/x.jpg", "dogs", "cats"), ("/data/y.jpg", "dogs", "dogs")])
    result = run_cli("compare", run_a, run_b, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["both_right"], summary["a_right_b_wrong"], summary["b_right_a_wrong"]) == (6, 1, 1)
    assert summary["a_right_b_wrong_paths"] == ["/data/x.jpg"] and summary["p_value"] == 1.0
    assert "not distinguishable on these 8 validation images" in summary["verdict"]
    text = run_cli("compare", run_a, run_b)
    assert text.returncode == 0 and "A right, B wrong (1):\n  /data/x.jpg" in text.stdout
    unevaluated = create_run(RunConfig().replace(**{"data.path": "/data"}), tmp_path)
    missing = run_cli("compare", run_a, unevaluated)
    assert missing.returncode == 2 and "has no predictions.csv" in missing.stderr


def test_describe_sets_a_description_and_adds_and_removes_tags(tmp_path):
    run_dir = create_run(RunConfig().replace(**{"data.path": "/data/x"}), tmp_path)
    result = run_cli("describe", run_dir.name, "--runs-dir", tmp_path, "--description", "first try",
                     "--tag", "Baseline", "--tag", "cats")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tags"] == ["baseline", "cats"]
    result = run_cli("describe", run_dir.name, "--runs-dir", tmp_path, "--untag", "BASELINE", "--tag", "sweep")
    assert json.loads(result.stdout)["tags"] == ["cats", "sweep"]
    assert read_status(run_dir).description == "first try"
    refused = run_cli("describe", run_dir.name, "--runs-dir", tmp_path, "--tag", "a,b")
    assert refused.returncode == 2 and "cannot contain a comma" in refused.stderr


def test_sweep_without_a_grid_or_with_an_unknown_sweep_says_what_to_give(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=3)
    no_grid = run_cli("sweep", "--data", data, "--runs-dir", tmp_path / "runs")
    assert no_grid.returncode == 2 and "at least one --grid" in no_grid.stderr
    bad = run_cli("sweep", "--data", data, "--runs-dir", tmp_path / "runs", "--grid", "training.learning_rate=fast")
    assert bad.returncode == 2 and "training.learning_rate" in bad.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("2*"))
    unknown = run_cli("sweep", "--show", "nope", "--runs-dir", tmp_path / "runs")
    assert unknown.returncode == 2 and "No sweep 'nope'" in unknown.stderr


@pytest.mark.training
def test_lr_find_prints_a_curve_and_a_suggestion(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=12)
    result = run_cli("lr-find", "--data", data, "--backbone", "MobileNet", "--alpha", "0.25", "--weights", "none",
                     "--image-size", "32", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout)
    assert found["images"] == 24 and found["steps"] >= 20
    assert found["suggested"] == pytest.approx(found["minimum_at"] / 10)


def test_cache_lists_what_is_cached(tmp_path):
    result = run_cli("cache", env={"TRANSFER_STUDIO_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
