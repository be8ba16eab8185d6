"""How sure the model is (the reliability diagram) and where it answers (the operating point), for Evaluate."""

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from engine.operating_point import Decision, binary_curves, per_class_precision_recall, read_decision, save_decision
from engine.users import User
from ui import CURVE_STYLES, PALETTE, chart_with_table

# Before and after calibration differ in colour (Okabe–Ito vermillion and blue), marker and dash.
RELIABILITY_STYLES = {"uncalibrated": {"color": PALETTE[1], "symbol": "diamond", "dash": "dash"},
                      "calibrated": {"color": PALETTE[0], "symbol": "circle", "dash": "solid"}}
# The precision-recall tables' columns, in words (the per-class score table says "precision" and "recall").
FOUND, RIGHT = "share found (recall)", "share right (precision)"
# Per-class curves: a dash pattern per class as well as a colour.
DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]
# The slider's point on the binary curves: black-outlined, so it stands out without its colour.
SLIDER_MARKER = dict(size=14, color=CURVE_STYLES["validation"]["color"], symbol="x",
                     line=dict(width=1, color="black"))


def reliability_figure(reliability: dict):
    """Confidence against the share right, per bin, before and after calibration; the diagonal is perfect."""
    figure = go.Figure()
    figure.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfectly calibrated",
                                line=dict(color="grey", dash="dot")))
    for name, style in RELIABILITY_STYLES.items():
        rows = [row for row in reliability.get(name) or [] if row["count"]]
        if not rows:
            continue
        figure.add_trace(go.Scatter(
            x=[row["confidence"] for row in rows], y=[row["accuracy"] for row in rows], mode="lines+markers",
            name=f"{name} (as trained)" if name == "uncalibrated" else name,
            line=dict(color=style["color"], dash=style["dash"]),
            marker=dict(size=[6 + 18 * np.sqrt(row["count"] / max(r["count"] for r in rows)) for row in rows],
                        symbol=style["symbol"]),
            customdata=[row["count"] for row in rows],
            hovertemplate="said %{x:.0%} sure → right %{y:.0%} of %{customdata} images<extra></extra>"))
    figure.update_layout(title="Reliability: how sure it said it was against how often it was right",
                         xaxis=dict(title="how sure the model said it was", tickformat=".0%", range=[0, 1]),
                         yaxis=dict(title="how often it was right", tickformat=".0%", range=[0, 1.02]),
                         height=360, margin=dict(t=40, b=10), legend=dict(orientation="h", y=-0.25))
    return figure


def reliability_table(reliability: dict) -> pd.DataFrame:
    """The reliability diagram's points: per probability bin, before and after calibration."""
    rows = [{"probabilities": name, "said it was sure": f"{row['confidence']:.0%}",
             "was right": f"{row['accuracy']:.0%}", "images": row["count"]}
            for name in RELIABILITY_STYLES for row in reliability.get(name) or [] if row["count"]]
    return pd.DataFrame(rows, columns=["probabilities", "said it was sure", "was right", "images"])


def curve_table(columns: dict, threshold=None) -> pd.DataFrame:
    """A curve's points as a table, rounded for reading; with `threshold`, the probability each point starts at."""
    table = pd.DataFrame({name: np.round(np.asarray(values, dtype=float), 3) for name, values in columns.items()})
    if threshold is not None:
        # scikit-learn's precision-recall curve has one threshold fewer than points: the last point has none.
        starts = np.full(len(table), np.nan)
        values = np.round(np.asarray(threshold, dtype=float), 3)[:len(table)]
        starts[:len(values)] = values
        table.insert(0, "from probability", starts)
    return table


