"""Transfer Studio's engine: datasets, backbones, training, evaluation and run folders.

The public API, for notebooks and scripts (docs/architecture.md says what each part does):

    import engine
    config = engine.RunConfig().replace(**{"data.path": "images/", "training.epochs": 3})
    run_dir = engine.train_run(config)            # trains in this process
    engine.read_status(run_dir).state             # State.FINISHED
    engine.predict_images(run_dir, ["cat.jpg"])

`engine.start` / `stop` / `kill` / `resume` / `wait_for` run the same training as detached,
queued processes (what the dashboard uses). Importing this package is cheap: names are
loaded on first use, and TensorFlow only by the calls that train, evaluate or predict,
so the dashboard's monitoring pages stay light.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name → the module that owns it; loaded on first use (PEP 562).
_PUBLIC = {
    "RunConfig": "engine.config",
    "ConfigError": "engine.config",
    "State": "engine.status",
    "Stage": "engine.status",
    "RunStatus": "engine.status",
    "read_status": "engine.status",
    "list_runs": "engine.runs",
    "create_run": "engine.runs",
    "start": "engine.jobs",
    "stop": "engine.jobs",
    "kill": "engine.jobs",
    "resume": "engine.jobs",
    "wait_for": "engine.jobs",
    "train_run": "engine.train",
    "predict_images": "engine.predict",
    "evaluate_folder": "engine.evaluate",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


def __dir__():
    return __all__
