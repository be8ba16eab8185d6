"""Keras callbacks that carry progress out of training, one job each.

- `StopOnRequest`: reads the stop request after every batch and leaves `fit` through
  Keras's own lifecycle (`model.stop_training = True`), so `on_train_end` still runs and
  `EarlyStopping(restore_best_weights=True)` restores the best weights.
- `MetricsLogger`: appends per-batch and per-epoch events to `metrics.jsonl`.
- `ProgressReporter`: keeps `status.json`'s progress current (stage, epoch, ETA, speed, best accuracy).
- `TerminalProgress`: a progress line on the CLI's terminal.
- `TensorBoardWriter`: the same events as TensorBoard scalars in `RUN_DIR/tensorboard/`.
- `EpochCheckpoint`: saves the model after every complete epoch, for resume.
- `BestFullModelCheckpoint`: `best.keras` as the full model while only the head trains.

An epoch that a stop request cuts short is not counted: it is not validated
(`EpochsToValidate`), so early stopping and `best.keras` pass over it, no epoch event or
resume checkpoint is written for it, and a resumed run does it again.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import keras

from engine import runfiles
from engine.status import LaunchStatus, Stage

# Per-batch events are written at most this often, so a fast run does not flood the file
# while a slow one still reports every batch well within the 2-second promise.
BATCH_EVENT_INTERVAL_SECONDS = 0.5
STAGE_OF_PHASE = {1: Stage.TRAINING_HEAD, 2: Stage.FINE_TUNING}


TENSORBOARD_FOLDER = "tensorboard"


def current_learning_rate(model) -> Optional[float]:
    """The optimizer's learning rate as a float, or None when it cannot be read."""
    try:
        return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
    except Exception:  # noqa: BLE001 - a schedule we cannot read is not worth failing a run
        return None


def _clean(value):
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


class StopOnRequest(keras.callbacks.Callback):
    """Leaves `fit` after the current batch once the run's `stop.request` file exists.

    It must be the last callback of the fit: the others see each batch and epoch first.

    Args:
        run_dir: The run folder.
        steps_per_epoch: Batches per epoch, to tell a cut-short epoch from a complete one.
        superseded: Returns True once this worker's launch is no longer current (declared
            dead, relaunched): it stops as if asked, and writes nothing more to the status.
    """

    def __init__(self, run_dir, steps_per_epoch: int, superseded=lambda: False):
        super().__init__()
        self.stop_path = Path(run_dir) / runfiles.STOP_REQUEST_FILE
        self.superseded = superseded
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.requested = False
        self.cut_short_epoch: Optional[int] = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.requested or not self._asked():
            return
        self.requested = True
        if batch + 1 < self.steps_per_epoch:
            self.cut_short_epoch = self._epoch
        # Keras leaves the epoch after this batch, validates, calls on_epoch_end and on_train_end.
        self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        # A request that arrived while the epoch was validated or saved ends training here, on a
        # complete epoch, rather than after one more batch. Coming after every other callback,
        # this one lets them all (EarlyStopping, checkpoints, metrics) see the epoch first.
        if not self.requested and self._asked():
            self.requested = True
            self.model.stop_training = True

    def _asked(self) -> bool:
        return self.stop_path.exists() or self.superseded()

    def epoch_is_complete(self, epoch: int) -> bool:
        """False for the epoch a stop request cut short."""
        return epoch != self.cut_short_epoch


class EpochsToValidate(list):
    """`model.fit(validation_freq=…)`: every epoch, except one a stop request cut short.

    Keras validates each epoch listed in `validation_freq` (`epoch in validation_freq`, one-
    indexed); this list answers no for a cut-short epoch, so a stop is not delayed by a whole
    validation pass over an epoch that will not count anyway.
    """

    def __init__(self, stop: "StopOnRequest"):
        super().__init__()
        self.stop = stop

    def __contains__(self, epoch) -> bool:
        return self.stop.epoch_is_complete(int(epoch) - 1)


