"""The data doctor (issue #7): broken, odd and duplicated files, folder structure, leakage, fuzzing, `check`.

Every file is generated here, small, so the whole module runs in seconds (one real training run
is marked `training`).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFile

import engine.doctor
from engine.cli import main
from engine.data import make_split, scan_dataset
from engine.doctor import NEAR_DUPLICATE_DISTANCE, check_dataset, finding_pairs
from engine.images import MIN_SIDE_PIXELS, check_image, inspect_image, load_rgb
from engine.pipeline import scan_and_decode
from tests.conftest import REPO_ROOT, make_dataset, open_folder_on_data_page, tiny_config, write_image

# The bombs below make Pillow warn while the scan refuses them; the warning is expected.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

RED, BLUE = (220, 40, 40), (40, 60, 220)
NOT_AN_IMAGE = "not an image: the content is not a recognised image format"


# --- generated files ---------------------------------------------------------------------------


def jpeg_bytes(seed: int = 0, size=(64, 48), quality: int = 90) -> bytes:
    """A noisy JPEG, so that cutting it anywhere cuts real entropy-coded data."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written by hand: Pillow cannot write 16-bit colour, and a bomb needs a header that lies."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows))
            + png_chunk(b"IEND", b""))


def bomb_png(width: int, height: int) -> bytes:
    """A header claiming width×height RGB pixels, with almost no data behind it."""
    return png_bytes(width, height, 8, 2, b"\0" * 64)


