"""TensorFlow Datasets by name, written as class folders: engine, CLI and Data page.

Nothing is downloaded: `tfds.testing.mock_data` makes deterministic random examples from
each dataset's real feature spec. The mock takes split names from a `dataset_info.json`
in its `data_dir` (the wheel ships none; without one every split name is accepted and
`info.splits` is empty), so each test writes the real split names of its dataset there.
Under the mock every split yields the same `num_examples` examples, and images are PNG.
One test instead prepares a small real TFDS dataset defined here (JPEG bytes, no download),
so TFDS's own generate-then-read path runs unmocked too.
"""

import contextlib
import io
import json
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from engine.cli import build_parser, config_from_arguments, main
from engine.data import make_split, scan_dataset, split_counts
from engine.samples import SampleUnavailableError
from engine.tfds_samples import MARKER, ensure_tfds_dataset
from tests.conftest import REPO_ROOT

tfds = pytest.importorskip("tensorflow_datasets")

# ClassLabel names in label order, as the datasets define them.
BEANS_CLASSES = ["angular_leaf_spot", "bean_rust", "healthy"]
FLOWERS_CLASSES = ["dandelion", "daisy", "tulips", "sunflowers", "roses"]


@pytest.fixture(autouse=True)
def no_user_tfds_dir(monkeypatch):
    """TFDS's data dir is the app's own cache in these tests, never a user's."""
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)


@contextlib.contextmanager
def mocked_tfds(folder: Path, name: str, splits: tuple, num_examples: int):
    """`tfds.testing.mock_data` with the dataset's real split names in its metadata."""
    version = str(tfds.builder_cls(name).VERSION)
    info = folder / name / version
    info.mkdir(parents=True, exist_ok=True)
    (info / "dataset_info.json").write_text(json.dumps({
        "name": name, "version": version, "fileFormat": "tfrecord",
        "splits": [{"name": split, "shardLengths": [str(num_examples)], "numBytes": "0"} for split in splits],
    }))
    with tfds.testing.mock_data(num_examples=num_examples, data_dir=str(folder),
                                policy=tfds.testing.MockPolicy.USE_FILES):
        yield


def mock_examples(name: str, split: str) -> list:
    """The (image, label) pairs the mock yields for a split, read the usual way (decoded, as_supervised)."""
    return list(tfds.as_numpy(tfds.load(name, split=split, as_supervised=True)))


def files_per_class(folder: Path) -> dict:
    return {entry.name: len(list(entry.iterdir())) for entry in sorted(folder.iterdir()) if entry.is_dir()}


def test_beans_keeps_tfds_splits_as_pre_split_class_folders(tmp_path):
    with mocked_tfds(tmp_path / "meta", "beans", ("train", "validation", "test"), num_examples=9):
        folder = ensure_tfds_dataset("beans", tmp_path / "data")
        examples = mock_examples("beans", "train")
    assert folder == tmp_path / "data" / "tfds" / "beans"
    assert sorted(entry.name for entry in folder.iterdir() if entry.is_dir()) == ["test", "train", "validation"]
    expected = dict(sorted(Counter(BEANS_CLASSES[label] for _, label in examples).items()))
    assert sorted(expected) == BEANS_CLASSES  # the seeded mock gives every class an image
    for split in ("train", "validation", "test"):
        assert files_per_class(folder / split) == expected, split
    # The stored bytes are written unchanged: the first example is that image, pixel for pixel.
    first_image, first_label = examples[0]
    written = folder / "train" / BEANS_CLASSES[first_label] / "train_000000.png"
    assert np.array_equal(np.asarray(Image.open(written)), first_image)
    marker = json.loads((folder / MARKER).read_text())
    assert marker["layout"] == "split" and marker["name"] == "beans" and marker["version"] == "0.1.0"

    scan = scan_dataset(folder)
    assert scan.layout == "split" and scan.classes == BEANS_CLASSES and not scan.excluded
    assert {(item.width, item.height) for item in scan.files} == {(500, 500)}
    counts = split_counts(make_split(scan))
    assert {split: sum(per_class.values()) for split, per_class in counts.items()} == \
        {"train": 9, "validation": 9, "test": 9}


def test_a_prepared_dataset_is_not_written_again_even_offline(tmp_path):
    with mocked_tfds(tmp_path / "meta", "beans", ("train", "validation", "test"), num_examples=3):
        folder = ensure_tfds_dataset("beans", tmp_path / "data")
    marker = (folder / MARKER).stat().st_mtime_ns
    files = sorted(path.stat().st_mtime_ns for path in folder.rglob("*.png"))
    # No mock now and no network (TRANSFER_STUDIO_OFFLINE=1): only the marker can answer.
    assert ensure_tfds_dataset("beans", tmp_path / "data") == folder
    assert (folder / MARKER).stat().st_mtime_ns == marker
    assert sorted(path.stat().st_mtime_ns for path in folder.rglob("*.png")) == files


