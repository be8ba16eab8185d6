"""Sweeps: a group of normal runs that differ in named settings, and their leaderboard.

A sweep is nothing but runs: each is started through `engine.jobs.start` (so the queue, the
per-user limits and permissions apply, and Monitor, Evaluate and Compare work on it), tagged
`sweep-<id>`, and listed in `RUNS_ROOT/sweeps/<id>.json`, which this module alone writes.
Runs of the same backbone are queued next to each other, so with cached features the second
finds the first one's features in the cache: a 3-backbone × 3-rate sweep costs three feature
passes and nine head trainings (when the queue runs one run at a time, its default).

The leaderboard ranks on validation accuracy and shows the test accuracy of the chosen run
only: choosing among many runs by their validation score overfits the validation images, so
only a split that played no part in the choice says how the chosen model will do.
"""

from __future__ import annotations

import datetime
import itertools
import os
import secrets
import time
from pathlib import Path
from typing import Iterable, Optional

import pandas as pd

from engine import runfiles
from engine.config import ConfigError, RunConfig
from engine.locations import runs_root
from engine.status import FINAL_STATES, State, read_status
from engine.users import AccessSettings, User

SWEEPS_FOLDER = "sweeps"
MAXIMUM_RUNS = 64


def parse_grid(items: Iterable[str]) -> dict[str, list[str]]:
    """`["model.backbone=A,B", "training.learning_rate=1e-3,3e-3"]` → {name: [values as text]}.

    Raises:
        ValueError: an item without `=`, without values, or a name given twice.
    """
    grid: dict[str, list[str]] = {}
    for item in items:
        name, separator, values = str(item).partition("=")
        name = name.strip()
        choices = [value.strip() for value in values.split(",") if value.strip()]
        if not separator or not name or not choices:
            raise ValueError(f"A grid entry is NAME=VALUE,VALUE (e.g. model.backbone=MobileNet,EfficientNetB0); "
                             f"received {item!r}.")
        if name in grid:
            raise ValueError(f"{name} is given twice in the grid; list all its values in one entry.")
        grid[name] = choices
    return grid


def expand(config: RunConfig, grid: dict[str, list]) -> list[tuple[RunConfig, dict]]:
    """Every combination of the grid's values applied to `config`, runs of one backbone next to each other.

    Returns:
        [(config of the run, {name: value} that makes it differ)].

    Raises:
        ValueError: an empty grid, more than MAXIMUM_RUNS combinations, or a value a setting
            refuses (the ConfigError names the setting).
    """
    if not grid:
        raise ValueError("A sweep needs at least one grid entry, e.g. --grid model.backbone=MobileNet,EfficientNetB0.")
    names = list(grid)
    combinations = list(itertools.product(*(grid[name] for name in names)))
    if len(combinations) > MAXIMUM_RUNS:
        raise ValueError(f"The grid makes {len(combinations)} runs; at most {MAXIMUM_RUNS} are allowed in one sweep. "
                         "Take fewer values.")
    runs = []
    for values in combinations:
        varied = dict(zip(names, values))
        try:
            run_config = config.replace(**varied, **_width_for(config, varied))
        except ConfigError as error:
            raise ValueError(f"Grid value refused: {error}") from error
        runs.append((run_config, {name: _setting_value(run_config, name) for name in names}))
    # Stable sort by backbone: the queue then computes each backbone's features once, first.
    order = {backbone: index for index, backbone in enumerate(dict.fromkeys(run.model.backbone for run, _ in runs))}
    return sorted(runs, key=lambda pair: order[pair[0].model.backbone])


def _width_for(config: RunConfig, varied: dict) -> dict:
    """The width to use when the grid changes the backbone but not `model.alpha`.

    The base's width is kept where the backbone has it (MobileNet α=0.25 stays 0.25); a backbone
    without that width gets its default, and one without widths none, so a grid over backbones
    of different families is valid.
    """
    from engine.backbones import BACKBONES

    backbone = varied.get("model.backbone")
    if backbone is None or "model.alpha" in varied or backbone not in BACKBONES:
        return {}
    if config.model.alpha is not None and config.model.alpha in BACKBONES[backbone].alphas:
        return {}
    return {"model.alpha": None}


def _setting_value(config: RunConfig, dotted: str):
    section, _, name = dotted.partition(".")
    value = getattr(config, section)
    return getattr(value, name) if name else value


def sweep_folder(runs_dir: Optional[str | os.PathLike] = None) -> Path:
    """Where the sweeps of a runs root are listed."""
    return Path(runs_dir or runs_root()) / SWEEPS_FOLDER


