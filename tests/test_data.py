"""The scanner, the report and the split, on generated files (good, odd and broken)."""

import io
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from engine.data import DataError, make_split, scan_dataset, split_counts
from engine.images import check_image, load_rgb
from tests.conftest import make_dataset, write_image


def _jpeg_bytes(colour=(200, 30, 30), size=(48, 40)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def messy_dataset(tmp_path):
    """Two usable classes plus every kind of bad, odd and ignorable file."""
    root = make_dataset(tmp_path / "messy", per_class=6)
    cats, dogs = root / "cats", root / "dogs"
    (cats / "empty.jpg").write_bytes(b"")
    (cats / "truncated.jpg").write_bytes(_jpeg_bytes()[:200])
    (cats / "notes.JPG").write_text("this is text, not a photo")
    Image.new("RGB", (40, 40)).save(cats / "tiff_named.jpg", format="TIFF")
    (cats / ".DS_Store").write_bytes(b"\0\1binary")
    (cats / "._cat_0.jpg").write_bytes(b"resource fork")
    (cats / "readme.txt").write_text("stray file")
    write_image(dogs / "UPPER.JPEG", (40, 60, 220))
    write_image(dogs / "png_named.jpg", (40, 60, 220), fmt="PNG")
    write_image(dogs / "grey.png", (40, 60, 220), mode="L")
    write_image(dogs / "alpha.png", (40, 60, 220), mode="RGBA")
    write_image(dogs / "palette.gif", (40, 60, 220), mode="P")
    write_image(dogs / "cmyk.jpg", (40, 60, 220), mode="CMYK")
    write_image(dogs / "nested" / "deeper" / "inner.webp", (40, 60, 220))
    Image.new("RGB", (1, 1)).save(dogs / "tiny.png")
    return root


def test_scan_excludes_broken_files_with_reasons(messy_dataset):
    scan = scan_dataset(messy_dataset)
    reasons = {os.path.basename(item["path"]): item["reason"] for item in scan.excluded}
    assert reasons["empty.jpg"].startswith("zero bytes")
    assert reasons["truncated.jpg"].startswith("truncated")
    assert reasons["notes.JPG"].startswith("not an image")
    assert reasons["tiff_named.jpg"].startswith("unsupported format: TIFF")
    assert reasons["tiny.png"].startswith("too small: 1×1")
    usable = {os.path.basename(item.path) for item in scan.files}
    assert not usable & set(reasons), "an excluded file reached the usable list"


def test_scan_ignores_and_counts_hidden_and_stray_files(messy_dataset):
    report = scan_dataset(messy_dataset).report()
    ignored = {os.path.basename(item["path"]): item["reason"] for item in report["ignored"]}
    assert ignored[".DS_Store"] == "hidden file"
    assert ignored["._cat_0.jpg"] == "hidden file"
    assert ignored["readme.txt"].startswith("not an image file type (.txt")
    assert report["num_hidden_ignored"] == 2
    assert report["num_ignored"] == 3


def test_scan_accepts_odd_but_valid_files_with_notes(messy_dataset):
    scan = scan_dataset(messy_dataset)
    notes = {os.path.basename(item.path): item.note for item in scan.files}
    for name in ("UPPER.JPEG", "png_named.jpg", "grey.png", "alpha.png", "palette.gif", "cmyk.jpg", "inner.webp"):
        assert name in notes, f"{name} should be usable"
    assert "PNG content named .jpg" in notes["png_named.jpg"]
    assert "CMYK converted to RGB" in notes["cmyk.jpg"]
    # The nested file belongs to the top class folder.
    assert next(item.label for item in scan.files if item.path.endswith("inner.webp")) == "dogs"


def test_report_counts_and_sizes(messy_dataset):
    report = scan_dataset(messy_dataset).report()
    assert report["layout"] == "flat"
    assert report["classes"] == ["cats", "dogs"]
    assert report["class_counts"] == {"cats": 6, "dogs": 13}
    assert report["image_size"]["width"]["max"] == 40
    assert report["num_excluded"] == 5


def test_every_odd_file_decodes_to_rgb_of_the_requested_size(messy_dataset):
    for item in scan_dataset(messy_dataset).files:
        array = load_rgb(item.path, 24)
        assert array.shape == (24, 24, 3) and array.dtype == np.uint8


def test_transparent_pixels_become_white_and_sixteen_bit_is_scaled(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    assert load_rgb(str(tmp_path / "clear.png")).min() == 255
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert check_image(str(tmp_path / "deep.png")).ok
    assert abs(int(load_rgb(str(tmp_path / "deep.png"))[0, 0, 0]) - 128) <= 1


def test_exif_orientation_is_applied(tmp_path):
    # A wide image whose EXIF says "rotate 90°": it must come out tall, upright.
    image = Image.new("RGB", (60, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_rgb(str(tmp_path / "rotated.jpg")).shape == (60, 20, 3)
    check = check_image(str(tmp_path / "rotated.jpg"))
    assert (check.width, check.height) == (20, 60)
    assert "EXIF" in check.note


def test_decompression_bomb_is_rejected_from_its_header(tmp_path, monkeypatch):
    write_image(tmp_path / "big.png", (1, 2, 3), size=(100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    check = check_image(str(tmp_path / "big.png"))
    assert not check.ok and check.reason.startswith("too large")


def test_scan_is_cached_by_fingerprint(tiny_dataset, monkeypatch):
    first = scan_dataset(tiny_dataset)
    import engine.data

    calls = []
    monkeypatch.setattr(engine.data, "check_all", lambda *args: calls.append(1) or [])
    second = scan_dataset(tiny_dataset)
    assert calls == [] and second.fingerprint == first.fingerprint
    write_image(tiny_dataset / "cats" / "new.png", (220, 40, 40))
    monkeypatch.undo()
    third = scan_dataset(tiny_dataset)
    assert third.fingerprint != first.fingerprint and len(third.files) == len(first.files) + 1


def test_flat_split_is_stratified_seeded_and_complete(tmp_path):
    root = make_dataset(tmp_path / "flat", classes=("birds", "cats", "dogs"), per_class=20)
    scan = scan_dataset(root)
    manifest = make_split(scan, 0.1, 0.1, seed=7)
    counts = split_counts(manifest)
    for label in ("birds", "cats", "dogs"):
        assert (counts["train"][label], counts["validation"][label], counts["test"][label]) == (16, 2, 2)
    assert len({item.path for item in manifest}) == 60
    assert [item.path for item in make_split(scan, 0.1, 0.1, seed=7)] == [item.path for item in manifest]
    other = make_split(scan, 0.1, 0.1, seed=8)
    assert {item.path for item in other if item.split == "validation"} != \
           {item.path for item in manifest if item.split == "validation"}


def test_presplit_folders_are_used_as_given(tiny_three_class_dataset):
    scan = scan_dataset(tiny_three_class_dataset)
    assert scan.layout == "split"
    manifest = make_split(scan, 0.3, 0.3, seed=1)
    for item in manifest:
        assert f"/{item.split}/{item.label}/" in item.path


def test_val_folder_name_is_accepted(tmp_path):
    root = make_dataset(tmp_path / "valname", per_class=6, split=True)
    os.rename(root / "validation", root / "val")
    os.rename(root / "test", root / "extra")  # not a split name: ignored as a folder without classes
    manifest = make_split(scan_dataset(root))
    assert Counter(item.split for item in manifest) == {"train": 12, "validation": 4}


def test_subset_keeps_a_stratified_share(tmp_path):
    root = make_dataset(tmp_path / "subset", per_class=40)
    manifest = make_split(scan_dataset(root), 0.25, 0.0, seed=3, subset_fraction=0.25)
    counts = split_counts(manifest)
    assert counts["train"] == {"cats": 8, "dogs": 8}
    assert counts["validation"] == {"cats": 3, "dogs": 3}


def test_single_class_is_a_clear_error(tmp_path):
    root = make_dataset(tmp_path / "single", classes=("cats",), per_class=5)
    with pytest.raises(DataError, match="At least two classes with images are needed"):
        make_split(scan_dataset(root))


def test_class_too_small_for_the_split_is_named(tmp_path):
    root = make_dataset(tmp_path / "small", per_class=6)
    for path in sorted((root / "dogs").iterdir())[1:]:
        path.unlink()
    with pytest.raises(DataError, match="Class dogs has 1 usable image"):
        make_split(scan_dataset(root), 0.1, 0.1)


def test_empty_class_folder_and_imbalance_are_warned(tmp_path):
    root = make_dataset(tmp_path / "warn", classes=("birds", "cats", "dogs"), per_class=4)
    for number in range(8):
        write_image(root / "cats" / f"more_{number}.png", (220, 40, 40), noise_seed=number)
    (root / "empty_class").mkdir()
    scan = scan_dataset(root)
    assert "Class folder empty_class has no images." in scan.warnings
    assert any("imbalanced: cats has 12 images" in warning and "class weights" in warning
               for warning in scan.warnings)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_dataset(tmp_path / "nowhere")
