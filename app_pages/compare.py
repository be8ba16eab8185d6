"""Compare: 2–4 runs side by side (what differs, curves, results, cost), and for two of them the images one
got right and the other wrong, with McNemar's exact test in plain words. The engine computes; this page draws."""

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from PIL import ImageOps

from engine import runfiles
from engine.compare import image_diff, results_side_by_side, settings_that_differ, verdict
from engine.interpret import metrics_frames
from signin import page_user
from ui import chart_with_table, image_alt, keyboard_focus_styles, run_label, runs_having, short_name, thumbnail

MAXIMUM_RUNS = 4
# A marker shape per run, as well as its colour, so runs are told apart without colour vision.
RUN_MARKERS = ["circle", "diamond", "square", "triangle-up"]
# The results table's less obvious columns, in words.
RESULT_HELP = {"accuracy": "Share of validation images classified correctly.",
               "macro F1": "F1 balances precision and recall (0 to 1); macro F1 averages it over the classes, "
                           "each class counting the same."}
GRID_COLUMNS = 6
SHOWN_PER_GRID = 24


@st.cache_data(max_entries=64, show_spinner=False)
def _epochs(run_path: str, modified: float):
    return metrics_frames(run_path)[1]


def curves(paths: list, names: dict) -> None:
    """Loss and accuracy per epoch, validation solid and training dotted, one colour and marker per run."""
    left, right = st.columns(2)
    for column, metric, title in ((left, "loss", "Loss (lower is better)"), (right, "accuracy", "Accuracy")):
        figure, rows = go.Figure(), []
        for number, path in enumerate(paths):
            metrics = Path(path) / runfiles.METRICS_FILE
            epochs = _epochs(path, metrics.stat().st_mtime if metrics.is_file() else 0.0)
            if epochs.empty:
                continue
            marker = {"symbol": RUN_MARKERS[number % len(RUN_MARKERS)], "size": 8}
            if f"val_{metric}" in epochs:
                figure.add_trace(go.Scatter(x=epochs["epoch"], y=epochs[f"val_{metric}"], mode="lines+markers",
                                            marker=marker, name=f"{names[path]} validation", legendgroup=path))
            if metric in epochs:
                figure.add_trace(go.Scatter(x=epochs["epoch"], y=epochs[metric], mode="lines",
                                            line={"dash": "dot"}, name=f"{names[path]} training", legendgroup=path))
            rows += [{"run": names[path], "epoch": epoch, "training": row.get(metric),
                      "validation": row.get(f"val_{metric}")} for epoch, row in zip(epochs["epoch"],
                                                                                   epochs.to_dict("records"))]
        figure.update_layout(title=title, xaxis_title="epoch", yaxis_title=metric, height=340,
                             margin={"t": 40, "b": 10}, yaxis_tickformat=".0%" if metric == "accuracy" else None)
        chart_with_table(figure, f"compare_{metric}",
                         f"{title} per epoch of {len(paths)} runs, validation solid with markers, training dotted.",
                         pd.DataFrame(rows, columns=["run", "epoch", "training", "validation"]).round(4),
                         container=column)


def image_grid(rows, split: str, name_a: str, name_b: str, key: str) -> None:
    """Thumbnails of discordant images with both runs' answers, most confident first."""
    if rows.empty:
        st.caption("None.")
        return
    columns = st.columns(GRID_COLUMNS)
    for position, row in enumerate(rows.head(SHOWN_PER_GRID).itertuples()):
        caption = f"true {row.true} · A: {row.predicted_a} {row.confidence_a:.0%} · B: {row.predicted_b} " \
                  f"{row.confidence_b:.0%}"
        column = columns[position % GRID_COLUMNS]
        try:
            # Square crops, so the grid keeps its rows whatever the photos' shapes.
            column.image(ImageOps.fit(thumbnail(row.path, 320), (160, 160)), caption=caption,
                         alt=image_alt(Path(row.path).name, true=row.true) + f"; {name_a} answered "
                             f"{row.predicted_a} ({row.confidence_a:.0%} sure), {name_b} answered {row.predicted_b} "
                             f"({row.confidence_b:.0%} sure)")
        except OSError:
            column.caption(f"{Path(row.path).name} is no longer readable · {caption}")
    if len(rows) > SHOWN_PER_GRID:
        st.caption(f"The {SHOWN_PER_GRID} most confident of {len(rows)}; `python -m engine compare` lists them all.")