def start_sweep(config: RunConfig, grid: dict[str, list], runs_dir: Optional[str | os.PathLike] = None,
                user: Optional[User] = None, name: str = "", limits: Optional[AccessSettings] = None,
                source: str = "python", executor: Optional[str] = None) -> dict:
    """Starts one queued run per grid combination and records the sweep.

    Returns:
        The sweep: {"id", "name", "created", "owner", "grid", "runs": [{"run_id", "settings"}]}.

    Raises:
        ValueError: see `expand`; PermissionError: a viewer; engine.jobs.QuotaExceeded: the user's
            queued-run limit is reached part way (the runs already started stay, listed in the sweep).
    """
    from engine import jobs
    from engine.run_details import describe

    planned = expand(config, grid)
    root = Path(runs_dir or runs_root())
    sweep_id = f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    title = " ".join(str(name).split()) or config.name or f"sweep {sweep_id}"
    sweep = {"id": sweep_id, "name": title, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
             "owner": getattr(user, "id", None), "grid": {key: list(values) for key, values in grid.items()},
             "base": config.to_dict(), "runs": []}
    folder = sweep_folder(root)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        for run_config, varied in planned:
            label = " · ".join(f"{key.split('.')[-1]}={value}" for key, value in varied.items())
            run_config = run_config.replace(name=f"{title} · {label}"[:120])
            run_id = jobs.start(run_config, root, user=user, limits=limits, source=source, executor=executor)
            describe(run_id, root, user=user, tags=[f"sweep-{sweep_id}"], source=source)
            sweep["runs"].append({"run_id": run_id, "settings": varied})
    finally:
        # Written even when a limit stops it part way: the runs already queued are part of it.
        # Not when not one run started (a viewer, a limit hit at once): an empty sweep would be listed.
        if sweep["runs"]:
            runfiles.atomic_write_json(folder / f"{sweep_id}.json", sweep)
    return sweep


def read_sweep(sweep_id: str, runs_dir: Optional[str | os.PathLike] = None) -> dict:
    """A sweep as recorded.

    Raises:
        FileNotFoundError: no sweep of that id in this runs root.
    """
    path = sweep_folder(runs_dir) / f"{Path(sweep_id).name}.json"
    sweep = runfiles.read_json(path)
    if not isinstance(sweep, dict):
        raise FileNotFoundError(f"No sweep {sweep_id!r} in {sweep_folder(runs_dir)}; "
                                "`python -m engine sweep --list` shows the sweeps there.")
    return sweep


def list_sweeps(runs_dir: Optional[str | os.PathLike] = None) -> list[dict]:
    """Every recorded sweep of the runs root, newest first."""
    folder = sweep_folder(runs_dir)
    sweeps = [runfiles.read_json(path) for path in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    return sorted((sweep for sweep in sweeps if isinstance(sweep, dict)), key=lambda sweep: sweep["id"], reverse=True)


def wait_for_sweep(sweep: dict, runs_dir: Optional[str | os.PathLike] = None, timeout: float = 24 * 3600.0,
                   poll_seconds: float = 1.0, progress=None) -> list:
    """Waits until every run of the sweep has ended (or time is up); returns their statuses."""
    from engine import jobs

    root = Path(runs_dir or runs_root())
    deadline = time.time() + timeout
    while True:
        statuses = [jobs.reconcile(root / entry["run_id"]) for entry in sweep["runs"]]
        if progress:
            progress(statuses)
        if all(status.state in FINAL_STATES for status in statuses) or time.time() >= deadline:
            return statuses
        time.sleep(poll_seconds)


def leaderboard(sweep: dict, runs_dir: Optional[str | os.PathLike] = None) -> tuple[pd.DataFrame, dict]:
    """The sweep's runs ranked by validation accuracy, and the chosen run with its test accuracy.

    Returns:
        (table, chosen): the table has name, the varied settings, validation accuracy, training
        seconds, model MB, one-image latency in ms (when measured, see `engine.latency`), state,
        owner and run_id; `chosen` is {"run_id", "name", "validation_accuracy", "test_accuracy",
        "test_images", "why"} or {} when no run finished.
    """
    from engine.compare import training_cost
    from engine.latency import read_latency

    root = Path(runs_dir or runs_root())
    rows = []
    for entry in sweep["runs"]:
        run_dir = root / entry["run_id"]
        status = read_status(run_dir)
        evaluation = runfiles.read_json(run_dir / runfiles.EVALUATION_FILE, default={}) or {}
        validation = ((evaluation.get("splits") or {}).get("validation") or {}).get("accuracy")
        model_path = run_dir / runfiles.MODEL_FILE
        latency = read_latency(run_dir)
        # What a reader compares first comes first; the id (for links) last.
        rows.append({"name": status.name, **entry["settings"], "validation accuracy": validation,
                     "training seconds": training_cost(run_dir)["training seconds"],
                     "model MB": model_path.stat().st_size / 1e6 if model_path.is_file() else None,
                     "latency ms (1 image)": latency.get("one_image_ms") if latency else None,
                     "state": status.state.value, "owner": status.owner, "run_id": entry["run_id"]})
    table = pd.DataFrame(rows)
    if table.empty:
        return table, {}
    table = table.sort_values("validation accuracy", ascending=False, na_position="last", kind="stable")
    table = table.reset_index(drop=True)
    finished = table[(table["state"] == State.FINISHED.value) & table["validation accuracy"].notna()]
    if finished.empty:
        return table, {}
    best = finished.iloc[0]
    evaluation = runfiles.read_json(root / best["run_id"] / runfiles.EVALUATION_FILE, default={}) or {}
    test = (evaluation.get("splits") or {}).get("test") or {}
    chosen = {"run_id": best["run_id"], "name": best["name"], "validation_accuracy": float(best["validation accuracy"]),
              "test_accuracy": test.get("accuracy"), "test_images": test.get("num_images"),
              "why": "The run is chosen by validation accuracy, so that number is optimistic: among many runs the "
                     "best on the validation images is partly the luckiest on them. The test images played no part "
                     "in the choice, so only the chosen run's test accuracy is shown: it is the honest estimate."}
    return table, chosen
