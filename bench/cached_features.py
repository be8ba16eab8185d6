"""Cached features against the recipes' pipeline: 10 head epochs on ../shared/data/cats_vs_dogs.

    .venv/bin/python bench/cached_features.py [--backbones MobileNet EfficientNetLite0] [--epochs 10]

For each backbone, three measurements, each in a fresh Python process whose clock starts
after TensorFlow is imported (interpreter start-up excluded from all of them):

  recipe   `keras.utils.image_dataset_from_directory` (+ prefetch, no cache), the frozen
           base inside `model.fit`, so every epoch decodes every JPEG and runs the base again;
           the same head, optimizer, learning rate and input preprocessing as the engine.
  engine   `engine.train.run_training` with an empty cache: scan, decode once, features
           once, head on the features, save the full model (then evaluate).
  rerun    the engine again with only the head's learning rate changed: everything cached.

Times run from the start of data loading to the saved model. It prints a table: wall time
of each, their ratio, feature-extraction images/second, peak memory (max RSS of the
process), final validation accuracy (the mean over the repeats, which train with seeds 42, 43,
…, the same seeds in both pipelines), and the share of the machine's float32 compute the
feature extraction reaches (FLOPs per image × images/second ÷ a measured matrix-multiply
rate). MobileNet's weights come from ../shared/keras_home, copied into a temporary KERAS_HOME;
EfficientNet-Lite0's come with the app.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data" / "cats_vs_dogs"
BACKBONES = {"MobileNet": {"alpha": 0.25}, "EfficientNetLite0": {"alpha": None}}
LEARNING_RATE = 3e-3
SEED = 42  # repeat r trains with seed SEED + r, in both pipelines

# Each child prints one JSON line prefixed with this marker.
MARKER = "BENCH_RESULT "

CHILD_PRELUDE = r'''
import json, os, resource, sys, time
PROCESS_STARTED = time.time()  # close to the interpreter's start, before TensorFlow is imported
sys.path.insert(0, os.environ["BENCH_REPO"])
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
import tensorflow as tf
import keras

def peak_megabytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

def report(**values):
    print("BENCH_RESULT " + json.dumps(values), flush=True)
'''

# The recipes' pipeline up to the compiled model: JPEGs read by `image_dataset_from_directory` every
# epoch, the frozen base inside the model. Needs `backbone`, `alpha`, `data`, `seed` and
# `learning_rate` defined; leaves `train`, `validation`, `base` and `model`. Also used by
# bench/fine_tuning.py.
RECIPE_MODEL = r'''
train = keras.utils.image_dataset_from_directory(os.path.join(data, "train"), image_size=(224, 224), batch_size=32,
                                                 label_mode="binary", seed=seed)
validation = keras.utils.image_dataset_from_directory(os.path.join(data, "validation"), image_size=(224, 224),
                                                      batch_size=32, label_mode="binary", shuffle=False)
train, validation = train.prefetch(tf.data.AUTOTUNE), validation.prefetch(tf.data.AUTOTUNE)
keras.utils.set_random_seed(seed)
base = build_base(backbone, 224, alpha, "imagenet")
base.trainable = False
inputs = keras.Input((224, 224, 3))
x = build_preprocessing(get_backbone(backbone).preprocess)(inputs)
x = base(x, training=False)
x = keras.layers.GlobalAveragePooling2D()(x)
x = keras.layers.Dropout(0.2)(x)
outputs = keras.layers.Dense(1, activation="sigmoid")(x)
model = keras.Model(inputs, outputs)
model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="binary_crossentropy", metrics=["accuracy"])
'''

RECIPE_CHILD = CHILD_PRELUDE + r'''
from engine.backbones import build_base, get_backbone
from engine.layers import build_preprocessing

backbone, alpha, epochs, data, work = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
learning_rate, seed = float(sys.argv[6]), int(sys.argv[7])
started = time.perf_counter()
''' + RECIPE_MODEL + r'''
history = model.fit(train, validation_data=validation, epochs=epochs, verbose=0)
model.save(os.path.join(work, "recipe.keras"))
seconds = time.perf_counter() - started
report(seconds=seconds, validation_accuracy=history.history["val_accuracy"][-1], peak_mb=peak_megabytes())
'''

ENGINE_CHILD = CHILD_PRELUDE + r'''
import engine.train
from engine.config import RunConfig
from engine.runs import create_run
from engine.train import run_training
from engine import runfiles

backbone, alpha, epochs, data, work = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
learning_rate, seed = float(sys.argv[6]), int(sys.argv[7])
config = RunConfig().replace(**{"data.path": data, "model.backbone": backbone, "model.alpha": alpha,
                                "model.image_size": 224, "training.epochs": epochs,
                                "training.learning_rate": learning_rate, "training.seed": seed})
started = time.perf_counter()
started_wall = time.time()
run_dir = create_run(config, os.path.join(work, "runs"))
state = run_training(run_dir)
total = time.perf_counter() - started
to_model = os.stat(os.path.join(run_dir, "model.keras")).st_mtime - started_wall
events = runfiles.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
first_batch = next(event["time"] for event in events if event["type"] == "batch") - started_wall
log = open(os.path.join(run_dir, "worker.log")).read()
evaluation = runfiles.read_json(os.path.join(run_dir, "evaluation.json"))
report(state=state, seconds=to_model, seconds_with_evaluation=total, first_batch_seconds=first_batch,
       first_batch_from_process_start=first_batch + started_wall - PROCESS_STARTED,
       validation_accuracy=evaluation["splits"]["validation"]["accuracy"], peak_mb=peak_megabytes(), log=log)
'''

MACHINE_CHILD = CHILD_PRELUDE + r'''
from engine.backbones import build_base

def flops_per_image(model):
    """Multiply-adds × 2 of the convolutions and dense layers (activations and batch norm left out)."""
    total = 0
    for layer in model._flatten_layers(include_self=False):
        config = layer.get_config()
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            _, height, width, channels = layer.output.shape
            kernel_height, kernel_width = config["kernel_size"]
            total += 2 * height * width * kernel_height * kernel_width * channels
        elif isinstance(layer, keras.layers.Conv2D):
            _, height, width, filters = layer.output.shape
            kernel_height, kernel_width = config["kernel_size"]
            input_channels = layer.input.shape[-1] // config.get("groups", 1)
            total += 2 * height * width * kernel_height * kernel_width * input_channels * filters
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * layer.input.shape[-1] * config["units"]
    return total

size = 2048
a = tf.random.normal((size, size))
b = tf.random.normal((size, size))
tf.linalg.matmul(a, b).numpy()
repeats = 12
started = time.perf_counter()
for _ in range(repeats):
    tf.linalg.matmul(a, b).numpy()
matmul_flops = 2 * size ** 3 * repeats / (time.perf_counter() - started)
flops = {}
for backbone, alpha in json.loads(sys.argv[1]).items():
    flops[backbone] = flops_per_image(build_base(backbone, 224, alpha, "none"))
report(matmul_flops_per_second=matmul_flops, flops_per_image=flops)
'''


def run_child(code: str, arguments: list, environment: dict) -> dict:
    """Runs one measurement in a fresh interpreter; returns the JSON it reports."""
    completed = subprocess.run([sys.executable, "-c", code, *map(str, arguments)], capture_output=True, text=True,
                               env=environment, cwd=REPO)
    for line in completed.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    raise RuntimeError(f"measurement failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}")


STAGES = (("decode", "Checking the images"), ("build", "Building"), ("features", "Computing"),
          ("head", "Phase 1"), ("save", "Saving the model"), ("evaluate", "Evaluating"))


def stage_seconds(log: str) -> dict:
    """Seconds between the worker log's stage messages: decode, build, features, head, save."""
    import datetime

    times = {}
    for line in log.splitlines():
        for name, text in STAGES:
            if text in line and name not in times:
                stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                times[name] = stamp.timestamp()
    ordered = sorted(times.items(), key=lambda pair: pair[1])
    return {name: round(ordered[index + 1][1] - start, 2) for index, (name, start) in enumerate(ordered[:-1])}


