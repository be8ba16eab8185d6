"""The Export page and the `export` command on a tiny trained run: export, the parity table, downloads."""

import json

import pytest

from engine.users import Role, User
from tests.conftest import make_dataset, open_page, run_cli, tiny_config

pytestmark = pytest.mark.training


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from engine import train_run

    base = tmp_path_factory.mktemp("export_page")
    data = make_dataset(base / "data", per_class=12)
    return train_run(tiny_config(data, **{"data.cache": "memory", "model.image_size": 64}), base / "runs")


def test_the_command_exports_onnx_and_a_browser_page_and_refuses_a_bad_choice(trained_run):
    runs = trained_run.parent
    made = run_cli("export", "--run", trained_run.name, "--runs-dir", runs, "--format", "onnx", "--sample-limit", "8")
    assert made.returncode == 0, made.stderr[-2000:]
    result = json.loads(made.stdout)
    assert result["passed"] is True and result["format"] == "onnx"
    assert (trained_run / "exports" / "onnx" / "parity.json").is_file()
    assert '"action": "export"' in (runs / "audit.jsonl").read_text()

    page = run_cli("export", "--run", trained_run.name, "--runs-dir", runs, "--format", "browser")
    assert page.returncode == 0, page.stderr[-2000:]
    files = json.loads(page.stdout)["files"]
    assert {"index.html", "model.onnx", "labels.json"} <= set(files)
    assert (trained_run / "exports" / "browser" / "index.html").is_file()

    refused = run_cli("export", "--run", trained_run.name, "--runs-dir", runs, "--format", "onnx",
                      "--quantize", "int8")
    assert refused.returncode == 2 and refused.stderr.startswith("error: `quantize` for onnx must be one of none")


def test_the_page_lists_exports_with_their_parity_and_offers_downloads(app_environment, trained_run, monkeypatch):
    monkeypatch.setenv("TRANSFER_STUDIO_RUNS", str(trained_run.parent))
    app = open_page("app_pages/export.py")
    assert not app.exception, app.exception
    app.selectbox(key="export_choice").set_value("SavedModel (TensorFlow Serving, Python)").run()
    app.button(key="export_start").click().run()
    assert not app.exception, app.exception
    assert any("passed" in message.value for message in app.success)
    table = next(frame.value for frame in app.dataframe if "pass mark" in frame.value.columns)
    assert "savedmodel" in list(table["export"]) and set(table["passed"]) == {"yes"}
    labels = [button.proto.label for button in app.get("download_button")]
    assert "savedmodel (zip)" in labels


def test_a_viewer_cannot_export(app_environment, trained_run, monkeypatch):
    import signin
    from engine.exports import export_run

    viewer = User("issuer|vic", "Vic", role=Role.VIEWER)
    monkeypatch.setattr(signin, "current_user", lambda: viewer)
    monkeypatch.setenv("TRANSFER_STUDIO_RUNS", str(trained_run.parent))
    app = open_page("app_pages/export.py")
    assert app.button(key="export_start").disabled
    with pytest.raises(PermissionError, match="viewer"):
        export_run(trained_run, "onnx", user=viewer)
