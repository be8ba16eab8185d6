"""The near-duplicate index finds exactly the pairs that comparing every pair finds (issue 15)."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from engine import doctor
from engine.near_duplicates import (all_pairs_within, block_plan, hamming, hashes_from_hex, pairs_within)


def planted_hashes(count: int, seed: int, constant_bits: int = 0) -> np.ndarray:
    """`count` random 256-bit hashes where a third are copies of another with 0-48 bits flipped.

    The flips cover every distance around the threshold (40: inside, 41: just outside), and
    copies of copies make clusters, so many pairs land close to the limit.
    """
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2, size=(count, 256), dtype=np.uint8)
    for index in range(max(1, count // 3), count):
        if rng.random() < 0.5:
            source = rng.integers(0, index)
            bits[index] = bits[source]
            flipped = rng.choice(256, size=rng.integers(0, 49), replace=False)
            bits[index, flipped] ^= 1
    # Real pHashes have bits that hardly change (the DC term is always above the median).
    bits[:, :constant_bits] = 1
    return np.packbits(bits, axis=1).view(">u8").astype(np.uint64)


@pytest.mark.parametrize("constant_bits", [0, 9])
def test_the_index_finds_exactly_the_pairs_of_the_all_pairs_search(constant_bits):
    hashes = planted_hashes(3000, seed=constant_bits, constant_bits=constant_bits)
    expected = all_pairs_within(hashes, None, 40)
    distances = expected[:, 2]
    # The planted copies reach both sides of the threshold, so the test has pairs at its edge.
    assert len(expected) > 500 and (distances == 40).any() and (distances == 0).any()
    assert np.array_equal(pairs_within(hashes, None, 40), expected)


def test_the_index_finds_exactly_the_pairs_between_two_sets():
    hashes = planted_hashes(2400, seed=7)
    order = np.random.default_rng(1).permutation(len(hashes))
    train, held_out = hashes[order[:1800]], hashes[order[1800:]]
    expected = all_pairs_within(train, held_out, 40)
    assert len(expected) > 50
    assert np.array_equal(pairs_within(train, held_out, 40), expected)


@pytest.mark.parametrize("max_distance,blocks", [(0, 16), (3, 16), (16, 16), (17, 16), (40, 13), (40, 14), (60, 16)])
def test_other_distances_and_block_counts_find_the_same_pairs(max_distance, blocks):
    hashes = planted_hashes(1200, seed=max_distance + blocks)
    assert np.array_equal(pairs_within(hashes, None, max_distance, blocks=blocks),
                          all_pairs_within(hashes, None, max_distance))


def test_every_way_of_spreading_the_distance_leaves_a_block_within_its_radius():
    """The pigeonhole argument: the blocks' radii + 1 add up to d + 1, so d bits cannot exceed every radius."""
    for max_distance in (0, 5, 15, 16, 40, 47):
        plan = block_plan(256, max_distance, 16)
        assert sum(radius + 1 for _, radius in plan) == max_distance + 1
        assert sorted(np.concatenate([positions for positions, _ in plan]).tolist()) == list(range(256))


def test_bad_input_says_what_was_received():
    with pytest.raises(ValueError, match="same length"):
        hashes_from_hex(["ab" * 32, "ab" * 16])
    with pytest.raises(ValueError, match="wider than 24 bits"):
        block_plan(256, 40, 8)
    with pytest.raises(ValueError, match="max_distance must be ≥ 0; received -1"):
        block_plan(256, -1, 16)
    with pytest.raises(ValueError, match="received 4 and 2"):
        pairs_within(np.zeros((2, 4), np.uint64), np.zeros((2, 2), np.uint64), 4)


def test_empty_and_single_inputs_have_no_pairs():
    one = planted_hashes(1, seed=0)
    assert pairs_within(one, None, 40).shape == (0, 3)
    assert pairs_within(one, one[:0], 40).shape == (0, 3)


def test_the_doctor_lists_the_same_pairs_and_count_as_the_all_pairs_search():
    """The doctor's colour check, count and closest-first cap on the index's pairs, against the reference."""
    hashes = planted_hashes(2000, seed=11)
    colours = np.random.default_rng(2).uniform(80, 150, size=(len(hashes), 3)).astype(np.float32)
    listed, total = doctor._close_pairs((hashes, colours), (hashes, colours), True, limit=100)
    reference = all_pairs_within(hashes, None, doctor.NEAR_DUPLICATE_DISTANCE)
    gap = np.abs(colours[reference[:, 0]] - colours[reference[:, 1]]).max(axis=1)
    reference = reference[gap <= doctor.COLOUR_TOLERANCE]
    reference = reference[np.lexsort((reference[:, 1], reference[:, 0], reference[:, 2]))]
    assert total == len(reference) > 100
    assert np.array_equal(listed, reference[:100])


@pytest.mark.real_data
def test_the_index_matches_on_real_photo_hashes(shared_dir):
    """pHashes of 1,200 real photos and of 300 resized, brightened or re-encoded copies: the same pairs."""
    import imagehash

    from engine.images import load_rgb

    photos = sorted((shared_dir / "data" / "cats_vs_dogs").rglob("*.jpg"))[::2][:1200]
    assert len(photos) == 1200
    rng = random.Random(0)
    hex_hashes = []

    def phash(image: Image.Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=rng.choice([60, 75, 90]))
        pixels = load_rgb(io.BytesIO(buffer.getvalue()), doctor.HASH_IMAGE_SIZE)
        return str(imagehash.phash(Image.fromarray(pixels), hash_size=doctor.HASH_SIZE))

    for index, path in enumerate(photos):
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        hex_hashes.append(str(imagehash.phash(Image.fromarray(load_rgb(str(path), doctor.HASH_IMAGE_SIZE)),
                                              hash_size=doctor.HASH_SIZE)))
        if index % 4 == 0:
            changed = image.resize((image.width // rng.choice([2, 3, 4]), image.height // 2))
            changed = ImageEnhance.Brightness(changed).enhance(rng.uniform(0.8, 1.3))
            hex_hashes.append(phash(changed))
    hashes = hashes_from_hex(hex_hashes)
    expected = all_pairs_within(hashes, None, doctor.NEAR_DUPLICATE_DISTANCE)
    assert len(expected) >= 250  # most copies are found again
    found = pairs_within(hashes, None, doctor.NEAR_DUPLICATE_DISTANCE)
    assert np.array_equal(found, expected)
    assert np.array_equal(found[:, 2], hamming(hashes[found[:, 0]], hashes[found[:, 1]]))
