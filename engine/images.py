"""Checking and decoding single image files with Pillow.

Decoding goes by the file's content, not its extension; EXIF orientation is applied;
grayscale, RGBA, palette, 16-bit and CMYK images come out as 8-bit RGB.
This module never imports TensorFlow.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow warns about odd files (a size over its limit, EXIF it cannot parse, palette
# transparency); each such file is checked here and its problem becomes a reason or a note,
# so the warnings are noise. They are silenced by a filter on Pillow's modules rather than
# `warnings.catch_warnings()`, which is not thread-safe: files are decoded in threads, and
# interleaved catch_warnings blocks can leave "ignore everything" installed for the whole process.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
warnings.filterwarnings("ignore", module=r"PIL(\..*)?$")

# Extensions we look at; anything else in a class folder is ignored and counted.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# Pillow format names we decode. MPO is the multi-picture JPEG some cameras write.
SUPPORTED_FORMATS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "BMP": ".bmp", "GIF": ".gif", "WEBP": ".webp"}
# Smaller images carry too little to learn from; they are excluded with a reason.
MIN_SIDE_PIXELS = 4
# What each Pillow mode other than RGB is, for the note that says how a file was converted.
MODE_NOTES = {
    "1": "1-bit black and white",
    "L": "grayscale",
    "LA": "grayscale with transparency composited on white",
    "P": "palette",
    "PA": "palette with transparency composited on white",
    "RGBA": "transparency composited on white",
    "RGBa": "transparency composited on white",
    "CMYK": "CMYK colours",
    "YCbCr": "YCbCr colours",
    "I;16": "16-bit grayscale scaled to 8 bits",
    "I;16B": "16-bit grayscale scaled to 8 bits",
    "I;16L": "16-bit grayscale scaled to 8 bits",
    "I": "32-bit integer grayscale scaled to 8 bits",
    "F": "32-bit float grayscale scaled to 8 bits",
}
# File signatures of the accepted formats, to say more than "not an image" when Pillow
# cannot read a file that starts like one of them.
SIGNATURES = ((b"\xff\xd8", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
              (b"BM", "BMP"))


@dataclass
class ImageCheck:
    """The result of checking one file: either a usable image (ok) or a reason to exclude it."""

    ok: bool
    reason: str = ""
    width: int = 0
    height: int = 0
    format: str = ""
    note: str = ""


def is_hidden(name: str) -> bool:
    """Hidden files (`.DS_Store`, macOS `._*` resource forks) are never images of the dataset."""
    return name.startswith(".")


def printable(text: str) -> str:
    """A path as text that can be shown or printed: bytes of a file name that are not UTF-8
    (surrogate escapes in Python) appear escaped, e.g. `caf\\xe9.png`."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def has_image_extension(name: str) -> bool:
    """True when the name ends in one of IMAGE_EXTENSIONS, in any letter case."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def check_image(path: str) -> ImageCheck:
    """Decodes a file (at a reduced scale where the format allows) to decide whether it can be trained on.

    Never raises for bad content: every failure becomes a reason.
    """
    return inspect_image(path)[0]


def inspect_image(path: str, image_size: Optional[int] = None) -> tuple[ImageCheck, Optional[np.ndarray]]:
    """Checks a file and, when `image_size` is given and the file is usable, decodes it in the same pass.

    Returns:
        The check, and the upright uint8 RGB pixels resized to image_size×image_size
        (None when no size was asked for or the file cannot be used). Never raises for
        bad content: every failure becomes a reason, and the scan and the image cache
        that use this decode each file once.
    """
    try:
        size = os.path.getsize(path)
    except OSError as error:
        return ImageCheck(False, f"unreadable: {error.strerror or error}"), None
    if size == 0:
        return ImageCheck(False, "zero bytes: the file is empty"), None
    try:
        with Image.open(path) as image:
            check = _check_open_image(path, image, image_size)
            if not check.ok or not image_size:
                return check, None
            return check, _upright_rgb_array(image, image_size)
    except UnidentifiedImageError:
        return ImageCheck(False, _unidentified_reason(path)), None
    except Image.DecompressionBombError as error:
        # Pillow refuses twice its limit while opening, from the header alone.
        found = re.search(r"\((\d+) pixels\)", str(error))
        pixels = found.group(1) if found else "more"
        return ImageCheck(False, f"too large: {pixels} pixels exceeds the limit of {Image.MAX_IMAGE_PIXELS} "
                                 f"pixels (a decompression-bomb guard; judged from the header, not decoded)"), None
    except Exception as error:  # noqa: BLE001 - bad content must become a reason, never a crash
        return ImageCheck(False, _reason_for(error)), None


def _unidentified_reason(path: str) -> str:
    """Why Pillow could not identify a file: a known format's header cut short, or not an image at all."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(64 * 1024)
    except OSError as error:
        return f"unreadable: {error.strerror or error}"
    is_webp = head[:4] == b"RIFF" and head[8:12] == b"WEBP"
    image_format = "WebP" if is_webp else next((name for magic, name in SIGNATURES if head.startswith(magic)), None)
    if image_format is None:
        return "not an image: the content is not a recognised image format"
    if image_format == "JPEG" and b"\xff\xda" not in head:
        # No start-of-scan marker: the header stops before any picture data.
        return "truncated: a JPEG header with no image data after it"
    return f"unreadable: starts as a {image_format} file but its header is cut short or corrupt"


