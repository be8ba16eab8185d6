"""Getting data in: data roots, folder resolution, zip uploads, the built-in sample."""

import io
import os
import stat
import zipfile

import pytest

from engine.ingest import ZipLimits, data_roots, extract_zip, list_dataset_folders, resolve_in_roots
from engine.samples import ensure_sample
from tests.conftest import make_dataset


def _zip(entries: dict, symlinks=()) -> io.BytesIO:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bundle:
        for name, data in entries.items():
            bundle.writestr(name, data)
        for name, target in symlinks:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            bundle.writestr(info, target)
    buffer.seek(0)
    return buffer


def test_a_zip_of_one_top_folder_becomes_its_dataset(tmp_path):
    source = make_dataset(tmp_path / "source", per_class=2)
    entries = {f"flowers/{path.relative_to(source)}": path.read_bytes() for path in source.rglob("*.*")}
    root = extract_zip(_zip(entries), tmp_path / "uploads")
    assert root.name == "flowers" and sorted(entry.name for entry in root.iterdir()) == ["cats", "dogs"]
    assert root.parent.parent == tmp_path / "uploads"


@pytest.mark.parametrize("name", ["../escape.png", "/etc/evil.png", "a/../../escape.png"])
def test_zip_slip_members_are_refused_and_nothing_is_left(tmp_path, name):
    with pytest.raises(ValueError, match="points outside the archive"):
        extract_zip(_zip({"cats/ok.png": b"x", name: b"x"}), tmp_path / "uploads")
    assert not (tmp_path / "uploads").exists() or not list((tmp_path / "uploads").iterdir())


def test_symlink_members_are_refused(tmp_path):
    with pytest.raises(ValueError, match="symbolic link"):
        extract_zip(_zip({"cats/ok.png": b"x"}, symlinks=[("cats/link.png", "/etc/passwd")]), tmp_path / "uploads")


def test_limits_on_members_size_and_ratio(tmp_path):
    with pytest.raises(ValueError, match="entries; at most 2"):
        extract_zip(_zip({"a/1": b"x", "a/2": b"x", "a/3": b"x"}), tmp_path / "u", ZipLimits(max_members=2))
    with pytest.raises(ValueError, match="expands to"):
        extract_zip(_zip({"a/1": b"x" * 5000}), tmp_path / "u", ZipLimits(max_total_bytes=1000, max_ratio=10**6))
    with pytest.raises(ValueError, match="zip bomb"):
        extract_zip(_zip({"a/1": b"\0" * 1_000_000}), tmp_path / "u")
    with pytest.raises(ValueError, match="not a valid zip"):
        extract_zip(io.BytesIO(b"not a zip"), tmp_path / "u")


def test_folders_resolve_only_inside_the_roots(tmp_path):
    root = tmp_path / "root"
    inside = make_dataset(root / "inside", per_class=2)
    outside = make_dataset(tmp_path / "outside", per_class=2)
    os.symlink(outside, root / "sneaky")
    assert resolve_in_roots(str(inside), [root.resolve()]) == inside.resolve()
    for path in (root / "sneaky", root / "inside" / ".." / ".." / "outside"):
        with pytest.raises(ValueError, match="outside the data roots"):
            resolve_in_roots(str(path), [root.resolve()])
    assert inside.resolve() in list_dataset_folders([root.resolve()])


def test_data_roots_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFER_STUDIO_DATA", str(tmp_path / "app"))
    (tmp_path / "app").mkdir()
    (tmp_path / "extra").mkdir()
    monkeypatch.setenv("TRANSFER_STUDIO_DATA_ROOTS", f"{tmp_path / 'extra'}{os.pathsep}{tmp_path / 'missing'}")
    assert data_roots() == [(tmp_path / "app").resolve(), (tmp_path / "extra").resolve()]


def test_digits_sample_is_written_once(tmp_path):
    folder = ensure_sample("digits", tmp_path)
    assert sorted(entry.name for entry in folder.iterdir() if entry.is_dir()) == [str(digit) for digit in range(10)]
    assert sum(1 for _ in folder.rglob("*.png")) == 1797
    marker = (folder / ".complete").stat().st_mtime_ns
    assert ensure_sample("digits", tmp_path) == folder and (folder / ".complete").stat().st_mtime_ns == marker
    with pytest.raises(ValueError, match="Unknown sample"):
        ensure_sample("imagenet", tmp_path)


def test_cats_vs_dogs_sample_offline_says_so_in_one_sentence(tmp_path):
    from engine.samples import SampleUnavailableError

    with pytest.raises(SampleUnavailableError) as caught:
        ensure_sample("cats_vs_dogs", tmp_path)
    message = str(caught.value)
    assert "cannot reach" in message and "digits sample" in message and message.count(". ") == 0


def test_cats_vs_dogs_sample_unpacks_the_tutorial_archive(tmp_path, monkeypatch):
    """The download itself is Keras's get_file; here it is handed a locally built archive of the same layout."""
    import keras

    import engine.backbones
    from engine.samples import CATS_VS_DOGS_URL

    source = make_dataset(tmp_path / "source", per_class=3, split=True)
    archive = tmp_path / "cats_and_dogs_filtered.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in source.rglob("*.*"):
            bundle.write(path, f"cats_and_dogs_filtered/{path.relative_to(source)}")
    asked = {}

    def fake_get_file(fname, origin, extract, cache_dir, cache_subdir):
        asked["origin"] = origin
        folder = os.path.join(cache_dir, cache_subdir)
        os.makedirs(folder, exist_ok=True)
        zipfile.ZipFile(archive).extractall(folder)
        return os.path.join(folder, fname)

    monkeypatch.setattr(engine.backbones, "_download_reachable", lambda host: True)
    monkeypatch.setattr(keras.utils, "get_file", fake_get_file)
    folder = ensure_sample("cats_vs_dogs", tmp_path / "data")
    assert asked["origin"] == CATS_VS_DOGS_URL
    assert folder.name == "cats_and_dogs_filtered" and (folder / "train" / "cats").is_dir()
    assert ensure_sample("cats_vs_dogs", tmp_path / "data") == folder  # cached: no second download
