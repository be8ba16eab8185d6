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
from typing import Optional

import numpy as np

from engine import runfiles
from engine.config import RunConfig
from engine.data import DataError, SplitItem, make_split, scan_dataset, split_counts
from engine.runs import StatusWriter, now_iso

logger = logging.getLogger("engine.train")

# Batches per TensorFlow call when the head trains on cached features: 10 epochs on 2000
# features took 1.7 s at 1 and 0.85 s at 32 (2 cores), and a stop still lands within ~0.1 s.
HEAD_STEPS_PER_EXECUTION = 32
VALIDATION_FEATURE_BATCH = 1024
STOP_REQUEST_FILE = runfiles.STOP_REQUEST_FILE
CHECKPOINT_MODEL_FILE = runfiles.CHECKPOINT_MODEL_FILE
CHECKPOINT_STATE_FILE = runfiles.CHECKPOINT_STATE_FILE
FAULT_VARIABLE = runfiles.FAULT_VARIABLE
fault_point = runfiles.fault_point


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
        _remove_dead_saves(run_dir)
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


def _remove_dead_saves(run_dir: Path) -> None:
    """Deletes the temporaries (`.<pid>.model.keras`, `.<pid>.checkpoint.keras`…) of a worker killed mid-save.

    Only this run's worker writes them and only one worker runs a run (it holds the run's
    lock), so any that is not this process's own is dead; each can be as large as the model.
    """
    for path in run_dir.glob(".*.keras"):
        pid = path.name.split(".")[1]
        if pid.isdigit() and int(pid) != os.getpid():
            logger.info("Removing %s, left by a worker that ended while saving.", path.name)
            path.unlink(missing_ok=True)


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
    image_key: Optional[str] = None


def _prepare_data(run_dir: Path, config: RunConfig, status: StatusWriter, echo, check_stop) -> PreparedData:
    """Scans and splits the data (or re-reads the split of a resumed run) and decodes every image once."""
    from engine.pipeline import build_image_cache, scan_and_decode

    resumed_split = runfiles.read_csv(run_dir / runfiles.SPLIT_FILE) if _checkpoint_state(run_dir) else []
    image_size = config.model.resolved_image_size
    if resumed_split:
        _say(status, echo, "checking data", f"Resuming on the same split of {len(resumed_split)} images.")
    else:
        _say(status, echo, "checking data",
             f"Checking the images in {config.data.path} and decoding them once at {image_size}×{image_size}.")

    def progress(done, total):
        check_stop()
        status.update(message=f"Checking and decoding images: {done}/{total}.")

    def read_and_decode():
        if config.data.subset_fraction < 1.0:
            # A subset decodes only the images it keeps, after a scan that checks them all.
            if resumed_split:
                manifest, report = _resumed_split(run_dir, resumed_split)
            else:
                scan = scan_dataset(config.data.path, progress=progress)
                manifest, report = _split(scan, config)
            cache = build_image_cache([item.path for item in manifest], image_size, cache=config.data.cache,
                                      progress=progress)
            return manifest, report, cache, list(range(len(manifest)))
        # The whole folder, checked and decoded in one pass into one cache that any split reuses.
        scan, cache = scan_and_decode(config.data.path, image_size, cache=config.data.cache, progress=progress)
        manifest, report = _resumed_split(run_dir, resumed_split) if resumed_split else _split(scan, config)
        row_of = {path: row for row, path in enumerate(scan.candidates)}
        return manifest, report, cache, [row_of.get(item.path, -1) for item in manifest]

    manifest, report, cache, rows = _while_the_folder_stays(config.data.path, read_and_decode)

    failures = {}
    for index, row in enumerate(rows):
        if row < 0:
            failures[index] = "no longer in the data folder"
        elif row in cache.failed:
            failures[index] = cache.failed[row]
    if failures:
        # Files that changed, broke or went away after the scan: excluded with a reason, the rest still trains.
        for index, reason in sorted(failures.items()):
            item = manifest[index]
            report["excluded"].append({"path": item.path, "label": item.label, "split": item.split, "reason": reason})
        report["num_excluded"] = len(report["excluded"])
    kept = [(item, rows[index]) for index, item in enumerate(manifest) if index not in failures]

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
    members = {split: [(item, row) for item, row in kept if item.split == split] for split in splits}
    if not members["validation"]:
        raise DataError("No validation images: set data.validation_fraction above 0 or add a validation folder.")
    return PreparedData(
        class_names=class_names,
        images=cache.images,
        positions={split: [row for _, row in pairs] for split, pairs in members.items()},
        labels={split: np.array([class_names.index(item.label) for item, _ in pairs], dtype=np.int32)
                for split, pairs in members.items()},
        paths={split: [item.path for item, _ in pairs] for split, pairs in members.items()},
        image_key=cache.key,
    )


