"""Demo: show a room what a trained model sees — a photo or an example picture, and its answer in plain words."""

import hashlib
import html
import tempfile
from pathlib import Path

import streamlit as st
from PIL import ImageOps

from engine import runfiles
from engine.feedback import list_feedback, record_feedback, resolve_feedback
from engine.share import demo_examples, demo_link, only_this_computer, qr_png
from signin import escape_markdown, page_user
from ui import image_alt, keyboard_focus_styles, runs_having, thumbnail
from views.explain import loaded_model as shared_loaded_model

# The best guess in the accent colour, the others quieter, so the answer stands out from the back of a room.
BEST_BAR_COLOUR = "#1b6ec2"  # the theme's primary colour (.streamlit/config.toml); red would read as an error
OTHER_BAR_COLOUR = "#8d99ae"


def loaded_model(run_path: str, modified: float):
    """The run's model from the cache Predict and Evaluate share (one loaded copy per model file).

    `modified` only keys the cached answers below; the shared cache checks the file itself.
    """
    return shared_loaded_model(run_path)


def _model_modified(run_path: str) -> float:
    return (Path(run_path) / runfiles.MODEL_FILE).stat().st_mtime


@st.cache_data(max_entries=64, show_spinner="Looking at the picture…")
def classify(run_path: str, modified: float, image_bytes: bytes, suffix: str) -> dict:
    """The model's answer for one picture (cached: a click elsewhere on the page does not ask again)."""
    from engine.predict import predict_images

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"picture{suffix}"
        path.write_bytes(image_bytes)
        result = predict_images(run_path, [str(path)], 3, loaded=loaded_model(run_path, modified))[0]
    result.pop("path", None)
    return result


@st.cache_data(max_entries=32, show_spinner="Finding where the model looked…")
def where_it_looked(run_path: str, modified: float, image_bytes: bytes, suffix: str, class_name: str,
                    size: int = 384):
    """The picture with the parts that counted most for `class_name` drawn over it (Grad-CAM), as uint8 RGB;
    None when the model pointed at no part in particular."""
    import numpy as np
    from PIL import Image

    from engine import gradcam
    from engine.images import load_rgb

    model, class_names, image_size = loaded_model(run_path, modified)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"picture{suffix}"
        path.write_bytes(image_bytes)
        model_input, shown = load_rgb(str(path), image_size), Image.fromarray(load_rgb(str(path)))
    heatmap = gradcam.class_activation_maps(model, model_input[None], [class_names.index(class_name)])[0]
    if gradcam.is_blank(heatmap):
        return None
    # The model sees a square; the audience sees the picture's own shape (overlay stretches the map to it).
    shown.thumbnail((size, size))
    return gradcam.overlay(np.asarray(shown), heatmap)


def _plain_name(run) -> str:
    return run.name or (f"{Path(run.dataset).name} model" if run.dataset else run.run_id)


def model_name(run, runs) -> str:
    """A run as an audience would name it: its human name, with when it was made if another has that name."""
    name = _plain_name(run)
    if sum(_plain_name(other) == name for other in runs) > 1:
        return f"{name} ({(run.created or '')[:16].replace('T', ' ') or run.run_id})"
    return name


def choose_run(runs):
    """The model picker, by name; the run in the address (`?run=`) chooses it, and follows the choice."""
    ids = [run.run_id for run in runs]
    wanted = st.query_params.get("run")
    if wanted and wanted not in ids:
        st.warning(f"The link asks for a model that is not here, or not trained yet ({escape_markdown(wanted)}); "
                   "showing another one.")
    chosen = st.selectbox("Model", ids, index=ids.index(wanted) if wanted in ids else 0, key="demo_run",
                          format_func=lambda run_id: model_name(runs[ids.index(run_id)], runs))
    st.query_params["run"] = chosen
    if st.session_state.get("demo_shown_run") not in (None, chosen):
        # Another model's examples belong to that model's classes: start the new one afresh.
        st.session_state.pop("demo_picture", None)
    st.session_state["demo_shown_run"] = chosen
    return runs[ids.index(chosen)]


def use_camera() -> None:
    st.session_state["demo_picture"] = {"source": "camera"}


def use_example(path: str, true: str) -> None:
    st.session_state["demo_picture"] = {"source": "example", "path": path, "true": true}


