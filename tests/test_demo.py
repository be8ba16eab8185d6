"""The Demo page (issue 13): feedback and share in the engine, and the page under Streamlit's AppTest.

The engine tests build run folders by hand (no model is needed to keep feedback); the page
tests share one tiny run trained for real on coloured squares.
"""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from PIL import Image

from engine import runfiles
from engine.config import RunConfig
from engine.feedback import MAX_IMAGE_BYTES, list_feedback, record_feedback, resolve_feedback
from engine.runs import create_run
from engine.share import demo_examples, demo_link, only_this_computer, qr_png
from engine.status import edit_summary
from engine.users import Role, User
from tests.conftest import REPO_ROOT, make_dataset, tiny_config

OWNER = User(id="https://idp.example|alice", name="Alice", role=Role.MEMBER)
OTHER_MEMBER = User(id="https://idp.example|bob", name="Bob", role=Role.MEMBER)
VIEWER = User(id="https://idp.example|vera", name="Vera", role=Role.VIEWER)
ADMIN = User(id="https://idp.example|ada", name="Ada", role=Role.ADMIN)
# The words the issue keeps off the page: an audience does not speak them.
JARGON = re.compile(r"\b(logits?|epochs?|val_loss|softmax|loss(es)?)\b", re.IGNORECASE)


def png_bytes(colour=(200, 30, 30), size=(24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def hand_made_run(tmp_path) -> Path:
    """A run folder owned by Alice with labels, a (placeholder) model file and predictions over real pictures."""
    data = make_dataset(tmp_path / "data", classes=("birds", "cats", "dogs"), per_class=4)
    run_dir = create_run(RunConfig().replace(**{"data.path": str(data)}), tmp_path / "runs", owner=OWNER)
    runfiles.atomic_write_json(run_dir / runfiles.LABELS_FILE, {"classes": ["birds", "cats", "dogs"]})
    (run_dir / runfiles.MODEL_FILE).write_bytes(b"a model stands here")
    rows = [(str(path), "validation", path.parent.name, path.parent.name, 1.0, 0.0, 0.0)
            for path in sorted(data.glob("*/*"))]
    rows.append((str(data / "gone" / "missing.png"), "validation", "birds", "birds", 1.0, 0.0, 0.0))
    runfiles.write_csv(run_dir / runfiles.PREDICTIONS_FILE,
                       ["path", "split", "true", "predicted", "prob_birds", "prob_cats", "prob_dogs"], rows)
    return run_dir


# --- feedback -------------------------------------------------------------------------------------


def test_a_viewer_sends_feedback_and_the_picture_is_kept_beside_the_run(hand_made_run):
    picture = png_bytes()
    entry = record_feedback(hand_made_run, picture, "cats", False, VIEWER, note="  it is a fox  ")
    assert (hand_made_run / entry["image"]).read_bytes() == picture
    assert entry["image"].startswith("feedback/") and entry["image"].endswith(".png")
    lines = runfiles.read_jsonl(hand_made_run / "feedback.jsonl")
    assert [(line["user"], line["predicted"], line["correct"], line["note"]) for line in lines] == [
        (VIEWER.id, "cats", False, "it is a fox")]
    listed = list_feedback(hand_made_run)
    assert [(item["id"], item["resolved"]) for item in listed] == [(entry["id"], False)]
    assert Path(listed[0]["image_path"]).read_bytes() == picture


def test_feedback_is_listed_newest_first(hand_made_run):
    first = record_feedback(hand_made_run, png_bytes(), "cats", True, VIEWER)
    second = record_feedback(hand_made_run, png_bytes((0, 0, 200)), "dogs", False, OTHER_MEMBER)
    assert [item["id"] for item in list_feedback(hand_made_run)] == [second["id"], first["id"]]


@pytest.mark.parametrize("picture, predicted, message", [
    (b"", "cats", "empty"),
    (b"\x89PNG not really a picture", "cats", "not a picture"),
    (b"\xff" * (MAX_IMAGE_BYTES + 1), "cats", "at most 10 MB"),
    (None, "wolves", "must be one of the run's classes"),
])
def test_feedback_refuses_bad_input_with_a_clear_message(hand_made_run, picture, predicted, message):
    with pytest.raises(ValueError, match=message):
        record_feedback(hand_made_run, png_bytes() if picture is None else picture, predicted, True, VIEWER)
    assert not (hand_made_run / "feedback.jsonl").exists()
    assert not (hand_made_run / "feedback").exists() or not any((hand_made_run / "feedback").iterdir())


def test_feedback_needs_a_trained_run(tmp_path):
    run_dir = create_run(RunConfig().replace(**{"data.path": str(tmp_path)}), tmp_path / "runs", owner=OWNER)
    with pytest.raises(ValueError, match="not a trained run"):
        record_feedback(run_dir, png_bytes(), "cats", True, OWNER)


def test_only_the_owner_or_an_admin_resolves_feedback(hand_made_run):
    first = record_feedback(hand_made_run, png_bytes(), "cats", False, VIEWER)
    second = record_feedback(hand_made_run, png_bytes(), "dogs", True, VIEWER)
    with pytest.raises(PermissionError, match="viewer"):
        resolve_feedback(hand_made_run, first["id"], VIEWER)
    with pytest.raises(PermissionError, match="belongs to Alice"):
        resolve_feedback(hand_made_run, first["id"], OTHER_MEMBER)
    assert [item["resolved"] for item in list_feedback(hand_made_run)] == [False, False]
    resolved = resolve_feedback(hand_made_run, first["id"], OWNER)
    assert resolved["resolved"] and resolved["resolved_by"] == "Alice"
    assert resolve_feedback(hand_made_run, second["id"], ADMIN)["resolved_by"] == "Ada"
    assert list_feedback(hand_made_run, unresolved_only=True) == []
    lines = len(runfiles.read_jsonl(hand_made_run / "feedback.jsonl"))
    resolve_feedback(hand_made_run, first["id"], OWNER)  # twice: nothing more is written
    assert len(runfiles.read_jsonl(hand_made_run / "feedback.jsonl")) == lines
    with pytest.raises(ValueError, match="no feedback with id 'nope'"):
        resolve_feedback(hand_made_run, "nope", OWNER)


# --- share -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["http://studio.lan:8501", "http://studio.lan:8501/", "http://studio.lan:8501/demo",
                                  "http://studio.lan:8501/demo?run=old#top"])
