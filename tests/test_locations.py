"""Every location honours its environment variable, read at call time, and falls back to its default."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from engine import locations

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fake home folder, so the `~` defaults are checked without touching the real one."""
    folder = tmp_path / "home"
    folder.mkdir()
    monkeypatch.setenv("HOME", str(folder))
    return folder


def test_runs_root_follows_the_environment_else_runs_in_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFER_STUDIO_RUNS", str(tmp_path / "elsewhere"))
    assert locations.runs_root() == tmp_path / "elsewhere"
    monkeypatch.delenv("TRANSFER_STUDIO_RUNS")
    assert locations.runs_root() == Path("runs")
    monkeypatch.setenv("TRANSFER_STUDIO_RUNS", "")  # empty means unset, as before
    assert locations.runs_root() == Path("runs")


def test_cache_root_follows_the_environment_else_the_user_cache(tmp_path, monkeypatch, home):
    monkeypatch.setenv("TRANSFER_STUDIO_CACHE", str(tmp_path / "cache"))
    assert locations.cache_root() == tmp_path / "cache"
    monkeypatch.delenv("TRANSFER_STUDIO_CACHE")
    assert locations.cache_root() == home / ".cache" / "transfer-studio"


def test_cache_folders_sit_under_the_cache_root_or_a_given_one(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFER_STUDIO_CACHE", str(tmp_path / "cache"))
    assert [locations.cache_folder(kind) for kind in locations.CACHE_KINDS] == [
        tmp_path / "cache" / "scans", tmp_path / "cache" / "images",
        tmp_path / "cache" / "features", tmp_path / "cache" / "hashes"]
    assert locations.cache_folder("images", tmp_path / "mine") == tmp_path / "mine" / "images"
    with pytest.raises(ValueError, match=r"Unknown cache kind 'models'; expected one of: scans, images"):
        locations.cache_folder("models")


def test_data_folder_and_its_subfolders_follow_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFER_STUDIO_DATA", str(tmp_path / "appdata"))
    assert locations.data_dir() == tmp_path / "appdata"
    assert locations.samples_dir() == tmp_path / "appdata" / "samples"
    assert locations.tfds_dir() == tmp_path / "appdata" / "tfds"
    assert locations.uploads_dir() == tmp_path / "appdata" / "uploads"
    # A data folder given by the caller wins over the environment.
    assert locations.samples_dir(tmp_path / "given") == tmp_path / "given" / "samples"
    monkeypatch.delenv("TRANSFER_STUDIO_DATA")
    assert locations.data_dir() == Path("data")
    assert locations.uploads_dir() == Path("data") / "uploads"


def test_data_roots_are_the_data_folder_the_environment_and_extra_ones_that_exist(tmp_path, monkeypatch):
    for name in ("app", "extra", "secret"):
        (tmp_path / name).mkdir()
    monkeypatch.setenv("TRANSFER_STUDIO_DATA", str(tmp_path / "app"))
    monkeypatch.setenv("TRANSFER_STUDIO_DATA_ROOTS", f"{tmp_path / 'extra'}{os.pathsep}{os.pathsep}{tmp_path / 'missing'}")
    assert locations.extra_data_roots() == [tmp_path / "extra", tmp_path / "missing"]
    assert locations.data_roots([str(tmp_path / "secret"), str(tmp_path / "app")]) == [
        (tmp_path / "app").resolve(), (tmp_path / "extra").resolve(), (tmp_path / "secret").resolve()]
    monkeypatch.delenv("TRANSFER_STUDIO_DATA_ROOTS")
    assert locations.extra_data_roots() == []
    assert locations.data_roots() == [(tmp_path / "app").resolve()]


def test_keras_home_follows_the_environment_before_keras_is_imported(tmp_path, monkeypatch, home):
    # Keras may already be imported by an earlier test; hide it so the environment is asked.
    monkeypatch.delitem(sys.modules, "keras", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    assert locations.keras_home() == tmp_path / "keras"
    assert locations.keras_models_dir() == tmp_path / "keras" / "models"
    monkeypatch.delenv("KERAS_HOME")
    assert locations.keras_home() == home / ".keras"


def test_keras_home_is_the_one_keras_uses_once_keras_is_imported(tmp_path, monkeypatch):
    import keras
    from keras.src.backend.config import keras_home as keras_own_home

    assert "keras" in sys.modules and keras
    # Keras read KERAS_HOME when it was imported; a later change must not make us look elsewhere.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "changed"))
    assert locations.keras_home() == Path(keras_own_home())
    assert locations.keras_home() != tmp_path / "changed"


def test_tfds_data_dir_follows_tfds_own_variable_else_sits_in_the_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFER_STUDIO_DATA", str(tmp_path / "appdata"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "shared_tfds"))
    assert locations.tfds_data_dir() == tmp_path / "shared_tfds"
    assert not locations.owns_tfds_data_dir()  # someone else's cache: its downloads are kept
    monkeypatch.delenv("TFDS_DATA_DIR")
    assert locations.tfds_data_dir() == tmp_path / "appdata" / "tfds" / ".tfds_data"
    assert locations.tfds_data_dir(tmp_path / "given") == tmp_path / "given" / "tfds" / ".tfds_data"
    assert locations.owns_tfds_data_dir()


def test_presets_are_the_configs_folder_of_the_repository():
    assert locations.presets_dir() == REPO_ROOT / "configs"


def test_offline_is_only_the_value_1(monkeypatch):
    monkeypatch.setenv("TRANSFER_STUDIO_OFFLINE", "1")
    assert locations.offline()
    for value in ("0", "", "yes"):
        monkeypatch.setenv("TRANSFER_STUDIO_OFFLINE", value)
        assert not locations.offline()
    monkeypatch.delenv("TRANSFER_STUDIO_OFFLINE")
    assert not locations.offline()


def test_offline_means_no_download_and_no_connection_attempt(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("offline, yet a connection was attempted")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("TRANSFER_STUDIO_OFFLINE", "1")
    assert not locations.download_reachable("example.org")


def test_online_the_download_check_asks_the_host_once_with_a_bounded_timeout(monkeypatch):
    asked = []

    class Connection:
        def __enter__(self):
            return self

        def __exit__(self, *exception):
            return False

    def answer(address, timeout):
        asked.append((address, timeout))
        if address[0] == "unreachable.example":
            raise OSError("no route to host")
        return Connection()

    monkeypatch.setattr(socket, "create_connection", answer)
    monkeypatch.delenv("TRANSFER_STUDIO_OFFLINE", raising=False)
    assert locations.download_reachable()
    assert not locations.download_reachable("unreachable.example", timeout_seconds=0.5)
    assert asked == [(("storage.googleapis.com", 443), 3.0), (("unreachable.example", 443), 0.5)]


def test_locations_import_neither_tensorflow_nor_keras():
    code = ("import sys, engine.locations as locations; locations.keras_home(); locations.data_roots(); "
            "print([name for name in ('tensorflow', 'keras') if name in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
