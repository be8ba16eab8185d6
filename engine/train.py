"""The training worker: everything one run does, from scanning the data to writing its evaluation.

`run_training(run_dir)` reads `config.json` from the run folder and writes every other
file of the folder (docs/architecture.md). It is what `python -m engine train` runs in
the foreground and what `python -m engine worker` runs for a detached run. It reads as
the phases of keras-io's transfer-learning guide:

    resume point (checkpoint.json) → data → phase 1: the new head (on cached features,
    or end to end) → phase 2: fine-tuning → save → evaluate

each a function with explicit inputs and outputs. A run saves a checkpoint after every
complete epoch; when one is present the run resumes from it, on the same split,
counting epochs on.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from engine import runfiles
from engine.config import RunConfig
from engine.data import DataError, SplitItem, make_split, scan_dataset, split_counts
from engine.status import LaunchStatus, Stage, State

logger = logging.getLogger("engine.train")

# Batches per TensorFlow call when the head trains on cached features: 10 epochs on 2000
# features took 1.7 s at 1 and 0.85 s at 32 (2 cores), and a stop still lands within ~0.1 s.
HEAD_STEPS_PER_EXECUTION = 32
VALIDATION_FEATURE_BATCH = 1024
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


def run_training(run_dir: str | os.PathLike, echo=None, launch_id: Optional[str] = None) -> State:
    """Trains, saves and evaluates the run in `run_dir` (resuming from its checkpoint if it has one).

    Holds the run's worker lock throughout, so that no other worker trains it meanwhile and
    liveness checks see it alive.

    Args:
        run_dir: A folder made by `engine.runs.create_run`.
        echo: A stream to print progress on (the CLI's terminal), or None.
        launch_id: The launch to adopt (given by the supervisor), or None when started directly.

    Returns:
        The final state: finished, stopped or failed. A failure never raises: it ends with
        state failed, a one-line message in status.json and the traceback in worker.log.

    Raises:
        IllegalTransition: the run cannot be started (it is finished, its status is unreadable,
            or the launch is no longer current).
        WorkerBusy: another live process trains the run.
    """
    from engine.executors import worker_lock

    run_dir = Path(run_dir)
    with worker_lock(run_dir):
        return _run_launch(run_dir, echo, launch_id)


def _run_launch(run_dir: Path, echo, launch_id: Optional[str]) -> State:
    status = LaunchStatus(run_dir)
    status.begin(pid=os.getpid(), host=socket.gethostname(), launch_id=launch_id)
    handler = logging.FileHandler(run_dir / runfiles.LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    engine_logger = logging.getLogger("engine")
    engine_logger.setLevel(logging.INFO)
    engine_logger.addHandler(handler)
    status.start_heartbeat()
    try:
        if (run_dir / runfiles.KILL_REQUEST_FILE).exists():
            # Kill was asked while the run was starting, before there was a process to signal.
            return _end(status, State.FAILED, "Killed by the user.", echo=echo, error="Killed by the user.")
        _remove_dead_saves(run_dir)
        return _end(status, *_train(run_dir, status, echo), echo=echo)
    except StopRequested:
        return _end(status, State.STOPPED, "Stopped before training began.", echo=echo)
    except BaseException as error:  # noqa: BLE001 - every failure must end as a readable status
        logger.error("Run failed:\n%s", traceback.format_exc())
        message = one_line(error) if not isinstance(error, KeyboardInterrupt) else "Interrupted."
        state = _end(status, State.FAILED, message, echo=echo, error=message)
        if isinstance(error, KeyboardInterrupt):
            raise
        return state
    finally:
        status.stop_heartbeat()
        engine_logger.removeHandler(handler)
        handler.close()


def _end(status: LaunchStatus, state: State, message: str, echo=None, **fields) -> State:
    """Records how this launch ended; the state returned is the one the run is in afterwards."""
    (logger.error if state is State.FAILED else logger.info)(message)
    if echo is not None:
        print(("\nerror: " if state is State.FAILED else "") + message, file=echo, flush=True)
    if status.finish(state, message, **fields) is None:
        logger.warning("The run was taken over (declared dead or relaunched) before it ended; "
                       "its own end, %s, is not recorded.", state)
        return State.FAILED
    return state


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


def _say(status: LaunchStatus, echo, stage: Stage, message: str) -> None:
    logger.info(message)
    status.update(stage=stage, message=message)
    if echo is not None:
        print(message, file=echo, flush=True)


@dataclass(frozen=True)
class ResumePoint:
    """Where a run picks up, read once from `checkpoint.json` (a fresh run starts at epoch 0, phase 1).

    Attributes:
        epochs_done: Complete epochs so far, over both phases.
        phase: The phase the checkpoint was saved in.
        phase1_epochs: How many epochs phase 1 ran (known once phase 2 began).
        elapsed_seconds: Training time so far, so elapsed times count on.
        model_kind: "full" (base + head), "head" (the head alone, trained on cached features) or
            "top" (phase 2 on cached activations: the base above the cut and the head).
    """

    epochs_done: int = 0
    phase: int = 1
    phase1_epochs: Optional[int] = None
    elapsed_seconds: float = 0.0
    model_kind: str = "full"

    @property
    def resuming(self) -> bool:
        """True when there is a checkpoint to continue from."""
        return self.epochs_done > 0

    @classmethod
    def read(cls, run_dir: Path) -> "ResumePoint":
        """The run's resume point; a fresh one when there is no complete checkpoint."""
        state = runfiles.read_json(run_dir / runfiles.CHECKPOINT_STATE_FILE)
        if not isinstance(state, dict) or not (run_dir / runfiles.CHECKPOINT_MODEL_FILE).is_file():
            return cls()
        phase = int(state.get("phase", 1))
        return cls(epochs_done=int(state.get("epoch", 0)), phase=phase,
                   phase1_epochs=int(state["phase1_epochs"]) if state.get("phase1_epochs") else None,
                   elapsed_seconds=float(state.get("elapsed_seconds", 0.0)), model_kind=state.get("model", "full"))


class StopCheck:
    """Raises StopRequested when the run's stop request exists (between steps, before training),
    or when this launch was superseded (declared dead, relaunched): it must stop writing the folder."""

    def __init__(self, run_dir: Path, status: LaunchStatus):
        self.path = run_dir / runfiles.STOP_REQUEST_FILE
        self.status = status

    def __call__(self) -> None:
        if self.path.exists() or self.status.superseded:
            raise StopRequested()


@dataclass
class PreparedData:
    """The split, the decoded images and the per-split positions and labels."""

    class_names: list
    images: np.ndarray
    positions: dict
    labels: dict
    paths: dict
    image_key: Optional[str] = None


def _prepare_data(run_dir: Path, config: RunConfig, status: LaunchStatus, echo, check_stop, resuming: bool) -> PreparedData:
    """Scans and splits the data (or re-reads the split of a resumed run) and decodes every image once."""
    from engine.pipeline import build_image_cache, scan_and_decode

    resumed_split = runfiles.read_csv(run_dir / runfiles.SPLIT_FILE) if resuming else []
    image_size = config.model.resolved_image_size
    if resumed_split:
        _say(status, echo, Stage.PREPARING_DATA, f"Resuming on the same split of {len(resumed_split)} images.")
    else:
        _say(status, echo, Stage.PREPARING_DATA,
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
    if not resumed_split:
        report["doctor"] = _duplicates_and_leakage([item for item, _ in kept], config.data.path, status, check_stop)
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


def _duplicates_and_leakage(items: list, root: str, status: LaunchStatus, check_stop) -> dict:
    """The data doctor's duplicates and train-vs-held-out leakage for this run's split (`data_report.json`).

    Hashes are cached per file and shared with the Data page's doctor, so a folder checked
    there costs nothing here; a new folder costs about 6 s per 3,000 photos on 2 cores.
    A failure here never fails the run: the report then says the check did not happen.
    """
    from engine.doctor import split_findings

    def progress(done, total):
        check_stop()
        status.update(message=f"Looking for duplicates and leakage: {done}/{total}.")

    try:
        # Keyed like the doctor's cache (the resolved folder), so the two share their hashes.
        findings = split_findings(items, progress=progress, cache_key=str(Path(root).expanduser().resolve()))
    except StopRequested:
        raise
    except Exception as error:  # noqa: BLE001 - the check is advice; training goes on without it
        logger.warning("The duplicate and leakage check failed: %s", one_line(error))
        return {"checked": False, "error": one_line(error)}
    if findings["num_leaks"]:
        logger.warning("%d validation/test image(s) are the same or nearly the same picture as a training image: "
                       "the measured accuracy may be optimistic (see data_report.json, doctor.leakage).",
                       findings["num_leaks"])
    return findings


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


@dataclass
class Training:
    """What every phase of one run needs: the run, its settings, its data, where progress goes."""

    run_dir: Path
    config: RunConfig
    data: PreparedData
    status: LaunchStatus
    echo: object
    started_at: float
    planned_epochs: int
    class_weight: Optional[dict]
    # How many devices train in step (MirroredStrategy's num_replicas_in_sync); 1 for one device.
    replicas: int = 1
    num_classes: int = field(init=False)
    steps_per_epoch: int = field(init=False)

    def __post_init__(self):
        self.num_classes = len(self.data.class_names)
        count, batch_size = len(self.data.positions["train"]), self.config.training.batch_size
        self.steps_per_epoch = math.ceil(count / batch_size)
        if 0 < count % batch_size < self.replicas:
            self.steps_per_epoch -= 1  # that last batch is left out (`Training.training_data`)

    @property
    def binary(self) -> bool:
        """Two classes train with one sigmoid output."""
        return self.num_classes == 2

    def say(self, stage: Stage, message: str) -> None:
        """Logs a step, shows it in the status and on the terminal."""
        _say(self.status, self.echo, stage, message)

    def validation_batch(self, wanted: int) -> int:
        """The validation batch size: `wanted`, or on several devices one that every device can share.

        Validation metrics are per image, so the batch size changes nothing else.
        `_check_splits_for_devices` has made sure that one exists.
        """
        if self.replicas == 1:
            return wanted
        return batch_for_devices(len(self.data.positions["validation"]), wanted, self.replicas, first_even=True)

    def prediction_batch(self, count: int, wanted: int) -> int:
        """The batch size for predicting `count` images: `wanted`, or on several devices one they can all share."""
        if self.replicas == 1:
            return wanted
        return batch_for_devices(count, wanted, self.replicas, first_even=False)

    def training_data(self, dataset):
        """The training batches; on several devices without a last batch too small to give each device an image.

        Such a batch (at most `replicas - 1` images, a different few each epoch as the order is
        reshuffled) would leave a device with nothing, which the base's layers fail on.
        """
        if self.replicas == 1 or not 0 < len(self.data.positions["train"]) % self.config.training.batch_size \
                < self.replicas:
            return dataset
        import tensorflow as tf

        replicas = self.replicas
        return dataset.filter(lambda images, *rest: tf.shape(images)[0] >= replicas)


def batch_for_devices(count: int, largest: int, replicas: int, first_even: bool) -> Optional[int]:
    """A batch size for `count` images on `replicas` devices under Keras 3.15, or None when there is none.

    Two things fail there (docs/training.md, "Several GPUs"): a batch that leaves some device
    without an image (the last one, when it holds fewer images than there are devices), and, in
    `fit` and `evaluate`, a first batch that does not split evenly (Keras reads it before the
    first epoch and averages it across the devices).

    Args:
        count: The images to batch.
        largest: The batch size wanted; the answer is at most this.
        replicas: The devices.
        first_even: Whether the first batch must split evenly (`fit`, `evaluate`), not only the last be large enough.
    """
    for size in range(min(largest, count), replicas - 1, -1):
        if first_even and size % replicas:
            continue
        if count % size == 0 or count % size >= replicas:
            return size
    return None


@dataclass
class PhaseResult:
    """How far training got: complete epochs over both phases, and whether a stop request ended it."""

    epochs_done: int
    stopped: bool = False


class FullModel:
    """The full model (base + head), built only when something needs it.

    With cached features, a head can train before the base is even loaded; a resumed run
    whose checkpoint is the full model takes that instead of building a new one.
    """

    def __init__(self, training: Training, checkpointed=None):
        self.training = training
        self.model = checkpointed

    def __call__(self):
        if self.model is None:
            from engine.modeling import build_model, compile_model

            config = self.training.config
            self.training.say(Stage.BUILDING_MODEL, f"Building {config.model.backbone} with weights {config.model.weights}.")
            self.model = build_model(config, self.training.num_classes)
            compile_model(self.model, config.training.optimizer, config.training.learning_rate,
                          self.training.num_classes)
        return self.model


def _train(run_dir: Path, status: LaunchStatus, echo) -> tuple[State, str]:
    """The phases of one run, in order; returns the final state and its message."""
    from engine.devices import training_devices

    config = RunConfig.load(run_dir / runfiles.CONFIG_FILE)
    logger.info("Config: %s", config.to_json())
    # Before anything runs TensorFlow: the testing aid that splits the CPU into logical
    # devices must act before TensorFlow starts, and too few GPUs should fail at once.
    devices = training_devices(config.training.gpus)
    check_stop = StopCheck(run_dir, status)
    resume = ResumePoint.read(run_dir)
    data = _prepare_data(run_dir, config, status, echo, check_stop, resume.resuming)
    check_stop()
    fine_tuning = config.fine_tuning
    training = Training(
        run_dir=run_dir, config=config, data=data, status=status, echo=echo,
        started_at=time.time() - resume.elapsed_seconds,
        planned_epochs=config.training.epochs + (fine_tuning.epochs if fine_tuning.enabled else 0),
        class_weight=(_class_weights(data.labels["train"], len(data.class_names))
                      if config.training.class_weight == "balanced" else None),
        replicas=devices.replicas)
    if devices.strategy is not None:
        _check_splits_for_devices(training)
        _record_devices(training, devices)
    # Every model is built, compiled, fitted, saved and evaluated under the strategy's scope,
    # so its variables are mirrored on each device; one device has no scope at all.
    with devices.scope():
        return _train_phases(training, resume, check_stop)


def _check_splits_for_devices(training: Training) -> None:
    """Refuses, with a sentence, a mirrored run whose first batches cannot split evenly over its devices.

    With at least one full batch of training images the first batch is `batch_size`, a multiple of
    `training.gpus` (checked by the config); the validation batches are chosen to split evenly
    (`Training.validation_batch`), which needs at least one validation image per device.
    """
    replicas, batch_size = training.replicas, training.config.training.batch_size
    counts = {split: len(rows) for split, rows in training.data.positions.items()}
    fix = "or train on one device (`training.gpus` 0)."
    if counts["train"] < batch_size and counts["train"] % replicas:
        even = counts["train"] // replicas * replicas
        raise ValueError(
            f"{counts['train']} training images are fewer than one batch of {batch_size} and do not split evenly "
            f"over {replicas} devices, which Keras needs for the first batch. Lower `training.batch_size` to "
            f"{even} or less (a multiple of {replicas}), {fix}")
    # Validation batches: `batch_size` on the images, larger on cached features.
    if any(batch_for_devices(counts["validation"], largest, replicas, True) is None
           for largest in (batch_size, max(batch_size, VALIDATION_FEATURE_BATCH))):
        raise ValueError(
            f"{counts['validation']} validation image(s) cannot be batched for {replicas} devices (each needs an "
            f"image in every batch, and the first batch must split evenly): add validation images or raise "
            f"`data.validation_fraction`, {fix}")
    if counts["test"] and counts["test"] < replicas:
        raise ValueError(f"{counts['test']} test image(s) cannot be shared by {replicas} devices: add test images, "
                         f"set `data.test_fraction` to 0 or raise it, {fix}")


def _record_devices(training: Training, devices) -> None:
    """Says which devices a mirrored run trains on, in worker.log and as a `devices` event in metrics.jsonl."""
    training.say(Stage.BUILDING_MODEL, devices.describe(training.config.training.batch_size))
    runfiles.append_jsonl(training.run_dir / runfiles.METRICS_FILE, [
        {"type": "devices", "strategy": type(devices.strategy).__name__, "replicas": devices.replicas,
         "devices": list(devices.devices), "time": time.time()}])


def _train_phases(training: Training, resume: ResumePoint, check_stop) -> tuple[State, str]:
    """Phase 1, phase 2, save and evaluate; the final state and its message."""
    run_dir, config, status = training.run_dir, training.config, training.status
    fine_tuning = config.fine_tuning
    checkpointed = _load_checkpoint(training, resume)
    full_model = FullModel(training, checkpointed if resume.model_kind == "full" else None)

    head, features, activations = None, {}, None
    if resume.phase == 1 and config.training.cached_features:
        # Where phase 2 will cut the base, if it will train on cached activations: phase 1's
        # feature pass then computes them on the way (engine.frozen_passes).
        planned_cut = _activation_cut(training, full_model, None)[0] if fine_tuning.enabled else None
        head, features, activations, result = train_head_on_features(training, resume, checkpointed, full_model,
                                                                     check_stop, planned_cut)
        model = full_model()
        from engine.modeling import copy_head_weights

        copy_head_weights(head, model)
    elif resume.phase == 1:
        model = full_model()
        result = train_head_end_to_end(training, resume, model)
    else:
        model, result = full_model(), PhaseResult(resume.epochs_done)
    checkpointed_top = checkpointed if resume.model_kind == "top" else None
    if checkpointed_top is not None:
        from engine.activations import copy_top_weights

        copy_top_weights(checkpointed_top, model)  # the phase 2 checkpoint holds the head and the top layers
    phase1_epochs = resume.phase1_epochs or (result.epochs_done if resume.phase == 1 else config.training.epochs)

    fine_tuned = False
    if fine_tuning.enabled and not result.stopped:
        result, fine_tuned = fine_tune(training, model, result.epochs_done, phase1_epochs, check_stop, checkpointed_top,
                                       activations)

    training.say(Stage.SAVING, "Saving the model.")
    save_model_atomically(model, run_dir / runfiles.MODEL_FILE)
    # The base did not change after the features were computed, so unless it was fine-tuned
    # the head on the cached features gives what the full model gives on the images (tested).
    accuracy = evaluate_run(training, model, head if not fine_tuned else None, features)
    verb = "Stopped" if result.stopped else "Finished"
    status.update(epoch=result.epochs_done, validation_accuracy=accuracy)
    return (State.STOPPED if result.stopped else State.FINISHED,
            f"{verb} after {result.epochs_done} epochs: the saved model's validation accuracy is {accuracy:.3f}.")


def _load_checkpoint(training: Training, resume: ResumePoint):
    """The checkpointed model (with its optimizer state) of a resumed run, or None."""
    if not resume.resuming:
        return None
    import keras

    import engine.layers  # noqa: F401 - registers our layers for safe-mode loading

    training.say(Stage.BUILDING_MODEL, f"Resuming from the checkpoint after epoch {resume.epochs_done}.")
    model = keras.models.load_model(training.run_dir / runfiles.CHECKPOINT_MODEL_FILE, safe_mode=True, compile=True)
    runfiles.append_jsonl(training.run_dir / runfiles.METRICS_FILE, [
        {"type": "resume", "epoch": resume.epochs_done, "phase": resume.phase, "time": time.time()}])
    return model


def _fit(training: Training, model, train_data, validation_data, phase: int, first_epoch: int, final_epoch: int,
         kind: str, phase1_epochs: Optional[int], extra_callbacks: list, total_epochs: int) -> PhaseResult:
    """`model.fit` from `first_epoch` to `final_epoch` with the run's callbacks; how far it got.

    Args:
        total_epochs: The run's last epoch as now planned, for progress and the ETA (phase 2
            counts on from where phase 1 really ended, early stopping included).
    """
    from engine.callbacks import (EpochCheckpoint, EpochsToValidate, MetricsLogger, ProgressReporter, StopOnRequest,
                                  TensorBoardWriter, TerminalProgress)

    stop = StopOnRequest(training.run_dir, training.steps_per_epoch, superseded=lambda: training.status.superseded)
    metrics = MetricsLogger(training.run_dir, phase, training.steps_per_epoch, training.config.training.batch_size,
                            total_epochs, training.started_at, stop)
    # The checkpoint is saved before the epoch's metrics event is written, so a worker killed in
    # between never leaves an epoch in metrics.jsonl that resume would repeat; the stop comes last.
    callbacks = [EpochCheckpoint(training.run_dir, phase, phase1_epochs, training.started_at, kind, stop),
                 metrics,
                 ProgressReporter(training.status, metrics, training.status.last.best_val_accuracy
                                  if training.status.last else None)]
    if training.echo is not None:
        callbacks.append(TerminalProgress(training.echo, metrics))
    # After the metrics logger, whose events it mirrors for `tensorboard --logdir runs/`.
    callbacks.insert(callbacks.index(metrics) + 1, TensorBoardWriter(training.run_dir, metrics))
    model.fit(train_data, validation_data=validation_data, validation_freq=EpochsToValidate(stop),
              initial_epoch=first_epoch, epochs=final_epoch, callbacks=callbacks + extra_callbacks + [stop],
              class_weight=training.class_weight, shuffle=False, verbose=0)
    if stop.requested:
        logger.info("Stop requested: left training after the current batch.")
    return PhaseResult(first_epoch + metrics.completed_epochs, stop.requested)


def _image_data(training: Training, split: str, shuffle: bool, epochs_done: int):
    """Batches gathered from the decode-once image cache; the shuffling seed moves on with the epochs."""
    from engine.pipeline import make_dataset

    data, settings = training.data, training.config.training
    batch_size = training.validation_batch(settings.batch_size) if split == "validation" else settings.batch_size
    dataset = make_dataset(data.images, data.labels[split], batch_size, shuffle=shuffle,
                           seed=settings.seed + epochs_done, binary=training.binary, rows=data.positions[split])
    return training.training_data(dataset) if split == "train" else dataset


def train_head_on_features(training: Training, resume: ResumePoint, checkpointed, full_model: FullModel,
                           check_stop: Callable[[], None], planned_cut=None):
    """Phase 1 on cached features: the frozen base runs once per image, the head trains on its output.

    Args:
        planned_cut: Where phase 2 will cut the base for cached activations, or None.

    Returns:
        (the trained head, the features per split, phase 2's activations when the feature
        pass computed them too (else None), how far training got).
    """
    from engine.features import make_feature_dataset
    from engine.frozen_passes import cached_features
    from engine.modeling import build_head, compile_model

    config, data = training.config, training.data
    settings = config.training
    features, activations = cached_features(training, full_model, check_stop, planned_cut)
    if checkpointed is not None:
        head = checkpointed
    else:
        head = build_head(config, training.num_classes, features["validation"].shape[-1])
        # Keras 3.15's loop of several steps per call fails under MirroredStrategy ("You must feed
        # a value for placeholder tensor 'while/cond/Placeholder'"), so a mirrored head takes one.
        compile_model(head, settings.optimizer, settings.learning_rate, training.num_classes,
                      steps_per_execution=HEAD_STEPS_PER_EXECUTION if training.replicas == 1 else 1)
    if resume.epochs_done >= settings.epochs:
        return head, features, activations, PhaseResult(resume.epochs_done)
    training.say(Stage.TRAINING_HEAD,
                 f"Phase 1: training the new head on cached features for epochs {resume.epochs_done + 1}–"
                 f"{settings.epochs} on {len(data.positions['train'])} images.")
    train_data = training.training_data(make_feature_dataset(
        features["train"], data.labels["train"], settings.batch_size, shuffle=True,
        seed=settings.seed + resume.epochs_done, binary=training.binary))
    # Validation batches only compute metrics (averaged per image), so their size changes
    # nothing but the per-batch overhead.
    validation_batch = training.validation_batch(max(settings.batch_size, VALIDATION_FEATURE_BATCH))
    validation_data = make_feature_dataset(features["validation"], data.labels["validation"], validation_batch,
                                           binary=training.binary)
    result = _fit(training, head, train_data, validation_data, 1, resume.epochs_done, settings.epochs, "head", None,
                  keras_callbacks(config, training.run_dir, full_model), training.planned_epochs)
    return head, features, activations, result


def train_head_end_to_end(training: Training, resume: ResumePoint, model) -> PhaseResult:
    """Phase 1 the tutorials' way: every image through the frozen base in every epoch (needed for
    fully random augmentation)."""
    settings = training.config.training
    if resume.epochs_done >= settings.epochs:
        return PhaseResult(resume.epochs_done)
    training.say(Stage.TRAINING_HEAD,
                 f"Phase 1: training the new head for epochs {resume.epochs_done + 1}–{settings.epochs} "
                 f"on {len(training.data.positions['train'])} images, every image through the base every epoch.")
    return _fit(training, model, _image_data(training, "train", True, resume.epochs_done),
                _image_data(training, "validation", False, resume.epochs_done), 1, resume.epochs_done,
                settings.epochs, "full", None, keras_callbacks(training.config, training.run_dir),
                training.planned_epochs)


def fine_tune(training: Training, model, epochs_done: int, phase1_epochs: int,
              check_stop: Callable[[], None] = lambda: None, checkpointed_top=None,
              activations: Optional[dict] = None) -> tuple[PhaseResult, bool]:
    """Phase 2: unfreeze the base's last layers (BatchNorm stays frozen) and train on at a low learning rate.

    On cached activations at the cut when it can (`engine.activations`), otherwise end to end.

    Args:
        checkpointed_top: A resumed run's phase 2 model above the cut (with its optimizer state).
        activations: The activations at the cut, when phase 1's feature pass computed them.

    Returns:
        (how far training got, whether any fine-tuning epoch was due).
    """
    from engine.modeling import compile_model, unfreeze_top_layers

    fine_tuning, settings = training.config.fine_tuning, training.config.training
    unfrozen = unfreeze_top_layers(model, fine_tuning.layers)
    final_epoch = phase1_epochs + fine_tuning.epochs
    if epochs_done >= final_epoch:
        return PhaseResult(epochs_done), False
    what = (f"Phase 2: fine-tuning the last {fine_tuning.layers} layers of the base ({unfrozen} with weights; "
            f"BatchNorm stays frozen) at learning rate {fine_tuning.learning_rate:g}, "
            f"epochs {epochs_done + 1}–{final_epoch}")
    cut, reason = _activation_cut(training, lambda: model, checkpointed_top)
    if cut is not None:
        if activations is None:
            from engine.frozen_passes import cached_activations

            activations = cached_activations(training, model, cut, check_stop)
        if activations is not None:
            return _fine_tune_on_activations(training, model, cut, activations, what, epochs_done, final_epoch,
                                             phase1_epochs, checkpointed_top), True
        reason = "the frozen layers' outputs would take more than half the cache budget"
    compile_model(model, settings.optimizer, fine_tuning.learning_rate, training.num_classes)
    training.say(Stage.FINE_TUNING, f"{what}, every image through the whole base every epoch ({reason}).")
    result = _fit(training, model, _image_data(training, "train", True, epochs_done),
                  _image_data(training, "validation", False, epochs_done), 2, epochs_done, final_epoch, "full",
                  phase1_epochs, keras_callbacks(training.config, training.run_dir), final_epoch)
    return result, True


def _activation_cut(training: Training, full_model: Callable, checkpointed_top) -> tuple:
    """(the cut, None) when phase 2 can train on cached activations; (None, why not) otherwise.

    Args:
        full_model: Returns the full model; called only once the settings allow cached activations.
    """
    from engine.activations import find_cut
    from engine.modeling import BASE_LAYER_NAME

    config = training.config
    if not config.training.cached_features:
        return None, "fast features are off, so augmentation is fully random in every epoch"
    if not config.fine_tuning.cached_activations:
        return None, "fine_tuning.cached_activations is off"
    if training.replicas > 1:
        return None, "cached activations are not yet used with several devices"
    base = full_model().get_layer(BASE_LAYER_NAME)
    cut = find_cut(base, config.fine_tuning.layers)
    if cut.index <= 1:
        return None, "the unfrozen layers reach the base's input, so there is nothing frozen to compute once"
    if checkpointed_top is not None and checkpointed_top.input_shape[1:] != cut.shape:
        return None, "the checkpoint was made at another cut"
    return cut, None


def _fine_tune_on_activations(training: Training, model, cut, activations: dict, what: str, epochs_done: int,
                              final_epoch: int, phase1_epochs: int, checkpointed_top) -> PhaseResult:
    """Phase 2 on cached activations: only the layers above the cut (and the head) run each epoch."""
    from engine.activations import build_top_model, copy_top_weights
    from engine.features import make_feature_dataset
    from engine.modeling import compile_model

    config, data = training.config, training.data
    settings, fine_tuning = config.training, config.fine_tuning
    moved = (f"; the cut moved down {cut.moved} layers to the nearest point a single tensor crosses "
             f"(a residual connection crosses the requested one)" if cut.moved else "")
    training.say(Stage.FINE_TUNING, f"{what}, on cached activations at {cut.producer}{moved}.")
    top = checkpointed_top
    if top is None:
        top = build_top_model(model, cut)
        compile_model(top, settings.optimizer, fine_tuning.learning_rate, training.num_classes)
    rank = len(cut.shape)
    train_data = training.training_data(make_feature_dataset(
        activations["train"], data.labels["train"], settings.batch_size, shuffle=True,
        seed=settings.seed + epochs_done, binary=training.binary, item_rank=rank))
    validation_data = make_feature_dataset(activations["validation"], data.labels["validation"],
                                           training.validation_batch(settings.batch_size), binary=training.binary,
                                           item_rank=rank)
    result = _fit(training, top, train_data, validation_data, 2, epochs_done, final_epoch, "top", phase1_epochs,
                  keras_callbacks(config, training.run_dir, lambda: model, copy_top_weights), final_epoch)
    copy_top_weights(top, model)  # a no-op unless `top` came from a checkpoint (its own layer objects)
    return result


def evaluate_run(training: Training, model, head, features: dict) -> float:
    """Writes evaluation.json and predictions.csv for the validation and test images; the validation accuracy.

    Args:
        head: The head trained on cached features, when the base did not change after they
            were computed (then the head on the features stands for the model on the images).
        features: The cached features per split.
    """
    from engine.evaluate import write_evaluation
    from engine.modeling import probabilities_per_class
    from engine.predict import predict_probabilities

    training.say(Stage.EVALUATING, "Evaluating on the validation and test images.")
    data = training.data
    split_results = {}
    for split in ("validation", "test"):
        if not data.positions[split]:
            continue
        if head is not None and split in features:
            # 32 and 64 are Keras's and predict_probabilities' own batch sizes, kept on one device.
            batch_size = training.prediction_batch(len(features[split]), 32)
            probabilities = probabilities_per_class(head.predict(features[split], batch_size=batch_size, verbose=0),
                                                    training.num_classes)
        else:
            probabilities = predict_probabilities(model, data.images, training.num_classes,
                                                  batch_size=training.prediction_batch(len(data.positions[split]), 64),
                                                  rows=data.positions[split])
        split_results[split] = (data.paths[split], data.labels[split], probabilities)
    evaluation = write_evaluation(training.run_dir, data.class_names, split_results)
    return evaluation["splits"]["validation"]["accuracy"]


def _class_weights(train_labels: np.ndarray, num_classes: int) -> dict:
    """Weights inversely proportional to class frequency (scikit-learn's 'balanced')."""
    counts = np.bincount(train_labels, minlength=num_classes)
    total = counts.sum()
    return {index: float(total / (num_classes * count)) if count else 0.0 for index, count in enumerate(counts)}


def keras_callbacks(config: RunConfig, run_dir: Path, full_model=None, copy_weights=None) -> list:
    """The callbacks the config switches on.

    Args:
        full_model: When training the head alone on cached features (or the top on cached
            activations), a function returning the full model, so that `best.keras` is the
            full model, not the part that trains.
        copy_weights: How that part's weights go into the full model (default: the head's).
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
            callbacks.append(BestFullModelCheckpoint(best_path, checkpoint.monitor, full_model, copy_weights))
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


def train_run(config: RunConfig, runs_dir: Optional[str | os.PathLike] = None, echo=None) -> Path:
    """Creates a run folder for `config` and trains it in this process (what `python -m engine train` does).

    Args:
        config: The run's settings.
        runs_dir: The runs root (default `$TRANSFER_STUDIO_RUNS`, else `runs/`).
        echo: A stream to print progress on, or None.

    Returns:
        The run folder; its status says how the run ended (`engine.read_status(folder).state`).
    """
    from engine.runs import create_run

    run_dir = create_run(config, runs_dir)
    run_training(run_dir, echo=echo)
    return run_dir
