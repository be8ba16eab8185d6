"""Evaluate: the confusion matrix down to the images, per-class scores, confused pairs, top losses."""

from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from engine import runfiles
from engine.images import printable
from engine.interpret import cell_images, load_predictions, most_confused, per_class_table, top_losses
from signin import escape_markdown, page_user
from ui import pick_run, runs_having, thumbnail

GRID_COLUMNS = 6


def confusion_figure(classes: list, matrix: np.ndarray, normalised: bool):
    """The confusion matrix as a heatmap (rows: true class, columns: predicted), clickable per cell.

    A transparent marker sits on every cell: Streamlit reports clicks on markers, not on heatmap cells.
    """
    totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros_like(matrix, dtype=float), where=totals > 0)
    texts = [[f"{value:.0%}" for value in row] for row in shares] if normalised else matrix.astype(int).astype(str)
    figure = go.Figure(go.Heatmap(
        z=shares, x=classes, y=classes, text=texts, texttemplate="%{text}", textfont=dict(size=18),
        colorscale="Blues", zmin=0, zmax=1, colorbar=dict(title="share of row"), hoverinfo="skip"))
    xs = [predicted for _ in classes for predicted in classes]
    ys = [true for true in classes for _ in classes]
    figure.add_trace(go.Scatter(
        x=xs, y=ys, mode="markers", showlegend=False,
        marker=dict(size=max(12, min(120, int(600 / max(1, len(classes))))), color="rgba(0,0,0,0)", symbol="square"),
        hovertemplate="true %{y} → predicted %{x}<extra></extra>"))
    figure.update_layout(xaxis=dict(title="predicted class", type="category", side="top"),
                         yaxis=dict(title="true class", type="category", autorange="reversed"),
                         height=min(900, max(380, 48 * len(classes) + 160)), margin=dict(t=40, b=10))
    return figure


def image_grid(rows, empty_message: str) -> None:
    if rows.empty:
        st.caption(empty_message)
        return
    columns = st.columns(GRID_COLUMNS)
    for position, row in enumerate(rows.itertuples()):
        with columns[position % GRID_COLUMNS]:
            try:
                st.image(thumbnail(row.path, 200), caption=f"{printable(Path(row.path).name)}: {row.true} → {row.predicted} "
                                                    f"({row.confidence:.0%} sure)")
            except OSError:
                st.caption(f"{printable(Path(row.path).name)} is no longer readable.")


def pick_cell(classes: list, selection) -> tuple[str, str]:
    """The cell to show: a click on the matrix, else the two pickers below it."""
    points = (selection or {}).get("selection", {}).get("points", []) if selection else []
    if "cell_true" not in st.session_state or st.session_state["cell_true"] not in classes:
        # Start on the most confused pair: the cell most worth a look.
        pairs = most_confused(result)
        st.session_state["cell_true"], st.session_state["cell_predicted"] = \
            (pairs[0][0], pairs[0][1]) if pairs else (classes[0], classes[0])
    if points:
        st.session_state["cell_true"], st.session_state["cell_predicted"] = points[0]["y"], points[0]["x"]
    left, right = st.columns(2)
    true = left.selectbox("True class", classes, key="cell_true")
    predicted = right.selectbox("Predicted class", classes, key="cell_predicted")
    return true, predicted


user = page_user()  # first: nothing of this page is drawn for a visitor who is not signed in
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
                          help="Each row shows how the images of one true class were predicted, in %.")
result = evaluation["splits"][split]
classes = evaluation["classes"]
first, second, third = st.columns(3)
first.metric("Accuracy", "–" if result["accuracy"] is None else f"{result['accuracy']:.1%}",
             help="Share of images classified correctly.")
second.metric("Macro F1", f"{result.get('macro_f1', 0):.2f}", help="Average over classes of the balance of precision and recall.")
third.metric("Images", result["num_images"])

st.subheader("Confusion matrix")
st.caption("Click a square to see its images. Rows are the true class, columns the prediction.")
matrix = np.array(result["confusion_matrix"])
selection = st.plotly_chart(confusion_figure(classes, matrix, normalised), key="confusion", on_select="rerun",
                            selection_mode="points")
true, predicted = pick_cell(classes, selection)
predictions = load_predictions(run.path)
st.markdown(f"**True {escape_markdown(true)}, predicted {escape_markdown(predicted)}**")
image_grid(cell_images(predictions, split, true, predicted).head(24), "No images in this cell.")

left, right = st.columns(2)
with left:
    st.subheader("Per class")
    st.dataframe(per_class_table(result), hide_index=True, key="per_class",
                 column_config={name: st.column_config.NumberColumn(format="%.2f") for name in ("precision", "recall", "f1")})
with right:
    st.subheader("Most confused")
    pairs = most_confused(result)
    if pairs:
        st.dataframe([{"true": a, "predicted as": b, "images": n} for a, b, n in pairs], hide_index=True, key="pairs")
    else:
        st.caption("No mistakes on these images.")
st.subheader("Most wrong (top losses)")
st.caption("The images the model was most confidently wrong about, or least sure were right.")
image_grid(top_losses(predictions, split, 12), "No predictions saved.")