def _while_the_folder_stays(folder: str, read):
    """Returns `read()`, failing the run with one sentence naming `folder` if it vanishes meanwhile.

    Without this, a folder that disappears half-way ends with whatever breaks first (a bare
    FileNotFoundError, "At least two classes…"), or a run that trains on the images read
    before it went, the rest excluded as unreadable. Once the images are decoded, training
    and evaluation read only the image cache, so a folder that goes later does not matter.
    """
    path = Path(folder).expanduser()
    was_there = path.is_dir()
    try:
        result = read()
    except (OSError, DataError) as error:
        if was_there and not path.is_dir():
            raise DataError(_vanished(folder)) from error
        raise
    if was_there and not path.is_dir():
        raise DataError(_vanished(folder))
    return result


def _vanished(folder: str) -> str:
    return (f"The data folder {folder!r} disappeared while its images were being read; "
            "put it back and resume the run.")


def _resumed_split(run_dir: Path, rows: list[dict]) -> tuple[list[SplitItem], dict]:
    """The manifest and data report a resumed run trained on, from its split.csv and data_report.json."""
    manifest = [SplitItem(row["path"], row["label"], row["split"]) for row in rows]
    return manifest, runfiles.read_json(run_dir / runfiles.DATA_REPORT_FILE) or {"excluded": []}


