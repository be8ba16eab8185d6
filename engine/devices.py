"""Which devices a training worker trains on: one, or several GPUs under `tf.distribute.MirroredStrategy`.

`training.gpus` ≤ 1 trains as runs always have: no strategy object and no scope, TensorFlow
places the work (on its first GPU if it sees one, else on the CPU). `training.gpus` = N ≥ 2
mirrors the model over the first N GPUs the worker sees: every variable has a copy on each
device, each batch of `training.batch_size` images is split into N equal shares, and the
gradients are summed across the devices before every update (docs/training.md, "Several GPUs").
On a Ray cluster the executor asks Ray for N GPUs, and Ray makes exactly those visible.

Only one machine: multi-node `tf.distribute.MultiWorkerMirroredStrategy` fails in
`model.fit` with Keras 3 (keras-team/keras#20585) and is not offered.

For tests and debugging on a machine without GPUs, `TRANSFER_STUDIO_LOGICAL_CPU_DEVICES=N`
(read before TensorFlow starts) splits the CPU into N logical devices, and a run with
`training.gpus` ≥ 2 mirrors over those instead of GPUs. It is slower than one device (the
same cores do the work of every replica); it exists to exercise the mirrored code path.

This module imports TensorFlow only when a run asks for several devices.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

# A testing and debugging aid: mirror over this many logical CPU devices instead of GPUs.
LOGICAL_CPU_DEVICES_VARIABLE = "TRANSFER_STUDIO_LOGICAL_CPU_DEVICES"
MAX_LOGICAL_CPU_DEVICES = 64


@dataclass(frozen=True)
class TrainingDevices:
    """The devices one run trains on, and the strategy that spreads the work over them.

    Attributes:
        strategy: A `tf.distribute.MirroredStrategy`, or None for one device (no strategy
            and no scope at all, so single-device runs are exactly what they always were).
        devices: The names of the mirrored devices, e.g. ("/device:GPU:0", "/device:GPU:1");
            empty for one device.
    """

    strategy: Any = None
    devices: tuple[str, ...] = ()

    @property
    def replicas(self) -> int:
        """How many copies of the model train in step (the strategy's `num_replicas_in_sync`)."""
        return int(self.strategy.num_replicas_in_sync) if self.strategy is not None else 1

    def scope(self):
        """The context to build, compile and fit models in: the strategy's scope, or nothing for one device."""
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def describe(self, batch_size: int) -> str:
        """The log's sentence: "Training on 2 devices … each takes 16 images of every batch of 32."."""
        if self.strategy is None:
            return "Training on one device."
        share = batch_size / self.replicas
        share_text = f"{share:g}" if share == int(share) else f"about {share:.1f}"
        return (f"Training on {self.replicas} devices with tf.distribute.MirroredStrategy "
                f"({', '.join(self.devices)}): each takes {share_text} images of every batch of {batch_size}.")


def logical_cpu_devices(environ: Optional[Mapping[str, str]] = None) -> int:
    """The number of logical CPU devices asked for by `$TRANSFER_STUDIO_LOGICAL_CPU_DEVICES` (0 when unset).

    Raises:
        ValueError: the variable is set to something other than a whole number from 0 to 64.
    """
    environ = os.environ if environ is None else environ
    text = environ.get(LOGICAL_CPU_DEVICES_VARIABLE, "").strip()
    if not text:
        return 0
    if not text.isdigit() or int(text) > MAX_LOGICAL_CPU_DEVICES:
        raise ValueError(f"`{LOGICAL_CPU_DEVICES_VARIABLE}` must be a whole number from 0 to "
                         f"{MAX_LOGICAL_CPU_DEVICES} (a testing aid: split the CPU into that many devices); "
                         f"received {text!r}. Unset it to train on the GPUs.")
    return int(text)


def training_devices(gpus: int, environ: Optional[Mapping[str, str]] = None) -> TrainingDevices:
    """Chooses the devices for a run that asks for `gpus` GPUs (`training.gpus`).

    Call it before anything in the process has run TensorFlow: splitting the CPU into
    logical devices (the testing aid) is only possible before TensorFlow starts.

    Args:
        gpus: `training.gpus`. 0 or 1: one device, no strategy. N ≥ 2: MirroredStrategy over
            the first N GPUs this process sees, or over N logical CPU devices when
            `$TRANSFER_STUDIO_LOGICAL_CPU_DEVICES` is set.
        environ: The environment to read the variable from (default `os.environ`).

    Returns:
        The devices and their strategy.

    Raises:
        ValueError: fewer devices are visible than asked for (the message says how many and
            which), or the variable is malformed.
    """
    if gpus <= 1:
        return TrainingDevices()
    logical = logical_cpu_devices(environ)
    import tensorflow as tf

    if logical >= 2:
        visible = _split_cpu(tf, logical)
        kind = f" (logical CPU devices from {LOGICAL_CPU_DEVICES_VARIABLE}={logical})"
    else:
        visible = [device.name for device in tf.config.list_logical_devices("GPU")]
        kind = ""
    if len(visible) < gpus:
        seen = f"{len(visible)}: {', '.join(visible)}" if visible else "none"
        raise ValueError(
            f"`training.gpus` asked for {gpus} GPUs, this worker sees {seen}{kind}. Lower `training.gpus` "
            f"to {len(visible) if len(visible) >= 2 else '0 or 1 (one device)'}, or run it where {gpus} GPUs are "
            "visible: on a Ray cluster the run asks Ray for them; on one machine check `nvidia-smi` and "
            "CUDA_VISIBLE_DEVICES.")
    chosen = tuple(visible[:gpus])
    return TrainingDevices(strategy=tf.distribute.MirroredStrategy(devices=list(chosen)), devices=chosen)


def _split_cpu(tf, count: int) -> list[str]:
    """Splits the CPU into `count` logical devices (once per process); the logical CPU devices' names."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:
        # TensorFlow has already started in this process: its devices are fixed from now on
        # (a second run in one Python session finds them split already, which is fine).
        pass
    names = [device.name for device in tf.config.list_logical_devices("CPU")]
    if len(names) < count:
        raise ValueError(
            f"`{LOGICAL_CPU_DEVICES_VARIABLE}={count}` asks for {count} logical CPU devices, but TensorFlow had "
            f"already started in this process with {len(names)}. Set the variable before the process starts "
            "(e.g. in the environment of `python -m engine train`).")
    return names
