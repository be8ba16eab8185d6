"""The Data page's two sections that work out more, only when asked: which labels look wrong (a gallery
with a decision per image) and a map of the data. The work is in `engine.label_issues`,
`engine.data_map` and `engine.label_decisions`; this module only draws.
"""

import os
from pathlib import Path

import pandas as pd
import plotly.express as px
import streamlit as st

from engine.config import ConfigError, RunConfig
from engine.data import DataError
from engine.images import printable
from engine.label_decisions import read_decisions, record_decision, undo_decision
from engine.users import Role
from ui import PALETTE, chart_with_table, image_alt, thumbnail

# Suspect images per page of the "check these labels" gallery.
ISSUES_PER_PAGE = 12
# The Train form's model settings: the label search and the map use the backbone you will train with.
MODEL_SETTINGS = ("model.backbone", "model.alpha", "model.image_size", "model.weights")


def feature_backbone() -> RunConfig:
    """The Train form's backbone, width, size and weights when it has valid ones, else the default run's."""
    values = {name: st.session_state[f"field.{name}"] for name in MODEL_SETTINGS if f"field.{name}" in st.session_state}
    # The form's own encodings: "default" width, size 0 and weights "file" (a path in another field).
    if values.get("model.alpha") == "default":
        values["model.alpha"] = None
    if values.get("model.image_size") == 0:
        values["model.image_size"] = None
    if values.get("model.weights") == "file":
        values["model.weights"] = st.session_state.get("field.weights_path", "")
    try:
        return RunConfig().replace(**values)
    except ConfigError:
        return RunConfig()


def compute_with_progress(work, what: str):
    """Runs an engine computation with a progress bar; a clear message instead of a traceback when it cannot."""
    bar = st.progress(0.0, text=what)
    try:
        return work(lambda step, done, total: bar.progress(min(done / max(total, 1), 1.0),
                                                           text=f"{step}: {done} of {total}"))
    except (DataError, ValueError, RuntimeError) as error:  # WeightsUnavailableError is a RuntimeError
        st.error(str(error))
        return None
    finally:
        bar.empty()


def show_label_issues(path: str, user) -> None:
    """The "check these labels" gallery, worked out only when asked (it runs the backbone once per image)."""
    section = st.expander("Check these labels: images whose label looks wrong", key="label_issues",
                          on_change="rerun")
    with section:
        if not section.open:
            return
        from engine.label_issues import find_label_issues_in_folder

        config = feature_backbone()
        st.caption(f"Each image is judged by a model that never saw its label: a logistic regression on "
                   f"{config.model.backbone} features, trained on the other images (k-fold), ranked with cleanlab. "
                   "The score is the probability of the given label (near 0: most likely wrong). Decisions apply "
                   "to the next run; your files are never moved or deleted.")
        stored = st.session_state.setdefault("label_issue_reports", {})
        key = f"{path}|{config.model.backbone}|{config.model.weights}|{config.model.resolved_image_size}"
        if st.button("Find labels that look wrong", key="find_label_issues"):
            stored[key] = compute_with_progress(
                lambda progress: find_label_issues_in_folder(path, config, progress), "Computing features…")
        report = stored.get(key)
        if not report:
            return
        st.markdown(f"**{report['num_issues']} image(s) to check** of {report['num_images']} searched, "
                    f"{report['scope']}; out-of-fold accuracy {report['out_of_fold_accuracy']:.1%}, "
                    f"{report['folds_note']}.")
        show_issue_gallery(path, report["issues"], user)