def _split(scan, config: RunConfig) -> tuple[list[SplitItem], dict]:
    """The split manifest and the data report of a fresh run; scan warnings go to the log."""
    manifest = make_split(scan, config.data.validation_fraction, config.data.test_fraction,
                          config.data.split_seed, config.data.subset_fraction)
    for warning in scan.warnings:
        logger.warning(warning)
    return manifest, scan.report()


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
    from engine.modeling import build_head, build_model, compile_model, copy_head_weights, unfreeze_top_layers
    from engine.pipeline import make_dataset

    training, fine_tuning = config.training, config.fine_tuning
    num_classes = len(data.class_names)
    checkpoint = _checkpoint_state(run_dir)
    epochs_done = int(checkpoint.get("epoch", 0))
    phase = int(checkpoint.get("phase", 1))
    phase1_epochs = int(checkpoint.get("phase1_epochs", training.epochs if phase == 2 else 0)) or training.epochs
    started_at = time.time() - float(checkpoint.get("elapsed_seconds", 0.0))
    steps_per_epoch = math.ceil(len(data.positions["train"]) / training.batch_size)
    class_weight = _class_weights(data.labels["train"], num_classes) if training.class_weight == "balanced" else None
    planned = training.epochs + (fine_tuning.epochs if fine_tuning.enabled else 0)
    binary = num_classes == 2
    checkpointed_model = None
    if checkpoint:
        import engine.layers  # noqa: F401 - registers our layers for safe-mode loading

        _say(status, echo, "building model", f"Resuming from the checkpoint after epoch {checkpoint['epoch']}.")
        checkpointed_model = keras.models.load_model(run_dir / CHECKPOINT_MODEL_FILE, safe_mode=True, compile=True)
        runfiles.append_jsonl(run_dir / runfiles.METRICS_FILE, [
            {"type": "resume", "epoch": int(checkpoint["epoch"]), "phase": phase, "time": time.time()}])

    # The full model (base + head) is built only when something needs it: with cached
    # features, a head can train before the base is even loaded.
    built = {}

    def full_model():
        if "model" not in built:
            if checkpointed_model is not None and checkpoint.get("model", "full") == "full":
                built["model"] = checkpointed_model
            else:
                _say(status, echo, "building model",
                     f"Building {config.model.backbone} with weights {config.model.weights}.")
                built["model"] = build_model(config, num_classes)
                compile_model(built["model"], training.optimizer, training.learning_rate, num_classes)
        return built["model"]

    def fit(fit_model, train_data, validation_data, phase_number, final_epoch, total_epochs, kind, callbacks):
        progress = RunProgress(run_dir, status, phase_number, steps_per_epoch, training.batch_size,
                               total_epochs, started_at, echo)
        # The checkpoint is saved before the epoch's metrics event is written, so a worker
        # killed in between never leaves an epoch in metrics.jsonl that resume would repeat.
        saver = EpochCheckpoint(run_dir, phase_number, phase1_epochs if phase_number == 2 else None, started_at,
                                kind=kind)
        try:
            fit_model.fit(train_data, validation_data=validation_data, initial_epoch=epochs_done,
                          epochs=final_epoch, callbacks=[saver, progress] + callbacks,
                          class_weight=class_weight, shuffle=False, verbose=0)
        except StopTrainingNow:
            logger.info("Stop requested: leaving training after the current batch.")
        return progress.completed_epochs, progress.stop_requested

    def image_data(split, shuffle):
        # Batches gathered from the decode-once image cache; the seed moves on with the epochs.
        return make_dataset(data.images, data.labels[split], training.batch_size, shuffle=shuffle,
                            seed=training.seed + epochs_done, binary=binary, rows=data.positions[split])

    stopped = False
    head = None
    features = {}
    if phase == 1 and training.cached_features:
        from engine.features import make_feature_dataset

        features = _cached_features(config, data, full_model, status, echo, check_stop)
        if checkpointed_model is not None:
            head = checkpointed_model
        else:
            head = build_head(config, num_classes, features["validation"].shape[-1])
            compile_model(head, training.optimizer, training.learning_rate, num_classes,
                          steps_per_execution=HEAD_STEPS_PER_EXECUTION)
        if epochs_done < training.epochs:
            _say(status, echo, "phase 1: training the new head",
                 f"Phase 1: training the new head on cached features for epochs {epochs_done + 1}–"
                 f"{training.epochs} on {len(data.positions['train'])} images.")
            train_data = make_feature_dataset(features["train"], data.labels["train"], training.batch_size,
                                              shuffle=True, seed=training.seed + epochs_done, binary=binary)
            # Validation batches only compute metrics (averaged per image), so their size changes
            # nothing but the per-batch overhead.
            validation_data = make_feature_dataset(features["validation"], data.labels["validation"],
                                                   max(training.batch_size, VALIDATION_FEATURE_BATCH), binary=binary)
            done, stopped = fit(head, train_data, validation_data, 1, training.epochs, planned, "head",
                                _keras_callbacks(config, run_dir, full_model))
            epochs_done += done
            phase1_epochs = epochs_done
        model = full_model()
        copy_head_weights(head, model)
    else:
        model = full_model()
        if phase == 1 and epochs_done < training.epochs:
            _say(status, echo, "phase 1: training the new head",
                 f"Phase 1: training the new head for epochs {epochs_done + 1}–{training.epochs} "
                 f"on {len(data.positions['train'])} images, every image through the base every epoch.")
            done, stopped = fit(model, image_data("train", True), image_data("validation", False), 1,
                                training.epochs, planned, "full", _keras_callbacks(config, run_dir))
            epochs_done += done
            phase1_epochs = epochs_done

    fine_tuned = False
    if fine_tuning.enabled and not stopped:
        unfrozen = unfreeze_top_layers(model, fine_tuning.layers)
        compile_model(model, training.optimizer, fine_tuning.learning_rate, num_classes)
        final_epoch = phase1_epochs + fine_tuning.epochs
        if epochs_done < final_epoch:
            _say(status, echo, "phase 2: fine-tuning",
                 f"Phase 2: fine-tuning the last {fine_tuning.layers} layers of the base ({unfrozen} with weights; "
                 f"BatchNorm stays frozen) at learning rate {fine_tuning.learning_rate:g}, "
                 f"epochs {epochs_done + 1}–{final_epoch}.")
            # Fine-tuning changes the base, so it trains end to end, on the decode-once image cache.
            done, stopped = fit(model, image_data("train", True), image_data("validation", False), 2, final_epoch,
                                final_epoch, "full", _keras_callbacks(config, run_dir))
            epochs_done += done
            fine_tuned = True

    _say(status, echo, "saving", "Saving the model.")
    save_model_atomically(model, run_dir / runfiles.MODEL_FILE)

    _say(status, echo, "evaluating", "Evaluating on the validation and test images.")
    from engine.evaluate import predict_probabilities, write_evaluation
    from engine.modeling import probabilities_per_class

    split_results = {}
    for split in ("validation", "test"):
        if not data.positions[split]:
            continue
        if head is not None and not fine_tuned and split in features:
            # The base did not change after the features were computed, so the head on the
            # cached features gives what the full model gives on the images (tested).
            probabilities = probabilities_per_class(head.predict(features[split], verbose=0), num_classes)
        else:
            probabilities = predict_probabilities(model, data.images, num_classes, rows=data.positions[split])
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


