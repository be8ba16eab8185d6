"""The training worker: everything one run does, from scanning the data to writing its evaluation.

`run_training(run_dir)` reads `config.json` from the run folder and writes every
other file of the folder (see README, "The run folder"). It is what
`python -m engine train` runs in the foreground and what a worker process runs.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import numpy as np

from engine import runfiles
from engine.config import RunConfig
from engine.data import DataError, make_split, scan_dataset, split_counts
from engine.runs import StatusWriter, now_iso

logger = logging.getLogger("engine.train")


def _attach_log_file(run_dir: Path, echo) -> logging.Handler:
    handler = logging.FileHandler(run_dir / runfiles.LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("engine")
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    return handler


def one_line(error: BaseException) -> str:
    """A readable one-line message for status.json."""
    text = " ".join(str(error).split()) or type(error).__name__
    if not isinstance(error, (ValueError, DataError)):
        text = f"{type(error).__name__}: {text}"
    return text if len(text) <= 400 else text[:397] + "..."


def run_training(run_dir: str | os.PathLike, echo=None) -> str:
    """Trains, saves and evaluates the run in `run_dir`.

    Args:
        run_dir: A folder made by `engine.runs.create_run`.
        echo: A stream to print progress on (the CLI's terminal), or None.

    Returns:
        The final state: "finished", "stopped" or "failed". A failure never raises:
        it ends with state "failed", a one-line message in status.json and the
        traceback in worker.log.
    """
    run_dir = Path(run_dir)
    status = StatusWriter(run_dir)
    handler = _attach_log_file(run_dir, echo)
    status.update(state="running", phase="preparing", message="Starting.", pid=os.getpid(),
                  started=now_iso(), error=None)
    status.start_heartbeat()
    try:
        state = _train(run_dir, status, echo)
        return state
    except BaseException as error:  # noqa: BLE001 - every failure must end as a readable status
        logger.error("Run failed:\n%s", traceback.format_exc())
        message = one_line(error) if not isinstance(error, KeyboardInterrupt) else "Interrupted."
        status.update(state="failed", phase="failed", message=message, error=message, finished=now_iso())
        if echo is not None:
            print(f"\nerror: {message}", file=echo, flush=True)
        if isinstance(error, KeyboardInterrupt):
            raise
        return "failed"
    finally:
        status.stop_heartbeat()
        logging.getLogger("engine").removeHandler(handler)
        handler.close()


def _say(status: StatusWriter, echo, phase: str, message: str) -> None:
    logger.info(message)
    status.update(phase=phase, message=message)
    if echo is not None:
        print(message, file=echo, flush=True)


def _train(run_dir: Path, status: StatusWriter, echo) -> str:
    config = RunConfig.load(run_dir / runfiles.CONFIG_FILE)
    logger.info("Config: %s", config.to_json())

    _say(status, echo, "checking data", f"Checking the images in {config.data.path}.")
    scan = scan_dataset(
        config.data.path,
        progress=lambda done, total: status.update(message=f"Checking images: {done}/{total}."),
    )
    manifest = make_split(scan, config.data.validation_fraction, config.data.test_fraction,
                          config.data.split_seed, config.data.subset_fraction)
    report = scan.report()

    image_size = config.model.resolved_image_size
    _say(status, echo, "caching images", f"Decoding {len(manifest)} images once at {image_size}×{image_size}.")
    from engine.pipeline import build_image_cache

    cache = build_image_cache(
        [item.path for item in manifest], image_size, cache=config.data.cache,
        progress=lambda done, total: status.update(message=f"Decoding images: {done}/{total}."),
    )
    if cache.failed:
        # Files that changed or broke after the scan: excluded with a reason, the rest still trains.
        for index, reason in sorted(cache.failed.items()):
            item = manifest[index]
            report["excluded"].append({"path": item.path, "label": item.label, "split": item.split, "reason": reason})
        report["num_excluded"] = len(report["excluded"])
    kept = [(item, index) for index, item in enumerate(manifest) if index not in cache.failed]
    manifest = [item for item, _ in kept]
    cache_positions = [index for _, index in kept]
    images = cache.images

    class_names = sorted({item.label for item in manifest if item.split == "train"})
    if len(class_names) < 2:
        raise DataError("At least two classes need training images; see data_report.json for what was excluded.")
    unknown = sorted({item.label for item in manifest} - set(class_names))
    if unknown:
        raise DataError(f"Class(es) {', '.join(unknown)} have validation/test images but no training images.")
    report["split_counts"] = split_counts(manifest)
    runfiles.atomic_write_json(run_dir / runfiles.DATA_REPORT_FILE, report)
    runfiles.write_csv(run_dir / runfiles.SPLIT_FILE, ["path", "label", "split"],
                       [[item.path, item.label, item.split] for item in manifest])
    runfiles.atomic_write_json(run_dir / runfiles.LABELS_FILE, {"classes": class_names})
    for warning in scan.warnings:
        logger.warning(warning)

    members = {split: [number for number, item in enumerate(manifest) if item.split == split]
               for split in ("train", "validation", "test")}
    indices = {split: [cache_positions[number] for number in numbers] for split, numbers in members.items()}
    labels = {split: np.array([class_names.index(manifest[number].label) for number in numbers], dtype=np.int32)
              for split, numbers in members.items()}
    if not indices["validation"]:
        raise DataError("No validation images: set data.validation_fraction above 0 or add a validation folder.")

    _say(status, echo, "building model", f"Building {config.model.backbone} with weights {config.model.weights}.")
    import keras

    from engine.callbacks import RunProgress
    from engine.modeling import build_model, compile_model, unfreeze_top_layers
    from engine.pipeline import make_dataset

    num_classes = len(class_names)
    binary = num_classes == 2
    model = build_model(config, num_classes)
    training = config.training

    def dataset(split, shuffle):
        return make_dataset(_take(images, indices[split]), labels[split], training.batch_size,
                            shuffle=shuffle, seed=training.seed, binary=binary)

    train_data = dataset("train", True)
    validation_data = dataset("validation", False)
    steps_per_epoch = math.ceil(len(indices["train"]) / training.batch_size)
    fine_tuning = config.fine_tuning
    total_epochs = training.epochs + (fine_tuning.epochs if fine_tuning.enabled else 0)
    class_weight = _class_weights(labels["train"], num_classes) if training.class_weight == "balanced" else None
    started_at = time.time()

    compile_model(model, training.optimizer, training.learning_rate, num_classes)
    progress = RunProgress(run_dir, status, 1, steps_per_epoch, training.batch_size, total_epochs, started_at, echo)
    _say(status, echo, "phase 1: training the new head",
         f"Phase 1: training the new head for {training.epochs} epochs on {len(indices['train'])} images.")
    history = model.fit(train_data, validation_data=validation_data, epochs=training.epochs,
                        callbacks=[progress] + _keras_callbacks(config, run_dir),
                        class_weight=class_weight, shuffle=False, verbose=0)
    epochs_done = len(history.epoch)
    stopped = progress.stop_requested

    if fine_tuning.enabled and not stopped:
        unfrozen = unfreeze_top_layers(model, fine_tuning.layers)
        compile_model(model, training.optimizer, fine_tuning.learning_rate, num_classes)
        _say(status, echo, "phase 2: fine-tuning",
             f"Phase 2: fine-tuning the last {fine_tuning.layers} layers of the base ({unfrozen} with weights; "
             f"BatchNorm stays frozen) at learning rate {fine_tuning.learning_rate:g}.")
        total_epochs = epochs_done + fine_tuning.epochs
        progress = RunProgress(run_dir, status, 2, steps_per_epoch, training.batch_size, total_epochs,
                               started_at, echo)
        history = model.fit(train_data, validation_data=validation_data, initial_epoch=epochs_done,
                            epochs=total_epochs, callbacks=[progress] + _keras_callbacks(config, run_dir),
                            class_weight=class_weight, shuffle=False, verbose=0)
        epochs_done += len(history.epoch)
        stopped = progress.stop_requested

    _say(status, echo, "saving", "Saving the model.")
    save_model_atomically(model, run_dir / runfiles.MODEL_FILE)

    _say(status, echo, "evaluating", "Evaluating on the validation and test images.")
    from engine.evaluate import predict_probabilities, write_evaluation

    split_results = {}
    for split in ("validation", "test"):
        if indices[split]:
            probabilities = predict_probabilities(model, _take(images, indices[split]), num_classes)
            split_results[split] = ([manifest[number].path for number in members[split]],
                                    labels[split], probabilities)
    evaluation = write_evaluation(run_dir, class_names, split_results)
    accuracy = evaluation["splits"]["validation"]["accuracy"]
    final_state = "stopped" if stopped else "finished"
    message = (f"{'Stopped' if stopped else 'Finished'} after {epochs_done} epochs: "
               f"validation accuracy {accuracy:.3f}.")
    status.update(state=final_state, phase=final_state, message=message, finished=now_iso(),
                  epoch=epochs_done, eta_seconds=0, validation_accuracy=accuracy)
    logger.info(message)
    if echo is not None:
        print(message, file=echo, flush=True)
    return final_state


def _take(images, positions: list[int]) -> np.ndarray:
    """The cached images at these positions (a contiguous view when they are consecutive)."""
    if not positions:
        return images[:0]
    if positions == list(range(positions[0], positions[0] + len(positions))):
        return images[positions[0]:positions[0] + len(positions)]
    return np.asarray(images[positions])


def _class_weights(train_labels: np.ndarray, num_classes: int) -> dict:
    """Weights inversely proportional to class frequency (scikit-learn's 'balanced')."""
    counts = np.bincount(train_labels, minlength=num_classes)
    total = counts.sum()
    return {index: float(total / (num_classes * count)) if count else 0.0 for index, count in enumerate(counts)}


def _keras_callbacks(config: RunConfig, run_dir: Path) -> list:
    import keras

    callbacks = []
    early = config.callbacks.early_stopping
    if early.enabled:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor=early.monitor, patience=early.patience, min_delta=early.min_delta,
            restore_best_weights=True, mode="auto"))
    checkpoint = config.callbacks.checkpoint
    if checkpoint.enabled:
        callbacks.append(keras.callbacks.ModelCheckpoint(
            str(run_dir / "best.keras"), monitor=checkpoint.monitor, save_best_only=True))
    reduce_lr = config.callbacks.reduce_lr
    if reduce_lr.enabled:
        callbacks.append(keras.callbacks.ReduceLROnPlateau(
            monitor=reduce_lr.monitor, factor=reduce_lr.factor, patience=reduce_lr.patience,
            min_lr=reduce_lr.min_learning_rate))
    return callbacks


def save_model_atomically(model, path: Path) -> None:
    """Saves a Keras model so that `path` is either the old complete file or the new one."""
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp.keras")
    try:
        model.save(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