def median_run(runs: list) -> dict:
    """The run with the median time (the lower middle one for an even count)."""
    return sorted(runs, key=lambda run: run["seconds"])[(len(runs) - 1) // 2]


def feature_rate(log: str) -> float | None:
    """Images/second of feature extraction, from the worker log line the engine writes."""
    match = re.search(r"Features of (\d+) images computed in ([\d.]+) s \(([\d.]+) images/s\)", log)
    return float(match.group(3)) if match else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure the recipe and the empty-cache engine this many times; the table shows the "
                             "run of median time")
    arguments = parser.parse_args()
    if not DATA.is_dir():
        print(f"{DATA} is not here; this benchmark needs ../shared/data/cats_vs_dogs.")
        return 1
    work = Path(tempfile.mkdtemp(prefix="bench_features_"))
    keras_home = work / "keras_home"
    (keras_home / "models").mkdir(parents=True)
    for weights_file in (SHARED / "keras_home" / "models").glob("*.h5"):
        shutil.copy(weights_file, keras_home / "models" / weights_file.name)
    environment = dict(os.environ, BENCH_REPO=str(REPO), KERAS_HOME=str(keras_home),
                       TRANSFER_STUDIO_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="3")
    try:
        machine = run_child(MACHINE_CHILD, [json.dumps({name: BACKBONES[name]["alpha"]
                                                        for name in arguments.backbones})], environment)
        rows = []
        for backbone in arguments.backbones:
            alpha = json.dumps(BACKBONES[backbone]["alpha"])
            # A fresh, empty cache per backbone: the engine's first run pays for decoding and features.
            environment["TRANSFER_STUDIO_CACHE"] = str(work / f"cache_{backbone}")
            common = [backbone, alpha, arguments.epochs, DATA, work]
            recipes, engines = [], []
            for repeat in range(arguments.repeats):
                print(f"{backbone}: recipe pipeline ({repeat + 1}/{arguments.repeats})…", file=sys.stderr, flush=True)
                # Each repeat trains with its own seed (the same for both), so the accuracy columns
                # are means over seeds, not one draw of the head's initialisation and shuffle.
                seed = SEED + repeat
                recipes.append(run_child(RECIPE_CHILD, common + [LEARNING_RATE, seed], environment))
                print(f"{backbone}: engine, empty cache ({repeat + 1}/{arguments.repeats})…", file=sys.stderr,
                      flush=True)
                shutil.rmtree(environment["TRANSFER_STUDIO_CACHE"], ignore_errors=True)
                engines.append(run_child(ENGINE_CHILD, common + [LEARNING_RATE, seed], environment))
            recipe, engine = median_run(recipes), median_run(engines)
            recipe["mean_accuracy"] = statistics.mean(run["validation_accuracy"] for run in recipes)
            engine["mean_accuracy"] = statistics.mean(run["validation_accuracy"] for run in engines)
            if arguments.repeats > 1:
                print(f"{backbone}: recipe seconds {[round(run['seconds'], 1) for run in recipes]}, engine seconds "
                      f"{[round(run['seconds'], 1) for run in engines]}; validation accuracy by seed "
                      f"{SEED}…: recipe {[run['validation_accuracy'] for run in recipes]}, engine "
                      f"{[run['validation_accuracy'] for run in engines]}", file=sys.stderr, flush=True)
            print(f"{backbone}: engine, only the learning rate changed…", file=sys.stderr, flush=True)
            rerun = run_child(ENGINE_CHILD, common + [LEARNING_RATE / 3, SEED], environment)
            rate = feature_rate(engine["log"])
            share = rate * machine["flops_per_image"][backbone] / machine["matmul_flops_per_second"] if rate else None
            rows.append((backbone, recipe, engine, rerun, rate, share, machine["flops_per_image"][backbone]))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\ncats_vs_dogs (2000 train + 1000 validation JPEGs), 224 px, {arguments.epochs} head epochs, "
          f"{os.cpu_count()} CPU cores; float32 matmul (2048²): "
          f"{machine['matmul_flops_per_second'] / 1e9:.1f} GFLOP/s\n")
    print("| backbone | recipe s | engine s (empty cache) | speed-up | rerun, lr only: s / first batch at s (from process start) "
          "| features img/s | GFLOPs/img | share of matmul peak | peak MB recipe / engine "
          "| val acc recipe / engine (mean over seeds) / rerun |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for backbone, recipe, engine, rerun, rate, share, flops in rows:
        print(f"| {backbone} | {recipe['seconds']:.1f} | {engine['seconds']:.1f} | "
              f"{recipe['seconds'] / engine['seconds']:.1f}× | "
              f"{rerun['seconds']:.1f} / {rerun['first_batch_seconds']:.1f} "
              f"({rerun['first_batch_from_process_start']:.1f}) | "
              f"{rate:.0f} | {flops / 1e9:.3f} | {share:.0%} | "
              f"{recipe['peak_mb']:.0f} / {engine['peak_mb']:.0f} | "
              f"{recipe['mean_accuracy']:.4f} / {engine['mean_accuracy']:.4f} / "
              f"{rerun['validation_accuracy']:.3f} |")
    print("\nEngine stages, empty cache (seconds, from the worker log):")
    for backbone, recipe, engine, rerun, rate, share, flops in rows:
        print(f"  {backbone}: {stage_seconds(engine['log'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
