"""The training worker: everything one run does, from scanning the data to writing its evaluation.

`run_training(run_dir)` reads `config.json` from the run folder and writes every
other file of the folder (see README, "The run folder"). It is what
`python -m engine train` runs in the foreground and what `python -m engine worker`
runs for a detached run. A run saves a checkpoint after every epoch; when one is
present the run resumes from it, on the same split, counting epochs on.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine import runfiles
from engine.config import RunConfig
from engine.data import DataError, SplitItem, make_split, scan_dataset, split_counts
from engine.runs import StatusWriter, now_iso

logger = logging.getLogger("engine.train")

STOP_REQUEST_FILE = runfiles.STOP_REQUEST_FILE
CHECKPOINT_MODEL_FILE = runfiles.CHECKPOINT_MODEL_FILE
CHECKPOINT_STATE_FILE = runfiles.CHECKPOINT_STATE_FILE


class StopRequested(Exception):
    """The user asked the run to stop before training began."""


def one_line(error: BaseException) -> str:
    """A readable one-line message for status.json."""
    text = " ".join(str(error).split()) or type(error).__name__
    if not isinstance(error, ValueError):
        text = f"{type(error).__name__}: {text}"
    return text if len(text) <= 400 else text[:397] + "..."


def run_training(run_dir: str | os.PathLike, echo=None) -> str:
    """Trains, saves and evaluates the run in `run_dir` (resuming from its checkpoint if it has one).

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
    handler = logging.FileHandler(run_dir / runfiles.LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    engine_logger = logging.getLogger("engine")
    engine_logger.setLevel(logging.INFO)
    engine_logger.addHandler(handler)
    status.update(state="running", phase="preparing", message="Starting.", pid=os.getpid(),
                  host=socket.gethostname(), started=now_iso(), error=None)
    status.start_heartbeat()
    try:
        return _train(run_dir, status, echo)
    except StopRequested:
        message = "Stopped before training began."
        status.update(state="stopped", phase="stopped", message=message, finished=now_iso(), eta_seconds=0)
        logger.info(message)
        return "stopped"
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
        engine_logger.removeHandler(handler)
        handler.close()


def _say(status: StatusWriter, echo, phase: str, message: str) -> None:
    logger.info(message)
    status.update(phase=phase, message=message)
    if echo is not None:
        print(message, file=echo, flush=True)


@dataclass
class PreparedData:
    """The split, the decoded images and the per-split positions and labels."""

    class_names: list
    images: np.ndarray
    positions: dict
    labels: dict
    paths: dict


def _prepare_data(run_dir: Path, config: RunConfig, status: StatusWriter, echo, check_stop) -> PreparedData:
    """Scans and splits the data (or re-reads the split of a resumed run) and decodes it once."""
    resumed_split = runfiles.read_csv(run_dir / runfiles.SPLIT_FILE) if _checkpoint_state(run_dir) else []
    if resumed_split:
        manifest = [SplitItem(row["path"], row["label"], row["split"]) for row in resumed_split]
        report = runfiles.read_json(run_dir / runfiles.DATA_REPORT_FILE) or {"excluded": []}
        _say(status, echo, "checking data", f"Resuming on the same split of {len(manifest)} images.")
    else:
        _say(status, echo, "checking data", f"Checking the images in {config.data.path}.")

        def scan_progress(done, total):
            check_stop()
            status.update(message=f"Checking images: {done}/{total}.")

        scan = scan_dataset(config.data.path, progress=scan_progress)
        manifest = make_split(scan, config.data.validation_fraction, config.data.test_fraction,
                              config.data.split_seed, config.data.subset_fraction)
        report = scan.report()
        for warning in scan.warnings:
            logger.warning(warning)

    image_size = config.model.resolved_image_size
    _say(status, echo, "caching images", f"Decoding {len(manifest)} images once at {image_size}×{image_size}.")
    from engine.pipeline import build_image_cache

    def cache_progress(done, total):
        check_stop()
        status.update(message=f"Decoding images: {done}/{total}.")

    cache = build_image_cache([item.path for item in manifest], image_size, cache=config.data.cache,
                              progress=cache_progress)
    if cache.failed:
        # Files that changed or broke after the scan: excluded with a reason, the rest still trains.
        for index, reason in sorted(cache.failed.items()):
            item = manifest[index]
            report["excluded"].append({"path": item.path, "label": item.label, "split": item.split, "reason": reason})
        report["num_excluded"] = len(report["excluded"])
    kept = [(item, index) for index, item in enumerate(manifest) if index not in cache.failed]

    class_names = sorted({item.label for item, _ in kept if item.split == "train"})
    if len(class_names) < 2:
        raise DataError("At least two classes need training images; see data_report.json for what was excluded.")
    unknown = sorted({item.label for item, _ in kept} - set(class_names))
    if unknown:
        raise DataError(f"Class(es) {', '.join(unknown)} have validation/test images but no training images.")
    report["split_counts"] = split_counts([item for item, _ in kept])
    runfiles.atomic_write_json(run_dir / runfiles.DATA_REPORT_FILE, report)
    runfiles.write_csv(run_dir / runfiles.SPLIT_FILE, ["path", "label", "split"],
                       [[item.path, item.label, item.split] for item, _ in kept])
    runfiles.atomic_write_json(run_dir / runfiles.LABELS_FILE, {"classes": class_names})

    splits = ("train", "validation", "test")
    members = {split: [(item, index) for item, index in kept if item.split == split] for split in splits}
    if not members["validation"]:
        raise DataError("No validation images: set data.validation_fraction above 0 or add a validation folder.")
    return PreparedData(
        class_names=class_names,
        images=cache.images,
        positions={split: [index for _, index in pairs] for split, pairs in members.items()},
        labels={split: np.array([class_names.index(item.label) for item, _ in pairs], dtype=np.int32)
                for split, pairs in members.items()},
        paths={split: [item.path for item, _ in pairs] for split, pairs in members.items()},
    )


def _checkpoint_state(run_dir: Path) -> dict:
    state = runfiles.read_json(run_dir / CHECKPOINT_STATE_FILE)
    if isinstance(state, dict) and (run_dir / CHECKPOINT_MODEL_FILE).is_file():
        return state
    return {}


def _train(run_dir: Path, status: StatusWriter, echo) -> str:
    config = RunConfig.load(run_dir / runfiles.CONFIG_FILE)
    logger.info("Config: %s", config.to_json())
    stop_path = run_dir / STOP_REQUEST_FILE

    def check_stop():
        if stop_path.exists():
            raise StopRequested()

    data = _prepare_data(run_dir, config, status, echo, check_stop)
    check_stop()

    import keras

    from engine.callbacks import EpochCheckpoint, RunProgress, StopTrainingNow
    from engine.modeling import build_model, compile_model, unfreeze_top_layers
    from engine.pipeline import make_dataset

    training, fine_tuning = config.training, config.fine_tuning
    num_classes = len(data.class_names)
    checkpoint = _checkpoint_state(run_dir)
    if checkpoint:
        import engine.layers  # noqa: F401 - registers our layers for safe-mode loading

        _say(status, echo, "building model", f"Resuming from the checkpoint after epoch {checkpoint['epoch']}.")
        model = keras.models.load_model(run_dir / CHECKPOINT_MODEL_FILE, safe_mode=True, compile=True)
        runfiles.append_jsonl(run_dir / runfiles.METRICS_FILE, [
            {"type": "resume", "epoch": int(checkpoint["epoch"]), "phase": int(checkpoint.get("phase", 1)),
             "time": time.time()}])
    else:
        _say(status, echo, "building model", f"Building {config.model.backbone} with weights {config.model.weights}.")
        model = build_model(config, num_classes)
        compile_model(model, training.optimizer, training.learning_rate, num_classes)
    epochs_done = int(checkpoint.get("epoch", 0))
    phase = int(checkpoint.get("phase", 1))
    phase1_epochs = int(checkpoint.get("phase1_epochs", training.epochs if phase == 2 else 0)) or training.epochs
    started_at = time.time() - float(checkpoint.get("elapsed_seconds", 0.0))

    def dataset(split, shuffle):
        return make_dataset(_take(data.images, data.positions[split]), data.labels[split], training.batch_size,
                            shuffle=shuffle, seed=training.seed + epochs_done, binary=num_classes == 2)

    train_data, validation_data = dataset("train", True), dataset("validation", False)
    steps_per_epoch = math.ceil(len(data.positions["train"]) / training.batch_size)
    class_weight = _class_weights(data.labels["train"], num_classes) if training.class_weight == "balanced" else None
    planned = training.epochs + (fine_tuning.epochs if fine_tuning.enabled else 0)
    stopped = False

    def fit(phase_number, initial_epoch, final_epoch, total_epochs):
        progress = RunProgress(run_dir, status, phase_number, steps_per_epoch, training.batch_size,
                               total_epochs, started_at, echo)
        # The checkpoint is saved before the epoch's metrics event is written, so a worker
        # killed in between never leaves an epoch in metrics.jsonl that resume would repeat.
        saver = EpochCheckpoint(run_dir, phase_number, phase1_epochs if phase_number == 2 else None, started_at)
        try:
            model.fit(train_data, validation_data=validation_data, initial_epoch=initial_epoch,
                      epochs=final_epoch, callbacks=[saver, progress] + _keras_callbacks(config, run_dir),
                      class_weight=class_weight, shuffle=False, verbose=0)
        except StopTrainingNow:
            logger.info("Stop requested: leaving training after the current batch.")
        return progress.completed_epochs, progress.stop_requested

    if phase == 1 and epochs_done < training.epochs:
        _say(status, echo, "phase 1: training the new head",
             f"Phase 1: training the new head for epochs {epochs_done + 1}–{training.epochs} "
             f"on {len(data.positions['train'])} images.")
        done, stopped = fit(1, epochs_done, training.epochs, planned)
        epochs_done += done
        phase1_epochs = epochs_done

    if fine_tuning.enabled and not stopped:
        unfrozen = unfreeze_top_layers(model, fine_tuning.layers)
        compile_model(model, training.optimizer, fine_tuning.learning_rate, num_classes)
        final_epoch = phase1_epochs + fine_tuning.epochs
        if epochs_done < final_epoch:
            _say(status, echo, "phase 2: fine-tuning",
                 f"Phase 2: fine-tuning the last {fine_tuning.layers} layers of the base ({unfrozen} with weights; "
                 f"BatchNorm stays frozen) at learning rate {fine_tuning.learning_rate:g}, "
                 f"epochs {epochs_done + 1}–{final_epoch}.")
            done, stopped = fit(2, epochs_done, final_epoch, final_epoch)
            epochs_done += done

    _say(status, echo, "saving", "Saving the model.")
    save_model_atomically(model, run_dir / runfiles.MODEL_FILE)

    _say(status, echo, "evaluating", "Evaluating on the validation and test images.")
    from engine.evaluate import predict_probabilities, write_evaluation

    split_results = {}
    for split in ("validation", "test"):
        if data.positions[split]:
            probabilities = predict_probabilities(model, _take(data.images, data.positions[split]), num_classes)
            split_results[split] = (data.paths[split], data.labels[split], probabilities)
    evaluation = write_evaluation(run_dir, data.class_names, split_results)
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
    """The cached images at these positions (a view, without copying, when they are consecutive)."""
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
    runfiles.write_through_temporary(path, model.save)