def _reason_for(error: BaseException) -> str:
    message = str(error).lower()
    if "truncated" in message or "broken data stream" in message or "premature end" in message:
        return "truncated: the file ends before the image data does"
    return f"unreadable: {_short(error)}"


def _short(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _check_open_image(path: str, image: Image.Image, image_size: Optional[int] = None) -> ImageCheck:
    """Checks an opened file and loads its pixels (at a reduced scale for JPEGs).

    Args:
        image_size: The size the pixels will be resized to, or None when only checking.
    """
    image_format = image.format or ""
    width, height = image.size
    original_mode = image.mode
    if image_format not in SUPPORTED_FORMATS:
        return ImageCheck(False, f"unsupported format: {image_format or 'unknown'} "
                                 f"(accepted: JPEG, PNG, BMP, GIF, WebP)", width, height, image_format)
    # Checked from the header, before decoding, so a decompression bomb costs nothing.
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        return ImageCheck(False, f"too large: {width}×{height} pixels exceeds the limit of {limit} pixels "
                                 f"(a decompression-bomb guard; judged from the header, not decoded)",
                          width, height, image_format)
    if min(width, height) < MIN_SIDE_PIXELS:
        return ImageCheck(False, f"too small: {width}×{height} pixels (at least "
                                 f"{MIN_SIDE_PIXELS}×{MIN_SIDE_PIXELS} needed)", width, height, image_format)
    notes = []
    # 16-bit colour PNGs open as RGB(A) and are reduced to 8 bits while loading; only the
    # tile's raw mode (gone after loading) tells.
    deep_colour = any(";16" in str(tile.args) for tile in (image.tile or [])) and original_mode in ("RGB", "RGBA")
    if image_format in ("JPEG", "MPO"):
        # libjpeg can decode at 1/2, 1/4 or 1/8 scale. It still reads every byte of the
        # entropy-coded data, so a truncated or corrupt file fails just the same, at a
        # fraction of the cost: for a check alone, 1/8; for training pixels, the smallest
        # scale that is still at least the training size (the resize then sets the size).
        draft_size = (image_size, image_size) if image_size else (max(1, width // 8), max(1, height // 8))
        image.draft("RGB" if image_size else image.mode, draft_size)
    try:
        image.load()
    except OSError as error:
        return ImageCheck(False, _reason_for(error), width, height, image_format)
    extension = os.path.splitext(path)[1].lower()
    expected_extension = SUPPORTED_FORMATS[image_format]
    same_family = extension == expected_extension or (expected_extension == ".jpg" and extension == ".jpeg")
    if not same_family:
        notes.append(f"{image_format} content named {extension or 'without extension'}")
    if getattr(image, "n_frames", 1) > 1:
        notes.append("animated: first frame used")
    if original_mode != "RGB":
        detail = MODE_NOTES.get(original_mode)
        notes.append(f"{original_mode} converted to RGB" + (f" ({detail})" if detail else ""))
    if deep_colour:
        notes.append(f"16-bit {original_mode} reduced to 8 bits")
    orientation = image.getexif().get(0x0112, 1) if hasattr(image, "getexif") else 1
    if orientation not in (1, None):
        notes.append("rotated upright from EXIF orientation")
        if orientation in (5, 6, 7, 8):
            width, height = height, width
    return ImageCheck(True, "", width, height, image_format, "; ".join(notes))


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any Pillow mode to 8-bit RGB, compositing transparency onto white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit and 32-bit integer images: scale to 8 bits rather than clip at 255.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / peak * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low or 1.0) * 255.0
        return Image.fromarray(scaled.astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def load_rgb(path: str, image_size: Optional[int] = None) -> np.ndarray:
    """Decodes one file to an upright uint8 RGB array, resized to image_size×image_size if given.

    Raises:
        OSError, ValueError or a Pillow error when the file cannot be decoded.
    """
    with Image.open(path) as image:
        if image_size and image.format in ("JPEG", "MPO"):
            # Let libjpeg decode at a reduced scale when the target is much smaller:
            # several times faster for large photos, and the resize below still sets the size.
            image.draft("RGB", (image_size, image_size))
        return _upright_rgb_array(image, image_size)


def _upright_rgb_array(image: Image.Image, image_size: Optional[int]) -> np.ndarray:
    """The first frame, rotated upright from EXIF, as 8-bit RGB, resized when a size is given."""
    image.seek(0)
    # exif_transpose copies the whole image even when there is nothing to turn; ask first.
    orientation = image.getexif().get(0x0112, 1)
    upright = ImageOps.exif_transpose(image) if orientation not in (1, None) else image
    rgb = to_rgb(upright)
    if image_size:
        rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(rgb, dtype=np.uint8)


def load_usable_images(image_paths, image_size: int) -> tuple[list[dict], list[np.ndarray], list[int]]:
    """Reads image files for a model, one bad file never stopping the others.

    Returns:
        (one dict per path, in order: {"path"} or {"path", "error"} naming why the file cannot
        be used; the uint8 RGB arrays of the usable files at `image_size`; for each array, the
        index of its dict in the first list).
    """
    results, arrays, positions = [], [], []
    for path in image_paths:
        path = str(path)
        check = check_image(path)
        if not check.ok:
            results.append({"path": path, "error": check.reason})
            continue
        try:
            arrays.append(load_rgb(path, image_size))
        except Exception as error:  # noqa: BLE001 - one bad file must not stop the others
            results.append({"path": path, "error": f"unreadable: {error}"})
            continue
        positions.append(len(results))
        results.append({"path": path})
    return results, arrays, positions