def test_tf_flowers_has_only_train_so_it_becomes_flat(tmp_path):
    with mocked_tfds(tmp_path / "meta", "tf_flowers", ("train",), num_examples=40):
        folder = ensure_tfds_dataset("tf_flowers", tmp_path / "data")
        examples = mock_examples("tf_flowers", "train")
    assert folder.name == "tf_flowers" and not (folder / "train").exists()
    expected = Counter(FLOWERS_CLASSES[label] for _, label in examples)
    assert files_per_class(folder) == dict(sorted(expected.items()))
    assert sorted(expected) == sorted(FLOWERS_CLASSES)
    scan = scan_dataset(folder)
    assert scan.layout == "flat" and scan.classes == sorted(FLOWERS_CLASSES) and len(scan.files) == 40
    # The engine splits it itself, stratified: every class in every split.
    counts = split_counts(make_split(scan, 0.1, 0.1))
    assert all(set(counts[split]) == set(FLOWERS_CLASSES) for split in ("train", "validation", "test"))


def test_a_dataset_not_yet_prepared_is_downloaded_then_written(tmp_path, monkeypatch):
    import engine.locations

    asked = []
    monkeypatch.setattr(engine.locations, "download_reachable", lambda host: asked.append(host) or True)
    with mocked_tfds(tmp_path / "meta", "tf_flowers", ("train",), num_examples=6):
        prepare = tfds.core.DatasetBuilder.download_and_prepare  # the mock's no-op
        with mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", lambda self: False), \
                mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare", autospec=True,
                                  side_effect=prepare) as download:
            folder = ensure_tfds_dataset("tf_flowers", tmp_path / "data")
    assert download.call_count == 1 and asked == ["download.tensorflow.org"]
    assert sum(files_per_class(folder).values()) == 6


def assert_nothing_written(data_dir: Path) -> None:
    """No dataset folder and no staging folder: a failed preparation leaves nothing to be mistaken for data."""
    tfds_root = data_dir / "tfds"
    left = sorted(entry.name for entry in tfds_root.iterdir()) if tfds_root.exists() else []
    assert left in ([], [".tfds_data"]), left


def jpeg_bytes(colour, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (24, 32, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class TinyLeaves(tfds.core.GeneratorBasedBuilder):
    """A real (not mocked) TFDS dataset that needs no download: JPEG bytes, two classes, three splits."""

    VERSION = tfds.core.Version("1.0.0")
    COLOURS = {"healthy": (40, 180, 60), "rust": (170, 90, 30)}
    SIZES = {"train": 4, "validation": 2, "test": 2}

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=list(self.COLOURS)),
                "note": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in self.SIZES}

    def _generate_examples(self, split):
        for number in range(self.SIZES[split]):
            for index, (label, colour) in enumerate(self.COLOURS.items()):
                key = f"{split}-{label}-{number}"
                yield key, {"image": jpeg_bytes(colour, seed=zlib.crc32(key.encode())), "label": label, "note": key}


def test_a_real_tfds_dataset_is_prepared_and_its_jpeg_bytes_kept(tmp_path):
    """No mock: TFDS generates its own files, then its records are read and written out as class folders."""
    folder = ensure_tfds_dataset("tiny_leaves", tmp_path / "data")
    assert (tmp_path / "data" / "tfds" / ".tfds_data" / "tiny_leaves" / "1.0.0" / "dataset_info.json").is_file()
    for split, per_class in TinyLeaves.SIZES.items():
        assert files_per_class(folder / split) == {"healthy": per_class, "rust": per_class}
    written = sorted((folder / "train" / "rust").iterdir())
    assert all(path.suffix == ".jpg" for path in written)
    originals = {jpeg_bytes(TinyLeaves.COLOURS["rust"], seed=zlib.crc32(f"train-rust-{n}".encode())) for n in range(4)}
    assert {path.read_bytes() for path in written} == originals  # byte for byte, not re-encoded
    scan = scan_dataset(folder)
    assert scan.layout == "split" and scan.classes == ["healthy", "rust"] and len(scan.files) == 16


def test_offline_says_so_in_one_sentence_and_leaves_nothing(tmp_path):
    with pytest.raises(SampleUnavailableError) as caught:
        ensure_tfds_dataset("beans", tmp_path / "data")
    message = str(caught.value)
    assert message == ("The dataset 'beans' (TensorFlow Datasets) is downloaded from storage.googleapis.com, which "
                       "this machine cannot reach; use the digits sample or a folder of your own images instead.")
    assert_nothing_written(tmp_path / "data")