def show_issue_gallery(path: str, issues: list, user) -> None:
    """A page of suspect images: thumbnail, given and suggested label, score, and the decision buttons."""
    if not issues:
        return
    pages = max(1, -(-len(issues) // ISSUES_PER_PAGE))
    page = st.number_input(f"Page (of {pages})", 1, pages, 1, key="issues_page")
    decided = {entry["path"]: entry for entry in read_decisions(path)}
    may_decide = user.role is not Role.VIEWER
    if not may_decide:
        st.info("You are signed in as a viewer: you can look, not change which images the next run uses.")
    columns = st.columns(4)
    for position, issue in enumerate(issues[(page - 1) * ISSUES_PER_PAGE: page * ISSUES_PER_PAGE]):
        with columns[position % 4]:
            image = issue["path"]
            if not Path(image).is_file():
                st.caption(f"{printable(Path(image).name)}: no longer in the folder")
                continue
            st.image(thumbnail(image), alt=image_alt(printable(Path(image).name), true=issue["given"])
                     + f", filed under {issue['given']}; suggested {issue['suggested']}")
            st.caption(f"{printable(Path(image).name)} · given {issue['given']} → suggested {issue['suggested']} "
                       f"· score {issue['score']:.3f}")
            decision = decided.get(image)
            if decision:
                st.caption("Left out of the next run" if decision["action"] == "leave_out"
                           else f"Moved to {decision['to']} for the next run")
            if may_decide:
                decision_buttons(path, issue, decision, user)


def decision_buttons(path: str, issue: dict, decision, user) -> None:
    """Leave out / move / undo for one image; the engine records it (and refuses viewers)."""
    image = issue["path"]
    try:
        if decision:
            if st.button("Undo", key=f"undo:{image}"):
                undo_decision(path, image, user=user)
                st.rerun()
            return
        if st.button("Leave out of the next run", key=f"leave_out:{image}"):
            record_decision(path, image, "leave_out", user=user)
            st.rerun()
        if issue["suggested"] != issue["given"] and st.button(f"Move to {issue['suggested']}", key=f"move:{image}"):
            record_decision(path, image, "move", to=issue["suggested"], user=user)
            st.rerun()
    except (ValueError, PermissionError) as error:
        st.error(str(error))


def show_data_map(path: str) -> None:
    """Every image's features in 2-D (PCA, then t-SNE), coloured by class, mistakes marked."""
    section = st.expander("A map of the data: clusters, outliers, overlapping classes", key="data_map",
                          on_change="rerun")
    with section:
        if not section.open:
            return
        from engine.data_map import data_map

        config = feature_backbone()
        st.caption(f"{config.model.backbone} features of every image, reduced to 2-D (PCA, then t-SNE): images the "
                   "network sees alike are close. ✕ marks a mistake: a model that never saw the image's label "
                   "predicts another class. Hover for the file name; click a point to see the image.")
        stored = st.session_state.setdefault("data_maps", {})
        key = f"{path}|{config.model.backbone}|{config.model.weights}|{config.model.resolved_image_size}"
        if st.button("Draw the map", key="draw_data_map"):
            stored[key] = compute_with_progress(lambda progress: data_map(path, config, progress),
                                                "Computing features…")
        result = stored.get(key)
        if not result:
            return
        points = pd.DataFrame(result["points"])
        points["file"] = points["path"].map(lambda file: printable(os.path.relpath(file, path)))
        points["kind"] = points["mistake"].map({True: "mistake", False: "agrees"})
        # Distinct, colour-blind-safe hues per class (ui.PALETTE); mistakes differ by shape too.
        figure = px.scatter(points, x="x", y="y", color="label", symbol="kind",
                            color_discrete_sequence=PALETTE,
                            symbol_map={"agrees": "circle", "mistake": "x"},
                            hover_data={"file": True, "predicted": True, "x": False, "y": False, "kind": False},
                            custom_data=["path"], title=f"{len(points)} images, {result['num_mistakes']} mistakes")
        # t-SNE's two axes have no meaning of their own: only closeness does, and the titles say so.
        figure.update_layout(height=520, margin=dict(t=40, b=10), xaxis_title="map axis 1 (no unit)",
                             yaxis_title="map axis 2 (no unit)")
        # Plotly cannot show an image on hover: a clicked (or lasso-selected) point's image is shown below.
        event = chart_with_table(
            figure, "data_map_chart", f"A map of {len(points)} images by what the network sees, one colour per "
            f"class; {result['num_mistakes']} mistakes are marked with a cross.",
            points[["file", "label", "predicted", "kind", "x", "y"]].round({"x": 2, "y": 2}),
            on_select="rerun", selection_mode="points")
        for point in event.selection.points[:4]:
            image = (point.get("customdata") or [None])[0]
            if image and Path(image).is_file():
                st.image(thumbnail(image), caption=printable(Path(image).name), width=200,
                         alt=image_alt(printable(Path(image).name)))
        st.caption(result["method"])
