"""Predict: upload images (or use the camera), see a trained run's top classes (calibrated), its answer or
"not sure" at the run's operating point, and where the model looked (Grad-CAM)."""

import tempfile
from pathlib import Path

import plotly.express as px
import streamlit as st

from engine import runfiles
from signin import escape_markdown, page_user
from ui import pick_run, runs_having
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
opacity = overlay_controls("predict_overlay")
if not uploads:
    st.caption("Upload one or more images to see what the model thinks.")
    st.stop()
for number, result in enumerate(predict(run.path, uploads, top_k)):
    left, right = st.columns([1, 2])
    picture = result["bytes"]
    if opacity is not None and "error" not in result:
        # Explain the class the model answered (its most probable one when it is not sure).
        explained = result["verdict"] if result.get("sure") else result["top"][0]["class"]
        overlay = overlay_for_upload(str(run.path), result["bytes"], result["name"], explained, opacity)
        picture = picture if overlay is None else overlay
    left.image(picture, caption=result["name"], width=240)
    with right:
        if "error" in result:
            st.error(f"{result['name']}: {result['error']}")
            continue
        best = result["top"][0]
        if result.get("sure", True):
            answer = result.get("verdict", best["class"])
            shown = result.get("probabilities", {}).get(answer, best["probability"])
            st.markdown(f"### {escape_markdown(answer)} — {shown:.0%}")
        else:
            st.markdown(f"### Not sure — maybe {escape_markdown(best['class'])} ({best['probability']:.0%})")
            st.caption("The model is less sure than the minimum its owner set on the Evaluate page.")
        figure = px.bar(x=[entry["probability"] for entry in result["top"]][::-1],
                        y=[entry["class"] for entry in result["top"]][::-1], orientation="h",
                        labels={"x": "probability (calibrated)", "y": ""}, range_x=[0, 1])
        figure.update_layout(height=60 + 40 * len(result["top"]), margin=dict(t=10, b=10), xaxis_tickformat=".0%")
        st.plotly_chart(figure, key=f"bars_{number}")
