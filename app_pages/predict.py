"""Predict: upload images (or use the camera) and see a trained run's top classes."""

import tempfile
from pathlib import Path

import plotly.express as px
import streamlit as st

from engine import runfiles
from signin import escape_markdown, page_user
from ui import pick_run, runs_having


@st.cache_resource(max_entries=3, show_spinner="Loading the model…")
def loaded_model(run_path: str, modified: float):
    """The run's model, loaded once per model file (read-only, shared by every visitor)."""
    from engine.predict import load_run_model

    return load_run_model(run_path)


def predict(run_path: str, uploads: list, top_k: int) -> list:
    from engine.predict import predict_images

    model_file = Path(run_path) / runfiles.MODEL_FILE
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for number, upload in enumerate(uploads):
            path = Path(folder) / f"{number}_{Path(upload.name).name}"
            path.write_bytes(upload.getvalue())
            paths.append(str(path))
        results = predict_images(run_path, paths, top_k, loaded=loaded_model(run_path, model_file.stat().st_mtime))
        for result, upload in zip(results, uploads):
            result["name"] = upload.name
            result["bytes"] = upload.getvalue()
    return results


user = page_user()  # first: nothing of this page is drawn for a visitor who is not signed in
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
if not uploads:
    st.caption("Upload one or more images to see what the model thinks.")
    st.stop()
for number, result in enumerate(predict(run.path, uploads, top_k)):
    left, right = st.columns([1, 2])
    left.image(result["bytes"], caption=result["name"], width=240)
    with right:
        if "error" in result:
            st.error(f"{result['name']}: {result['error']}")
            continue
        best = result["top"][0]
        st.markdown(f"### {escape_markdown(best['class'])} — {best['probability']:.0%}")
        figure = px.bar(x=[entry["probability"] for entry in result["top"]][::-1],
                        y=[entry["class"] for entry in result["top"]][::-1], orientation="h",
                        labels={"x": "probability", "y": ""}, range_x=[0, 1])
        figure.update_layout(height=60 + 40 * len(result["top"]), margin=dict(t=10, b=10), xaxis_tickformat=".0%")
        st.plotly_chart(figure, key=f"bars_{number}")
