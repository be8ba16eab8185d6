"""Export: take a trained model out of the app (SavedModel, TFLite, ONNX, a browser page), each export proven by its
own runtime to predict what the model predicts here (the parity check)."""

import io
import zipfile
from pathlib import Path

import pandas as pd
import streamlit as st

from engine import runfiles
from signin import page_user
from ui import keyboard_focus_styles, pick_run, runs_having

# (label, format, quantize) in the order a person would reach for them.
CHOICES = [
    ("SavedModel (TensorFlow Serving, Python)", "savedmodel", "none"),
    ("TFLite / LiteRT float32 (phones, edge)", "tflite", "none"),
    ("TFLite / LiteRT float16 (half the size)", "tflite", "float16"),
    ("TFLite / LiteRT int8 (smallest, integer-only)", "tflite", "int8"),
    ("ONNX (onnxruntime, many languages)", "onnx", "none"),
    ("Browser page (ONNX + onnxruntime-web, no server code)", "browser", "none"),
]


@st.cache_data(max_entries=16, show_spinner="Packing the files…")
def zipped(folder: str, stamp: float) -> bytes:
    """The export folder as a zip (cached per folder and parity time)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                archive.write(path, Path(folder).name + "/" + str(path.relative_to(folder)))
    return buffer.getvalue()


def parity_table(exports: list) -> pd.DataFrame:
    """One row per export: the parity check's numbers, in words a reader can scan."""
    rows = []
    for export in exports:
        parity = export.get("parity") or {}
        mark = parity.get("mark")
        rows.append({
            "export": Path(export["folder"]).name,
            "passed": "yes" if export.get("passed") else ("no" if parity else "not checked"),
            "images compared": parity.get("images"),
            "largest difference": parity.get("max_abs_difference"),
            "same answer": parity.get("top1_agreement"),
            "accuracy (export)": parity.get("accuracy_export"),
            "accuracy (here)": parity.get("accuracy_keras"),
            "size (MB)": None if parity.get("file_bytes") is None else parity["file_bytes"] / 1e6,
            "1 image (ms)": parity.get("latency_one_ms"),
            "32 images (ms)": parity.get("latency_batch32_ms"),
            "pass mark": mark.get("text") if isinstance(mark, dict) else mark,
        })
    return pd.DataFrame(rows)


def export_button(run, user) -> None:
    """The format picker and Export (owner or admin; the engine refuses anyone else)."""
    from engine.exports import export_run
    from engine.exports.browser import export_browser

    can_export = user.can_control(run.owner)
    label = st.selectbox("Format", [choice[0] for choice in CHOICES], key="export_choice")
    _, export_format, quantize = next(choice for choice in CHOICES if choice[0] == label)
    if st.button("Export and check", type="primary", disabled=not can_export, key="export_start",
                 help=None if can_export else "Only the run's owner or an admin can export it."):
        with st.spinner("Exporting, then checking the export with its own runtime…"):
            try:
                if export_format == "browser":
                    # The page runs the ONNX export, which must pass its own parity check first.
                    parity = export_browser(run.path, user=user)["onnx_parity"]
                else:
                    parity = export_run(run.path, export_format, quantize, user=user, source="page")
            except (PermissionError, ValueError, RuntimeError, FileNotFoundError) as error:
                st.error(str(error))
                return
        mark = parity.get("mark")
        mark = mark.get("text", "") if isinstance(mark, dict) else (mark or "")
        if parity.get("passed"):
            st.success(f"{label}: passed — {mark}")
        else:
            st.warning(f"{label}: exported but failed its parity mark ({mark}); kept with its numbers.")


user = page_user()  # first: nothing of this page is drawn for a visitor who is not signed in
keyboard_focus_styles()
st.title("Export")
runs = runs_having(runfiles.MODEL_FILE)
if not runs:
    st.info("No trained model yet: train one first.")
    st.stop()
run = pick_run(runs, key="export_run")
st.caption("Each export is loaded back by its own runtime in a separate process and must give the same answers as "
           "the model here, on the run's validation images, before it is offered for download.")
export_button(run, user)

from engine.exports import list_exports  # noqa: E402 - after the picker: a page with no runs never imports it

exports = list_exports(run.path)
browser_folder = Path(run.path) / "exports" / "browser"
if (browser_folder / "index.html").is_file():
    # The browser page has no parity file of its own: it runs the ONNX export, checked above.
    onnx = next((export for export in exports if export["format"] == "onnx"), None)
    exports.append({"folder": browser_folder, "format": "browser", "quantize": "none",
                    "parity": (onnx or {}).get("parity"), "passed": bool(onnx and onnx["passed"])})
if not exports:
    st.caption("No exports yet.")
    st.stop()
st.subheader("The parity check")
st.dataframe(parity_table(exports), hide_index=True, key="parity_table",
             column_config={
                 "largest difference": st.column_config.NumberColumn(
                     format="%.2e", help="The largest gap between a probability of the export and of the model here."),
                 "same answer": st.column_config.NumberColumn(
                     format="percent", help="Share of images the export gives the same class as the model here."),
                 "accuracy (export)": st.column_config.NumberColumn(
                     format="percent", help="Share of validation images the export classifies correctly."),
                 "accuracy (here)": st.column_config.NumberColumn(
                     format="percent", help="Share of validation images the model here classifies correctly."),
                 "size (MB)": st.column_config.NumberColumn(format="%.2f", help="File size in megabytes."),
                 "1 image (ms)": st.column_config.NumberColumn(
                     format="%.1f", help="Milliseconds to classify one image, on this machine."),
                 "32 images (ms)": st.column_config.NumberColumn(
                     format="%.1f", help="Milliseconds to classify a batch of 32 images, on this machine.")})
st.subheader("Downloads")
for export in exports:
    folder = Path(export["folder"])
    if export.get("passed"):
        stamp = max(path.stat().st_mtime for path in folder.iterdir())
        st.download_button(f"{folder.name} (zip)", zipped(str(folder), stamp),
                           file_name=f"{run.run_id}-{folder.name}.zip", mime="application/zip",
                           key=f"download_{folder.name}")
    else:
        st.caption(f"{folder.name}: failed its parity mark, so it is not offered here; its files and "
                   f"numbers stay in {folder}.")
