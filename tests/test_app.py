"""The dashboard (AppTest, no browser) and the promise that reading runs never imports TensorFlow."""

import subprocess
import sys

from streamlit.testing.v1 import AppTest

from engine.config import RunConfig
from engine.runs import create_run
from tests.conftest import REPO_ROOT


def test_home_page_explains_the_tool_and_offers_a_first_step(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFER_STUDIO_RUNS", str(tmp_path / "runs"))
    app = AppTest.from_file(str(REPO_ROOT / "streamlit_app.py"), default_timeout=30).run()
    assert not app.exception
    assert app.title[0].value == "Transfer Studio"
    assert "No runs yet" in app.info[0].value


def test_home_page_lists_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFER_STUDIO_RUNS", str(tmp_path / "runs"))
    run_dir = create_run(RunConfig().replace(**{"data.path": "/data/flowers"}), tmp_path / "runs")
    app = AppTest.from_file(str(REPO_ROOT / "streamlit_app.py"), default_timeout=30).run()
    assert not app.exception
    table = app.dataframe[0].value
    assert list(table["Run"]) == [run_dir.name]
    assert list(table["State"]) == ["queued"] and list(table["Dataset"]) == ["/data/flowers"]


def test_reading_runs_does_not_import_tensorflow(tmp_path):
    create_run(RunConfig().replace(**{"data.path": "/data/x"}), tmp_path)
    code = (
        "import sys; from engine.runs import list_runs, get_run; "
        f"runs = list_runs({str(tmp_path)!r}); get_run(runs[0].path); "
        "import engine.backbones, engine.config, engine.data; engine.backbones.weights_status(); "
        "bad = [name for name in ('tensorflow', 'keras') if name in sys.modules]; "
        "print(len(runs), bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "1 []"
