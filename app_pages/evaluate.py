"""Evaluate: the confusion matrix down to the images (with where the model looked), how sure the model is,
its operating point, per-class scores, confused pairs, top losses and the model card."""

from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from engine import runfiles
from engine.images import printable
from engine.interpret import (apply_decision, cell_images, confusion_table, load_predictions, most_confused,
                              per_class_table, split_probabilities, top_losses)
from engine.operating_point import NOT_SURE
from signin import escape_markdown, page_user
from ui import chart_with_table, image_alt, keyboard_focus_styles, pick_run, runs_having, thumbnail
from views.card import card_section
from views.confidence import calibration_section, operating_point_controls
from views.explain import heatmaps, overlaid, overlay_controls

GRID_COLUMNS = 6
# What the per-class scores mean, in words (shown when hovering the column headers).
COLUMN_HELP = {
    "precision": "Of the images the model gave this class, the share that really are this class.",
    "recall": "Of the images that really are this class, the share the model found.",
    "f1": "F1 score: one number from 0 to 1 balancing precision and recall (their harmonic mean).",
}


def confusion_figure(classes: list, answers: list, matrix: np.ndarray, normalised: bool):
    """The confusion matrix as a heatmap (rows: true class, columns: the answer), clickable per cell.

    A transparent marker sits on every cell: Streamlit reports clicks on markers, not on heatmap cells.
    """
    totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros_like(matrix, dtype=float), where=totals > 0)
    texts = [[f"{value:.0%}" for value in row] for row in shares] if normalised else matrix.astype(int).astype(str)
    figure = go.Figure(go.Heatmap(
        z=shares, x=answers, y=classes, text=texts, texttemplate="%{text}", textfont=dict(size=18),
        # One hue from light to dark: the order reads the same with any colour vision, and the count
        # or share is written in each square, so nothing is told by colour alone.
        colorscale="Blues", zmin=0, zmax=1, colorbar=dict(title="share of row"), hoverinfo="skip"))
    xs = [predicted for _ in classes for predicted in answers]
    ys = [true for true in classes for _ in answers]
    figure.add_trace(go.Scatter(
        x=xs, y=ys, mode="markers", showlegend=False,
        marker=dict(size=max(12, min(120, int(600 / max(1, len(classes))))), color="rgba(0,0,0,0)", symbol="square"),
        hovertemplate="true %{y} → predicted %{x}<extra></extra>"))
    figure.update_layout(title=dict(text="Confusion matrix: true class against the answer", y=0.99, yanchor="top"),
                         xaxis=dict(title="predicted class", type="category", side="top"),
                         yaxis=dict(title="true class", type="category", autorange="reversed"),
                         # 50 px more than the squares need for the title above the top axis: the clickable
                         # markers are sized for squares of this height and must not overlap.
                         height=min(950, max(430, 48 * len(classes) + 210)), margin=dict(t=90, b=10))
    return figure


def confusion_frame(classes: list, answers: list, matrix: np.ndarray):
    """The confusion matrix as a table: one row per true class, one column per answer, and the row's total."""
    table = pd.DataFrame(matrix.astype(int), columns=[f"answered {answer}" for answer in answers])
    table.insert(0, "true class", classes)
    table["images"] = matrix.sum(axis=1).astype(int)
    return table


def image_grid(rows, empty_message: str, run_path: str, opacity: float | None) -> None:
    """Thumbnails with the true class, the answer and how sure; with `opacity`, Grad-CAM over each."""
    if rows.empty:
        st.caption(empty_message)
        return
    # Each image is explained for the class the model answered (its own predicted class for "not sure").
    maps = heatmaps(run_path, list(rows["path"]), list(rows["predicted"])) if opacity is not None else None
    columns = st.columns(GRID_COLUMNS)
    for position, row in enumerate(rows.itertuples()):
        with columns[position % GRID_COLUMNS]:
            try:
                image = thumbnail(row.path, 200)
                if maps is not None:
                    image = overlaid(image, maps[position], opacity)
                name = printable(Path(row.path).name)
                st.image(image, caption=f"{name}: {row.true} → {row.predicted} ({row.confidence:.0%} sure)",
                         alt=image_alt(name, row.true, row.predicted, row.confidence, overlay=maps is not None))
            except OSError:
                st.caption(f"{printable(Path(row.path).name)} is no longer readable.")


