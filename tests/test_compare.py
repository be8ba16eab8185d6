"""Comparing runs: the image-level diff and McNemar's exact test on hand-made predictions with known counts."""

import json

import pytest

from engine import runfiles
from tests.conftest import make_dataset, open_page, tiny_config
from engine.compare import (image_diff, mcnemar_exact_p_value, results_side_by_side, settings_that_differ,
                            verdict)

CLASSES = ("cats", "dogs")


def write_run(folder, rows, config=None, accuracy=None):
    """A run folder with predictions.csv from (path, split, true, predicted, probability of the prediction) rows."""
    folder.mkdir(parents=True)
    lines = []
    for path, split, true, predicted, confidence in rows:
        probabilities = {name: (confidence if name == predicted else 1 - confidence) for name in CLASSES}
        lines.append([path, split, true, predicted, *(f"{probabilities[name]:.6f}" for name in CLASSES)])
    runfiles.write_csv(folder / runfiles.PREDICTIONS_FILE,
                       ["path", "split", "true", "predicted", *(f"prob_{name}" for name in CLASSES)], lines)
    (folder / runfiles.CONFIG_FILE).write_text(json.dumps(config or {"name": folder.name, "training": {"epochs": 3}}))
    if accuracy is not None:
        runfiles.atomic_write_json(folder / runfiles.EVALUATION_FILE, {"splits": {"validation": {
            "num_images": len(rows), "accuracy": accuracy, "macro_f1": accuracy,
            "per_class": {name: {"f1": accuracy} for name in CLASSES}}}})
    return folder


def known_pair(tmp_path, a_only=2, b_only=10, both_right=30, both_wrong=3):
    """Runs A and B on the same validation images with the given counts of (A right, B right)."""
    rows_a, rows_b = [], []
    number = 0
    for count, a_right, b_right in ((a_only, True, False), (b_only, False, True), (both_right, True, True),
                                    (both_wrong, False, False)):
        for _ in range(count):
            true = CLASSES[number % 2]
            wrong = CLASSES[(number + 1) % 2]
            path = f"/data/{true}/{number}.jpg"
            rows_a.append((path, "validation", true, true if a_right else wrong, 0.6 + (number % 7) / 20))
            rows_b.append((path, "validation", true, true if b_right else wrong, 0.7))
            number += 1
    return write_run(tmp_path / "a", rows_a), write_run(tmp_path / "b", rows_b)


def test_the_diff_counts_each_kind_of_image_and_lists_the_disagreements(tmp_path):
    run_a, run_b = known_pair(tmp_path)
    diff = image_diff(run_a, run_b)
    assert (diff.common, diff.both_right, diff.both_wrong) == (45, 30, 3)
    assert (len(diff.a_right_b_wrong), len(diff.b_right_a_wrong)) == (2, 10)
    assert diff.same_images and diff.only_a == diff.only_b == 0
    # Each listed image: A right and B wrong, with both predictions and confidences.
    for row in diff.a_right_b_wrong.itertuples():
        assert row.predicted_a == row.true != row.predicted_b
    assert list(diff.b_right_a_wrong.columns) == ["path", "true", "predicted_a", "confidence_a", "predicted_b",
                                                  "confidence_b"]
    summary = diff.to_dict()
    assert summary["a_right_b_wrong"] == 2 and len(summary["b_right_a_wrong_paths"]) == 10


def test_mcnemar_exact_p_value_matches_the_binomial_by_hand(tmp_path):
    # 2 against 10 disagreements: 2 · P(X ≤ 2) for X ~ Binomial(12, 1/2) = 2 · (1 + 12 + 66) / 4096.
    assert mcnemar_exact_p_value(2, 10) == pytest.approx(158 / 4096)
    assert mcnemar_exact_p_value(10, 2) == pytest.approx(158 / 4096)
    assert mcnemar_exact_p_value(6, 6) == pytest.approx(1.0)
    assert mcnemar_exact_p_value(0, 0) == 1.0
    # 0 against 5: 2 / 32.
    assert mcnemar_exact_p_value(0, 5) == pytest.approx(2 / 32)
    with pytest.raises(ValueError, match="≥ 0"):
        mcnemar_exact_p_value(-1, 3)
    run_a, run_b = known_pair(tmp_path)
    assert image_diff(run_a, run_b).p_value == pytest.approx(158 / 4096)


def test_the_verdict_says_which_is_better_or_that_they_cannot_be_told_apart(tmp_path):
    run_a, run_b = known_pair(tmp_path)
    text = verdict(image_diff(run_a, run_b), "small", "large")
    assert text.startswith("large is better than small on these 45 validation images")
    assert "probability 0.039" in text
    close_a, close_b = known_pair(tmp_path / "close", a_only=4, b_only=6)
    text = verdict(image_diff(close_a, close_b), "small", "large")
    assert text.startswith("small and large are not distinguishable on these 43 validation images: only small is "
                           "right on 4, only large on 6")