def current_picture(photo):
    """(bytes, suffix, example's class or None) of the picture to classify, or None when nothing is chosen."""
    choice = st.session_state.get("demo_picture")
    if choice is None and photo is not None:
        choice = {"source": "camera"}
    if not choice:
        return None
    if choice["source"] == "camera":
        return (photo.getvalue(), Path(photo.name or "photo.jpg").suffix or ".jpg", None) if photo else None
    path = Path(choice["path"])
    return (path.read_bytes(), path.suffix, choice["true"]) if path.is_file() else None


def gallery(run) -> None:
    """Up to eight validation pictures of the run, each with a "Try this one" button."""
    examples = demo_examples(run.path, count=8)
    if not examples:
        st.caption("This model has no example pictures to show.")
        return
    columns = st.columns(4)
    for number, example in enumerate(examples):
        with columns[number % 4]:
            # Square tiles, so a gallery of photos of every shape lines up in even rows.
            st.image(ImageOps.fit(thumbnail(example["path"], 320), (200, 200)), width="stretch",
                     alt=f"Example {number + 1}: " + image_alt(Path(example["path"]).name, true=example["true"]))
            st.button("Try this one", key=f"example_{number}", on_click=use_example,
                      args=(example["path"], example["true"]), width="stretch")


def bars(top: list) -> str:
    """The top classes as large horizontal bars, as HTML (class names escaped)."""
    rows = []
    for position, entry in enumerate(top):
        colour = BEST_BAR_COLOUR if position == 0 else OTHER_BAR_COLOUR
        share = entry["probability"] * 100
        shown = "less than 1%" if share < 1 else f"{share:.0f}%"
        rows.append(
            f'<div class="demo-bar" style="margin:0.4rem 0 1rem 0">'
            f'<div style="display:flex;justify-content:space-between;font-size:1.7rem;line-height:2.2rem">'
            f'<span>{html.escape(entry["class"])}</span><b>{shown}</b></div>'
            f'<div style="background:rgba(128,128,128,0.18);border-radius:10px;height:32px">'
            f'<div style="background:{colour};width:{share:.1f}%;height:32px;border-radius:10px"></div></div></div>')
    return "".join(rows)


def headline(result: dict) -> str:
    """The answer in words: "This looks like **dogs**", or "Not sure — it could be **cats** or **dogs**"."""
    top = result["top"]
    if result.get("sure", True):
        return f"## This looks like **{escape_markdown(result.get('verdict', top[0]['class']))}**"
    choices = " or ".join(f"**{escape_markdown(entry['class'])}**" for entry in top[:2])
    return f"## Not sure — it could be {choices}"


def not_sure_reason(run_path: str, best_probability: float) -> str:
    """Why the model said "not sure", in plain words, with the level its owner set when there is one."""
    from engine.operating_point import read_decision

    level = read_decision(run_path).minimum_confidence
    if level is None:
        return "The model is not confident enough to give one answer, so it says so instead of guessing."
    return (f"Its best guess is only {best_probability:.0%} likely; the model's owner asked it to answer only "
            f"when it is at least {level:.0%} sure, so it says so instead of guessing.")


def send_feedback(run, picture_bytes: bytes, predicted: str, correct: bool, user, sent_key: str) -> None:
    try:
        record_feedback(run.path, picture_bytes, predicted, correct, user)
    except ValueError as error:
        st.session_state["demo_feedback_error"] = str(error)
        return
    st.session_state.setdefault("demo_sent", set()).add(sent_key)


