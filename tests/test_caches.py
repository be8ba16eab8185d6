"""The cache budget: entries listed by dataset and backbone, least recently used evicted first, entries of
queued and running runs kept, clearing by part, and runs that rebuild what was evicted (issue 15)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from engine import caches, locations, runfiles
from engine.features import load_cached_features, save_cached_features
from engine.pipeline import build_image_cache, scan_and_decode
from engine.runs import create_run
from engine.status import LaunchStatus, State
from tests.conftest import make_dataset, tiny_config

MB = 10**6


def cache_root() -> Path:
    return Path(os.environ["TRANSFER_STUDIO_CACHE"])


def fake_entry(kind: str, key: str, size: int, used_seconds_ago: float, dataset: str = "/data/a",
               backbone: str | None = None) -> None:
    """An entry as a writer leaves it: a data file of `size` bytes and its description, last used then."""
    folder = locations.cache_folder(kind)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{key}.npy").write_bytes(b"\0" * size)
    caches.touch(kind, key, dataset=dataset, backbone=backbone)
    moment = time.time() - used_seconds_ago
    for path in folder.glob(f"{key}.*"):
        os.utime(path, (moment, moment))


def keys() -> set:
    return {entry.key for entry in caches.list_entries()}


def test_entries_are_listed_with_dataset_backbone_size_and_last_use():
    fake_entry("images", "old", 2 * MB, 300, dataset="/data/a")
    fake_entry("features", "new", 1 * MB, 10, dataset="/data/a", backbone="MobileNet")
    entries = caches.list_entries()
    assert [entry.key for entry in entries] == ["old", "new"]  # least recently used first
    old, new = entries
    assert (old.kind, old.dataset, old.backbone) == ("images", "/data/a", None)
    assert (new.kind, new.backbone) == ("features", "MobileNet")
    assert old.size >= 2 * MB and abs(old.last_used - (time.time() - 300)) < 5
    assert caches.cache_size() == old.size + new.size


def test_eviction_keeps_the_budget_and_goes_least_recently_used_first():
    for index, age in enumerate([500, 100, 400, 200, 300]):
        fake_entry("images", f"entry{index}", 1 * MB, age)
    evicted = caches.enforce_budget(budget=2 * MB + 2000)
    # The three oldest (500, 400, 300 s ago) go; the two most recently used stay.
    assert [entry.key for entry in evicted] == ["entry0", "entry2", "entry4"]
    assert keys() == {"entry1", "entry3"}
    assert caches.cache_size() <= 2 * MB + 2000
    assert caches.enforce_budget(budget=2 * MB + 2000) == []  # within budget: nothing more goes


def test_reading_an_entry_makes_it_recently_used(tiny_dataset):
    paths = sorted(str(path) for path in tiny_dataset.rglob("*.*"))
    first = build_image_cache(paths[:10], 32)
    second = build_image_cache(paths[10:], 32)
    past = time.time() - 1000
    for entry in caches.list_entries():
        for path in entry.files:
            os.utime(path, (past, past))
    build_image_cache(paths[:10], 32)  # read from the cache: touched
    order = [entry.key for entry in caches.list_entries() if entry.kind == "images"]
    assert order == [second.key, first.key]
    evicted = caches.enforce_budget(budget=caches.cache_size() - 1)
    assert second.key in {entry.key for entry in evicted} and first.key in keys()


def test_the_entry_just_written_is_kept_even_over_budget():
    fake_entry("images", "older", 1 * MB, 100)
    fake_entry("images", "just_written", 2 * MB, 200)
    caches.enforce_budget(budget=1000, keep=[("images", "just_written")])
    assert keys() == {"just_written"}


def test_entries_of_queued_and_running_runs_are_kept(tmp_path):
    wanted = make_dataset(tmp_path / "wanted", per_class=3)
    queued = create_run(tiny_config(wanted), tmp_path / "runs")
    running = create_run(tiny_config(wanted, **{"model.backbone": "EfficientNetLite0", "model.alpha": None}),
                         tmp_path / "runs")
    LaunchStatus(running).begin(pid=os.getpid(), host=socket.gethostname())
    assert [runfiles.read_json(run / "status.json")["state"] for run in (queued, running)] == ["queued", "running"]
    fake_entry("scans", "wanted_scan", MB, 900, dataset=str(wanted))
    fake_entry("images", "wanted_images", MB, 800, dataset=str(wanted))
    fake_entry("features", "wanted_mobilenet", MB, 700, dataset=str(wanted), backbone="MobileNet")
    fake_entry("features", "wanted_lite", MB, 650, dataset=str(wanted), backbone="EfficientNetLite0")
    fake_entry("features", "wanted_resnet", MB, 600, dataset=str(wanted), backbone="ResNet50")
    fake_entry("images", "unrelated", MB, 10, dataset=str(tmp_path / "nobody"))
    caches.enforce_budget(budget=0, runs_dirs=[tmp_path / "runs"])
    # Every entry of the queued and running runs' folder stays, features only of their backbones;
    # the ResNet50 features and a folder no run uses go, however recently used.
    assert keys() == {"wanted_scan", "wanted_images", "wanted_mobilenet", "wanted_lite"}


def test_finished_runs_keep_nothing(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=3)
    run_dir = create_run(tiny_config(data), tmp_path / "runs")
    status = LaunchStatus(run_dir)
    status.begin(pid=os.getpid(), host=socket.gethostname())
    status.finish(State.FINISHED, "Done.")
    fake_entry("images", "of_a_finished_run", MB, 10, dataset=str(data))
    caches.enforce_budget(budget=0, runs_dirs=[tmp_path / "runs"])
    assert keys() == set()


def test_clear_by_dataset_backbone_kind_and_age():
    fake_entry("images", "a_images", MB, 10, dataset="/data/a")
    fake_entry("features", "a_mobilenet", MB, 10, dataset="/data/a", backbone="MobileNet")
    fake_entry("features", "a_lite", MB, 3 * 86400, dataset="/data/a", backbone="EfficientNetLite0")
    fake_entry("hashes", "b_hashes", MB, 10, dataset="/data/b")
    removed, kept = caches.clear(backbone="MobileNet")
    assert [entry.key for entry in removed] == ["a_mobilenet"] and kept == []
    caches.clear(older_than_days=2)
    assert keys() == {"a_images", "b_hashes"}
    caches.clear(kind="hashes")
    assert keys() == {"a_images"}
    caches.clear(dataset="/data/a")
    assert keys() == set()
    with pytest.raises(ValueError, match="Unknown cache kind 'models'"):
        caches.clear(kind="models")


def run_command(*words) -> int:
    parser = argparse.ArgumentParser()
    caches.add_cache_arguments(parser)
    return caches.run_cache_command(parser.parse_args(list(words)))


def test_the_cache_command_lists_and_clears(capsys, tmp_path):
    fake_entry("images", "a_images", 2 * MB, 3600 * 5, dataset="/data/a")
    fake_entry("features", "a_mobilenet", MB, 60 * 3, dataset="/data/a", backbone="MobileNet")
    assert run_command() == 0
    listing = capsys.readouterr().out
    assert "3.0 MB of a" in listing and "budget" in listing
    rows = [line for line in listing.splitlines() if "/data/a" in line]
    assert rows[0].split()[:4] == ["images", "2.0", "MB", "5"]  # oldest first, 5 h ago
    assert "MobileNet" in rows[1] and "3 min ago" in rows[1]
    assert run_command("--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [entry["key"] for entry in listed["entries"]] == ["a_images", "a_mobilenet"]
    with pytest.raises(ValueError, match="needs --all, or a filter"):
        run_command("clear")
    assert run_command("clear", "--kind", "features") == 0
    assert "Removed 1 entry (1.0 MB)" in capsys.readouterr().out
    assert run_command("clear", "--all") == 0
    assert keys() == set()


def test_the_budget_setting(monkeypatch):
    monkeypatch.setenv(locations.CACHE_BUDGET_VARIABLE, "1.5GB")
    assert caches.budget_bytes() == 1_500_000_000
    monkeypatch.setenv(locations.CACHE_BUDGET_VARIABLE, "2GiB")
    assert caches.budget_bytes() == 2 * 2**30
    monkeypatch.setenv(locations.CACHE_BUDGET_VARIABLE, "10%")
    import shutil
    assert abs(caches.budget_bytes() - shutil.disk_usage(cache_root().parent).total // 10) <= 1
    monkeypatch.setenv(locations.CACHE_BUDGET_VARIABLE, "lots")
    with pytest.raises(ValueError, match="TRANSFER_STUDIO_CACHE_BUDGET='lots' is not a cache budget"):
        caches.budget_bytes()
    monkeypatch.delenv(locations.CACHE_BUDGET_VARIABLE)
    assert 0 < caches.budget_bytes() <= caches.DEFAULT_BUDGET_BYTES


def test_writes_trim_the_cache_to_its_budget(tiny_dataset, monkeypatch):
    """A cache write evicts older entries itself: the 24 images at 32 px are 74 kB, 12 at 64 px 147 kB."""
    monkeypatch.setenv(locations.CACHE_BUDGET_VARIABLE, "100kB")
    scan, first = scan_and_decode(tiny_dataset, 32)
    assert first.key in keys() and caches.cache_size() <= 100_000
    second = build_image_cache(scan.candidates[:12], 64)
    remaining = keys()
    # The new array alone is over budget: it stays (just written), everything older goes.
    assert second.key in remaining and first.key not in remaining
    assert {entry.kind for entry in caches.list_entries()} == {"images"}


def test_a_run_whose_entries_were_evicted_rebuilds_them(tiny_dataset):
    scan, cache = scan_and_decode(tiny_dataset, 32)
    pixels = np.array(cache.images)
    features = np.arange(24 * 8, dtype=np.float32).reshape(24, 8)
    save_cached_features("somefeatures", features)
    mapped = cache.images
    removed, _ = caches.clear()
    assert {entry.kind for entry in removed} == {"images", "scans", "features"}
    assert np.array_equal(np.array(mapped), pixels)  # a reader's mapping outlives the eviction
    assert load_cached_features("somefeatures") is None  # evicted: the caller computes them again
    again_scan, again = scan_and_decode(tiny_dataset, 32)
    assert again.key == cache.key and np.array_equal(np.array(again.images), pixels)
    assert again_scan.fingerprint == scan.fingerprint and len(again_scan.files) == len(scan.files)
    assert (locations.cache_folder("images") / f"{cache.key}.npy").is_file()


@pytest.mark.training
def test_a_training_run_after_eviction_rebuilds_its_caches_and_finishes(tiny_dataset, tmp_path):
    from engine.train import run_training

    first = create_run(tiny_config(tiny_dataset), tmp_path / "runs")
    assert run_training(first) is State.FINISHED
    kinds = {entry.kind for entry in caches.list_entries()}
    assert {"scans", "images", "features", "hashes"} <= kinds
    described = {entry.kind: entry for entry in caches.list_entries()}
    assert described["features"].backbone == "MobileNet"
    assert described["features"].dataset == str(tiny_dataset.resolve())
    caches.clear()
    assert caches.list_entries() == []
    second = create_run(tiny_config(tiny_dataset), tmp_path / "runs")
    assert run_training(second) is State.FINISHED, runfiles.read_json(second / "status.json")
    assert {"scans", "images", "features", "hashes"} <= {entry.kind for entry in caches.list_entries()}
    first_accuracy = runfiles.read_json(first / "evaluation.json")["splits"]["validation"]["accuracy"]
    second_accuracy = runfiles.read_json(second / "evaluation.json")["splits"]["validation"]["accuracy"]
    assert first_accuracy == second_accuracy  # rebuilt the same: same data, same seed