def _cached_features(config: RunConfig, data: PreparedData, full_model, status: StatusWriter, echo,
                     check_stop) -> dict:
    """The frozen base's pooled features per split, from the cache or computed once now.

    Returns:
        {split: (N, D) features} for the splits that have images; with augmentation, "train"
        holds (K, N, D) augmented views.
    """
    from engine.features import (build_feature_extractor, compute_features, feature_cache_key,
                                 load_cached_features, save_cached_features)

    views = config.augmentation.views if config.augmentation.enabled else 0
    image_key = data.image_key if config.data.cache == "disk" else None
    # The un-augmented features of every image the run uses, by image-cache row: another
    # split, seed or head of the same folder finds them under the same key. With
    # augmentation, also K augmented views of the training images.
    used_rows = sorted({row for rows in data.positions.values() for row in rows})
    jobs = [FeatureJob(used_rows, 0)]
    if views:
        jobs.append(FeatureJob(data.positions["train"], views))
    for job in jobs:
        job.key = feature_cache_key(image_key, config, job.positions, job.views)
        job.array = load_cached_features(job.key)
    missing = [job for job in jobs if job.array is None]
    total = sum(len(job.positions) * max(1, job.views) for job in missing)
    if total:
        model = full_model()
        extractor = build_feature_extractor(model)
        augmentation = model.get_layer("augmentation") if views else None
        _say(status, echo, "computing features",
             f"Computing {config.model.backbone} features of {total} images once "
             f"({views} augmented views of each training image)." if views else
             f"Computing {config.model.backbone} features of {total} images once.")
        done = [0]
        began = time.time()

        def progress(count):
            check_stop()
            done[0] += count
            rate = done[0] / max(time.time() - began, 1e-9)
            status.update(message=f"Computing features: {done[0]}/{total} images ({rate:.0f}/s).",
                          images_per_second=round(rate, 1),
                          eta_seconds=round((total - done[0]) / max(rate, 1e-9), 1))

        for job in missing:
            job.array = compute_features(extractor, data.images, job.positions, augmentation, job.views, progress)
            save_cached_features(job.key, job.array)
        seconds = time.time() - began
        logger.info("Features of %d images computed in %.1f s (%.0f images/s).", total, seconds,
                    total / max(seconds, 1e-9))
    else:
        _say(status, echo, "computing features", "Backbone features found in the cache; nothing to compute.")
    index_of_row = {row: index for index, row in enumerate(used_rows)}
    features = {split: jobs[0].array[[index_of_row[row] for row in rows]]
                for split, rows in data.positions.items() if rows}
    if views:
        features["train"] = jobs[1].array
    return features


@dataclass
class FeatureJob:
    """One feature array: its image rows, its augmented views (0 = none), its cache key and contents."""

    positions: list
    views: int
    key: Optional[str] = None
    array: Optional[np.ndarray] = None


def _class_weights(train_labels: np.ndarray, num_classes: int) -> dict:
    """Weights inversely proportional to class frequency (scikit-learn's 'balanced')."""
    counts = np.bincount(train_labels, minlength=num_classes)
    total = counts.sum()
    return {index: float(total / (num_classes * count)) if count else 0.0 for index, count in enumerate(counts)}


def _keras_callbacks(config: RunConfig, run_dir: Path, full_model=None) -> list:
    """The callbacks the config switches on.

    Args:
        full_model: When training the head alone on cached features, a function returning
            the full model, so that `best.keras` is the full model, not the head.
    """
    import keras

    from engine.callbacks import BestFullModelCheckpoint

    callbacks = []
    early = config.callbacks.early_stopping
    if early.enabled:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor=early.monitor, patience=early.patience, min_delta=early.min_delta,
            restore_best_weights=True, mode="auto"))
    checkpoint = config.callbacks.checkpoint
    if checkpoint.enabled:
        best_path = run_dir / runfiles.BEST_MODEL_FILE
        if full_model is not None:
            callbacks.append(BestFullModelCheckpoint(best_path, checkpoint.monitor, full_model))
        else:
            callbacks.append(keras.callbacks.ModelCheckpoint(str(best_path), monitor=checkpoint.monitor,
                                                             save_best_only=True))
    reduce_lr = config.callbacks.reduce_lr
    if reduce_lr.enabled:
        callbacks.append(keras.callbacks.ReduceLROnPlateau(
            monitor=reduce_lr.monitor, factor=reduce_lr.factor, patience=reduce_lr.patience,
            min_lr=reduce_lr.min_learning_rate))
    return callbacks


def save_model_atomically(model, path: Path) -> None:
    """Saves a Keras model so that `path` is either the old complete file or the new one."""
    def write(temporary):
        model.save(temporary)
        fault_point("saving")

    runfiles.write_through_temporary(path, write)
