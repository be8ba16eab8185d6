"""Predict: upload images (or use the camera), see a trained run's top classes (calibrated), its answer or
"not sure" at the run's operating point, and where the model looked (Grad-CAM)."""

import tempfile
from pathlib import Path

import pandas as pd
import plotly.express as px
import streamlit as st

from engine import runfiles
from signin import escape_markdown, page_user
from ui import chart_with_table, image_alt, keyboard_focus_styles, pick_run, runs_having
from views.explain import loaded_model, overlay_for_upload, overlay_controls


def predict(run_path: str, uploads: list, top_k: int) -> list:
    from engine.predict import predict_images

    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for number, upload in enumerate(uploads):
            path = Path(folder) / f"{number}_{Path(upload.name).name}"
            path.write_bytes(upload.getvalue())
            paths.append(str(path))
        results = predict_images(run_path, paths, top_k, loaded=loaded_model(run_path))
        for result, upload in zip(results, uploads):
            result["name"] = upload.name
            result["bytes"] = upload.getvalue()
    return results


def show_answer(result: dict, picture, number: int, overlay_shown: bool) -> None:
    """The picture (described for screen readers), the answer in words, and the top classes as bars and a table."""
    left, right = st.columns([1, 2])
    best = result["top"][0]
    sure = result.get("sure", True)
    answer = result.get("verdict", best["class"]) if sure else best["class"]
    shown = result.get("probabilities", {}).get(answer, best["probability"]) if sure else best["probability"]
    left.image(picture, caption=result["name"], width=240,
               alt=image_alt(result["name"], predicted=answer if sure else f"not sure, maybe {answer}",
                             confidence=shown, overlay=overlay_shown))
    with right:
        if sure:
            st.markdown(f"### {escape_markdown(answer)} — {shown:.0%}")
        else:
            st.markdown(f"### Not sure — maybe {escape_markdown(best['class'])} ({best['probability']:.0%})")
            st.caption("The model is less sure than the minimum its owner set on the Evaluate page.")
        top = pd.DataFrame({"class": [entry["class"] for entry in result["top"]],
                            "probability": [round(entry["probability"], 4) for entry in result["top"]]})
        figure = px.bar(top.iloc[::-1], x="probability", y="class", orientation="h", range_x=[0, 1],
                        title=f"Top {len(top)} classes for {result['name']}",
                        labels={"probability": "probability (calibrated)", "class": "class"})
        figure.update_layout(height=100 + 40 * len(top), margin=dict(t=40, b=10), xaxis_tickformat=".0%")
        chart_with_table(figure, f"bars_{number}",
                         f"Bar chart of the {len(top)} most probable classes for {result['name']}.", top)


user = page_user()  # first: nothing of this page is drawn for a visitor who is not signed in
keyboard_focus_styles()
st.title("Predict")
runs = runs_having(runfiles.MODEL_FILE)
if not runs:
    st.info("No trained model yet: train one first.")
    st.stop()
run = pick_run(runs, key="predict_run")
uploads = st.file_uploader("Images to classify", type=["jpg", "jpeg", "png", "bmp", "gif", "webp"],
                           accept_multiple_files=True)
uploads = list(uploads or [])
if st.toggle("Use the camera"):
    photo = st.camera_input("Take a picture")
    if photo is not None:
        uploads.append(photo)
top_k = st.slider("Classes to show", 1, 10, 3)
opacity = overlay_controls("predict_overlay")
if not uploads:
    st.caption("Upload one or more images to see what the model thinks.")
    st.stop()
for number, result in enumerate(predict(run.path, uploads, top_k)):
    picture = result["bytes"]
    if opacity is not None and "error" not in result:
        # Explain the class the model answered (its most probable one when it is not sure).
        explained = result["verdict"] if result.get("sure") else result["top"][0]["class"]
        overlay = overlay_for_upload(str(run.path), result["bytes"], result["name"], explained, opacity)
        picture = picture if overlay is None else overlay
    if "error" in result:
        left, right = st.columns([1, 2])
        left.image(picture, caption=result["name"], width=240, alt=image_alt(result["name"]))
        right.error(f"{result['name']}: {result['error']}")
        continue
    show_answer(result, picture, number, overlay_shown=picture is not result["bytes"])