def show_answer(run, picture, user) -> None:
    """The picture, the answer, the bars, the Grad-CAM toggle and the right/wrong buttons."""
    picture_bytes, suffix, true_class = picture
    modified = _model_modified(run.path)
    result = classify(run.path, modified, picture_bytes, suffix)
    if "error" in result:
        st.error(f"This picture cannot be used: {result['error']}")
        return
    best = result["top"][0]["class"]
    overlay = None
    looked = st.toggle("Show where the model looked", key="demo_overlay")
    if looked:
        overlay = where_it_looked(run.path, modified, picture_bytes, suffix, best)
    described = "The example picture" if true_class else "Your photo"
    st.image(overlay if overlay is not None else picture_bytes, width=384,
             alt=f"{described}; the model answers {best} with {result['top'][0]['probability']:.0%} confidence"
                 + ("; the parts that counted most are drawn over it in warm colours" if overlay is not None else ""))
    if looked:
        st.caption(f"The bright, warm colours show the parts of the picture that counted most for "
                   f"“{escape_markdown(best)}”." if overlay is not None
                   else "The model did not point at any one part of this picture.")
    st.markdown(headline(result))
    if not result.get("sure", True):
        st.caption(not_sure_reason(run.path, result["top"][0]["probability"]))
    st.markdown(bars(result["top"]), unsafe_allow_html=True)
    if true_class:
        st.caption(f"This example comes from the “{escape_markdown(true_class)}” pictures.")
    sent_key = f"{run.run_id}:{hashlib.sha256(picture_bytes).hexdigest()}"
    if sent_key in st.session_state.get("demo_sent", set()):
        st.success("Thank you! The model's owner will look at this picture. The model does not change by itself.")
        return
    st.markdown(f"**Is it {escape_markdown(best)}?** Tell the model's owner:")
    right, wrong = st.columns(2)
    right.button("Yes, right", icon=":material/thumb_up:", key="demo_right", width="stretch",
                 on_click=send_feedback, args=(run, picture_bytes, best, True, user, sent_key))
    wrong.button("No, wrong", icon=":material/thumb_down:", key="demo_wrong", width="stretch",
                 on_click=send_feedback, args=(run, picture_bytes, best, False, user, sent_key))
    if error := st.session_state.pop("demo_feedback_error", None):
        st.error(error)


def feedback_to_review(run, user) -> None:
    """For the run's owner or an admin: what the audience said, each with a Resolve button."""
    if not user.can_control(run.owner):
        return
    waiting = list_feedback(run.path, unresolved_only=True)
    with st.expander(f"Feedback to review ({len(waiting)})", icon=":material/rate_review:"):
        st.caption("Pictures people marked right or wrong during demos. They are kept in this model's folder "
                   "(feedback/) and are never added to the training pictures unless you add them yourself.")
        for item in waiting:
            picture, words, action = st.columns([1, 4, 1], vertical_alignment="center")
            if Path(item["image_path"]).is_file():
                picture.image(thumbnail(item["image_path"], 120),
                              alt=f"Picture the model called {item['predicted']}, marked "
                                  f"{'right' if item['correct'] else 'wrong'}")
            verdict = "right" if item["correct"] else "wrong"
            words.markdown(f"The model said **{escape_markdown(item['predicted'])}**; "
                           f"{escape_markdown(item['user_name'] or 'someone')} said that was **{verdict}** "
                           f"· {escape_markdown(str(item['time'])[:16].replace('T', ' '))}")
            if action.button("Resolve", key=f"resolve_{item['id']}"):
                resolve_feedback(run.path, item["id"], user)
                st.rerun()


def share(run) -> None:
    """The demo's address for this model, and a QR code of it for phones in the room."""
    st.subheader("Share this demo")
    base = st.context.url or f"http://{st.get_option('browser.serverAddress')}:{st.get_option('browser.serverPort')}"
    link = demo_link(base, run.run_id)
    words, code = st.columns([3, 2])
    with words:
        st.write("People in the room can open this model on their phones: scan the code with the phone's camera, "
                 "or type the address. They can try pictures and say right or wrong, but cannot change anything.")
        st.code(link, language=None, wrap_lines=True)
        if only_this_computer(link):
            st.warning("This address only opens on this computer. For phones, start the dashboard with "
                       "`--server.address 0.0.0.0` and open it by this computer's network name.")
    code.image(qr_png(link), width=280, caption="Scan to open this demo", alt=f"QR code of the address {link}")


user = page_user()  # first: nothing of this page is drawn for a visitor who is not signed in
keyboard_focus_styles()
st.title("Demo")
st.caption("Show what a trained model sees: take a photo or try an example picture, and the model says what it is.")
runs = runs_having(runfiles.MODEL_FILE)
if not runs:
    st.info("No trained model yet: train one first, then come back to show it.")
    st.stop()
run = choose_run(runs)
take, answer = st.columns([3, 2], gap="large")
with take:
    photo = st.camera_input("Take a photo", key="demo_camera", on_change=use_camera)
    st.subheader("No camera? Try an example")
    gallery(run)
with answer:
    picture = current_picture(photo)
    if picture is None:
        st.info("Take a photo or choose an example picture: the answer appears here.")
    else:
        show_answer(run, picture, user)
feedback_to_review(run, user)
share(run)