class MetricsLogger(keras.callbacks.Callback):
    """Appends per-batch (at most every BATCH_EVENT_INTERVAL_SECONDS) and per-epoch events to `metrics.jsonl`.

    Args:
        run_dir: The run folder.
        phase: 1 (head on the frozen base) or 2 (fine-tuning).
        steps_per_epoch: Batches per epoch.
        batch_size: Images per batch, for images/second.
        total_epochs: Epochs planned over both phases, for the ETA.
        started_at: Time training began, for elapsed seconds.
        stop: The run's StopOnRequest, to leave out an epoch it cut short.
    """

    def __init__(self, run_dir, phase: int, steps_per_epoch: int, batch_size: int, total_epochs: int,
                 started_at: float, stop: StopOnRequest):
        super().__init__()
        self.metrics_path = Path(run_dir) / runfiles.METRICS_FILE
        self.phase = phase
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.batch_size = batch_size
        self.total_epochs = total_epochs
        self.started_at = started_at
        self.stop = stop
        self.completed_epochs = 0
        self.last_batch_event: Optional[dict] = None
        self.last_epoch_event: Optional[dict] = None
        self._last_event_time = 0.0
        self._epoch = 0
        self._epoch_started = time.time()
        self._seconds_per_step: Optional[float] = None
        self._epoch_period: Optional[float] = None

    def on_epoch_begin(self, epoch, logs=None):
        now = time.time()
        if self._epoch:
            # From one epoch's start to the next: batches, validation, checkpoint and all.
            self._epoch_period = now - self._epoch_started
        self._epoch = epoch + 1
        self._epoch_started = now

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        now = time.time()
        # With steps_per_execution, Keras reports the last step of the call, which may pass the epoch's end.
        step = min(batch + 1, self.steps_per_epoch)
        elapsed_in_epoch = now - self._epoch_started
        self._seconds_per_step = elapsed_in_epoch / step
        if now - self._last_event_time < BATCH_EVENT_INTERVAL_SECONDS and step < self.steps_per_epoch:
            return
        self._last_event_time = now
        self.last_batch_event = {
            "type": "batch",
            "phase": self.phase,
            "epoch": self._epoch,
            "step": step,
            "steps": self.steps_per_epoch,
            "loss": _clean(logs.get("loss", float("nan"))),
            "accuracy": _clean(logs.get("accuracy", float("nan"))),
            "learning_rate": current_learning_rate(self.model),
            "elapsed_seconds": round(now - self.started_at, 3),
            "images_per_second": round(step * self.batch_size / max(elapsed_in_epoch, 1e-9), 2),
            "eta_seconds": self.eta(step),
            "time": now,
        }
        runfiles.append_jsonl(self.metrics_path, [self.last_batch_event])

    def on_epoch_end(self, epoch, logs=None):
        if not self.stop.epoch_is_complete(epoch):
            return
        logs = logs or {}
        now = time.time()
        self.completed_epochs += 1
        epoch_seconds = now - self._epoch_started
        self.last_epoch_event = {
            "type": "epoch",
            "phase": self.phase,
            "epoch": epoch + 1,
            "loss": _clean(logs.get("loss", float("nan"))),
            "accuracy": _clean(logs.get("accuracy", float("nan"))),
            "val_loss": _clean(logs.get("val_loss", float("nan"))),
            "val_accuracy": _clean(logs.get("val_accuracy", float("nan"))),
            "learning_rate": current_learning_rate(self.model),
            "elapsed_seconds": round(now - self.started_at, 3),
            "epoch_seconds": round(epoch_seconds, 3),
            "images_per_second": round(self.steps_per_epoch * self.batch_size / max(epoch_seconds, 1e-9), 2),
            "eta_seconds": self.eta(self.steps_per_epoch, finished_epoch=True),
            "time": now,
        }
        runfiles.append_jsonl(self.metrics_path, [self.last_epoch_event])
        runfiles.fault_point("epoch_end")  # tests only: slow epochs down so a stop lands mid-run

    def eta(self, step: int, finished_epoch: bool = False) -> Optional[float]:
        """Seconds left for all planned epochs.

        The rest of this epoch at the speed of its batches so far; each epoch after it at the
        length of the last whole epoch (validation and checkpoint included), or at the batch
        speed until one epoch has passed.
        """
        if not self._seconds_per_step:
            return None
        per_epoch = self._epoch_period or self.steps_per_epoch * self._seconds_per_step
        rest_of_epoch = 0 if finished_epoch else (self.steps_per_epoch - step) * self._seconds_per_step
        return round((self.total_epochs - self._epoch) * per_epoch + rest_of_epoch, 1)