def calibration_section(evaluation: dict, split: str) -> None:
    """The temperature, the calibration error before and after, and the reliability diagram."""
    calibration = evaluation.get("calibration")
    st.subheader("How sure is it, really?")
    if not calibration:
        st.caption("This run was trained before calibration existed: its probabilities are shown as the model "
                   "gave them. Train it again to get calibrated probabilities.")
        return
    measured = calibration if split == "validation" else (calibration.get("splits") or {}).get(split)
    if not measured:
        st.caption(f"Calibration was not measured on the {split} images.")
        return
    errors = measured["expected_calibration_error"]
    first, second, third = st.columns(3)
    first.metric("Calibration error as trained", _percent(errors["uncalibrated"]),
                 help="Expected calibration error (15 bins): on average, how far 'says X % sure' is from "
                      "'right X % of the time'. Lower is better.")
    second.metric("After calibration", _percent(errors["calibrated"]),
                  help="The same calibration error once the probabilities are softened or sharpened by the "
                       "temperature; the change is in percentage points.",
                  delta=None if errors["uncalibrated"] is None or errors["calibrated"] is None
                  else f"{(errors['calibrated'] - errors['uncalibrated']) * 100:+.1f} points",
                  delta_color="inverse")
    third.metric("Temperature", f"{calibration['temperature']:.2f}",
                 help="Fitted on the validation images: above 1 the model was over-confident and its "
                      "probabilities are softened; below 1 it was too modest.")
    chart_with_table(reliability_figure(measured["reliability"]), "reliability",
                     "Reliability diagram: how sure the model said it was against how often it was right, before "
                     "and after calibration; the diagonal is perfect.", reliability_table(measured["reliability"]))
    note = ("The temperature was fitted on these images, so this is the best case; test images are the honest check."
            if split == "validation" else "The temperature never saw these images: this is the honest check.")
    st.caption(f"Every probability shown in Transfer Studio is the calibrated one. {note}")


def _percent(value) -> str:
    return "–" if value is None else f"{value:.1%}"


def operating_point_controls(run_path: str, classes: list, probabilities: np.ndarray, true_indices: np.ndarray,
                             can_save: bool, user: User) -> Decision:
    """Sliders for the threshold (two classes) and the minimum confidence, the curves, and Save.

    Returns:
        The decision the sliders describe now (the confusion matrix below is drawn at it).
    """
    saved = read_decision(run_path)
    st.subheader("Where does it say yes?")
    threshold = None
    if len(classes) == 2:
        threshold = st.slider(
            f"Answer {classes[1]} from this probability", 0.01, 0.99, float(saved.threshold or 0.5), 0.01,
            key=f"threshold_{run_path}",
            help=f"Lower finds more {classes[1]} images but raises more false alarms; the confusion matrix "
                 "below follows the slider.")
        _binary_curves(probabilities, true_indices, classes, threshold)
    else:
        _per_class_curves(probabilities, true_indices, classes)
    minimum = st.slider("Say \"not sure\" below this probability", 0.0, 0.99,
                        float(saved.minimum_confidence or 0.0), 0.01, key=f"minimum_{run_path}",
                        help="Below it, Predict and Demo answer \"not sure\" instead of a class. 0 means always answer.")
    # 0.5 is the plain "most probable class": kept as no threshold, like a run that never set one.
    decision = Decision(None if threshold is None or round(threshold, 2) == 0.5 else threshold, minimum or None)
    if decision != saved:
        if st.button("Save as this model's operating point", disabled=not can_save, key="save_decision",
                     help=None if can_save else "Only the run's owner or an admin can change this."):
            try:
                save_decision(run_path, decision.threshold, decision.minimum_confidence, user=user, source="page")
                st.toast("Saved: Predict and Demo now answer at this point.")
                st.rerun()
            except (PermissionError, ValueError) as error:
                st.error(str(error))
    else:
        st.caption(decision.describe(classes))
    return decision


