"""Getting data in: data roots, folder resolution, zip uploads, the built-in sample."""

import io
import os
import re
import stat
import struct
import tomllib
import zipfile

import pytest

from engine.ingest import ZipLimits, extract_zip, list_dataset_folders, resolve_in_roots
from engine.locations import data_roots
from engine.samples import ensure_sample
from tests.conftest import REPO_ROOT, make_dataset


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
    assert root.parent.parent.parent == tmp_path / "uploads"


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


def test_a_link_inside_the_folder_that_leads_outside_the_roots_is_refused(tmp_path):
    root = tmp_path / "root"
    dataset = make_dataset(root / "photos", per_class=2)
    outside = make_dataset(tmp_path / "outside", per_class=2)
    roots = [root.resolve()]
    hostile = {
        "cats/borrowed.jpg": outside / "cats" / "cats_0.jpg",   # a linked file
        "birds": outside / "dogs",                               # a linked class folder
        "dogs/nested/up": root / ".." / "outside",              # '..' inside a link's target
        "dogs/loop": dataset / "dogs" / "loop",                  # a link to itself
    }
    (dataset / "dogs" / "nested").mkdir()
    for name, target in hostile.items():
        os.symlink(target, dataset / name)
        with pytest.raises(ValueError, match=f"holds a link that leads outside the data roots: '{name}'"):
            resolve_in_roots(str(dataset), roots)
        os.unlink(dataset / name)
    # Links that stay inside the roots are followed as before.
    os.symlink(dataset / "cats" / "cats_0.jpg", dataset / "dogs" / "same_cat.jpg")
    os.symlink(dataset / "cats", dataset / "kittens")
    assert resolve_in_roots(str(dataset), roots) == dataset.resolve()