def pick_cell(classes: list, answers: list, selection) -> tuple[str, str]:
    """The cell to show: a click on the matrix, else the two pickers below it."""
    points = (selection or {}).get("selection", {}).get("points", []) if selection else []
    if st.session_state.get("cell_predicted") not in (None, *answers):
        del st.session_state["cell_predicted"]  # "not sure" went away with the slider
    if "cell_true" not in st.session_state or st.session_state["cell_true"] not in classes:
        # Start on the most confused pair: the cell most worth a look.
        pairs = most_confused(result)
        st.session_state["cell_true"], st.session_state["cell_predicted"] = \
            (pairs[0][0], pairs[0][1]) if pairs else (classes[0], classes[0])
    if points:
        st.session_state["cell_true"], st.session_state["cell_predicted"] = points[0]["y"], points[0]["x"]
    left, right = st.columns(2)
    true = left.selectbox("True class", classes, key="cell_true")
    predicted = right.selectbox("Answer", answers, key="cell_predicted")
    return true, predicted


user = page_user()  # first: nothing of this page is drawn for a visitor who is not signed in
keyboard_focus_styles()
st.title("Evaluate")
runs = runs_having(runfiles.EVALUATION_FILE)
if not runs:
    st.info("No evaluated runs yet: a run is evaluated when it finishes or is stopped.")
    st.stop()
run = pick_run(runs, key="evaluate_run")
evaluation = runfiles.read_json(Path(run.path) / runfiles.EVALUATION_FILE) or {}
splits = list(evaluation.get("splits", {}))
left, right = st.columns([2, 1])
split = left.radio("Images", splits, horizontal=True, format_func=str.capitalize, key="evaluate_split",
                   help="Validation images scored the run during training; test images were never seen.")
normalised = right.toggle("Show shares of each row", key="normalised",
                          help="Each row shows how the images of one true class were answered, in %.")
result = evaluation["splits"][split]
classes = evaluation["classes"]
raw_predictions = load_predictions(run.path)
has_model = (Path(run.path) / runfiles.MODEL_FILE).is_file()
can_change = user.can_control(run.owner)

calibration_section(evaluation, split)
probabilities, true_indices, _ = split_probabilities(raw_predictions, split)
decision = operating_point_controls(str(run.path), classes, probabilities, true_indices, can_change, user)
predictions = apply_decision(raw_predictions, decision)

rows = predictions[predictions["split"] == split] if not predictions.empty else predictions
answered = rows[rows["predicted"] != NOT_SURE] if not rows.empty else rows
first, second, third = st.columns(3)
first.metric("Accuracy", "–" if answered.empty else f"{answered['correct'].mean():.1%}",
             help="Share of the answered images classified correctly, at the operating point above.")
second.metric("Answered", "–" if rows.empty else f"{len(answered) / len(rows):.0%}",
              help="Share of images the model gave a class for; the rest it called \"not sure\".")
third.metric("Macro F1 (most probable class)", f"{result.get('macro_f1', 0):.2f}",
             help="F1 is a score from 0 to 1 that balances precision (how often an answer of a class is right) and "
                  "recall (how many of a class's images are found); macro F1 is its average over the classes, "
                  "each class counting the same, answering the most probable class.")

st.subheader("Confusion matrix")
st.caption("Click a square, or choose its true class and answer below, to see its images. Rows are the true "
           "class, columns the answer.")
matrix, answers = confusion_table(predictions, split, classes)
selection = chart_with_table(
    confusion_figure(classes, answers, matrix, normalised), "confusion",
    f"Confusion matrix of {len(classes)} classes: rows are the true class, columns the answer, each square the "
    "number of images; choose a square with the two pickers below, or click it.",
    confusion_frame(classes, answers, matrix), on_select="rerun", selection_mode="points")
true, predicted = pick_cell(classes, answers, selection)
opacity = overlay_controls("evaluate_overlay") if has_model else None
st.markdown(f"**True {escape_markdown(true)}, answered {escape_markdown(predicted)}**")
image_grid(cell_images(predictions, split, true, predicted).head(24), "No images in this cell.", str(run.path), opacity)

left, right = st.columns(2)
with left:
    st.subheader("Per class")
    st.dataframe(per_class_table(result), hide_index=True, key="per_class",
                 column_config={name: st.column_config.NumberColumn(format="%.2f", help=COLUMN_HELP[name])
                                for name in ("precision", "recall", "f1")})
with right:
    st.subheader("Most confused")
    pairs = most_confused(result)
    if pairs:
        st.dataframe([{"true": a, "predicted as": b, "images": n} for a, b, n in pairs], hide_index=True, key="pairs")
    else:
        st.caption("No mistakes on these images.")
st.subheader("Most wrong (top losses)")
st.caption("The images the model was most confidently wrong about, or least sure were right.")
image_grid(top_losses(predictions, split, 12), "No predictions saved.", str(run.path), opacity)
card_section(str(run.path), run.run_id, can_change, user)
