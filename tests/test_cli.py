"""The command line: a full train → runs → evaluate → predict chain, and one-line errors."""

import json
from pathlib import Path

import pytest

from engine.cli import main
from tests.conftest import make_dataset, run_cli


@pytest.mark.training
def test_train_runs_evaluate_predict_chain(tiny_dataset, tmp_path):
    runs_dir = tmp_path / "runs"
    trained = run_cli("train", "--data", tiny_dataset, "--backbone", "MobileNet", "--alpha", "0.25",
                      "--weights", "none", "--image-size", "32", "--epochs", "2", "--batch-size", "8",
                      "--runs-dir", runs_dir, "--set", "callbacks.early_stopping.enabled=true")
    assert trained.returncode == 0, trained.stderr
    run_dir = Path(trained.stdout.strip().splitlines()[0])
    assert run_dir.parent == runs_dir and (run_dir / "model.keras").is_file()
    assert "Finished after 2 epochs" in trained.stderr
    assert json.loads((run_dir / "config.json").read_text())["callbacks"]["early_stopping"]["enabled"] is True

    listed = run_cli("runs", "--runs-dir", runs_dir)
    assert listed.returncode == 0 and run_dir.name in listed.stdout and "finished" in listed.stdout

    other = make_dataset(tmp_path / "other", per_class=3)
    evaluated = run_cli("evaluate", "--run", run_dir, "--data", other)
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads(evaluated.stdout)
    assert metrics["num_images"] == 6 and 0.0 <= metrics["accuracy"] <= 1.0
    assert len(metrics["confusion_matrix"]) == 2

    image = next((other / "cats").iterdir())
    predicted = run_cli("predict", "--run", run_dir.name, "--runs-dir", runs_dir, image, "--top-k", "2")
    assert predicted.returncode == 0, predicted.stderr
    result = json.loads(predicted.stdout)[0]
    assert [entry["class"] for entry in result["top"]] in (["cats", "dogs"], ["dogs", "cats"])
    assert result["verdict"] == result["top"][0]["class"] and result["sure"] is True

    # Grad-CAM overlays, a broken file reported beside the others.
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    explained = run_cli("explain", "--run", run_dir.name, "--runs-dir", runs_dir, "--out", tmp_path / "cams",
                        image, broken)
    assert explained.returncode == 0, explained.stderr
    good, bad = json.loads(explained.stdout)
    assert Path(good["overlay"]).is_file() and Path(good["overlay"]).parent == tmp_path / "cams"
    assert good["class"] == result["top"][0]["class"] and "error" in bad

    card = run_cli("card", "--run", run_dir.name, "--runs-dir", runs_dir)
    assert card.returncode == 0, card.stderr
    assert sorted(Path(line).name for line in card.stdout.split()) == ["model_card.html", "model_card.json",
                                                                      "model_card.md"]


def _error_line(capsys):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ")
    return lines[0]


def test_missing_data_folder_is_one_line(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in _error_line(capsys)


def test_invalid_value_names_the_field(tiny_dataset, capsys):
    assert main(["train", "--data", str(tiny_dataset), "--epochs", "0"]) == 2
    assert "`training.epochs` must be ≥ 1" in _error_line(capsys)


def test_unknown_backbone_lists_the_choices(tiny_dataset, capsys):
    assert main(["train", "--data", str(tiny_dataset), "--backbone", "ResNet9000"]) == 2
    line = _error_line(capsys)
    assert "ResNet9000" in line and "MobileNetV2" in line


def test_unknown_set_name_is_refused(tiny_dataset, capsys):
    assert main(["train", "--data", str(tiny_dataset), "--set", "training.speed=11"]) == 2
    assert "Unknown setting `training.speed`" in _error_line(capsys)


def test_no_data_at_all_is_refused(capsys):
    assert main(["train"]) == 2
    assert "No data folder" in _error_line(capsys)


@pytest.mark.training
def test_missing_imagenet_weights_offline_fail_fast_with_the_file_name(tiny_dataset, tmp_path, capsys):
    code = main(["train", "--data", str(tiny_dataset), "--backbone", "MobileNet", "--alpha", "0.5",
                 "--image-size", "128", "--runs-dir", str(tmp_path / "runs"), "--quiet"])
    assert code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: Run failed:") and "mobilenet_5_0_128_tf_no_top.h5" in line


def test_unknown_run_is_one_line(tmp_path, capsys):
    assert main(["evaluate", "--run", "nope", "--data", str(tmp_path), "--runs-dir", str(tmp_path)]) == 2
    assert "No run 'nope'" in _error_line(capsys)


def test_runs_lists_nothing_politely(tmp_path, capsys):
    assert main(["runs", "--runs-dir", str(tmp_path / "empty")]) == 0
    assert "No runs yet." in capsys.readouterr().out


def test_backbones_lists_weights_availability(capsys):
    assert main(["backbones", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {row["name"] for row in rows} >= {"MobileNet", "VGG16", "ConvNeXtTiny"}


def test_data_can_name_a_built_in_sample(tmp_path, monkeypatch):
    from engine.cli import build_parser, config_from_arguments

    monkeypatch.setenv("TRANSFER_STUDIO_DATA", str(tmp_path / "appdata"))
    config = config_from_arguments(build_parser().parse_args(["train", "--data", "sample:digits"]))
    assert config.data.path.endswith("samples/digits")
    assert len(list((tmp_path / "appdata" / "samples" / "digits").rglob("*.png"))) == 1797


def test_unknown_sample_is_one_line(capsys):
    assert main(["train", "--data", "sample:imagenet"]) == 2
    assert "Unknown sample 'imagenet'; choose one of: digits" in _error_line(capsys)


def test_check_label_issues_lists_a_picture_filed_under_the_wrong_class(tmp_path):
    import shutil

    data = make_dataset(tmp_path / "colours", per_class=12)
    shutil.copy(data / "cats" / "cats_0.jpg", data / "dogs" / "a_red_one.jpg")  # a cat filed as a dog
    as_json = run_cli("check", data, "--label-issues", "--json")
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    # With 25 noisy squares, a second image may rank too; the mislabelled one must be there, rightly read.
    (found,) = [issue for issue in report["issues"] if Path(issue["path"]).name == "a_red_one.jpg"]
    assert (found["given"], found["suggested"]) == ("dogs", "cats") and report["num_images"] == 25
    assert found["rank"] <= 2
    as_text = run_cli("check", data, "--label-issues")
    assert as_text.returncode == 0, as_text.stderr
    assert "Labels that look wrong" in as_text.stdout and "dogs/a_red_one.jpg" in as_text.stdout