def test_the_demo_link_names_the_run_in_the_address(base):
    link = demo_link(base, "20260101-120000-cats & dogs-1a2b")
    parts = urlsplit(link)
    assert (parts.scheme, parts.netloc, parts.path, parts.fragment) == ("http", "studio.lan:8501", "/demo", "")
    assert parse_qs(parts.query) == {"run": ["20260101-120000-cats & dogs-1a2b"]}
    assert " " not in link and "&" not in link  # encoded, so a phone's camera app keeps it whole


def test_the_demo_link_keeps_a_path_prefix_and_refuses_what_is_not_an_address():
    assert demo_link("https://example.org/studio/", "run-1") == "https://example.org/studio/demo?run=run-1"
    with pytest.raises(ValueError, match="http:// or https://"):
        demo_link("studio.lan:8501", "run-1")
    with pytest.raises(ValueError, match="run id"):
        demo_link("http://studio.lan", "")
    assert only_this_computer("http://localhost:8501/demo?run=x") and only_this_computer("http://127.0.0.1:1/")
    assert not only_this_computer("http://studio.lan:8501/demo?run=x")


def test_the_qr_code_is_a_large_png_of_the_link():
    import segno

    link = demo_link("http://studio.lan:8501", "20260101-120000-Cats-1a2b")
    image = Image.open(io.BytesIO(qr_png(link))).convert("L")
    assert image.width == image.height >= 480  # big enough to scan from a projected screen
    matrix = np.array(segno.make(link, error="m", micro=False).matrix, dtype=bool)
    modules = matrix.shape[0] + 2 * 4
    assert image.width % modules == 0
    scale = image.width // modules
    pixels = np.asarray(image)
    # The centre of every module is black exactly where the QR matrix of the link is dark.
    centres = pixels[4 * scale + scale // 2::scale, 4 * scale + scale // 2::scale][:matrix.shape[0], :matrix.shape[1]]
    assert np.array_equal(centres < 128, matrix)
    with pytest.raises(ValueError, match="needs some text"):
        qr_png("")


def test_the_examples_mix_the_classes_and_skip_missing_files(hand_made_run):
    examples = demo_examples(hand_made_run, count=7)
    assert [example["true"] for example in examples] == ["birds", "cats", "dogs"] * 2 + ["birds"]
    assert all(Path(example["path"]).is_file() for example in examples)
    assert len({example["path"] for example in examples}) == 7
    assert len(demo_examples(hand_made_run, count=50)) == 12  # every existing picture, none twice


# --- the page --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    """A tiny run trained for real on three colours ("Colour guesser"), and a copy named "Second model"."""
    import engine

    base = tmp_path_factory.mktemp("demo")
    data = make_dataset(base / "colours", classes=("birds", "cats", "dogs"), per_class=8)
    run_dir = engine.train_run(tiny_config(data, name="Colour guesser", **{"data.cache": "memory"}), base / "runs")
    assert engine.read_status(run_dir).state is engine.State.FINISHED
    second = base / "runs" / (run_dir.name[:-4] + "beef")
    shutil.copytree(run_dir, second)
    runfiles.atomic_write_json(second / "status.json", {**runfiles.read_json(run_dir / "status.json"),
                                                        "run_id": second.name})
    edit_summary(second, name="Second model")
    return run_dir, second


@pytest.fixture
def demo_runs(trained_runs, monkeypatch):
    """The trained runs, with no feedback before or after the test (the model stays loaded between tests)."""
    def clear_feedback():
        for run_dir in trained_runs:
            (run_dir / "feedback.jsonl").unlink(missing_ok=True)
            shutil.rmtree(run_dir / "feedback", ignore_errors=True)

    clear_feedback()
    monkeypatch.setenv("TRANSFER_STUDIO_RUNS", str(trained_runs[0].parent))
    yield trained_runs
    clear_feedback()


def open_demo(query_run: str | None = None, secrets: dict | None = None, user: dict | None = None):
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file(str(REPO_ROOT / "streamlit_app.py"), default_timeout=90)
    for key, value in (secrets or {}).items():
        app.secrets[key] = value
    if user is not None:
        app.user = user
    if query_run:
        app.query_params["run"] = query_run
    app.switch_page("app_pages/demo.py")
    return app.run()


def page_texts(app) -> list[str]:
    """Every piece of text the page shows: bodies, labels, options, help, captions, headings."""
    texts = []

    def walk(node):
        for child in getattr(node, "children", {}).values():
            walk(child)
        proto = getattr(node, "proto", None)
        if proto is not None and getattr(node, "type", "") != "imgs":
            texts.append(str(proto))

    walk(app._tree)
    return texts


def bar_classes(app) -> list[str]:
    return [re.sub(r"<[^>]+>", "", match) for markdown in app.markdown
            for match in re.findall(r'class="demo-bar".*?<span>(.*?)</span>', markdown.value)]


def headline(app) -> str:
    return next(markdown.value for markdown in app.markdown
                if markdown.value.startswith(("## This looks like", "## Not sure")))


@pytest.mark.training
def test_the_page_lists_models_by_name_and_the_address_chooses_one(demo_runs):
    first, second = demo_runs
    app = open_demo()
    assert not app.exception, app.exception
    picker = app.selectbox(key="demo_run")
    assert set(picker.options) == {"Colour guesser", "Second model"}
    app = open_demo(query_run=second.name)
    assert app.selectbox(key="demo_run").value == second.name
    assert app.selectbox(key="demo_run").format_func(second.name) == "Second model"
    app.button(key="example_0").click().run()
    assert headline(app)
    app.selectbox(key="demo_run").set_value(first.name).run()
    # Another model starts afresh: the other model's example is not answered for it.
    assert not [markdown for markdown in app.markdown if markdown.value.startswith("## ")]
    assert app.query_params["run"] == [first.name] or app.query_params["run"] == first.name
    assert any(demo_link("http://x", first.name).split("?")[1] in code.value for code in app.code)
    unknown = open_demo(query_run="no-such-run")
    assert any("not here" in warning.value for warning in unknown.warning)


@pytest.mark.training
def test_an_example_picture_gets_its_classes_as_bars_and_an_answer_in_words(demo_runs):
    from engine.predict import predict_images

    run_dir = demo_runs[0]
    app = open_demo(query_run=run_dir.name)
    validation = [row for row in runfiles.read_csv(run_dir / "predictions.csv") if row["split"] == "validation"]
    tries = [button for button in app.button if button.label == "Try this one"]
    assert len(tries) == min(8, len(validation)) >= 3
    assert not [markdown for markdown in app.markdown if markdown.value.startswith("## ")]
    app.button(key="example_1").click().run()
    assert not app.exception, app.exception
    example = demo_examples(run_dir)[1]
    expected = predict_images(run_dir, [example["path"]], top_k=3)[0]
    assert bar_classes(app) == [entry["class"] for entry in expected["top"]]
    assert len(bar_classes(app)) == 3
    words = headline(app)
    if expected.get("sure", True):
        assert words == f"## This looks like **{expected.get('verdict', expected['top'][0]['class'])}**"
    else:
        assert words.startswith("## Not sure — it could be")
    assert any(f"“{example['true']}” pictures" in caption.value for caption in app.caption)


@pytest.mark.training
def test_right_and_wrong_send_the_picture_to_the_owner(demo_runs):
    run_dir = demo_runs[0]
    app = open_demo(query_run=run_dir.name)
    app.button(key="example_2").click().run()
    best = bar_classes(app)[0]
    app.button(key="demo_wrong").click().run()
    assert not app.exception, app.exception
    lines = runfiles.read_jsonl(run_dir / "feedback.jsonl")
    assert [(line["predicted"], line["correct"]) for line in lines] == [(best, False)]
    assert (run_dir / lines[0]["image"]).read_bytes() == Path(demo_examples(run_dir)[2]["path"]).read_bytes()
    assert any("owner will look at this picture" in success.value for success in app.success)
    assert not [button for button in app.button if button.key in ("demo_right", "demo_wrong")]
    # The owner (local mode: the local admin) finds it to review, and resolves it.
    assert any(expander.label == "Feedback to review (1)" for expander in app.expander)
    app.button(key=f"resolve_{lines[0]['id']}").click().run()
    assert list_feedback(run_dir, unresolved_only=True) == []
    assert any(expander.label == "Feedback to review (0)" for expander in app.expander)


AUTH = {"redirect_uri": "http://localhost:8501/oauth2callback", "cookie_secret": "a-test-cookie-secret-0123456789",
        "client_id": "transfer-studio", "client_secret": "test-client-secret",
        "server_metadata_url": "https://idp.example/.well-known/openid-configuration"}
VERA_CLAIMS = {"is_logged_in": True, "iss": "https://idp.example", "sub": "vera", "name": "Vera",
               "email": "vera@example.com", "email_verified": True}


@pytest.mark.training
def test_a_viewer_tries_pictures_and_sends_feedback_but_resolves_nothing(demo_runs):
    run_dir = demo_runs[0]
    record_feedback(run_dir, png_bytes(), "cats", False, OTHER_MEMBER)
    app = open_demo(run_dir.name, secrets={"auth": AUTH, "viewers": ["vera@example.com"]}, user=VERA_CLAIMS)
    assert not app.exception, app.exception
    assert any("viewer" in caption.value for caption in app.sidebar.caption)
    app.button(key="example_0").click().run()
    assert not [expander for expander in app.expander if expander.label.startswith("Feedback to review")]
    assert {button.label for button in app.button} <= {"Try this one", "Yes, right", "No, wrong", "Sign out"}
    app.button(key="demo_right").click().run()
    lines = runfiles.read_jsonl(run_dir / "feedback.jsonl")
    assert lines[-1]["user"] == "https://idp.example|vera" and lines[-1]["correct"] is True
    with pytest.raises(PermissionError, match="viewer"):
        resolve_feedback(run_dir, lines[-1]["id"], User(id="https://idp.example|vera", name="Vera", role=Role.VIEWER))


@pytest.mark.training
def test_the_page_speaks_plain_words(demo_runs):
    run_dir = demo_runs[0]
    record_feedback(run_dir, png_bytes(), "cats", False, OTHER_MEMBER)  # so the review list has an item
    app = open_demo(run_dir.name)
    app.button(key="example_2").click().run()
    app.toggle(key="demo_overlay").set_value(True).run()
    assert not app.exception, app.exception
    # The Grad-CAM toggle draws the overlay (or says the model pointed nowhere in particular).
    assert any("counted most for" in caption.value or "did not point" in caption.value for caption in app.caption)
    texts = page_texts(app)
    assert any("This looks like" in text or "Not sure" in text for text in texts)  # the answer was collected
    assert any("Share this demo" in text for text in texts) and any("Feedback to review" in text for text in texts)
    found = sorted({match.group(0) for text in texts for match in JARGON.finditer(text)})
    assert not found, found


def test_with_no_trained_model_the_page_says_what_to_do(app_environment):
    app = open_demo()
    assert not app.exception, app.exception
    assert app.title[0].value == "Demo"
    assert any("No trained model yet" in info.value for info in app.info)
