"""The model card: its facts agree with the run folder, its pages are safe and self-contained, old runs still get one."""

import json
import re
import shutil
from pathlib import Path

import pytest

from engine import jobs, runfiles
from engine.model_card import (MAX_EXAMPLES_PER_PAIR, MAX_INTENDED_USE_CHARACTERS, MAX_WEAK_PAIRS, card_facts,
                               card_html, card_markdown, intended_use, markdown_escape, set_intended_use, write_card)
from engine.runs import create_run
from engine.users import Role, User
from tests.conftest import make_dataset, tiny_config

# A class and a run name a browser would run as code if the card forgot to escape them.
HOSTILE_CLASS = "<script>x"
HOSTILE_NAME = "<script>alert('run')</script>"
OWNER = User(id="issuer|ann", name="Ann", role=Role.MEMBER)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One tiny finished run (two classes, one of them named like a script, one corrupt file), shared by this module.

    Module-scoped, so the autouse per-test environment is not set yet: set its cache and offline switch here.
    """
    import engine

    base = tmp_path_factory.mktemp("card")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRANSFER_STUDIO_CACHE", str(base / "cache"))
        patch.setenv("TRANSFER_STUDIO_OFFLINE", "1")
        data = make_dataset(base / "data", classes=("cats", HOSTILE_CLASS), per_class=10)
        (data / "cats" / "broken.jpg").write_bytes(b"this is not a picture")
        run_dir = engine.train_run(tiny_config(data, **{"training.epochs": 1}), runs_dir=base / "runs")
        jobs.rename(str(run_dir), HOSTILE_NAME, base / "runs")
        write_card(run_dir)
    return Path(run_dir)


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the shared run, for a test that changes its files."""
    return Path(shutil.copytree(run_dir, tmp_path / "runs" / run_dir.name))


@pytest.mark.training
def test_card_facts_agree_with_evaluation_json(trained_run):
    evaluation = runfiles.read_json(trained_run / "evaluation.json")
    facts = runfiles.read_json(trained_run / "model_card.json")
    assert facts["evaluation"]["available"] and set(facts["evaluation"]["splits"]) == set(evaluation["splits"])
    for name, split in evaluation["splits"].items():
        card = facts["evaluation"]["splits"][name]
        assert card["confusion_matrix"] == split["confusion_matrix"]
        correct = sum(split["confusion_matrix"][index][index] for index in range(len(split["classes"])))
        assert card["correct"] == correct and card["num_images"] == split["num_images"]
        assert card["accuracy"] == pytest.approx(split["accuracy"])
        assert card["sentence"] == (f"Right on {correct} of {split['num_images']} {name} images "
                                    f"({100 * correct / split['num_images']:.1f} %).")
        for index, row in enumerate(card["per_class"]):
            label = split["classes"][index]
            assert row["class"] == label
            assert row["right"] == split["confusion_matrix"][index][index]
            assert row["images"] == sum(split["confusion_matrix"][index]) == split["per_class"][label]["support"]
            assert row["recall"] == pytest.approx(split["per_class"][label]["recall"])
            assert row["precision"] == pytest.approx(split["per_class"][label]["precision"])
    # Weak spots are the off-diagonal cells of the fairest split, each with at most the capped examples.
    main = facts["weak_spots"]["split"]
    assert main == "test"
    matrix, classes = evaluation["splits"][main]["confusion_matrix"], evaluation["splits"][main]["classes"]
    expected = {(classes[row], classes[column]): matrix[row][column] for row in range(len(classes))
                for column in range(len(classes)) if row != column and matrix[row][column]}
    assert {(pair["true"], pair["predicted"]): pair["count"] for pair in facts["weak_spots"]["pairs"]} == expected
    for pair in facts["weak_spots"]["pairs"]:
        assert 1 <= len(pair["examples"]) <= min(pair["count"], MAX_EXAMPLES_PER_PAIR)
    assert len(facts["weak_spots"]["pairs"]) <= MAX_WEAK_PAIRS
    assert facts["run"]["name"] == HOSTILE_NAME and facts["training"]["rounds_done"] == 1
    assert facts["exports"]["sentences"] == ["No exports yet."]
    if "calibration" in evaluation:  # runs trained before calibration existed have none
        assert facts["calibration"]["temperature"] == pytest.approx(evaluation["calibration"]["temperature"])
        assert facts["calibration"]["expected_calibration_error"]["calibrated"] == pytest.approx(
            evaluation["calibration"]["expected_calibration_error"]["calibrated"])