def test_different_splits_compare_only_the_common_images_and_say_so(tmp_path):
    shared = [(f"/data/cats/{n}.jpg", "validation", "cats", "cats", 0.9) for n in range(5)]
    run_a = write_run(tmp_path / "a", shared + [("/data/cats/only_a.jpg", "validation", "cats", "dogs", 0.8)])
    run_b = write_run(tmp_path / "b", shared + [("/data/dogs/only_b.jpg", "validation", "dogs", "dogs", 0.8),
                                                ("/data/dogs/only_b2.jpg", "validation", "dogs", "dogs", 0.8)])
    diff = image_diff(run_a, run_b)
    assert (diff.common, diff.only_a, diff.only_b) == (5, 1, 2)
    assert not diff.same_images


def test_a_relabelled_image_is_left_out_and_counted(tmp_path):
    run_a = write_run(tmp_path / "a", [("/data/x.jpg", "validation", "cats", "cats", 0.9),
                                       ("/data/y.jpg", "validation", "cats", "cats", 0.9)])
    run_b = write_run(tmp_path / "b", [("/data/x.jpg", "validation", "dogs", "cats", 0.9),
                                       ("/data/y.jpg", "validation", "cats", "cats", 0.9)])
    diff = image_diff(run_a, run_b)
    assert (diff.common, diff.label_changed, diff.both_right) == (1, 1, 1)


def test_a_run_without_predictions_is_named(tmp_path):
    run_a, _ = known_pair(tmp_path)
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(FileNotFoundError, match="unfinished has no predictions.csv"):
        image_diff(run_a, tmp_path / "unfinished")


def test_only_the_settings_that_differ_are_listed_and_results_sit_side_by_side(tmp_path):
    first = write_run(tmp_path / "first", [], {"name": "one", "model": {"backbone": "MobileNet", "image_size": 224},
                                               "training": {"learning_rate": 0.003, "epochs": 5}}, accuracy=0.9)
    second = write_run(tmp_path / "second", [], {"name": "two", "model": {"backbone": "MobileNet", "image_size": 224},
                                                 "training": {"learning_rate": 0.001, "epochs": 5}}, accuracy=0.8)
    differ = settings_that_differ([first, second])
    assert list(differ["setting"]) == ["training.learning_rate"]  # the name differs too, but says nothing
    assert list(differ.iloc[0][["first", "second"]]) == [0.003, 0.001]
    table = results_side_by_side([first, second])
    assert list(table["accuracy"]) == [0.9, 0.8] and list(table["F1 cats"]) == [0.9, 0.8]


@pytest.fixture(scope="module")
def two_trained_runs(tmp_path_factory):
    """Two tiny runs on the same images that differ in learning rate and epochs."""
    from engine import train_run

    base = tmp_path_factory.mktemp("compare")
    data = make_dataset(base / "data", per_class=12)
    runs = base / "runs"
    first = train_run(tiny_config(data, name="slow learner", **{"data.cache": "memory", "training.learning_rate": 1e-4,
                                                                "training.epochs": 1}), runs)
    second = train_run(tiny_config(data, name="fast learner", **{"data.cache": "memory", "training.epochs": 3}), runs)
    return first, second


@pytest.mark.training
def test_the_compare_page_shows_what_differs_the_results_and_the_image_diff(app_environment, two_trained_runs,
                                                                             monkeypatch):
    first, second = two_trained_runs
    monkeypatch.setenv("TRANSFER_STUDIO_RUNS", str(first.parent))
    app = open_page("app_pages/compare.py")
    assert not app.exception, app.exception
    assert set(app.multiselect(key="compare_runs").value) == {str(first), str(second)}
    differ = next(table.value for table in app.dataframe if "setting" in table.value.columns)
    assert set(differ["setting"]) == {"training.learning_rate", "training.epochs"}
    results = next(table.value for table in app.dataframe if "macro F1" in table.value.columns)
    assert set(results["run"]) == {"slow learner", "fast learner"}
    assert len(app.get("plotly_chart")) == 2
    # The verdict and the four counts match the engine's diff of the same two runs on the same images.
    chosen_a = app.selectbox(key="compare_a").value
    chosen_b = app.selectbox(key="compare_b").value
    diff = image_diff(chosen_a, chosen_b)
    names = {str(first): "slow learner", str(second): "fast learner"}
    assert any(verdict(diff, names[chosen_a], names[chosen_b]) in text.value for text in app.markdown)
    counts = {metric.label: metric.value for metric in app.metric}
    assert counts["Both right"] == str(diff.both_right)
    assert counts["Only A right"] == str(len(diff.a_right_b_wrong))
    assert sorted(app.query_params["compare"]) == sorted([first.name, second.name])  # a link reopens the choice


@pytest.mark.training
def test_one_run_is_not_enough_to_compare(app_environment, two_trained_runs, monkeypatch, tmp_path):
    import shutil

    lone = tmp_path / "runs"
    shutil.copytree(two_trained_runs[0], lone / two_trained_runs[0].name)
    monkeypatch.setenv("TRANSFER_STUDIO_RUNS", str(lone))
    app = open_page("app_pages/compare.py")
    assert not app.exception, app.exception
    assert any("needs two evaluated runs" in info.value for info in app.info)
