"""Benchmark: how the costs grow from 3,000 to 30,000 images (issue 15).

    .venv/bin/python bench/scale.py [--sizes 3000 10000 30000] [--repeats 2] [--folder ~/.cache/transfer-studio-bench]
    .venv/bin/python bench/scale.py --searches      # the near-duplicate search alone: every pair vs the index
    .venv/bin/python bench/scale.py --sizes 3000 30000 --interleaved   # decode and features, small/large/small

The folders are generated once from the 3,000 photos of ../shared/data/cats_vs_dogs (two
classes): every photo gives up to ten distinct images, each a different random crop (45-85 %
of the area), mirrored or not, with its brightness, contrast and colour changed and scaled to
a longest side of 160-400 px, saved as JPEG. They are written into `--folder` (outside the
repository) and reused by later runs; a folder of N images holds the first N of the pool, as
hard links, so the three sizes share their files' bytes on disk but not their paths.

For each size, with an empty cache root, it measures in one fresh worker process
(interpreter start-up and the TensorFlow import excluded from the stages):

  scan                 `engine.data.scan_dataset`: list, check and decode every file once
  data doctor          `engine.doctor.check_dataset` on that scan: hashes, duplicates,
                       near-duplicates (the index of `engine.near_duplicates`), leakage
  decode cache         `engine.pipeline.build_image_cache` at 224 px (the memory-mapped array)
  feature extraction   MobileNet α=0.25 (real ImageNet weights) over every image, once, saved
                       in the feature cache
  head training        3 epochs of the head on those features (`engine.features`)

each as seconds and seconds per 1,000 images (with `--repeats N`: N runs, each with an empty
cache, keeping each stage's fastest time, since on a shared machine other work only adds
time); the worker's peak resident memory (VmHWM, which counts mapped file pages) and its peak
anonymous memory (sampled every 0.1 s); then a real Streamlit server (started here on
127.0.0.1 with the same cache root, ended by its process group id) and headless Chromium:
the time from "Use this folder" to the folder's image count and first thumbnail on the Data
page, the median time of five reruns (the grid's next page, until its first new file name is
drawn and the page is idle), and the server's peak resident memory; and the disk used by
the caches, per kind. The first table ends with the per-1,000-image time at the largest size
divided by that at the smallest (target: at most 1.3×).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SOURCE = SHARED / "data" / "cats_vs_dogs"
WEIGHTS = SHARED / "keras_home" / "models" / "mobilenet_2_5_224_tf_no_top.h5"
DEFAULT_FOLDER = Path(os.path.expanduser("~")) / ".cache" / "transfer-studio-bench"
VARIANTS_PER_PHOTO = 10
POOL_VERSION = 1
MARKER = "BENCH_RESULT "
STAGES = ("scan", "data doctor", "decode cache", "feature extraction", "head training")


def source_photos() -> list[tuple[Path, str]]:
    """Every photo of cats_vs_dogs with its class (train and validation together), in a fixed order."""
    photos = []
    for path in sorted(SOURCE.rglob("*.jpg")):
        photos.append((path, path.parent.name))
    if not photos:
        raise SystemExit(f"No photos found in {SOURCE}; this benchmark generates its images from them.")
    return photos


def _variants_of(job: tuple) -> int:
    """Writes the ten variants of one photo (skipping those already written); returns how many were written."""
    from PIL import Image, ImageEnhance, ImageOps

    index, path, label, pool = job
    targets = [Path(pool) / label / f"{Path(path).stem}-v{variant}.jpg" for variant in range(VARIANTS_PER_PHOTO)]
    if all(target.exists() for target in targets):
        return 0
    with Image.open(path) as opened:
        photo = ImageOps.exif_transpose(opened).convert("RGB")
    written = 0
    for variant, target in enumerate(targets):
        if target.exists():
            continue
        rng = random.Random(f"{index}-{variant}")
        width, height = photo.size
        area = rng.uniform(0.45, 0.85)
        aspect = rng.uniform(0.75, 1.33)
        crop_width = min(width, max(16, int(round((area * width * height * aspect) ** 0.5))))
        crop_height = min(height, max(16, int(round((area * width * height / aspect) ** 0.5))))
        left = rng.randint(0, width - crop_width)
        top = rng.randint(0, height - crop_height)
        image = photo.crop((left, top, left + crop_width, top + crop_height))
        if (variant + rng.randint(0, 1)) % 2:
            image = ImageOps.mirror(image)
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.75, 1.25))
        image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.75, 1.25))
        image = ImageEnhance.Color(image).enhance(rng.uniform(0.5, 1.5))
        longest = rng.randint(160, 400)
        scale = longest / max(image.size)
        image = image.resize((max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale))),
                             Image.Resampling.BILINEAR)
        temporary = target.with_suffix(".tmp")
        image.save(temporary, "JPEG", quality=rng.randint(75, 92))
        os.replace(temporary, target)
        written += 1
    return written


def build_pool(folder: Path, workers: int = 2) -> Path:
    """Writes the pool of generated images once (ten per photo); later calls only check it is complete."""
    pool = folder / f"pool-v{POOL_VERSION}"
    done_marker = pool / ".complete"
    if done_marker.exists():
        return pool
    photos = source_photos()
    for label in {label for _, label in photos}:
        (pool / label).mkdir(parents=True, exist_ok=True)
    jobs = [(index, str(path), label, str(pool)) for index, (path, label) in enumerate(photos)]
    began = time.perf_counter()
    written = 0
    with ProcessPoolExecutor(max_workers=workers) as executor:
        for done, count in enumerate(executor.map(_variants_of, jobs, chunksize=16), start=1):
            written += count
            if done % 300 == 0:
                print(f"  generated the variants of {done}/{len(jobs)} photos ({time.perf_counter() - began:.0f} s)",
                      flush=True)
    done_marker.write_text(f"{written} images written\n")
    return pool


def pool_order(pool: Path) -> list[Path]:
    """The pool's images in the order folders take them: every photo's variant 0, then every variant 1, …

    So a folder of 3,000 holds one variant of each photo and a folder of 30,000 all ten.
    """
    photos = source_photos()
    return [pool / label / f"{path.stem}-v{variant}.jpg"
            for variant in range(VARIANTS_PER_PHOTO) for path, label in photos]


def build_folder(folder: Path, size: int) -> Path:
    """The dataset folder of `size` images (hard links into the pool), made once."""
    pool = build_pool(folder)
    target = folder / f"images-{size}"
    marker = target / ".complete"
    if marker.exists():
        return target
    order = pool_order(pool)
    if size > len(order):
        raise SystemExit(f"--sizes asks for {size} images; the pool has {len(order)} (ten per photo).")
    for path in order[:size]:
        link = target / path.parent.name / path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            try:
                os.link(path, link)
            except OSError:
                shutil.copy2(path, link)
    marker.write_text(f"{size}\n")
    return target


CHILD_STAGES = r'''
import json, os, resource, sys, threading, time
sys.path.insert(0, os.environ["BENCH_REPO"])
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
import tensorflow as tf  # imported before any clock starts
import keras

from engine import caches
from engine.config import RunConfig
from engine.data import make_split, scan_dataset
from engine.doctor import check_dataset
from engine.features import (build_feature_extractor, compute_features, feature_cache_key, make_feature_dataset,
                             save_cached_features)
from engine.modeling import build_head, build_model, compile_model
from engine.pipeline import build_image_cache

peak_anonymous = [0]

def sample_memory():
    while True:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    peak_anonymous[0] = max(peak_anonymous[0], int(line.split()[1]) * 1024)
        time.sleep(0.1)

threading.Thread(target=sample_memory, daemon=True).start()
folder = sys.argv[1]
seconds, notes = {}, {}

def timed(name, work):
    began = time.perf_counter()
    result = work()
    seconds[name] = time.perf_counter() - began
    return result

scan = timed("scan", lambda: scan_dataset(folder))
report = timed("data doctor", lambda: check_dataset(folder, scan=scan))
notes.update(images=len(scan.files), near_duplicate_pairs=report["num_near_duplicate_pairs"],
             leaks=report["num_leaks"], duplicate_files=report["num_duplicate_files"])
cache = timed("decode cache", lambda: build_image_cache(scan.candidates, 224, cache="disk", dataset=scan.root))
config = RunConfig().replace(**{"data.path": folder, "model.backbone": "MobileNet", "model.alpha": 0.25,
                                "model.weights": "imagenet", "model.image_size": 224, "training.epochs": 3})
manifest = make_split(scan, 0.1, 0.1, 42)
row_of = {path: row for row, path in enumerate(scan.candidates)}
classes = sorted({item.label for item in manifest})
began = time.perf_counter()
model = build_model(config, len(classes))
extractor = build_feature_extractor(model)
notes["model_build_seconds"] = time.perf_counter() - began
rows = [row_of[item.path] for item in manifest]
used_rows = sorted(set(rows))

def extract():
    # As a run does: every used image once, saved in the feature cache under the run's key.
    computed = compute_features(extractor, cache.images, used_rows)
    save_cached_features(feature_cache_key(cache.key, config, used_rows), computed)
    return computed

extracted = timed("feature extraction", extract)
index_of_row = {row: index for index, row in enumerate(used_rows)}
features = extracted[[index_of_row[row] for row in rows]]
labels = np.array([classes.index(item.label) for item in manifest], dtype=np.int32)
train = np.array([item.split == "train" for item in manifest])
validation = np.array([item.split == "validation" for item in manifest])

def train_head():
    head = build_head(config, len(classes), features.shape[-1])
    compile_model(head, config.training.optimizer, config.training.learning_rate, len(classes), steps_per_execution=32)
    history = head.fit(make_feature_dataset(features[train], labels[train], config.training.batch_size, shuffle=True,
                                            binary=True),
                       validation_data=make_feature_dataset(features[validation], labels[validation], 256, binary=True),
                       epochs=3, verbose=0)
    return history.history["val_accuracy"][-1]

notes["validation_accuracy"] = timed("head training", train_head)
with open("/proc/self/status") as handle:
    peak_total = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))
cache_root = os.environ["TRANSFER_STUDIO_CACHE"]
print("BENCH_RESULT " + json.dumps({"seconds": seconds, "notes": notes, "peak_rss": peak_total,
                                    "peak_anonymous": peak_anonymous[0],
                                    "cache_bytes": caches.cache_size(cache_root),
                                    "cache_by_kind": {kind: sum(entry.size for entry in caches.list_entries(cache_root)
                                                                if entry.kind == kind)
                                                      for kind in ("scans", "images", "features", "hashes")}}),
      flush=True)
'''


INTERLEAVED = r'''
import json, os, sys, time
sys.path.insert(0, os.environ["BENCH_REPO"])
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
import tensorflow as tf
from pathlib import Path
from engine.config import RunConfig
from engine.data import list_candidate_files
from engine.features import build_feature_extractor, compute_features
from engine.modeling import build_model
from engine.pipeline import build_image_cache

small, large = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
paths = {folder: [path for path, _, _ in list_candidate_files(folder)[1]] for folder in (small, large)}
rows = []

def report(stage, folder, count, seconds):
    rows.append({"stage": stage, "images": count, "seconds": seconds, "load": os.getloadavg()[0]})
    print(json.dumps(rows[-1]), flush=True)

caches = {}
for step, folder in enumerate((small, large, small)):
    began = time.perf_counter()
    cache = build_image_cache(paths[folder], 224, cache_dir=os.path.join(os.environ["TRANSFER_STUDIO_CACHE"], str(step)))
    report("decode cache", folder, len(paths[folder]), time.perf_counter() - began)
    caches[folder] = cache
config = RunConfig().replace(**{"data.path": str(large), "model.backbone": "MobileNet", "model.alpha": 0.25,
                                "model.weights": "imagenet", "model.image_size": 224})
extractor = build_feature_extractor(build_model(config, 2))
compute_features(extractor, caches[large].images, list(range(64)))  # traced once, before any clock
for folder in (small, large, small):
    count = len(paths[folder])
    began = time.perf_counter()
    compute_features(extractor, caches[folder].images, list(range(count)))
    report("feature extraction", folder, count, time.perf_counter() - began)
print("BENCH_RESULT " + json.dumps(rows), flush=True)
'''


def interleaved(small: Path, large: Path, work: Path) -> None:
    """Decoding and feature extraction on the small and the large folder in turn (small, large, small), in one process.

    On a shared machine the load moves while a size is measured; alternating the sizes shows
    whether a difference per image belongs to the size or to the moment.
    """
    environment = {"TRANSFER_STUDIO_CACHE": str(work / "cache"), "KERAS_HOME": str(keras_home(work)),
                   "TRANSFER_STUDIO_OFFLINE": "1", "BENCH_REPO": str(REPO)}
    result = subprocess.run([sys.executable, "-c", INTERLEAVED, str(small), str(large)], capture_output=True,
                            text=True, env={**os.environ, **environment}, cwd=REPO)
    rows = next((json.loads(line[len(MARKER):]) for line in result.stdout.splitlines() if line.startswith(MARKER)),
                None)
    if rows is None:
        raise SystemExit(f"The interleaved measurement failed ({result.returncode}):\n{result.stderr[-3000:]}")
    print("\n| stage | images | s | s per 1,000 | load average (1 min) at the end |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['stage']} | {row['images']:,} | {row['seconds']:.1f} | {row['seconds'] / row['images'] * 1000:.2f} "
              f"| {row['load']:.1f} |")


def run_worker(folder: Path, environment: dict) -> dict:
    """The five stages in a fresh process (TensorFlow imported before the clocks start)."""
    result = subprocess.run([sys.executable, "-c", CHILD_STAGES, str(folder)], capture_output=True, text=True,
                            env={**os.environ, **environment, "BENCH_REPO": str(REPO)}, cwd=REPO)
    for line in result.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    raise SystemExit(f"The worker failed ({result.returncode}):\n{result.stderr[-3000:]}")


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_memory(pid: int) -> dict:
    """Peak and current resident memory of a process (bytes), from /proc."""
    values = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            name, _, rest = line.partition(":")
            if name in ("VmHWM", "VmRSS", "RssAnon"):
                values[name] = int(rest.split()[0]) * 1024
    return values


def measure_data_page(folder: Path, environment: dict, work: Path, reruns: int = 5) -> dict:
    """A real Streamlit server and headless Chromium: open the Data page on `folder`, then page through the grid.

    Returns the seconds from "Use this folder" to the image count on screen, the median seconds of a
    rerun (the grid's next page until its first new file name is drawn), and the server's peak memory.
    """
    import signal
    import statistics
    import urllib.request

    from playwright.sync_api import sync_playwright

    port = free_port()
    log = open(work / "streamlit.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.port", str(port),
         "--server.headless", "true", "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"],
        cwd=REPO, env={**os.environ, **environment, "TRANSFER_STUDIO_DATA_ROOTS": str(folder.parent),
                       "TRANSFER_STUDIO_DATA": str(work / "appdata"), "TRANSFER_STUDIO_RUNS": str(work / "runs")},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    cats = sorted(path.name for path in (folder / "cats").iterdir())
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.time() > deadline:
                    raise SystemExit("The dashboard did not start: " + (work / "streamlit.log").read_text()[-2000:])
                time.sleep(0.3)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-quic"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{url}/data")
            page.get_by_role("heading", name="Data", exact=True).wait_for(timeout=120000)
            page.get_by_text("Usable images").wait_for(timeout=120000)  # the built-in sample first
            page.get_by_text("Folder on the server").click()
            page.locator("input[aria-label='…or type a path inside the allowed folders']").fill(str(folder))
            page.keyboard.press("Enter")
            began = time.perf_counter()
            page.get_by_role("button", name="Use this folder").click()
            count = f"{sum(1 for path in folder.rglob('*.jpg')):,}".replace(",", "")
            page.locator("[data-testid='stMetricValue']").filter(has_text=count).first.wait_for(timeout=600000)
            page.get_by_text(cats[0], exact=True).first.wait_for(timeout=120000)
            opened = time.perf_counter() - began
            times = []
            for step in range(1, reruns + 1):
                began = time.perf_counter()
                page.locator("[data-testid='stNumberInputStepUp']").first.click()
                page.get_by_text(cats[12 * step], exact=True).first.wait_for(timeout=120000)
                page.wait_for_function("!document.querySelector('[data-testid=\"stStatusWidget\"]')",
                                       timeout=120000)
                times.append(time.perf_counter() - began)
            browser.close()
        memory = process_memory(server.pid)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        log.close()
    return {"open_seconds": opened, "rerun_seconds": statistics.median(times), "rerun_all": times,
            "server_peak_rss": memory.get("VmHWM"), "server_rss": memory.get("VmRSS")}


def compare_searches(folders: dict, cache_folder: Path) -> None:
    """Times the near-duplicate search alone: every pair against the index, on each folder's real pHashes.

    The hashes are computed once into `cache_folder` (a cache root kept for this comparison).
    """
    sys.path.insert(0, str(REPO))
    from engine.data import list_candidate_files
    from engine.doctor import NEAR_DUPLICATE_DISTANCE, file_hashes
    from engine.near_duplicates import all_pairs_within, hashes_from_hex, pairs_within

    print("\n| images | every pair s | index s | index per 1,000 s | pairs found (both) | same pairs |")
    print("| ---: | ---: | ---: | ---: | ---: | --- |")
    first_rate = None
    for size, folder in folders.items():
        _, candidates, _, _ = list_candidate_files(folder.resolve())
        paths = [path for path, _, _ in candidates]
        hashes = file_hashes(paths, cache_folder, cache_key=str(folder.resolve()))
        array = hashes_from_hex([hashes[path]["phash"] for path in paths if hashes[path]["phash"]])
        began = time.perf_counter()
        reference = all_pairs_within(array, None, NEAR_DUPLICATE_DISTANCE)
        every_pair = time.perf_counter() - began
        began = time.perf_counter()
        found = pairs_within(array, None, NEAR_DUPLICATE_DISTANCE)
        index = time.perf_counter() - began
        rate = index / size * 1000
        first_rate = first_rate or rate
        print(f"| {size:,} | {every_pair:.2f} | {index:.2f} | {rate:.3f} ({rate / first_rate:.2f}×) | {len(found)} "
              f"| {'yes' if len(found) == len(reference) and (found == reference).all() else 'NO'} |", flush=True)


def keras_home(work: Path) -> Path:
    """A temporary KERAS_HOME holding the real MobileNet α=0.25 weights (copied, never downloaded)."""
    if not WEIGHTS.is_file():
        raise SystemExit(f"{WEIGHTS} is missing; this benchmark needs the real MobileNet α=0.25 weights.")
    home = work / "keras_home"
    (home / "models").mkdir(parents=True, exist_ok=True)
    shutil.copy(WEIGHTS, home / "models" / WEIGHTS.name)
    return home


def load_average() -> str:
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3000, 10000, 30000])
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER,
                        help="Where the generated folders are written once and reused (outside the repository).")
    parser.add_argument("--generate-only", action="store_true", help="Only write the folders.")
    parser.add_argument("--no-page", action="store_true", help="Leave out the Streamlit server and the Data page.")
    parser.add_argument("--repeats", type=int, default=1,
                        help="Run the worker stages this many times per size (each with an empty cache) and keep "
                             "each stage's fastest time: on a shared machine, other work only ever adds time.")
    parser.add_argument("--searches", action="store_true",
                        help="Only time the near-duplicate search: every pair against the index.")
    parser.add_argument("--interleaved", action="store_true",
                        help="Only decode and extract features of the smallest and largest size in turn "
                             "(small, large, small), to tell the size's cost from the machine's load.")
    arguments = parser.parse_args()
    folders = {size: build_folder(arguments.folder, size) for size in arguments.sizes}
    if arguments.generate_only:
        return
    if arguments.searches:
        compare_searches(folders, arguments.folder / "hash-cache")
        return
    if arguments.interleaved:
        work = Path(tempfile.mkdtemp(prefix="interleaved-", dir=arguments.folder))
        try:
            interleaved(folders[min(folders)], folders[max(folders)], work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    results = {}
    for size, folder in folders.items():
        work = Path(tempfile.mkdtemp(prefix=f"scale-{size}-", dir=arguments.folder))
        try:
            environment = {"TRANSFER_STUDIO_CACHE": str(work / "cache"), "KERAS_HOME": str(keras_home(work)),
                           "TRANSFER_STUDIO_OFFLINE": "1"}
            before = load_average()
            print(f"{size} images: worker stages… (load average {before})", flush=True)
            result = run_worker(folder, environment)
            for _ in range(arguments.repeats - 1):
                shutil.rmtree(work / "cache", ignore_errors=True)
                again = run_worker(folder, environment)
                result["seconds"] = {stage: min(value, again["seconds"][stage])
                                     for stage, value in result["seconds"].items()}
                result["all_seconds"] = result.get("all_seconds", []) + [again["seconds"]]
                result["peak_rss"] = max(result["peak_rss"], again["peak_rss"])
                result["peak_anonymous"] = max(result["peak_anonymous"], again["peak_anonymous"])
            if not arguments.no_page:
                print(f"{size} images: the Data page in a real server and browser…", flush=True)
                result["page"] = measure_data_page(folder, environment, work)
            result["load"] = f"{before} → {load_average()}"
            results[size] = result
            print(json.dumps(result), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print_tables(results)


def print_tables(results: dict) -> None:
    sizes = sorted(results)
    megabytes = 1e6
    print(f"\nMobileNet α=0.25 at 224 px, {os.cpu_count()} CPU cores (shared), an empty cache root for each size "
          f"and repeat, fastest of the repeats per stage\n")
    print("| stage | " + " | ".join(f"{size:,} images: s | s per 1,000" for size in sizes) + " | "
          + f"per 1,000 at {sizes[-1]:,} ÷ at {sizes[0]:,} |")
    print("| --- | " + " | ".join("---: | ---:" for _ in sizes) + " | ---: |")
    for stage in STAGES:
        cells = []
        for size in sizes:
            value = results[size]["seconds"][stage]
            cells.append(f"{value:.1f} | {value / size * 1000:.2f}")
        first = results[sizes[0]]["seconds"][stage] / sizes[0]
        last = results[sizes[-1]]["seconds"][stage] / sizes[-1]
        print(f"| {stage} | " + " | ".join(cells) + f" | {last / first:.2f}× |")
    print()
    print("| size | worker peak RSS MB | worker peak anonymous MB | Data page server peak RSS MB "
          "| open the folder s | rerun (next grid page) s | caches on disk MB | images | scans | features "
          "| hashes | near-duplicate pairs | leaks | validation accuracy | load average |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for size in sizes:
        result = results[size]
        page = result.get("page") or {}
        kinds = result["cache_by_kind"]
        server = f"{page['server_peak_rss'] / megabytes:.0f}" if page.get("server_peak_rss") else "-"
        opened = f"{page['open_seconds']:.1f}" if page else "-"
        rerun = f"{page['rerun_seconds']:.2f}" if page else "-"
        print(f"| {size:,} | {result['peak_rss'] / megabytes:.0f} | {result['peak_anonymous'] / megabytes:.0f} "
              f"| {server} | {opened} | {rerun} | {result['cache_bytes'] / megabytes:.0f} "
              f"| {kinds['images'] / megabytes:.0f} | {kinds['scans'] / megabytes:.1f} "
              f"| {kinds['features'] / megabytes:.1f} | {kinds['hashes'] / megabytes:.1f} "
              f"| {result['notes']['near_duplicate_pairs']} | {result['notes']['leaks']} "
              f"| {result['notes']['validation_accuracy']:.3f} | {result['load']} |")


if __name__ == "__main__":
    main()
