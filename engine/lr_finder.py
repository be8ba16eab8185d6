"""The learning-rate range test (Smith 2015, as fastai's `lr_find` offers) for the new head, on cached features.

The head the run would train (same layers, optimizer and loss) takes one step per batch of the
training images' cached features while the learning rate grows exponentially from
`START_RATE` to `END_RATE`; the loss of each step is smoothed (an exponential moving average
with bias correction, as fastai does) and the test stops early once the smoothed loss has
blown up to four times its minimum. The suggested rate is the one a tenth of the way back
from the smoothed loss's minimum, the classic rule: at the minimum the rate is already too
high to keep training on, a tenth of it is still fast and stable.

Why by hand: Keras ships no range test, and fastai's `lr_find` needs a fastai `Learner` over
PyTorch. The loop is fifty lines over Keras's own `train_on_batch`.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

START_RATE = 1e-6
END_RATE = 1.0
# Fewer steps than this make a ragged curve; a small dataset is passed over more than once.
MINIMUM_STEPS = 100
MAXIMUM_STEPS = 300
SMOOTHING = 0.98
BLOW_UP = 4.0


def range_test(features: np.ndarray, labels: np.ndarray, config, num_classes: int,
               progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Runs the range test for `config`'s head on (N, D) features.

    Args:
        features: The training images' pooled features.
        labels: Their class indices.
        config: The RunConfig whose head, optimizer, batch size and seed are used.
        num_classes: How many classes the run has.
        progress: Called with (step, steps).

    Returns:
        {"learning_rates", "losses" (raw), "smoothed", "suggested", "minimum_at", "steps", "stopped_early"}.

    Raises:
        ValueError: fewer than two images, or labels that do not match the features.
    """
    import keras

    from engine.modeling import build_head, compile_model

    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels)
    if len(features) < 2 or len(features) != len(labels):
        raise ValueError(f"The range test needs at least two training images with one label each; received "
                         f"{len(features)} features and {len(labels)} labels.")
    batch_size = min(config.training.batch_size, len(features))
    batches_per_pass = math.ceil(len(features) / batch_size)
    steps = int(min(MAXIMUM_STEPS, max(MINIMUM_STEPS, batches_per_pass)))
    head = build_head(config, num_classes, features.shape[1])
    compile_model(head, config.training.optimizer, START_RATE, num_classes)
    targets = labels.astype("float32").reshape(-1, 1) if num_classes == 2 else labels.astype("int32")
    order = np.random.default_rng(config.training.seed).permutation(len(features))
    factor = (END_RATE / START_RATE) ** (1.0 / max(steps - 1, 1))
    rates, losses, smoothed = [], [], []
    average, best = 0.0, math.inf
    stopped_early = False
    for step in range(steps):
        rate = START_RATE * factor ** step
        head.optimizer.learning_rate.assign(rate)
        start = (step % batches_per_pass) * batch_size
        rows = order[start:start + batch_size]
        result = head.train_on_batch(features[rows], targets[rows], return_dict=True)
        loss = float(result["loss"])
        if not math.isfinite(loss):
            stopped_early = True
            break
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        value = average / (1 - SMOOTHING ** (step + 1))
        rates.append(rate)
        losses.append(loss)
        smoothed.append(value)
        best = min(best, value)
        if progress:
            progress(step + 1, steps)
        if step > 10 and value > BLOW_UP * best:
            stopped_early = True
            break
    keras.backend.clear_session()
    return {"learning_rates": rates, "losses": losses, "smoothed": smoothed, "steps": len(rates),
            "stopped_early": stopped_early, **suggestion(rates, smoothed)}


def suggestion(rates: list, smoothed: list) -> dict:
    """{"suggested": a tenth of the rate at the smoothed loss's minimum, "minimum_at": that rate}."""
    if not rates:
        return {"suggested": None, "minimum_at": None}
    lowest = int(np.argmin(smoothed))
    return {"suggested": float(rates[lowest] / 10), "minimum_at": float(rates[lowest])}


def find_learning_rate(config, progress: Optional[Callable[[str, int, int], None]] = None) -> dict:
    """The range test on `config`'s data folder, from the feature cache (the backbone runs only if it must).

    The training images are those a run would train on: the `train` folder of a pre-split
    folder; otherwise all images (the range test only looks at the training loss, so the
    images a run would hold out do no harm here).

    Returns:
        `range_test`'s result plus "images", "backbone" and "feature_seconds".

    Raises:
        engine.data.DataError: the folder cannot be read; WeightsUnavailableError: no weights offline.
    """
    from engine.label_issues import folder_features

    folder = folder_features(config.data.path, config, progress)
    rows = folder.training_rows()
    labels = folder.label_indices()
    result = range_test(folder.features[rows], labels[rows], config, len(folder.classes),
                        (lambda step, steps: progress("Range test", step, steps)) if progress else None)
    return {**result, "images": int(len(rows)), "backbone": folder.backbone,
            "feature_seconds": folder.seconds.get("features")}
