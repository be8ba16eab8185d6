"""Phase 2 on cached activations against end-to-end phase 2 and recipe 3's pipeline (issue 17).

    .venv/bin/python bench/fine_tuning.py [--backbones MobileNet EfficientNetLite0] [--seeds 42 1 2]

On ../shared/data/cats_vs_dogs at 224 px, 10 head epochs then 5 fine-tuning epochs at 1e-5:
MobileNet α=0.25 unfreezes its last 20 layers, EfficientNet-Lite0 its last block (block15 and
the head convolution, 11 layers). Each measurement runs in a fresh Python process with an
empty cache (so the engine pays for decoding, features and activations):

  activations  the engine, phase 2 on cached activations (the default);
  end to end   the engine with `fine_tuning.cached_activations=false` (phase 2 as before issue 17);
  recipe 3     recipe 3's pipeline (`image_dataset_from_directory`, the frozen base inside
               `model.fit`, then the last N layers unfrozen and `fit` again), with its [0, 1]
               rescaling corrected to the backbone's own preprocessing (the pipeline of
               bench/cached_features.py, `RECIPE_MODEL`); seed 42 only.

It prints, per backbone and seed: phase 2 seconds (from the first phase 2 log line to "Saving
the model", plus the activations' computation wherever it ran: when phase 1's feature pass
computes them on the way, what that pass took longer than the plain feature pass of the end-to-end
run of the same seed is added, and shown in its own column), the mean seconds of a phase 2 epoch,
the whole run's seconds, validation accuracy, and the activations' size per image; then the
ratios. Times are wall-clock on a shared machine: read them with the load average printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cached_features import CHILD_PRELUDE, DATA, RECIPE_MODEL, REPO, SHARED, run_child  # noqa: E402

BACKBONES = {"MobileNet": {"alpha": 0.25, "layers": 20}, "EfficientNetLite0": {"alpha": None, "layers": 11}}
HEAD_EPOCHS, FINE_TUNE_EPOCHS, HEAD_RATE, FINE_TUNE_RATE = 10, 5, 3e-3, 1e-5

ENGINE_CHILD = CHILD_PRELUDE + r'''
from engine.config import RunConfig
from engine.runs import create_run
from engine.train import run_training
from engine import runfiles

backbone, alpha, layers, cached, data, work, seed = (sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]),
                                                     sys.argv[4] == "1", sys.argv[5], sys.argv[6], int(sys.argv[7]))
head_epochs, fine_tune_epochs, head_rate, fine_tune_rate = json.loads(sys.argv[8])
config = RunConfig().replace(**{"data.path": data, "model.backbone": backbone, "model.alpha": alpha,
                                "model.image_size": 224, "training.epochs": head_epochs,
                                "training.learning_rate": head_rate, "training.seed": seed,
                                "fine_tuning.layers": layers, "fine_tuning.epochs": fine_tune_epochs,
                                "fine_tuning.learning_rate": fine_tune_rate,
                                "fine_tuning.cached_activations": cached})
started_wall = time.time()
run_dir = create_run(config, os.path.join(work, "runs"))
state = run_training(run_dir)
to_model = os.stat(os.path.join(run_dir, "model.keras")).st_mtime - started_wall
events = runfiles.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
phase2_epochs = [event["epoch_seconds"] for event in events if event["type"] == "epoch" and event["phase"] == 2]
evaluation = runfiles.read_json(os.path.join(run_dir, "evaluation.json"))
log = open(os.path.join(run_dir, "worker.log")).read()
report(state=state, seconds=to_model, phase2_epoch_seconds=phase2_epochs,
       validation_accuracy=evaluation["splits"]["validation"]["accuracy"], log=log, peak_mb=peak_megabytes())
'''

RECIPE_CHILD = CHILD_PRELUDE + r'''
from engine.backbones import build_base, get_backbone
from engine.layers import build_preprocessing

backbone, alpha, layers, data, seed = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
head_epochs, fine_tune_epochs, head_rate, fine_tune_rate = json.loads(sys.argv[6])
learning_rate = head_rate
started = time.perf_counter()
''' + RECIPE_MODEL + r'''
model.fit(train, validation_data=validation, epochs=head_epochs, verbose=0)

class EpochTimes(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.began = time.perf_counter()
    def on_epoch_end(self, epoch, logs=None):
        times.append(time.perf_counter() - self.began)

times = []
phase2_started = time.perf_counter()
base.trainable = True
for layer in base.layers[:-layers]:
    layer.trainable = False
model.compile(optimizer=keras.optimizers.Adam(fine_tune_rate), loss="binary_crossentropy", metrics=["accuracy"])
history = model.fit(train, validation_data=validation, initial_epoch=head_epochs,
                    epochs=head_epochs + fine_tune_epochs, verbose=0, callbacks=[EpochTimes()])
phase2 = time.perf_counter() - phase2_started
seconds = time.perf_counter() - started
report(seconds=seconds, phase2_seconds=phase2, phase2_epoch_seconds=times,
       validation_accuracy=history.history["val_accuracy"][-1], peak_mb=peak_megabytes())
'''

PHASE2_STARTS = ("Computing the frozen layers' output", "Activations at", "Phase 2:")


def log_time(line: str) -> float:
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def phase2_seconds(log: str) -> float:
    """From the first phase 2 line of the worker log to "Saving the model"."""
    lines = [line for line in log.splitlines() if line[:4].isdigit()]
    start = next(log_time(line) for line in lines if any(text in line for text in PHASE2_STARTS))
    end = next(log_time(line) for line in lines if "Saving the model" in line)
    return end - start


def feature_pass_seconds(log: str) -> float | None:
    """The feature pass's seconds from the worker log ("Features [and activations] of N images computed in X s")."""
    for line in log.splitlines():
        if "images computed in" in line and ("Features of" in line or "Features and activations of" in line):
            return float(line.split("computed in ")[1].split(" s")[0])
    return None


