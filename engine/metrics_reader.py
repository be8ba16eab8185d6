"""An incremental reader of a run's `metrics.jsonl`, for pages that redraw a growing run every second.

`engine.interpret.metrics_frames` used to read and parse the whole file on every call, so a
Monitor refresh of a run that had written hours of per-batch events cost four times that of
a short run, and every viewer paid it every 1.5 s. A `MetricsReader` remembers how far it
has read and parses only the bytes appended since; it keeps the per-batch points at a bounded
resolution for drawing, and it builds its tables again only when something new arrived. One
reader per run folder can be shared by every viewer of that run (it is thread-safe; the
Monitor page shares it through `st.cache_resource`). This module never imports Streamlit or
TensorFlow.
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Optional

import pandas as pd

from engine import runfiles

# Per-batch points kept for drawing, over all epochs. A chart 1,000–2,000 pixels wide shows no
# more, and plotting and sending 2,000 points costs a few milliseconds.
DEFAULT_MAX_POINTS = 2000
# Bytes before the read position compared on every change of the file, to tell a file that
# grew from one that was replaced or rewritten in place (a new run in a folder of the same name).
_CHECK_BYTES = 64


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _EpochBatches:
    """The batch events of one stretch of one epoch, thinned to at most `cap` points as they arrive.

    A point is kept when its arrival index within the stretch is a multiple of `stride`; when
    more than `cap` points are kept, the stride doubles and every other kept point goes. So
    what is kept depends only on the sequence of events, not on how the file was cut into
    reads, and the first point of the stretch is always kept. The latest point is kept apart
    (the page shows the latest step and speed, and the curve ends where the run is).
    """

    __slots__ = ("epoch", "points", "indices", "count", "stride", "last")

    def __init__(self, epoch: float):
        self.epoch = epoch
        self.points: list[dict] = []
        self.indices: list[int] = []
        self.count = 0
        self.stride = 1
        self.last: Optional[dict] = None

    def add(self, event: dict, cap: Optional[int]) -> None:
        index = self.count
        self.count += 1
        self.last = event
        if index % self.stride == 0:
            self.points.append(event)
            self.indices.append(index)
            self.thin(cap)

    def thin(self, cap: Optional[int]) -> None:
        """Doubles the stride until at most `cap` points are kept (None keeps every point)."""
        while cap is not None and len(self.points) > cap:
            self.stride *= 2
            kept = [(index, point) for index, point in zip(self.indices, self.points) if index % self.stride == 0]
            self.indices = [index for index, _ in kept]
            self.points = [point for _, point in kept]

    def rows(self) -> list[dict]:
        if self.last is not None and (not self.points or self.points[-1] is not self.last):
            return self.points + [self.last]
        return self.points


class MetricsReader:
    """Reads a run's `metrics.jsonl` incrementally and serves it as the tables the pages draw.

    Each call to `frames` looks at the file (one `stat`), parses only the complete lines
    appended since the last call (a half-written last line is left for the next one, as
    `runfiles.read_jsonl` does), and returns the same tables as `engine.interpret.metrics_frames`,
    with the per-batch points thinned to at most about `max_points`. When the file was replaced,
    truncated or rewritten (a new run folder at the same path), it is read again from the start.
    A `resume` event drops the events of the epochs the resumed run repeats, as `metrics_frames`
    does.

    Thread-safe: several viewers of one run can share one reader.

    Args:
        run_dir: The run folder.
        max_points: Per-batch points kept over all epochs (each epoch keeps at least its first and
            last); None keeps every point.
    """

    def __init__(self, run_dir: str | os.PathLike, max_points: Optional[int] = DEFAULT_MAX_POINTS):
        if max_points is not None and max_points < 2:
            raise ValueError(f"`max_points` must be ≥ 2 or None; received max_points={max_points!r}.")
        self.path = Path(run_dir) / runfiles.METRICS_FILE
        self.max_points = max_points
        self._lock = threading.Lock()
        self.bytes_read = 0  # every byte this reader has read from the file, for tests and benchmarks
        self._reset()

    def _reset(self) -> None:
        self._identity: Optional[tuple] = None  # (device, inode, size, modification time) last seen
        self._offset = 0  # bytes of complete lines consumed
        self._check = b""  # the last bytes consumed, to recognise the same file next time
        self._stretches: list[_EpochBatches] = []
        self._epochs: list[dict] = []
        self._version = 0
        self._built_version = -1
        self._frames = (pd.DataFrame(), pd.DataFrame())

    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Per-batch and per-epoch events as tables, with `progress` in epochs (2.5 = half of epoch 3).

        The columns are those of `engine.interpret.metrics_frames`. The tables are copies, so a
        caller may change them without touching what other viewers see.
        """
        with self._lock:
            self._refresh()
            if self._built_version != self._version:
                self._frames = self._build()
                self._built_version = self._version
            batches, epochs = self._frames
        return batches.copy(), epochs.copy()

    def _refresh(self) -> None:
        try:
            stat = os.stat(self.path)
        except OSError:
            if self._identity is not None or self._offset:
                self._reset()  # the file (or its run folder) went away: nothing to show
                self._version += 1
            return
        identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if identity == self._identity:
            return  # the common case on a refresh: nothing new, no read at all
        try:
            with open(self.path, "rb") as handle:
                if not self._same_file(handle, stat):
                    self._reset()
                    self._version += 1
                handle.seek(self._offset)
                data = handle.read()
        except OSError:
            return  # read again on the next refresh
        self.bytes_read += len(data)
        self._identity = identity
        # Only complete lines are consumed; a line still being written is read again next time.
        end = data.rfind(b"\n") + 1
        if end == 0:
            return
        self._offset += end
        self._check = (self._check + data[max(0, end - _CHECK_BYTES):end])[-_CHECK_BYTES:]
        for line in data[:end].splitlines():
            try:
                event = json.loads(line.decode("utf-8", errors="replace"))
            except ValueError:
                continue  # a corrupt line is skipped, as runfiles.read_jsonl does
            if isinstance(event, dict):
                self._add(event)
        self._version += 1

    def _same_file(self, handle, stat: os.stat_result) -> bool:
        """Whether the open file is the one read so far, grown only at its end."""
        if self._identity is None:
            return self._offset == 0
        if (stat.st_dev, stat.st_ino) != self._identity[:2] or stat.st_size < self._offset:
            return False
        handle.seek(self._offset - len(self._check))
        return handle.read(len(self._check)) == self._check

    def _add(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "resume":
            resumed_after = event.get("epoch", 0)
            if _number(resumed_after):
                # The resumed run repeats the epochs after its checkpoint: the first try of them goes.
                self._stretches = [stretch for stretch in self._stretches if stretch.epoch <= resumed_after]
                self._epochs = [item for item in self._epochs if item["epoch"] <= resumed_after]
        elif kind == "batch":
            if not all(_number(event.get(key)) for key in ("epoch", "step", "steps")) or event["steps"] <= 0:
                return  # cannot be placed on the epoch axis
            if not self._stretches or self._stretches[-1].epoch != event["epoch"]:
                self._stretches.append(_EpochBatches(event["epoch"]))
                self._thin_all()
            self._stretches[-1].add(event, self._cap())
        elif kind == "epoch" and _number(event.get("epoch")):
            self._epochs.append(event)

    def _cap(self) -> Optional[int]:
        # Every stretch gets an equal share of the points, and always room for its first and last.
        if self.max_points is None:
            return None
        return max(2, self.max_points // max(1, len(self._stretches)))

    def _thin_all(self) -> None:
        cap = self._cap()
        for stretch in self._stretches:
            stretch.thin(cap)

    def _build(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        batches = pd.DataFrame([row for stretch in self._stretches for row in stretch.rows()])
        epochs = pd.DataFrame(self._epochs)
        if not batches.empty:
            batches["progress"] = batches["epoch"] - 1 + batches["step"] / batches["steps"]
        if not epochs.empty:
            epochs["progress"] = epochs["epoch"].astype(float)
        return batches, epochs
