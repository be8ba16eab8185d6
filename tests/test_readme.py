"""The README's front-door promises, run as a user would run them."""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, make_dataset


def readme_python_example() -> str:
    """The Python block that follows `<!-- python-example -->` in README.md."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- python-example -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert found, "README.md has no <!-- python-example --> block"
    return found.group(1)


@pytest.mark.training
def test_the_readme_python_example_runs(tmp_path):
    images = make_dataset(tmp_path / "images")
    (images / "cats" / "cats_0.jpg").rename(images / "cats" / "cat_0.jpg")
    code = readme_python_example().replace("path/to/images", str(images))
    # In a fresh interpreter, from a folder of its own, as a user's script would be.
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "finished", result.stdout
    assert "'cats'" in lines[1] or "'dogs'" in lines[1], lines[1]
    assert len(list((tmp_path / "runs").iterdir())) == 1


def test_piped_cli_output_ends_quietly(tmp_path):
    """`python -m engine runs | head -1`: the reader goes away; no BrokenPipe traceback."""
    from engine.config import RunConfig
    from engine.runs import create_run

    for number in range(300):
        create_run(RunConfig().replace(**{"data.path": "/data/x", "name": f"r{number}"}), tmp_path)
    result = subprocess.run(f"{sys.executable} -m engine runs --runs-dir {tmp_path} | head -1",
                            shell=True, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith("run ") and result.stdout.count("\n") == 1, result.stdout
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr


def test_the_ci_script_parses_and_ends_in_make_test():
    """CI runs `.ci/run`: a quoting slip there fails every run after one second, before any test."""
    script = REPO_ROOT / ".ci" / "run"
    checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    commands = [line.strip() for line in script.read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.strip().startswith("#")]
    assert commands[-1] == "make test", commands[-1]
    assert os.access(script, os.X_OK), ".ci/run must stay executable"