def _lying_zip() -> io.BytesIO:
    """A member whose headers say 10 bytes while 1000 follow."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as bundle:
        bundle.writestr("cats/a.png", b"x" * 1000)
    data = bytearray(buffer.getvalue())
    struct.pack_into("<I", data, data.index(b"PK\x03\x04") + 22, 10)
    struct.pack_into("<I", data, data.index(b"PK\x01\x02") + 24, 10)
    return io.BytesIO(bytes(data))


HOSTILE_ARCHIVES = {
    "parent": (lambda: _zip({"cats/ok.png": b"x", "../escape.png": b"x"}), {}, "points outside the archive"),
    "absolute": (lambda: _zip({"cats/ok.png": b"x", "/etc/evil.png": b"x"}), {}, "points outside the archive"),
    "nested parent": (lambda: _zip({"cats/ok.png": b"x", "a/../../e.png": b"x"}), {}, "points outside the archive"),
    "drive letter": (lambda: _zip({"cats/ok.png": b"x", "C:/evil.png": b"x"}), {}, "points outside the archive"),
    "backslashes": (lambda: _zip({"cats/ok.png": b"x", "..\\evil.png": b"x"}), {}, "points outside the archive"),
    "symlink": (lambda: _zip({"cats/ok.png": b"x"}, symlinks=[("cats/l.png", "/etc/passwd")]), {}, "symbolic link"),
    "members": (lambda: _zip({"a/1": b"x", "a/2": b"x", "a/3": b"x"}), {"max_members": 2}, "entries; at most 2"),
    "total size": (lambda: _zip({"a/1": b"x" * 5000}), {"max_total_bytes": 1000, "max_ratio": 10**6}, "expands to"),
    "ratio": (lambda: _zip({"cats/ok.png": b"x", "a/1": b"\0" * 1_000_000}), {}, "zip bomb"),
    "lying size": (_lying_zip, {}, "not a valid zip archive"),
    "not a zip": (lambda: io.BytesIO(b"not a zip"), {}, "not a valid zip archive"),
    "cut short": (lambda: io.BytesIO(_zip({"cats/a.png": os.urandom(4000)}).getvalue()[:3000]), {},
                  "not a valid zip archive"),
    "file then folder": (lambda: _zip({"cats/ok.png": b"x", "dogs": b"x", "dogs/a.png": b"y"}), {},
                         "could not be extracted"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_ARCHIVES))
def test_every_rejected_archive_leaves_nothing_behind(tmp_path, case):
    build, limits, message = HOSTILE_ARCHIVES[case]
    uploads = tmp_path / "uploads"
    with pytest.raises(ValueError, match=message):
        extract_zip(build(), uploads, ZipLimits(**limits))
    assert not uploads.exists() or list(uploads.iterdir()) == []
    assert sorted(entry.name for entry in tmp_path.iterdir()) == (["uploads"] if uploads.exists() else [])


def test_each_upload_is_extracted_into_a_fresh_folder_of_its_owner(tmp_path):
    from engine.ingest import list_uploads
    from engine.users import User

    alice, bob = User("https://id.example.org|alice", "Alice"), User("https://id.example.org|bob", "Bob")
    entries = {"cats/a.png": b"1", "dogs/b.png": b"2"}
    first = extract_zip(_zip(entries), tmp_path / "uploads", owner=alice)
    second = extract_zip(_zip(entries), tmp_path / "uploads", owner=alice)
    third = extract_zip(_zip(entries), tmp_path / "uploads", owner=bob)
    assert first != second and first.parent == second.parent != third.parent
    assert first.parent.parent == third.parent.parent == tmp_path / "uploads"
    assert first.parent.name.startswith("Alice-") and third.parent.name.startswith("Bob-")
    assert first.name.startswith("upload-") and (first / "cats" / "a.png").read_bytes() == b"1"
    assert sorted(entry.name for entry in first.parent.iterdir()) == sorted([first.name, second.name])
    listed = {(upload.path, upload.owner_name) for upload in list_uploads(tmp_path / "uploads")}
    assert listed == {(first, "Alice"), (second, "Alice"), (third, "Bob")}
    assert {upload.owner for upload in list_uploads(tmp_path / "uploads")} == {alice.id, bob.id}
    from engine.users import Role

    # A note inside an archive, or one naming another owner or pointing elsewhere, is not listed.
    forged = tmp_path / "uploads" / first.parent.name / "upload-0123456789ab"
    forged.mkdir()
    (forged / ".upload.json").write_text('{"owner": "%s", "owner_name": "Bob", "dataset": "/etc"}' % bob.id)
    nested = first / "cats" / "upload-00000000000a"
    nested.mkdir()
    (nested / ".upload.json").write_text('{"owner": "%s", "dataset": "/etc", "uploaded": "2099"}' % alice.id)
    listed_after = {(upload.path, upload.owner_name) for upload in list_uploads(tmp_path / "uploads")}
    assert listed_after == listed
    with pytest.raises(PermissionError, match="Carol is a viewer"):
        extract_zip(_zip(entries), tmp_path / "uploads", owner=User("id|carol", "Carol", role=Role.VIEWER))


def test_streamlit_settings_keep_xsrf_protection_and_a_deliberate_upload_limit():
    server = tomllib.loads((REPO_ROOT / ".streamlit" / "config.toml").read_text())["server"]
    assert server["enableXsrfProtection"] is True
    # With CORS off Streamlit accepts a WebSocket from any origin, which XSRF protection does not stop.
    assert server["enableCORS"] is True
    documented = re.search(r"caps uploads at (\d+) MB", (REPO_ROOT / "README.md").read_text())
    assert documented and server["maxUploadSize"] == int(documented.group(1))
    # An upload can never be larger than what extraction accepts.
    assert 0 < server["maxUploadSize"] * 1024**2 <= ZipLimits().max_total_bytes


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

    import engine.locations
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

    monkeypatch.setattr(engine.locations, "download_reachable", lambda host: True)
    monkeypatch.setattr(keras.utils, "get_file", fake_get_file)
    folder = ensure_sample("cats_vs_dogs", tmp_path / "data")
    assert asked["origin"] == CATS_VS_DOGS_URL
    assert folder.name == "cats_and_dogs_filtered" and (folder / "train" / "cats").is_dir()
    assert ensure_sample("cats_vs_dogs", tmp_path / "data") == folder  # cached: no second download