@pytest.mark.training
def test_left_out_files_appear_with_their_reasons(trained_run):
    report = runfiles.read_json(trained_run / "data_report.json")
    facts = runfiles.read_json(trained_run / "model_card.json")
    assert [item["name"] for item in facts["data"]["excluded"]] == ["broken.jpg"]
    reason = report["excluded"][0]["reason"]
    assert facts["data"]["excluded"][0]["reason"] == reason and reason
    markdown = (trained_run / "model_card.md").read_text()
    page = (trained_run / "model_card.html").read_text()
    assert f"broken.jpg (cats): {markdown_escape(reason)}" in markdown
    assert "broken.jpg (cats): " + __import__("html").escape(reason) in page
    assert facts["data"]["class_counts"] == report["class_counts"]


@pytest.mark.training
def test_html_is_self_contained_and_escapes_names(trained_run):
    page = (trained_run / "model_card.html").read_text()
    assert "http://" not in page and "https://" not in page
    # The only script-like text is the escaped class and run name.
    assert "<script" not in page.lower()
    assert "&lt;script&gt;x" in page and "&lt;script&gt;alert(&#x27;run&#x27;)&lt;/script&gt;" in page
    assert "@media print" in page and "<table>" in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(source.startswith("data:image/jpeg;base64,") for source in sources)
    facts = runfiles.read_json(trained_run / "model_card.json")
    assert len(sources) == sum(len(pair["examples"]) for pair in facts["weak_spots"]["pairs"])
    markdown = (trained_run / "model_card.md").read_text()
    assert not re.search(r"(?<!\\)<", markdown), "an unescaped < in the Markdown"
    assert "\\<script\\>x" in markdown and "\\<script\\>alert('run')\\</script\\>" in markdown


@pytest.mark.training
def test_markdown_and_json_say_the_same(trained_run):
    facts = runfiles.read_json(trained_run / "model_card.json")
    markdown = (trained_run / "model_card.md").read_text()
    sentences = [facts["intended_use_sentence"]]
    for section in ("data", "training", "calibration", "decision", "weak_spots", "exports"):
        sentences += facts[section]["sentences"]
    for split in facts["evaluation"]["splits"].values():
        sentences += [split["sentence"]] + [row["sentence"] for row in split["per_class"]]
        for label, row in zip(split["classes"], split["confusion_matrix"]):
            assert f"| {markdown_escape(label)} | " + " | ".join(str(value) for value in row) + " |" in markdown
    for sentence in sentences:
        assert markdown_escape(sentence) in markdown, sentence
    # The file is the facts of the moment it was written: drawing them again gives the same page.
    assert card_markdown(facts) == markdown


def test_a_run_without_evaluation_still_gets_a_card_that_says_what_is_missing(tmp_path):
    run_dir = create_run(tiny_config(tmp_path / "nowhere"), tmp_path / "runs")
    paths = write_card(run_dir)
    assert {path.name for path in paths.values()} == {"model_card.md", "model_card.html", "model_card.json"}
    facts = json.loads(paths["json"].read_text())
    assert {"data_report.json", "evaluation.json", "predictions.csv"} <= set(facts["missing"])
    assert not facts["evaluation"]["available"] and not facts["data"]["available"]
    markdown = paths["markdown"].read_text()
    assert "evaluation.json" in markdown and "not evaluated" in markdown and "No exports yet." in markdown
    assert "not evaluated" in paths["html"].read_text()