def test_a_download_that_fails_after_tfds_retries_is_unavailable(tmp_path, monkeypatch):
    """When the host answers the probe but the download breaks, TFDS 4.9.10 raises requests' ConnectionError."""
    import requests

    import engine.locations

    monkeypatch.setattr(engine.locations, "download_reachable", lambda host: True)
    failure = requests.exceptions.ConnectionError("Max retries exceeded with url: /ibeans/train.zip")
    with mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare", side_effect=failure):
        with pytest.raises(SampleUnavailableError, match=r"'beans' \(TensorFlow Datasets\) could not be downloaded "
                                                         r"\(ConnectionError\); use the digits sample"):
            ensure_tfds_dataset("beans", tmp_path / "data")
    assert_nothing_written(tmp_path / "data")


def test_unknown_and_malformed_names_say_what_is_allowed(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown TensorFlow Datasets name 'no_such_dataset'; give an "
                                         r"image-classification dataset such as beans, tf_flowers"):
        ensure_tfds_dataset("no_such_dataset", tmp_path)
    with pytest.raises(ValueError, match=r"'\.\./etc' is not a TensorFlow Datasets name"):
        ensure_tfds_dataset("../etc", tmp_path)
    with pytest.raises(ValueError, match=r"'imagenette' has no config 'bad'; its configs are: full-size-v2, "):
        ensure_tfds_dataset("imagenette/bad", tmp_path)
    assert not (tmp_path / "tfds" / "no_such_dataset").exists()


def test_a_dataset_that_is_not_image_classification_is_refused(tmp_path):
    with pytest.raises(ValueError) as caught:
        ensure_tfds_dataset("imdb_reviews", tmp_path)
    message = str(caught.value)
    assert "'imdb_reviews' is not an image-classification dataset" in message
    assert "text (Text)" in message and "label (ClassLabel)" in message and "beans" in message


def test_cli_data_tfds_name_resolves_to_the_written_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFER_STUDIO_DATA", str(tmp_path / "appdata"))
    with mocked_tfds(tmp_path / "meta", "beans", ("train", "validation", "test"), num_examples=3):
        config = config_from_arguments(build_parser().parse_args(["train", "--data", "tfds:beans"]))
    assert config.data.path == str((tmp_path / "appdata" / "tfds" / "beans").resolve())
    assert sum(1 for _ in Path(config.data.path).rglob("*.png")) == 9


def _error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_cli_errors_are_one_line_with_status_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRANSFER_STUDIO_DATA", str(tmp_path / "appdata"))
    assert main(["train", "--data", "tfds:no_such_dataset"]) == 2
    assert "Unknown TensorFlow Datasets name 'no_such_dataset'" in _error_line(capsys)
    assert main(["train", "--data", "tfds:beans"]) == 2
    assert "storage.googleapis.com, which this machine cannot reach" in _error_line(capsys)


def test_importing_the_module_does_not_import_tensorflow():
    code = ("import sys, engine.samples, engine.tfds_samples; "
            "bad = [name for name in ('tensorflow_datasets', 'tensorflow', 'keras') if name in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def app_data(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFER_STUDIO_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("TRANSFER_STUDIO_DATA", str(tmp_path / "appdata"))
    (tmp_path / "appdata").mkdir()
    return tmp_path / "appdata"


def open_data_page_on_tfds():
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file(str(REPO_ROOT / "streamlit_app.py"), default_timeout=120)
    app.switch_page("app_pages/data.py")
    app.run()
    app.radio(key="data_source").set_value("TensorFlow Datasets").run()
    return app


def test_data_page_prepares_a_tfds_dataset_and_scans_it(app_data, tmp_path):
    app = open_data_page_on_tfds()
    app.selectbox(key="tfds_suggested").set_value("beans").run()
    with mocked_tfds(tmp_path / "meta", "beans", ("train", "validation", "test"), num_examples=4):
        app.button(key="use_tfds").click().run()
    assert not app.exception, app.exception
    assert not app.error, [error.value for error in app.error]
    assert app.session_state["dataset_path"] == str((app_data / "tfds" / "beans").resolve())
    metrics = {metric.label: metric.value for metric in app.metric}
    assert metrics["Classes"] == "3" and metrics["Usable images"] == "12" and metrics["Left out"] == "0"
    assert any("already split" in caption.value for caption in app.caption)


def test_data_page_shows_the_offline_sentence(app_data):
    app = open_data_page_on_tfds()
    app.text_input(key="tfds_typed").set_value("tf_flowers").run()
    app.button(key="use_tfds").click().run()
    assert not app.exception, app.exception
    assert [error.value for error in app.error] == [
        "The dataset 'tf_flowers' (TensorFlow Datasets) is downloaded from download.tensorflow.org, which this "
        "machine cannot reach; use the digits sample or a folder of your own images instead."]
    assert app.session_state["dataset_path"].endswith("samples/digits")  # unchanged: the default sample