def write_broken(folder: Path) -> dict[str, str]:
    """Every broken file of the issue; returns {name: the exact reason it must be excluded with}."""
    folder.mkdir(parents=True, exist_ok=True)
    photo = jpeg_bytes()
    start_of_scan = photo.index(b"\xff\xda")
    random_bytes = np.random.default_rng(7).bytes(3000)
    assert not random_bytes.startswith((b"\x89PNG", b"\xff\xd8", b"GIF", b"BM", b"RIFF"))
    limit = Image.MAX_IMAGE_PIXELS
    files = {
        "zero.jpg": (b"", "zero bytes: the file is empty"),
        "truncated.jpg": (photo[: len(photo) // 2], "truncated: the file ends before the image data does"),
        "text.jpg": (b"Meeting notes, not a photo.\n" * 20, NOT_AN_IMAGE),
        "random.png": (random_bytes, NOT_AN_IMAGE),
        "header_only.jpg": (photo[:start_of_scan], "truncated: a JPEG header with no image data after it"),
        # Over twice Pillow's limit Pillow itself refuses while opening; between once and twice,
        # our own check of the header does. Neither decodes a pixel.
        "bomb.png": (bomb_png(20000, 20000), f"too large: 400000000 pixels exceeds the limit of {limit} pixels "
                                             "(a decompression-bomb guard; judged from the header, not decoded)"),
        "bomb_header.png": (bomb_png(10000, 10000), f"too large: 10000×10000 pixels exceeds the limit of {limit} "
                                                    "pixels (a decompression-bomb guard; judged from the header, "
                                                    "not decoded)"),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: reason for name, (_, reason) in files.items()}


def write_odd(folder: Path, colour) -> dict[str, str]:
    """Every odd but valid file of the issue; returns {name: a note it must carry ("" for none)}."""
    folder.mkdir(parents=True, exist_ok=True)
    picture = Image.new("RGB", (40, 32), colour)
    picture.save(folder / "png_named.jpg", format="PNG")
    picture.save(folder / "gif_named.jpg", format="GIF")
    picture.save(folder / "webp_named.jpg", format="WEBP", lossless=True)
    second_frame = Image.new("RGB", (40, 32), (255, 255, 0))
    picture.save(folder / "animated.gif", save_all=True, append_images=[second_frame], duration=100)
    picture.convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    Image.fromarray(np.full((32, 40), 32768, dtype=np.uint16)).save(folder / "deep16.png")
    sixteen_bit = np.tile(np.array([65535, 32768, 0], dtype=">u2"), (32, 40, 1))
    rows = b"".join(b"\0" + row.tobytes() for row in sixteen_bit)
    (folder / "rgb16.png").write_bytes(png_bytes(40, 32, 16, 2, rows))
    picture.convert("L").save(folder / "grey.png")
    Image.new("RGBA", (40, 32), (*colour, 0)).save(folder / "clear_rgba.png")
    picture.convert("P").save(folder / "palette.png")
    # Stored wide, left half red and right half blue; EXIF orientation 6 says "turn 90° clockwise".
    sideways = Image.new("RGB", (60, 20), RED)
    sideways.paste(BLUE, (30, 0, 60, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways.save(folder / "exif_rotated.jpg", exif=exif, quality=95)
    picture.save(folder / "ünïcödé 猫.png")
    picture.save(folder / "with space.jpg", quality=95)
    Image.new("RGB", (MIN_SIDE_PIXELS, MIN_SIDE_PIXELS), colour).save(folder / "four_by_four.png")
    return {
        "png_named.jpg": "PNG content named .jpg",
        "gif_named.jpg": "GIF content named .jpg",
        "webp_named.jpg": "WEBP content named .jpg",
        "animated.gif": "animated: first frame used",
        "cmyk.jpg": "CMYK converted to RGB",
        "deep16.png": "I;16 converted to RGB (16-bit grayscale scaled to 8 bits)",
        "rgb16.png": "16-bit RGB reduced to 8 bits",
        "grey.png": "L converted to RGB (grayscale)",
        "clear_rgba.png": "RGBA converted to RGB (transparency composited on white)",
        "palette.png": "P converted to RGB (palette)",
        "exif_rotated.jpg": "rotated upright from EXIF orientation",
        "ünïcödé 猫.png": "",
        "with space.jpg": "",
        "four_by_four.png": "",
    }


def non_utf8_path(folder: Path) -> Path:
    """A file name that is not valid UTF-8 (Latin-1 'café'), as Python sees it (surrogate escapes)."""
    return Path(os.fsdecode(os.fsencode(str(folder)) + b"/caf\xe9.png"))


def picture(seed: int, size=(96, 72)) -> Image.Image:
    """A distinct synthetic photo: a gradient and a few random shapes."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size[0])[None, :, None] * rng.integers(0, 255, 3)
    image = Image.fromarray(np.broadcast_to(ramp, (size[1], size[0], 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, size[0] - 10), rng.integers(0, size[1] - 10)
        x1, y1 = x0 + rng.integers(8, size[0] // 2), y0 + rng.integers(8, size[1] // 2)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((int(x0), int(y0), int(x1), int(y1)), fill=tuple(int(value) for value in rng.integers(0, 255, 3)))
    return image


def save(image: Image.Image, path: Path, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def names(entries, key="path") -> dict:
    return {os.path.basename(entry[key] if isinstance(entry, dict) else getattr(entry, key)): entry
            for entry in entries}


# --- broken files --------------------------------------------------------------------------------


def test_each_broken_file_is_excluded_with_its_exact_reason(tmp_path):
    expected = write_broken(tmp_path / "broken")
    for name, reason in expected.items():
        path = str(tmp_path / "broken" / name)
        check = check_image(path)
        assert not check.ok and check.reason == reason, name
        checked, pixels = inspect_image(path, 16)  # the training worker's check-and-decode pass
        assert checked.reason == reason and pixels is None, name


def test_a_decompression_bomb_is_rejected_without_decoding(tmp_path, monkeypatch):
    write_broken(tmp_path / "broken")

    def no_decoding(self):
        raise AssertionError("a decompression bomb must be rejected before its pixels are decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    for name in ("bomb.png", "bomb_header.png"):
        assert check_image(str(tmp_path / "broken" / name)).reason.startswith("too large: "), name


def test_broken_files_are_excluded_and_the_rest_is_still_usable(tmp_path):
    root = make_dataset(tmp_path / "data", per_class=6)
    expected = write_broken(root / "cats")
    for name, reason in write_broken(tmp_path / "more").items():
        shutil.copy(tmp_path / "more" / name, root / "dogs" / f"dog_{name}")
        expected[f"dog_{name}"] = reason
    scan = scan_dataset(root)
    assert {name: entry["reason"] for name, entry in names(scan.excluded).items()} == expected
    assert len(scan.files) == 12 and not set(names(scan.files)) & set(expected)
    manifest = make_split(scan, 0.2, 0.2, seed=3)
    assert len(manifest) == 12 and {item.split for item in manifest} == {"train", "validation", "test"}
    assert not {os.path.basename(item.path) for item in manifest} & set(expected)


# --- odd but valid files --------------------------------------------------------------------------


def test_each_odd_file_is_usable_decoded_to_rgb_and_noted(tmp_path):
    expected = write_odd(tmp_path / "odd", RED)
    for name, note in expected.items():
        path = str(tmp_path / "odd" / name)
        check, pixels = inspect_image(path, 16)
        assert check.ok, (name, check.reason)
        assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8, name
        assert (note in check.note) if note else check.note == "", (name, check.note)


def test_odd_files_decode_by_content_to_the_right_pixels(tmp_path):
    write_odd(tmp_path / "odd", RED)
    odd = tmp_path / "odd"

    def centre(name):
        array = load_rgb(str(odd / name))
        return array[array.shape[0] // 2, array.shape[1] // 2].astype(int)

    for name in ("png_named.jpg", "gif_named.jpg", "webp_named.jpg", "animated.gif", "palette.png"):
        # GIF and palette colours are quantised (to 204, 51, 51); the second frame would be yellow.
        assert np.abs(centre(name) - RED).max() <= 24, name
    assert np.abs(centre("cmyk.jpg") - RED).max() <= 30
    assert np.abs(centre("deep16.png") - 128).max() <= 1  # 32768 of 65535, scaled, not clipped
    assert centre("rgb16.png").tolist() == [255, 128, 0]
    assert centre("clear_rgba.png").tolist() == [255, 255, 255]  # transparent becomes white
    grey = centre("grey.png")
    assert grey[0] == grey[1] == grey[2]


def test_an_exif_rotated_photo_is_decoded_upright(tmp_path):
    write_odd(tmp_path / "odd", RED)
    path = str(tmp_path / "odd" / "exif_rotated.jpg")
    upright = load_rgb(path)
    assert upright.shape == (60, 20, 3)  # stored 60 wide, 20 tall
    # Turned 90° clockwise, the stored left half (red) is on top and the right half (blue) below.
    assert np.abs(upright[8, 10].astype(int) - RED).max() <= 30
    assert np.abs(upright[52, 10].astype(int) - BLUE).max() <= 30
    check = check_image(path)
    assert (check.width, check.height) == (20, 60)


def test_odd_files_reach_the_training_cache_upright_in_rgb(tmp_path):
    root = make_dataset(tmp_path / "data", per_class=4)
    expected = write_odd(root / "cats", RED)
    scan, cache = scan_and_decode(root, 32, cache="memory")
    usable = names(scan.files)
    assert set(expected) <= set(usable)
    row = {path: index for index, path in enumerate(scan.candidates)}
    rotated = cache.images[row[usable["exif_rotated.jpg"].path]].astype(int)
    assert rotated[4, 16, 0] > 150 and rotated[4, 16, 2] < 100   # red at the top
    assert rotated[28, 16, 2] > 150 and rotated[28, 16, 0] < 100  # blue at the bottom
    assert cache.images[row[usable["rgb16.png"].path]][16, 16].tolist() == [255, 128, 0]
    assert not cache.failed


def test_unicode_space_and_non_utf8_file_names_are_usable(tmp_path):
    root = make_dataset(tmp_path / "data", per_class=4)
    write_odd(root / "cats", RED)
    odd_name = non_utf8_path(root / "cats")
    write_image(odd_name, RED, noise_seed=77)
    shutil.copy(odd_name, root / "cats" / "copy of café.png")
    scan = scan_dataset(root)
    usable = {item.path for item in scan.files}
    for path in (root / "cats" / "ünïcödé 猫.png", root / "cats" / "with space.jpg", odd_name):
        assert str(path) in usable, path
        assert load_rgb(str(path), 8).shape == (8, 8, 3)
    assert str(odd_name) in {item.path for item in make_split(scan, 0.2, 0.2)}
    # The report stays valid JSON (the odd bytes are escaped) and reads back to the same paths.
    report = check_dataset(root)
    expected = {str(root / "cats" / "copy of café.png"), str(odd_name)}
    assert expected in [set(group["paths"]) for group in report["duplicates"]]
    assert expected in [set(group["paths"]) for group in json.loads(json.dumps(report))["duplicates"]]


def test_tiny_images_are_excluded_as_too_small_with_the_size(tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    for width, height in ((1, 1), (3, 40), (40, 2)):
        Image.new("RGB", (width, height), RED).save(folder / f"{width}x{height}.png")
        check = check_image(str(folder / f"{width}x{height}.png"))
        assert check.reason == f"too small: {width}×{height} pixels (at least 4×4 needed)"
    assert check_image(str(write_image(folder / "four.png", RED, (4, 4)))).ok


# --- folder structure ------------------------------------------------------------------------------


def test_folder_structure_cases_are_reported(tmp_path):
    root = make_dataset(tmp_path / "data", per_class=6)
    cats = root / "cats"
    (cats / ".DS_Store").write_bytes(b"\0\1")
    (cats / "._cats_0.jpg").write_bytes(b"resource fork")
    (cats / "readme.txt").write_text("stray")
    (cats / "labels.csv").write_text("a,b")
    write_image(cats / ".thumbnails" / "hidden.png", RED)
    write_image(root / "loose.png", RED)  # directly in the data folder: in no class
    write_image(cats / "2019" / "summer" / "deep.png", RED)  # nested: belongs to cats
    outside = make_dataset(tmp_path / "outside", classes=("cats",), per_class=2)
    os.symlink(outside / "cats", cats / "linked")
    (root / "empty_class").mkdir()
    report = check_dataset(root)
    ignored = {os.path.relpath(entry["path"], root): entry["reason"] for entry in report["ignored"]}
    assert ignored == {
        "cats/.DS_Store": "hidden file",
        "cats/._cats_0.jpg": "hidden file",
        "cats/readme.txt": "not an image file type (.txt; accepted: .jpg, .jpeg, .png, .bmp, .gif, .webp)",
        "cats/labels.csv": "not an image file type (.csv; accepted: .jpg, .jpeg, .png, .bmp, .gif, .webp)",
        "cats/.thumbnails": "hidden folder: not read",
        "cats/linked": "linked folder: not followed (copy its images in, or link the class folder)",
        "loose.png": "not inside a class folder",
    }
    assert report["num_ignored"] == 7 and report["num_hidden_ignored"] == 3
    assert report["class_counts"] == {"cats": 7, "dogs": 6, "empty_class": 0}
    labels = {item.path: item.label for item in scan_dataset(root).files}
    assert labels[str(cats / "2019" / "summer" / "deep.png")] == "cats"
    assert report["rules"][0].startswith("Images anywhere below a class folder belong to that class")
    assert "Class folder empty_class has no images." in report["warnings"]
    assert report["trainable"] and report["errors"] == []


def test_a_single_class_cannot_be_trained_and_says_so(tmp_path):
    root = make_dataset(tmp_path / "single", classes=("cats",), per_class=5)
    report = check_dataset(root)
    assert not report["trainable"] and not report["leakage_checked"]
    assert report["errors"][0].startswith("At least two classes with images are needed to train a classifier")


def test_a_class_too_small_for_the_split_is_named(tmp_path):
    root = make_dataset(tmp_path / "small", per_class=6)
    for path in sorted((root / "dogs").iterdir())[2:]:
        path.unlink()
    report = check_dataset(root, 0.1, 0.1)
    assert not report["trainable"]
    assert report["errors"][0].startswith("Class dogs has 2 usable image(s); the split (validation 0.1, test 0.1) "
                                          "needs at least 3")
    assert check_dataset(root, 0.2, 0.0)["trainable"]  # one held-out split: two images are enough


def test_a_presplit_class_missing_from_validation_is_warned(tmp_path):
    root = make_dataset(tmp_path / "presplit", per_class=6, split=True)
    shutil.rmtree(root / "validation" / "dogs")
    report = check_dataset(root)
    assert "Class dogs has no validation images: its validation metrics will be empty." in report["warnings"]
    assert report["split"]["source"] == "given by the folders"


# --- duplicates, near-duplicates, leakage --------------------------------------------------------------


@pytest.fixture
def photos(tmp_path) -> Path:
    """Ten distinct synthetic photos per class, plus copies of five of them."""
    root = tmp_path / "photos"
    for index in range(10):
        save(picture(index), root / "cats" / f"cat_{index}.png")
        save(picture(100 + index), root / "dogs" / f"dog_{index}.png")
    shutil.copy(root / "cats" / "cat_0.png", root / "cats" / "cat_0_copy.png")
    shutil.copy(root / "cats" / "cat_1.png", root / "dogs" / "dog_that_is_cat_1.png")
    original = picture(2)
    save(original.resize((48, 36), Image.Resampling.BICUBIC), root / "cats" / "cat_2_small.jpg", quality=75)
    save(ImageEnhance.Brightness(picture(3)).enhance(1.1), root / "cats" / "cat_3_brighter.png")
    save(picture(4), root / "cats" / "cat_4_reencoded.jpg", quality=70)
    return root


def test_exact_and_near_duplicates_are_listed_with_both_paths(photos):
    report = check_dataset(photos)
    cats, dogs = photos / "cats", photos / "dogs"
    groups = {tuple(group["paths"]): group["same_class"] for group in report["duplicates"]}
    assert groups == {
        (str(cats / "cat_0.png"), str(cats / "cat_0_copy.png")): True,
        (str(cats / "cat_1.png"), str(dogs / "dog_that_is_cat_1.png")): False,
    }
    assert report["num_duplicate_files"] == 2
    near = {tuple(pair["paths"]): pair["distance"] for pair in report["near_duplicates"]}
    # Resized and re-encoded, brightened, re-encoded: found; the twenty different photos: not.
    assert set(near) == {
        (str(cats / "cat_2.png"), str(cats / "cat_2_small.jpg")),
        (str(cats / "cat_3.png"), str(cats / "cat_3_brighter.png")),
        (str(cats / "cat_4.png"), str(cats / "cat_4_reencoded.jpg")),
    }
    assert all(distance <= NEAR_DUPLICATE_DISTANCE for distance in near.values())
    assert report["num_near_duplicate_pairs"] == 3
    rows = finding_pairs(report)
    assert [(row["first"], row["second"]) for row in rows["Exact duplicates"]] == list(groups)


def test_different_photos_are_far_apart(tmp_path):
    """The threshold leaves a margin: forty distinct photos are all more than the threshold apart."""
    for index in range(40):
        save(picture(1000 + index), tmp_path / "many" / ("a" if index % 2 else "b") / f"{index}.png")
    hashes = engine.doctor.file_hashes([str(path) for path in sorted((tmp_path / "many").rglob("*.png"))])
    _, array, _ = engine.doctor._hash_array(list(hashes), hashes)
    distances = [int(np.bitwise_count(array[i] ^ array[j]).sum())
                 for i in range(len(array)) for j in range(i + 1, len(array))]
    assert min(distances) > NEAR_DUPLICATE_DISTANCE


def test_the_same_layout_in_other_colours_is_not_a_near_duplicate(tmp_path):
    """pHash sees brightness only: a red and a green picture of the same shapes hash alike; colours tell them apart."""
    def layout(fill):
        image = Image.new("RGB", (96, 72), (0, 0, 0))
        draw = ImageDraw.Draw(image)
        draw.rectangle((0, 0, 47, 71), fill=fill)
        draw.ellipse((56, 10, 90, 60), fill=fill)
        return image

    root = make_dataset(tmp_path / "data", per_class=3)
    red = save(layout((200, 50, 50)), root / "cats" / "red.png")
    green = save(layout((50, 110, 90)), root / "dogs" / "green.png")
    darker_red = save(layout((180, 45, 45)), root / "dogs" / "darker_red.png")
    hashes = engine.doctor.file_hashes([str(red), str(green)])
    _, array, _ = engine.doctor._hash_array(list(hashes), hashes)
    assert int(np.bitwise_count(array[0] ^ array[1]).sum()) <= NEAR_DUPLICATE_DISTANCE  # alike to pHash
    pairs = [set(pair["paths"]) for pair in check_dataset(root)["near_duplicates"]]
    assert {str(red), str(green)} not in pairs and {str(green), str(darker_red)} not in pairs
    assert {str(red), str(darker_red)} in pairs  # 10 % darker is still the same picture


def test_leakage_in_a_presplit_folder_lists_both_paths(tmp_path):
    root = tmp_path / "presplit"
    for split, offset in (("train", 0), ("validation", 50), ("test", 80)):
        for index in range(4):
            save(picture(offset + index), root / split / "cats" / f"cat_{index}.png")
            save(picture(offset + 500 + index), root / split / "dogs" / f"dog_{index}.png")
    save(picture(0), root / "validation" / "cats" / "seen_in_train.jpg", quality=80)
    shutil.copy(root / "train" / "dogs" / "dog_1.png", root / "test" / "dogs" / "copied_from_train.png")
    report = check_dataset(root)
    leaks = {(tuple(leak["paths"]), tuple(leak["splits"]), leak["exact"]) for leak in report["leakage"]}
    assert leaks == {
        ((str(root / "train/cats/cat_0.png"), str(root / "validation/cats/seen_in_train.jpg")),
         ("train", "validation"), False),
        ((str(root / "train/dogs/dog_1.png"), str(root / "test/dogs/copied_from_train.png")), ("train", "test"), True),
    }
    assert report["num_leaks"] == 2 and report["leakage_checked"]


def test_leakage_in_a_flat_folder_follows_the_split_training_would_make(photos):
    scan = scan_dataset(photos)
    original, copy = str(photos / "cats" / "cat_0.png"), str(photos / "cats" / "cat_0_copy.png")

    def splits(seed):
        manifest = {item.path: item.split for item in make_split(scan, 0.2, 0.2, seed)}
        return manifest[original], manifest[copy]

    leaking = next(seed for seed in range(100) if "train" in splits(seed) and splits(seed) != ("train", "train"))
    apart = next(seed for seed in range(100) if splits(seed) == ("train", "train"))
    report = check_dataset(photos, 0.2, 0.2, leaking)
    pairs = {frozenset(leak["paths"]) for leak in report["leakage"] if leak["exact"]}
    assert frozenset((original, copy)) in pairs
    manifest = {item.path: item.split for item in make_split(scan, 0.2, 0.2, leaking)}
    for leak in report["leakage"]:
        assert leak["splits"] == [manifest[leak["paths"][0]], manifest[leak["paths"][1]]]
        assert leak["splits"][0] == "train" and leak["splits"][1] in ("validation", "test")
    assert report["split"] == {"source": "made by the engine", "validation_fraction": 0.2, "test_fraction": 0.2,
                               "seed": leaking, "counts": report["split"]["counts"]}
    quiet = check_dataset(photos, 0.2, 0.2, apart)
    assert frozenset((original, copy)) not in {frozenset(leak["paths"]) for leak in quiet["leakage"]}


def test_hashes_are_cached_per_file(photos, monkeypatch):
    first = check_dataset(photos)
    calls = []
    real = engine.doctor._hash_file
    monkeypatch.setattr(engine.doctor, "_hash_file", lambda path: calls.append(path) or real(path))
    again = check_dataset(photos)
    assert calls == [] and again == first
    changed = photos / "dogs" / "dog_5.png"
    save(picture(4), changed)  # now a copy of cat_4's picture
    os.utime(changed, ns=(1, 1))
    third = check_dataset(photos)
    assert calls == [str(changed)]
    assert (str(photos / "cats" / "cat_4.png"), str(changed)) in {tuple(group["paths"]) for group in third["duplicates"]}


def test_listed_findings_are_capped_closest_first_with_complete_counts(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "data", per_class=4)
    base = picture(9)
    for index, factor in enumerate((1.0, 1.04, 1.08, 1.12)):
        save(ImageEnhance.Brightness(base).enhance(factor), root / "cats" / f"same_{index}.png")
    monkeypatch.setattr(engine.doctor, "MAX_LISTED", 2)
    report = check_dataset(root)
    assert report["num_near_duplicate_pairs"] >= 4 and len(report["near_duplicates"]) == 2
    distances = [pair["distance"] for pair in report["near_duplicates"]]
    assert distances == sorted(distances)


def test_imbalance_is_reported_with_ratio_and_suggestion_and_never_fixed(tmp_path):
    root = make_dataset(tmp_path / "data", per_class=4)
    for index in range(8):
        write_image(root / "cats" / f"more_{index}.png", RED, noise_seed=50 + index)
    report = check_dataset(root, 0.25, 0.0)
    assert report["imbalance"]["ratio"] == 3.0
    assert (report["imbalance"]["largest"], report["imbalance"]["smallest"]) == ("cats", "dogs")
    assert "class weights 'balanced'" in report["imbalance"]["suggestion"]
    assert report["class_counts"] == {"cats": 12, "dogs": 4}
    assert sum(sum(counts.values()) for counts in report["split"]["counts"].values()) == 16  # nothing dropped
    balanced = check_dataset(make_dataset(tmp_path / "even", per_class=4))
    assert balanced["imbalance"]["imbalanced"] is False and balanced["imbalance"]["suggestion"] == ""


# --- fuzzing -----------------------------------------------------------------------------------------------


def fuzz_corpus(folder: Path, count: int, seed: int = 20260707) -> list[Path]:
    """Random bytes and mutated valid JPEG, PNG, GIF, WebP and BMP files, named with image extensions."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
    valid = {}
    for name, options in (("jpg", {"format": "JPEG"}), ("png", {"format": "PNG"}), ("webp", {"format": "WEBP"}),
                          ("bmp", {"format": "BMP"}),
                          ("gif", {"format": "GIF", "save_all": True, "append_images": [base.rotate(90)]})):
        buffer = io.BytesIO()
        base.save(buffer, **options)
        valid[name] = buffer.getvalue()
    extensions = list(valid)
    paths = []
    for index in range(count):
        extension = extensions[index % len(extensions)]
        data = bytearray(valid[extensions[int(rng.integers(len(extensions)))]])
        mutation = index % 5
        if mutation == 0:
            data = bytearray(rng.bytes(int(rng.integers(0, 3000))))
        elif mutation == 1:  # flipped bytes anywhere
            for _ in range(int(rng.integers(1, 20))):
                data[int(rng.integers(len(data)))] = int(rng.integers(256))
        elif mutation == 2:  # cut short
            data = data[: int(rng.integers(len(data)))]
        elif mutation == 3:  # a damaged header
            position = int(rng.integers(min(len(data), 48)))
            data[position:position + 4] = rng.bytes(4)
        else:  # a chunk repeated or dropped
            start, length = int(rng.integers(len(data))), int(rng.integers(1, 200))
            data = data[:start] + data[start:start + length] * int(rng.integers(0, 3)) + data[start + length:]
        path = folder / ("cats" if index % 2 else "dogs") / f"fuzz_{index:03d}.{extension}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(data))
        paths.append(path)
    return paths


def test_fuzzed_files_never_raise_and_each_is_an_image_or_a_reason(tmp_path):
    paths = fuzz_corpus(tmp_path / "fuzz", 400)
    outcomes = {"ok": 0, "excluded": 0}
    for path in paths:
        check = check_image(str(path))
        checked, pixels = inspect_image(str(path), 16)
        assert check.ok == checked.ok, path
        if check.ok:
            assert check.reason == "" and min(check.width, check.height) >= MIN_SIDE_PIXELS
            assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
            outcomes["ok"] += 1
        else:
            assert check.reason.strip() and pixels is None, path
            outcomes["excluded"] += 1
    assert outcomes["ok"] > 0 and outcomes["excluded"] > 0  # the corpus exercises both outcomes
    scan = scan_dataset(tmp_path / "fuzz")
    assert len(scan.files) + len(scan.excluded) == len(paths)
    assert all(entry["reason"].strip() for entry in scan.excluded)
    assert len(scan.files) == outcomes["ok"]
    report = check_dataset(tmp_path / "fuzz")
    assert report["num_images"] == outcomes["ok"]


@pytest.mark.real_data
def test_the_threshold_on_real_photos(shared_dir, tmp_path, monkeypatch):
    """On the shared cats-vs-dogs photos: the one photo saved twice is found, nothing else; copies are found."""
    root = shared_dir / "data" / "cats_vs_dogs"
    report = check_dataset(root)
    assert [pair["paths"] for pair in report["near_duplicates"]] == [
        [str(root / "train" / "dogs" / "dog.180.jpg"), str(root / "train" / "dogs" / "dog.74.jpg")]]
    assert report["num_duplicate_groups"] == 0 and report["num_leaks"] == 0
    hashed = []
    real = engine.doctor._hash_file
    monkeypatch.setattr(engine.doctor, "_hash_file", lambda path: hashed.append(path))
    assert check_dataset(root) == report and hashed == []  # the second time, nothing is read again
    monkeypatch.setattr(engine.doctor, "_hash_file", real)
    originals = sorted((root / "validation" / "cats").glob("*.jpg"))[:20]
    copies = tmp_path / "copies"
    expected = set()
    for index, path in enumerate(originals):
        with Image.open(path) as opened:
            photo = opened.convert("RGB")
        folder = copies / ("a" if index % 2 else "b")
        original = save(photo, folder / f"{index}.png")
        half = save(photo.resize((photo.width // 2, photo.height // 2), Image.Resampling.BICUBIC),
                    folder / f"{index}_half.jpg", quality=75)
        brighter = save(ImageEnhance.Brightness(photo).enhance(1.1), folder / f"{index}_brighter.jpg", quality=90)
        much_brighter = save(ImageEnhance.Brightness(photo).enhance(1.2), folder / f"{index}_much_brighter.png")
        expected |= {(str(original), str(copy)) for copy in (half, brighter, much_brighter)}
    found = {tuple(sorted(pair["paths"], key=lambda path: "_" in Path(path).name))
             for pair in check_dataset(copies)["near_duplicates"]}
    assert expected <= found  # every copy is found next to its photo
    assert all(Path(first).name.split("_")[0].split(".")[0] == Path(second).name.split("_")[0].split(".")[0]
               for first, second in found)  # and no two different photos are paired


# --- the `check` command ----------------------------------------------------------------------------------


@pytest.fixture
def messy(photos) -> Path:
    write_broken(photos / "cats")
    (photos / "dogs" / "notes.txt").write_text("stray")
    return photos


def test_check_prints_a_readable_summary(messy, capsys):
    assert main(["check", str(messy), "--validation-fraction", "0.2", "--test-fraction", "0.2"]) == 0
    output = capsys.readouterr().out
    assert "Layout: flat (the engine splits it: validation 0.2, test 0.2, seed 42)" in output
    report = check_dataset(messy, 0.2, 0.2)
    assert f"Usable images: {report['num_images']}   excluded: 7   ignored: 1 (0 hidden)" in output
    for name, reason in write_broken(messy.parent / "again").items():
        assert f"cats/{name}: {reason}" in output
    assert "cats/cat_0.png = cats/cat_0_copy.png" in output
    assert "cats/cat_1.png = dogs/dog_that_is_cat_1.png   [in different classes: cats, dogs]" in output
    assert "cats/cat_2.png ~ cats/cat_2_small.jpg" in output
    assert "Near-duplicates (pHash, 256 bits (ImageHash), at most 40 bits apart): 3" in output
    assert f"Leakage (the same picture in train and in validation/test): {report['num_leaks']}" in output
    assert "Images anywhere below a class folder belong to that class" in output
    assert output.rstrip().endswith("Trainable: yes")


def test_check_json_is_the_whole_report(messy, capsys):
    assert main(["check", str(messy), "--json", "--split-seed", "5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["split"]["seed"] == 5 and report["trainable"] is True
    assert report["num_excluded"] == 7 and report["num_duplicate_groups"] == 2
    assert report == json.loads(json.dumps(check_dataset(messy, 0.1, 0.1, 5)))


def test_check_exits_2_with_one_error_line_when_the_data_cannot_be_trained(tmp_path, capsys):
    root = make_dataset(tmp_path / "single", classes=("cats",), per_class=5)
    assert main(["check", str(root)]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("error: At least two classes with images are needed")
    assert captured.out.rstrip().endswith("Trainable: no")
    assert main(["check", str(root), "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["trainable"] is False
    for arguments in (["check", str(tmp_path / "nowhere")], ["check", str(root), "--test-fraction", "1.5"]):
        assert main(arguments) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and error.startswith("error: ")


def test_check_from_a_shell_prints_odd_file_names(tmp_path):
    root = make_dataset(tmp_path / "data", per_class=4)
    write_image(non_utf8_path(root / "cats"), RED)
    (root / "cats" / "zero.jpg").write_bytes(b"")
    result = subprocess.run([sys.executable, "-m", "engine", "check", str(root)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 0, result.stderr
    assert "Usable images: 9   excluded: 1" in result.stdout
    assert "cats/zero.jpg: zero bytes: the file is empty" in result.stdout


# --- the Data page -----------------------------------------------------------------------------------------


def test_data_page_doctor_shows_duplicates_and_leakage_once_opened(tmp_path, monkeypatch, photos):
    monkeypatch.setenv("TRANSFER_STUDIO_DATA", str(tmp_path / "appdata"))
    (tmp_path / "appdata").mkdir()
    root = tmp_path / "appdata" / "photos"
    shutil.copytree(photos, root)
    hashed = []
    real = engine.doctor._hash_file
    monkeypatch.setattr(engine.doctor, "_hash_file", lambda path: hashed.append(path) or real(path))
    app = open_folder_on_data_page(root)
    assert not app.exception and hashed == []  # closed: nothing is hashed
    app.session_state["doctor"] = True
    app.run()
    assert not app.exception, app.exception
    metrics = {metric.label: metric.value for metric in app.metric}
    assert metrics["Duplicate files"] == "2" and metrics["Near-duplicate pairs"] == "3"
    tables = [table.value for table in app.dataframe if "how close" in table.value.columns]
    duplicates = tables[0]
    assert set(zip(duplicates["first"], duplicates["second"])) == {
        ("cats/cat_0.png", "cats/cat_0_copy.png"), ("cats/cat_1.png", "dogs/dog_that_is_cat_1.png")}
    assert len(app.expander[-1].get("image")) >= 4  # the first pairs, side by side


def test_data_page_reruns_never_scan_list_or_hash_again(tmp_path, monkeypatch):
    """Issue 15: widget reruns on a large folder reuse the cached scan, fingerprint and hashes; the grid is
    paginated; a file added to the folder is noticed; the page shows the caches' size."""
    import engine.data

    monkeypatch.setenv("TRANSFER_STUDIO_DATA", str(tmp_path / "appdata"))
    root = make_dataset(tmp_path / "appdata" / "many", per_class=30)
    calls = {"check": 0, "list": 0, "hash": 0}

    def counted(name, real):
        def call(first, *arguments, **keywords):
            # Only calls about this folder count (the page first opens on the built-in sample).
            if str(root) in str(first[0] if isinstance(first, list) and first else first):
                calls[name] += 1
            return real(first, *arguments, **keywords)
        return call

    monkeypatch.setattr(engine.data, "check_all", counted("check", engine.data.check_all))
    monkeypatch.setattr(engine.data, "list_candidate_files", counted("list", engine.data.list_candidate_files))
    monkeypatch.setattr(engine.doctor, "_hash_file", counted("hash", engine.doctor._hash_file))
    app = open_folder_on_data_page(root)
    assert not app.exception, app.exception
    assert calls["check"] == 1 and calls["hash"] == 0
    app.session_state["doctor"] = True
    app.run()
    assert calls["hash"] == 60 and calls["check"] == 1
    before = dict(calls)
    app.number_input(key="grid_page").set_value(3).run()  # the grid's last page
    app.selectbox(key="grid_class").set_value("dogs").run()
    app.slider(key="field.data.validation_fraction").set_value(0.2).run()
    app.run()
    assert not app.exception, app.exception
    assert calls == before, f"reruns scanned, listed or hashed again: {before} → {calls}"
    assert app.number_input(key="grid_page").label == "Page (of 3)"  # 30 images, 12 a page
    assert any("Caches (scans, decoded images, features, hashes):" in caption.value and "budget" in caption.value
               for caption in app.caption)
    write_image(root / "dogs" / "new_dog.png", (40, 60, 220), noise_seed=4242)
    app.run()
    assert {metric.label: metric.value for metric in app.metric}["Usable images"] == "61"
    assert calls["check"] == before["check"] + 1


# --- one real training run on the mixed corpus ----------------------------------------------------------------


@pytest.mark.training
def test_broken_files_are_excluded_and_odd_files_are_trained(tmp_path):
    from engine import runfiles
    from engine.runs import create_run
    from engine.train import run_training

    root = make_dataset(tmp_path / "mixed", per_class=8)
    broken = {**write_broken(root / "cats"), **write_broken(root / "dogs")}
    odd = {**write_odd(root / "cats" / "odd", RED), **write_odd(root / "dogs" / "odd", BLUE)}
    not_utf8 = write_image(non_utf8_path(root / "cats"), RED, noise_seed=99)
    run_dir = create_run(tiny_config(root), tmp_path / "runs")
    assert run_training(run_dir).value == "finished", runfiles.read_json(run_dir / "status.json")
    trained = {row["path"] for row in runfiles.read_csv(run_dir / "split.csv")}
    assert str(not_utf8) in trained  # written back as its own bytes, read back as the same path
    for class_name in ("cats", "dogs"):
        for name in odd:
            assert str(root / class_name / "odd" / name) in trained, (class_name, name)
        for name in broken:
            assert str(root / class_name / name) not in trained
    report = runfiles.read_json(run_dir / "data_report.json")
    excluded = {os.path.relpath(entry["path"], root): entry["reason"] for entry in report["excluded"]}
    assert excluded == {f"{class_name}/{name}": reason for class_name in ("cats", "dogs")
                        for name, reason in broken.items()}
    evaluation = runfiles.read_json(run_dir / "evaluation.json")
    assert evaluation["splits"]["validation"]["num_images"] > 0
