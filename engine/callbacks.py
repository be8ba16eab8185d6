"""Keras callbacks that carry progress out of training: metrics events, status, stop requests.

Progress leaves `model.fit` only through these callbacks; nothing polls the model.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import keras

from engine import runfiles
from engine.runs import StatusWriter

# Per-batch events are written at most this often, so a fast run does not flood the file
# while a slow one still reports every batch well within the 2-second promise.
BATCH_EVENT_INTERVAL_SECONDS = 0.5


def current_learning_rate(model) -> Optional[float]:
    """The optimizer's learning rate as a float, or None when it cannot be read."""
    try:
        return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
    except Exception:  # noqa: BLE001 - a schedule we cannot read is not worth failing a run
        return None


def _clean(value):
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


class StopTrainingNow(Exception):
    """Raised from a callback to leave `model.fit` right after the current batch."""


class RunProgress(keras.callbacks.Callback):
    """Appends per-batch and per-epoch events to `metrics.jsonl` and keeps `status.json` current.

    Args:
        run_dir: The run folder.
        status: The run's StatusWriter.
        phase: 1 (head on the frozen base) or 2 (fine-tuning).
        steps_per_epoch: Batches per epoch.
        batch_size: Images per batch, for images/second.
        total_epochs: Epochs planned over both phases, for the ETA.
        started_at: Time training began, for elapsed seconds.
        echo: Also print a progress line on this stream (the CLI's terminal), or None.
    """

    def __init__(self, run_dir, status: StatusWriter, phase: int, steps_per_epoch: int, batch_size: int,
                 total_epochs: int, started_at: float, echo=None):
        super().__init__()
        self.metrics_path = Path(run_dir) / runfiles.METRICS_FILE
        self.stop_path = Path(run_dir) / runfiles.STOP_REQUEST_FILE
        self.status = status
        self.phase = phase
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.batch_size = batch_size
        self.total_epochs = total_epochs
        self.started_at = started_at
        self.echo = echo
        self.stop_requested = False
        self.completed_epochs = 0
        self._last_event_time = 0.0
        self._epoch = 0
        self._epoch_started = time.time()
        self._seconds_per_step: Optional[float] = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch + 1
        self._epoch_started = time.time()

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        now = time.time()
        step = batch + 1
        elapsed_in_epoch = now - self._epoch_started
        self._seconds_per_step = elapsed_in_epoch / step
        if self.stop_path.exists() and not self.stop_requested:
            # Cooperative stop: this batch is done; leave fit at once (skipping the rest of the
            # epoch and its validation pass) so the worker saves and evaluates within seconds.
            self.stop_requested = True
            self.model.stop_training = True
            raise StopTrainingNow()
        if now - self._last_event_time < BATCH_EVENT_INTERVAL_SECONDS and step != self.steps_per_epoch:
            return
        self._last_event_time = now
        event = {
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
            "eta_seconds": self._eta(step),
            "time": now,
        }
        runfiles.append_jsonl(self.metrics_path, [event])
        self.status.update(
            state="running", phase=self._phase_name(), epoch=self._epoch, epochs=self.total_epochs,
            step=step, steps=self.steps_per_epoch, eta_seconds=event["eta_seconds"],
            images_per_second=event["images_per_second"],
            message=f"Phase {self.phase}: epoch {self._epoch}/{self.total_epochs}, "
                    f"batch {step}/{self.steps_per_epoch}.",
        )
        if self.echo is not None:
            self._print_line(event)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        now = time.time()
        self.completed_epochs += 1
        epoch_seconds = now - self._epoch_started
        event = {
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
            "time": now,
        }
        runfiles.append_jsonl(self.metrics_path, [event])
        self.status.update(state="running", phase=self._phase_name(), epoch=epoch + 1,
                           epochs=self.total_epochs, last_completed_epoch=epoch + 1,
                           eta_seconds=self._eta(self.steps_per_epoch, finished_epoch=True))
        if self.echo is not None:
            accuracy = event["val_accuracy"]
            print(f"\rphase {self.phase} epoch {epoch + 1}/{self.total_epochs}: "
                  f"loss {event['loss']:.4f}, accuracy {event['accuracy']:.4f}, "
                  f"val_loss {event['val_loss'] if event['val_loss'] is None else round(event['val_loss'], 4)}, "
                  f"val_accuracy {accuracy if accuracy is None else round(accuracy, 4)} "
                  f"({epoch_seconds:.1f}s)" + " " * 10, file=self.echo, flush=True)
        runfiles.fault_point("epoch_end")  # tests only: slow epochs down so a stop lands mid-run

    def _phase_name(self) -> str:
        return "phase 1: training the new head" if self.phase == 1 else "phase 2: fine-tuning"

    def _eta(self, step: int, finished_epoch: bool = False) -> Optional[float]:
        if not self._seconds_per_step:
            return None
        remaining_steps = (self.total_epochs - self._epoch) * self.steps_per_epoch
        if not finished_epoch:
            remaining_steps += self.steps_per_epoch - step
        return round(remaining_steps * self._seconds_per_step, 1)

    def _print_line(self, event: dict) -> None:
        if not getattr(self.echo, "isatty", lambda: False)():
            return
        width = 24
        filled = int(width * event["step"] / event["steps"])
        bar = "#" * filled + "-" * (width - filled)
        loss = "?" if event["loss"] is None else f"{event['loss']:.4f}"
        eta = "?" if event["eta_seconds"] is None else f"{event['eta_seconds']:.0f}s"
        print(f"\rphase {self.phase} epoch {event['epoch']}/{self.total_epochs} [{bar}] "
              f"{event['step']}/{event['steps']} loss {loss} {event['images_per_second']:.0f} img/s ETA {eta}",
              end="", file=self.echo, flush=True)


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves the model being trained (with its optimizer state) after every epoch, for resume.

    `checkpoint.keras` is replaced atomically, then `checkpoint.json` records which
    epoch and phase it holds, and whether it is the full model or only the head trained
    on cached features (`"model": "full" | "head"`), so a reader never pairs a state
    with the wrong model.
    """

    def __init__(self, run_dir, phase: int, phase1_epochs: Optional[int], started_at: float, kind: str = "full"):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.phase = phase
        self.phase1_epochs = phase1_epochs
        self.started_at = started_at
        self.kind = kind

    def on_epoch_end(self, epoch, logs=None):
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
    """

    def __init__(self, path, monitor: str, full_model):
        super().__init__()
        self.path = Path(path)
        self.monitor = monitor
        self.full_model = full_model
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
            copy_head_weights(self.model, model)
            runfiles.write_through_temporary(self.path, model.save)