def two_run_diff(paths: list, names: dict) -> None:
    """The image-level diff and McNemar's test for the two runs chosen as A and B."""
    st.subheader("Image by image")
    left, middle, right = st.columns(3)
    run_a = left.selectbox("A", paths, format_func=names.get, key="compare_a")
    run_b = middle.selectbox("B", [path for path in paths if path != run_a], format_func=names.get, key="compare_b")
    split = right.radio("Images", ["validation", "test"], horizontal=True, key="compare_split")
    try:
        diff = image_diff(run_a, run_b, split)
    except (FileNotFoundError, ValueError) as error:
        st.info(str(error))
        return
    name_a, name_b = names[run_a], names[run_b]
    if not diff.same_images:
        st.warning(f"The two runs were not evaluated on the same {split} images: {diff.common} are common "
                   f"({diff.only_a} only in {name_a}, {diff.only_b} only in {name_b}"
                   + (f", {diff.label_changed} relabelled in between" if diff.label_changed else "")
                   + "). Only the common images are compared.")
    st.markdown(f"**{verdict(diff, name_a, name_b)}**")
    counts = st.columns(4)
    counts[0].metric("Both right", diff.both_right, help="Images both runs classified correctly.")
    counts[1].metric("Only A right", len(diff.a_right_b_wrong),
                     help=f"Images {name_a} (A) classified correctly and {name_b} (B) did not.")
    counts[2].metric("Only B right", len(diff.b_right_a_wrong),
                     help=f"Images {name_b} (B) classified correctly and {name_a} (A) did not.")
    counts[3].metric("Both wrong", diff.both_wrong, help="Images neither run classified correctly.")
    st.caption(f"A is {name_a}, B is {name_b}; each picture shows both answers and their confidence.")
    st.markdown(f"**{name_a} right, {name_b} wrong** ({len(diff.a_right_b_wrong)})")
    image_grid(diff.a_right_b_wrong, split, name_a, name_b, "a_right")
    st.markdown(f"**{name_b} right, {name_a} wrong** ({len(diff.b_right_a_wrong)})")
    image_grid(diff.b_right_a_wrong, split, name_a, name_b, "b_right")


user = page_user()  # first: nothing of this page is drawn for a visitor who is not signed in
keyboard_focus_styles()
st.title("Compare")
runs = runs_having(runfiles.EVALUATION_FILE)
if len(runs) < 2:
    st.info("Compare needs two evaluated runs: train another one on the Train page.")
    st.stop()
by_path = {str(run.path): run for run in runs}
wanted = [value for value in st.query_params.get_all("compare") if value in {run.run_id for run in runs}]
default = [str(run.path) for run in runs if run.run_id in wanted] or [str(run.path) for run in runs[:2]]
chosen = st.multiselect(f"Runs (2 to {MAXIMUM_RUNS})", list(by_path), default=default[:MAXIMUM_RUNS],
                        max_selections=MAXIMUM_RUNS, format_func=lambda path: run_label(by_path[path]),
                        key="compare_runs")
st.query_params["compare"] = [by_path[path].run_id for path in chosen]
if len(chosen) < 2:
    st.info("Choose at least two runs.")
    st.stop()
names = {path: short_name(by_path[path]) for path in chosen}
if len(set(names.values())) < len(names):  # two runs of the same name: tell them apart by id
    names = {path: f"{names[path]} ({by_path[path].run_id})" for path in chosen}

st.subheader("What differs")
differ = settings_that_differ(chosen).rename(columns={Path(path).name: names[path] for path in chosen})
if differ.empty:
    st.caption("The runs have the same settings (apart from their names).")
else:
    st.dataframe(differ.astype(str), hide_index=True, key="compare_settings")
st.subheader("Results on the validation images")
results = results_side_by_side(chosen).assign(run=[names[path] for path in chosen])
st.dataframe(results, hide_index=True, key="compare_results",
             column_config={column: st.column_config.NumberColumn(format="percent", help=RESULT_HELP.get(column))
                            for column in results.columns
                            if column in ("accuracy", "macro F1") or column.startswith("F1 ")}
             | {"training seconds": st.column_config.NumberColumn(format="%.0f"),
                "images per second": st.column_config.NumberColumn(format="%.0f")})
st.caption("Training seconds run from start to finish (features, epochs, evaluation); images per second is "
           "training images × epochs over that time.")
curves(chosen, names)
two_run_diff(chosen, names)