def activation_bytes_per_image(cache: Path, train_images: int, validation_images: int) -> float | None:
    """The activation cache entries' bytes per image (train and validation, one view each)."""
    arrays = [path for path in (cache / "features").glob("[!.]*.npy")]
    sizes = sorted((path.stat().st_size for path in arrays), reverse=True)
    # The two largest arrays are the activations (train, validation); the pooled features are far smaller.
    if len(sizes) < 2:
        return None
    return (sizes[0] + sizes[1]) / (train_images + validation_images)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 1, 2])
    parser.add_argument("--no-recipe", action="store_true", help="skip recipe 3's pipeline")
    arguments = parser.parse_args()
    if not DATA.is_dir():
        print(f"{DATA} is not here; this benchmark needs ../shared/data/cats_vs_dogs.")
        return 1
    work = Path(tempfile.mkdtemp(prefix="bench_fine_tuning_"))
    keras_home = work / "keras_home"
    (keras_home / "models").mkdir(parents=True)
    for weights_file in (SHARED / "keras_home" / "models").glob("*.h5"):
        shutil.copy(weights_file, keras_home / "models" / weights_file.name)
    environment = dict(os.environ, BENCH_REPO=str(REPO), KERAS_HOME=str(keras_home),
                       TRANSFER_STUDIO_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="3")
    settings = json.dumps([HEAD_EPOCHS, FINE_TUNE_EPOCHS, HEAD_RATE, FINE_TUNE_RATE])
    print(f"load average at the start: {os.getloadavg()}", flush=True)
    results = {}
    try:
        for backbone in arguments.backbones:
            spec = BACKBONES[backbone]
            alpha = json.dumps(spec["alpha"])
            if not arguments.no_recipe:
                print(f"{backbone}: recipe 3 pipeline…", file=sys.stderr, flush=True)
                results[(backbone, "recipe", 42)] = run_child(
                    RECIPE_CHILD, [backbone, alpha, spec["layers"], DATA, 42, settings], environment)
            for seed in arguments.seeds:
                for mode, cached in (("activations", "1"), ("end to end", "0")):
                    print(f"{backbone}: {mode}, seed {seed}…", file=sys.stderr, flush=True)
                    cache = work / f"cache_{backbone}_{seed}_{cached}"
                    environment["TRANSFER_STUDIO_CACHE"] = str(cache)
                    result = run_child(ENGINE_CHILD, [backbone, alpha, spec["layers"], cached, DATA, work, seed,
                                                      settings], environment)
                    result["phase2_seconds"] = phase2_seconds(result["log"])
                    result["bytes_per_image"] = activation_bytes_per_image(cache, 2000, 1000) if cached == "1" else None
                    result["cut"] = next((line.split("on cached activations at ")[1].split(".")[0]
                                          for line in result["log"].splitlines() if "on cached activations at" in line),
                                         None)
                    result["feature_pass_seconds"] = feature_pass_seconds(result["log"])
                    results[(backbone, mode, seed)] = result
                    shutil.rmtree(cache, ignore_errors=True)
                fast, slow = results[(backbone, "activations", seed)], results[(backbone, "end to end", seed)]
                if "Features and activations of" in fast["log"]:
                    # The activations' share of phase 1's one pass counts as phase 2's cost.
                    # (Never below 0: a faster combined pass would be noise, not a saving.)
                    fast["activations_in_phase1"] = max(0.0, fast["feature_pass_seconds"] - slow["feature_pass_seconds"])
                    fast["phase2_seconds"] += fast["activations_in_phase1"]
                # Each seed's result as it lands, so a long run can be read before its tables.
                print(f"  seed {seed}: phase 2 {fast['phase2_seconds']:.1f} s on activations, "
                      f"{slow['phase2_seconds']:.1f} s end to end; validation accuracy "
                      f"{fast['validation_accuracy']:.4f} / {slow['validation_accuracy']:.4f}", file=sys.stderr,
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\ncats_vs_dogs (2000 train + 1000 validation), 224 px, {HEAD_EPOCHS} head epochs at {HEAD_RATE:g}, then "
          f"{FINE_TUNE_EPOCHS} fine-tuning epochs at {FINE_TUNE_RATE:g}; {os.cpu_count()} CPU cores; "
          f"load average at the end {os.getloadavg()}\n")
    print("| backbone | seed | pipeline | cut | feature pass s | of which activations s | phase 2 s | "
          "phase 2 epoch s (mean) | whole run s | val accuracy | activations KB/image |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (backbone, mode, seed), result in results.items():
        epochs = result["phase2_epoch_seconds"]
        size = f"{result['bytes_per_image'] / 1024:.0f}" if result.get("bytes_per_image") else ""
        feature_pass = f"{result['feature_pass_seconds']:.1f}" if result.get("feature_pass_seconds") else ""
        share = f"{result['activations_in_phase1']:.1f}" if "activations_in_phase1" in result else ""
        print(f"| {backbone} | {seed} | {mode} | {result.get('cut') or ''} | {feature_pass} | {share} | "
              f"{result['phase2_seconds']:.1f} | "
              f"{statistics.mean(epochs):.2f} | {result['seconds']:.1f} | {result['validation_accuracy']:.4f} | "
              f"{size} |")
    print("\n| backbone | phase 2 speed-up over end to end, per seed | activations phase 2 epoch vs recipe 3's "
          "fine-tuning epoch | whole run: recipe 3 s / activations s (seed 42) |")
    print("| --- | --- | --- | --- |")
    for backbone in arguments.backbones:
        speedups = [results[(backbone, "end to end", seed)]["phase2_seconds"]
                    / results[(backbone, "activations", seed)]["phase2_seconds"] for seed in arguments.seeds]
        recipe = results.get((backbone, "recipe", 42))
        fast = results.get((backbone, "activations", 42)) or results[(backbone, "activations", arguments.seeds[0])]
        epoch_ratio = (statistics.mean(recipe["phase2_epoch_seconds"]) / statistics.mean(fast["phase2_epoch_seconds"])
                       if recipe else None)
        whole = recipe["seconds"] / fast["seconds"] if recipe else None
        print(f"| {backbone} | {', '.join(f'{value:.1f}×' for value in speedups)} | "
              f"{f'{epoch_ratio:.1f}×' if epoch_ratio else ''} | {f'{whole:.1f}×' if whole else ''} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