def test_calibration_operating_point_doctor_and_exports_are_read_when_present(tmp_path):
    run_dir = create_run(tiny_config(tmp_path / "nowhere"), tmp_path / "runs")
    classes = ["ok", "defect"]
    bins = [{"confidence": (index + 0.5) / 15, "accuracy": (index + 0.5) / 15, "count": index % 3} for index in range(15)]
    runfiles.atomic_write_json(run_dir / "evaluation.json", {
        "classes": classes,
        "splits": {"validation": {"classes": classes, "accuracy": 0.75, "macro_f1": 0.7, "num_images": 8,
                                  "confusion_matrix": [[5, 1], [1, 1]],
                                  "per_class": {"ok": {"precision": 5 / 6, "recall": 5 / 6, "f1": 5 / 6, "support": 6},
                                                "defect": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}}}},
        "calibration": {"temperature": 1.7, "fitted_on": "validation", "bins": 15,
                        "expected_calibration_error": {"uncalibrated": 0.123, "calibrated": 0.045},
                        "reliability": {"uncalibrated": bins, "calibrated": bins}, "num_images": 8,
                        "splits": {"test": {"expected_calibration_error": {"uncalibrated": 0.2, "calibrated": 0.1}}}}})
    runfiles.atomic_write_json(run_dir / "decision.json", {"threshold": 0.3, "minimum_confidence": None})
    runfiles.atomic_write_json(run_dir / "data_report.json", {
        "classes": classes, "class_counts": {"ok": 30, "defect": 10}, "split_counts": {}, "excluded": [],
        "doctor": {"leakage": [{"paths": ["/d/train/ok/a.png", "/d/validation/ok/b.png"], "labels": ["ok", "ok"],
                                "splits": ["train", "validation"], "distance": 0, "exact": True}],
                   "num_leaks": 1, "num_duplicate_files": 2, "num_near_duplicate_pairs": 0}})
    (run_dir / "exports" / "tflite").mkdir(parents=True)
    runfiles.atomic_write_json(run_dir / "exports" / "tflite" / "parity.json", {"max_difference": 0.00002})
    (run_dir / "exports" / "onnx").mkdir()

    facts = card_facts(run_dir)
    assert facts["calibration"]["temperature"] == 1.7
    assert "12.3 points" in facts["calibration"]["sentences"][1] and "4.5 points" in facts["calibration"]["sentences"][1]
    assert "fitted on the 8 validation images" in facts["calibration"]["sentences"][0]
    assert facts["calibration"]["sentences"][2] == ("On the test images, which the adjustment never saw: 20.0 points "
                                                    "before, 10.0 after.")
    assert facts["decision"]["sentences"] == ["It answers defect when it is at least 30.0 % sure of defect, otherwise "
                                              "ok (the usual cut is 50 %)."]
    assert facts["data"]["doctor"]["num_leaks"] == 1 and "Exact copies of another file: 2." in facts["data"]["sentences"]
    assert [item["format"] for item in facts["exports"]["formats"]] == ["onnx", "tflite"]
    assert facts["exports"]["sentences"] == ["onnx: no parity check recorded.",
                                             "tflite: parity check: max_difference 2e-05."]
    page = card_html(facts)
    assert "<svg" in page and "<polyline" in page and "a.png ~ b.png (train, validation; identical)" in page
    # No predictions.csv: the pair is named but has no example images.
    assert facts["weak_spots"]["pairs"][0]["examples"] == [] and "data:image" not in page
    assert "http://" not in page and "https://" not in page


def test_only_the_owner_or_an_admin_sets_the_intended_use(tmp_path):
    run_dir = create_run(tiny_config(tmp_path / "nowhere"), tmp_path / "runs", owner=OWNER)
    assert intended_use(run_dir) == ""
    set_intended_use(run_dir, "  Sorting <b>parts</b> on line 3.\n\nNot for people.  ", OWNER)
    assert intended_use(run_dir) == "Sorting <b>parts</b> on line 3.\n\nNot for people."
    admin = User(id="issuer|root", name="Root", role=Role.ADMIN)
    set_intended_use(run_dir, "Sorting parts on line 3.", admin)
    assert runfiles.read_json(run_dir / "card.json")["updated_by"] == admin.id
    for other in (User(id="issuer|bob", name="Bob", role=Role.MEMBER),
                  User(id="issuer|ann", name="Ann", role=Role.VIEWER)):
        with pytest.raises(PermissionError, match="Ann|viewer"):
            set_intended_use(run_dir, "Something else.", other)
    assert intended_use(run_dir) == "Sorting parts on line 3."
    with pytest.raises(ValueError, match=f"at most {MAX_INTENDED_USE_CHARACTERS:,} characters"):
        set_intended_use(run_dir, "x" * (MAX_INTENDED_USE_CHARACTERS + 1), OWNER)
    facts = card_facts(run_dir)
    assert facts["intended_use"] == "Sorting parts on line 3." and "Sorting parts on line 3." in card_markdown(facts)


def test_user_text_cannot_break_the_markdown_or_html(tmp_path):
    run_dir = create_run(tiny_config(tmp_path / "nowhere"), tmp_path / "runs", owner=OWNER)
    set_intended_use(run_dir, "# Not a heading\n| not | a table |\n<img src=x onerror=alert(1)>", OWNER)
    facts = card_facts(run_dir)
    markdown, page = card_markdown(facts), card_html(facts)
    assert "\n# Not a heading" not in markdown and "\\# Not a heading" in markdown
    assert "\\| not \\| a table \\|" in markdown and "\\<img src=x onerror=alert(1)\\>" in markdown
    assert not re.search(r"(?<!\\)<", markdown), "an unescaped < in the Markdown"
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page


def test_card_command_writes_the_three_files_and_prints_their_paths(tmp_path):
    from tests.conftest import run_cli

    run_dir = create_run(tiny_config(tmp_path / "nowhere"), tmp_path / "runs")
    result = run_cli("card", "--run", run_dir.name, "--runs-dir", tmp_path / "runs")
    assert result.returncode == 0, result.stderr
    printed = [Path(line) for line in result.stdout.split()]
    assert {path.name for path in printed} == {"model_card.md", "model_card.html", "model_card.json"}
    assert all(path.parent == run_dir and path.is_file() for path in printed)
    missing = run_cli("card", "--run", "no-such-run", "--runs-dir", tmp_path / "runs")
    assert missing.returncode == 2 and missing.stderr.startswith("error: No run 'no-such-run'")