def _binary_curves(probabilities, true_indices, classes, threshold: float) -> None:
    curves = binary_curves(probabilities, true_indices)
    if curves["roc"] is None:
        st.caption("Both classes are needed among these images to draw the curves.")
        return
    left, right = st.columns(2)
    pr, roc = curves["precision_recall"], curves["roc"]
    at_pr = int(np.argmin(np.abs(np.asarray(pr["threshold"]) - threshold)))
    at_roc = int(np.argmin(np.abs(np.asarray(roc["threshold"]) - threshold)))
    figure = go.Figure(go.Scatter(x=pr["recall"], y=pr["precision"], mode="lines", name="curve",
                                  customdata=pr["threshold"],
                                  hovertemplate="from %{customdata:.2f}: finds %{x:.0%}, right %{y:.0%}<extra></extra>"))
    figure.add_trace(go.Scatter(x=[pr["recall"][at_pr]], y=[pr["precision"][at_pr]], mode="markers",
                                marker=SLIDER_MARKER, name="the slider"))
    figure.update_layout(title=f"Precision–recall for {classes[1]} (area {curves['average_precision']:.2f})",
                         xaxis=dict(title=f"share of {classes[1]} found (recall)", tickformat=".0%"),
                         yaxis=dict(title=f"share right when it says {classes[1]} (precision)", tickformat=".0%"),
                         height=340, margin=dict(t=40, b=10), showlegend=False)
    chart_with_table(figure, "precision_recall",
                     f"Precision against recall for {classes[1]} at every probability; a cross marks the slider.",
                     curve_table({FOUND: pr["recall"], RIGHT: pr["precision"]}, pr["threshold"]),
                     container=left)
    figure = go.Figure(go.Scatter(x=roc["false_positive_rate"], y=roc["true_positive_rate"], mode="lines",
                                  customdata=roc["threshold"],
                                  hovertemplate="from %{customdata:.2f}: finds %{y:.0%}, "
                                                "false alarms %{x:.0%}<extra></extra>"))
    figure.add_trace(go.Scatter(x=[roc["false_positive_rate"][at_roc]], y=[roc["true_positive_rate"][at_roc]],
                                mode="markers", marker=SLIDER_MARKER))
    figure.update_layout(title=f"ROC curve: found against false alarms (area {curves['roc_auc']:.2f})",
                         xaxis=dict(title=f"{classes[0]} images called {classes[1]}", tickformat=".0%"),
                         yaxis=dict(title=f"{classes[1]} images found", tickformat=".0%"),
                         height=340, margin=dict(t=40, b=10), showlegend=False)
    chart_with_table(figure, "roc",
                     f"ROC (receiver operating characteristic) curve: {classes[1]} images found against {classes[0]} "
                     "images wrongly called it, at every probability; a cross marks the slider.",
                     curve_table({"false alarms": roc["false_positive_rate"], "found": roc["true_positive_rate"]},
                                 roc["threshold"]), container=right)


def _per_class_curves(probabilities, true_indices, classes) -> None:
    curves = per_class_precision_recall(probabilities, true_indices, classes)
    figure = go.Figure()
    tables = []
    for number, (name, curve) in enumerate(curves.items()):
        if curve:
            figure.add_trace(go.Scatter(x=curve["recall"], y=curve["precision"], mode="lines",
                                        line=dict(dash=DASHES[number % len(DASHES)]),
                                        name=f"{name} (area {curve['average_precision']:.2f})"))
            tables.append(curve_table({FOUND: curve["recall"], RIGHT: curve["precision"]})
                          .assign(**{"class": name}))
    figure.update_layout(title="Precision–recall per class (each class against the rest)",
                         xaxis=dict(title="share of the class found (recall)", tickformat=".0%"),
                         yaxis=dict(title="share right when it says the class (precision)", tickformat=".0%"),
                         height=360, margin=dict(t=40, b=10))
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["class", FOUND, RIGHT])
    chart_with_table(figure, "per_class_precision_recall",
                     f"Precision against recall for each of {len(classes)} classes, each class against the rest.",
                     table[["class", FOUND, RIGHT]])
