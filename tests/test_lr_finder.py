"""The learning-rate range test on cached features: its curve, its suggestion, and a run trained with it."""

import numpy as np
import pytest

from engine.config import RunConfig
from engine.lr_finder import range_test, suggestion


def test_the_suggestion_is_a_tenth_of_the_rate_at_the_smoothed_minimum():
    rates = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    assert suggestion(rates, [1.0, 0.8, 0.5, 0.7, 3.0]) == {"suggested": pytest.approx(1e-4), "minimum_at": 1e-3}
    assert suggestion([], []) == {"suggested": None, "minimum_at": None}


@pytest.mark.training
def test_the_range_test_on_separable_features_falls_then_blows_up():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 60)
    features = rng.normal(size=(180, 16)).astype("float32") + np.eye(3, 16)[labels] * 4
    result = range_test(features, labels, RunConfig(), num_classes=3)
    rates, smoothed = result["learning_rates"], result["smoothed"]
    assert len(rates) == result["steps"] >= 20
    assert all(later > earlier for earlier, later in zip(rates, rates[1:]))  # exponentially growing
    assert rates[0] == pytest.approx(1e-6)
    assert min(smoothed) < 0.75 * smoothed[0]  # the loss falls on the way
    assert rates[0] < result["minimum_at"] <= rates[-1]
    assert result["suggested"] == pytest.approx(result["minimum_at"] / 10)
    with pytest.raises(ValueError, match="at least two training images"):
        range_test(features[:1], labels[:1], RunConfig(), num_classes=3)


@pytest.mark.training
@pytest.mark.real_data
@pytest.mark.slow  # 35-50 s of feature extraction and two trainings; make test-all runs it
def test_the_suggestion_on_digits_trains_at_least_as_well_as_the_default(keras_home_with_mobilenet, tmp_path):
    from engine import train_run
    from engine.lr_finder import find_learning_rate
    from engine.runfiles import EVALUATION_FILE, read_json
    from engine.samples import ensure_sample

    digits = ensure_sample("digits", tmp_path / "appdata")
    base = RunConfig().replace(**{"data.path": str(digits), "model.backbone": "MobileNet", "model.alpha": 0.25,
                                  "model.weights": "imagenet", "model.image_size": 224, "training.epochs": 5})
    found = find_learning_rate(base)
    assert found["images"] > 1000 and found["suggested"] is not None
    accuracy = {}
    for label, rate in (("default", base.training.learning_rate), ("suggested", found["suggested"])):
        run_dir = train_run(base.replace(**{"training.learning_rate": rate}), tmp_path / "runs")
        accuracy[label] = read_json(run_dir / EVALUATION_FILE)["splits"]["validation"]["accuracy"]
    print(f"\nsuggested {found['suggested']:.2e} (minimum at {found['minimum_at']:.2e}); validation accuracy "
          f"default {accuracy['default']:.3f}, suggested {accuracy['suggested']:.3f}")
    assert accuracy["suggested"] >= accuracy["default"], (found["suggested"], accuracy)