class ProgressReporter(keras.callbacks.Callback):
    """Keeps the run's status current from the events the MetricsLogger just wrote.

    Args:
        status: The worker's LaunchStatus.
        metrics: The MetricsLogger of the same fit (it must come before this callback).
        best_val_accuracy: The best validation accuracy before this fit (a resumed run, phase 1).
    """

    def __init__(self, status: LaunchStatus, metrics: MetricsLogger, best_val_accuracy: Optional[float] = None):
        super().__init__()
        self.status = status
        self.metrics = metrics
        self.best_val_accuracy = best_val_accuracy
        self._reported_batch: Optional[dict] = None
        self._reported_epoch: Optional[dict] = None

    def on_train_batch_end(self, batch, logs=None):
        event = self.metrics.last_batch_event
        if event is None or event is self._reported_batch:
            return
        self._reported_batch = event
        metrics = self.metrics
        self.status.update(
            stage=STAGE_OF_PHASE[metrics.phase], epoch=event["epoch"], epochs=metrics.total_epochs,
            step=event["step"], steps=event["steps"], eta_seconds=event["eta_seconds"],
            images_per_second=event["images_per_second"],
            message=f"Phase {metrics.phase}: epoch {event['epoch']}/{metrics.total_epochs}, "
                    f"batch {event['step']}/{event['steps']}.")

    def on_epoch_end(self, epoch, logs=None):
        event = self.metrics.last_epoch_event
        if event is None or event is self._reported_epoch:
            return
        self._reported_epoch = event
        accuracy = event["val_accuracy"]
        if accuracy is not None and (self.best_val_accuracy is None or accuracy > self.best_val_accuracy):
            self.best_val_accuracy = accuracy
        self.status.update(stage=STAGE_OF_PHASE[self.metrics.phase], epoch=event["epoch"],
                           epochs=self.metrics.total_epochs, eta_seconds=event["eta_seconds"],
                           best_val_accuracy=self.best_val_accuracy)


class TerminalProgress(keras.callbacks.Callback):
    """Prints the MetricsLogger's events on a stream (the CLI's terminal): a bar per batch, a line per epoch."""

    def __init__(self, echo, metrics: MetricsLogger):
        super().__init__()
        self.echo = echo
        self.metrics = metrics
        self._printed: Optional[dict] = None

    def on_train_batch_end(self, batch, logs=None):
        event = self.metrics.last_batch_event
        if event is None or event is self._printed or not getattr(self.echo, "isatty", lambda: False)():
            return
        self._printed = event
        width = 24
        filled = int(width * event["step"] / event["steps"])
        bar = "#" * filled + "-" * (width - filled)
        loss = "?" if event["loss"] is None else f"{event['loss']:.4f}"
        eta = "?" if event["eta_seconds"] is None else f"{event['eta_seconds']:.0f}s"
        print(f"\rphase {self.metrics.phase} epoch {event['epoch']}/{self.metrics.total_epochs} [{bar}] "
              f"{event['step']}/{event['steps']} loss {loss} {event['images_per_second']:.0f} img/s ETA {eta}",
              end="", file=self.echo, flush=True)

    def on_epoch_end(self, epoch, logs=None):
        event = self.metrics.last_epoch_event
        if event is None or event["epoch"] != epoch + 1:
            return

        def shown(value):
            return value if value is None else round(value, 4)

        print(f"\rphase {self.metrics.phase} epoch {event['epoch']}/{self.metrics.total_epochs}: "
              f"loss {shown(event['loss'])}, accuracy {shown(event['accuracy'])}, "
              f"val_loss {shown(event['val_loss'])}, val_accuracy {shown(event['val_accuracy'])} "
              f"({event['epoch_seconds']:.1f}s)" + " " * 10, file=self.echo, flush=True)


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves the model being trained (with its optimizer state) after every complete epoch, for resume.

    `checkpoint.keras` is replaced atomically, then `checkpoint.json` records which
    epoch and phase it holds, and whether it is the full model or only the head trained
    on cached features, or the base above the cut with the head trained on cached activations
    (`"model": "full" | "head" | "top"`), so a reader never pairs a state
    with the wrong model. It must come before the MetricsLogger, so a worker killed in
    between never leaves an epoch in metrics.jsonl that resume would repeat.
    """

    def __init__(self, run_dir, phase: int, phase1_epochs: Optional[int], started_at: float, kind: str,
                 stop: StopOnRequest):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.phase = phase
        self.phase1_epochs = phase1_epochs
        self.started_at = started_at
        self.kind = kind
        self.stop = stop

    def on_epoch_end(self, epoch, logs=None):
        if not self.stop.epoch_is_complete(epoch):
            return
        runfiles.write_through_temporary(self.run_dir / runfiles.CHECKPOINT_MODEL_FILE, self.model.save)
        state = {"epoch": epoch + 1, "phase": self.phase, "model": self.kind,
                 "elapsed_seconds": round(time.time() - self.started_at, 3)}
        if self.phase1_epochs is not None:
            state["phase1_epochs"] = self.phase1_epochs
        runfiles.atomic_write_json(self.run_dir / runfiles.CHECKPOINT_STATE_FILE, state)


class BestFullModelCheckpoint(keras.callbacks.Callback):
    """`best.keras` for a head trained on cached features: the full model at the best epoch.

    Keras's ModelCheckpoint would save the head alone; this puts the head's weights into
    the full model (base + head) whenever the monitored value improves, and saves that.

    Args:
        path: Where to save (`best.keras` in the run folder).
        monitor: "val_loss" (lower is better) or "val_accuracy" (higher is better).
        full_model: A function returning the full model (built on first use).
        copy_weights: Puts the trained part's weights into the full model (default: the head's,
            `engine.modeling.copy_head_weights`; phase 2 on activations passes its own).
    """

    def __init__(self, path, monitor: str, full_model, copy_weights=None):
        super().__init__()
        self.path = Path(path)
        self.monitor = monitor
        self.full_model = full_model
        self.copy_weights = copy_weights
        self.best: Optional[float] = None

    def on_epoch_end(self, epoch, logs=None):
        from engine.modeling import copy_head_weights

        value = (logs or {}).get(self.monitor)
        if value is None or math.isnan(float(value)):
            return
        value = float(value)
        better = self.best is None or (value > self.best if "accuracy" in self.monitor else value < self.best)
        if better:
            self.best = value
            model = self.full_model()
            (self.copy_weights or copy_head_weights)(self.model, model)
            runfiles.write_through_temporary(self.path, model.save)


class TensorBoardWriter(keras.callbacks.Callback):
    """Writes MetricsLogger's events as TensorBoard scalars into `RUN_DIR/tensorboard/`.

    Per batch (as often as metrics.jsonl gets them): `batch/loss`, `batch/accuracy`,
    `batch/learning_rate` at the global step; per epoch: `epoch/loss`, `epoch/accuracy`,
    `epoch/val_loss`, `epoch/val_accuracy`, `epoch/learning_rate` at the epoch number. So
    `tensorboard --logdir runs/` shows every run beside the others. Keras's own TensorBoard
    callback is not used: with many batches per TensorFlow call (cached features) it logs
    per call, and its epoch numbers restart on resume; these events are the ones the app shows.

    Args:
        run_dir: The run folder.
        metrics: The phase's MetricsLogger, whose events are mirrored (it must run first).
    """

    def __init__(self, run_dir, metrics: "MetricsLogger"):
        super().__init__()
        import importlib.util

        import tensorflow as tf

        self.metrics = metrics
        # tf.summary.scalar lives in the tensorboard package (pinned in requirements.txt); without
        # it a run still trains, only without event files.
        self.writer = None
        if importlib.util.find_spec("tensorboard") is not None:
            self.writer = tf.summary.create_file_writer(str(Path(run_dir) / TENSORBOARD_FOLDER))
        self._last_batch: Optional[dict] = None
        self._last_epoch: Optional[dict] = None

    def _write(self, prefix: str, event: dict, names: tuple, step: int) -> None:
        import tensorflow as tf

        if self.writer is None:
            return
        with self.writer.as_default():
            for name in names:
                value = event.get(name)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    tf.summary.scalar(f"{prefix}/{name}", value, step=step)

    def on_train_batch_end(self, batch, logs=None):
        event = self.metrics.last_batch_event
        if event is None or event is self._last_batch:
            return
        self._last_batch = event
        step = (event["epoch"] - 1) * event["steps"] + event["step"]
        self._write("batch", event, ("loss", "accuracy", "learning_rate"), step)

    def on_epoch_end(self, epoch, logs=None):
        event = self.metrics.last_epoch_event
        if event is None or event is self._last_epoch:
            return
        self._last_epoch = event
        self._write("epoch", event, ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"), event["epoch"])
        if self.writer is not None:
            self.writer.flush()

    def on_train_end(self, logs=None):
        if self.writer is not None:
            self.writer.flush()
