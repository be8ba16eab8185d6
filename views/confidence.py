"""How sure the model is (the reliability diagram) and where it answers (the operating point), for Evaluate."""

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from engine.operating_point import Decision, binary_curves, per_class_precision_recall, read_decision, save_decision
from engine.users import User


def reliability_figure(reliability: dict):
    """Confidence against the share right, per bin, before and after calibration; the diagonal is perfect."""
    figure = go.Figure()
    figure.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfectly calibrated",
                                line=dict(color="grey", dash="dot")))
    for name, colour in (("uncalibrated", "#d62728"), ("calibrated", "#2ca02c")):
        rows = [row for row in reliability.get(name) or [] if row["count"]]
        if not rows:
            continue
        figure.add_trace(go.Scatter(
            x=[row["confidence"] for row in rows], y=[row["accuracy"] for row in rows], mode="lines+markers",
            name=f"{name} (as trained)" if name == "uncalibrated" else name, line=dict(color=colour),
            marker=dict(size=[6 + 18 * np.sqrt(row["count"] / max(r["count"] for r in rows)) for row in rows]),
            customdata=[row["count"] for row in rows],
            hovertemplate="said %{x:.0%} sure → right %{y:.0%} of %{customdata} images<extra></extra>"))
    figure.update_layout(xaxis=dict(title="how sure the model said it was", tickformat=".0%", range=[0, 1]),
                         yaxis=dict(title="how often it was right", tickformat=".0%", range=[0, 1.02]),
                         height=360, margin=dict(t=10, b=10), legend=dict(orientation="h", y=-0.25))
    return figure


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
                  delta=None if errors["uncalibrated"] is None or errors["calibrated"] is None
                  else f"{(errors['calibrated'] - errors['uncalibrated']) * 100:+.1f} points",
                  delta_color="inverse")
    third.metric("Temperature", f"{calibration['temperature']:.2f}",
                 help="Fitted on the validation images: above 1 the model was over-confident and its "
                      "probabilities are softened; below 1 it was too modest.")
    st.plotly_chart(reliability_figure(measured["reliability"]), key="reliability")
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
                                marker=dict(size=14, color="#d62728"), name="the slider"))
    figure.update_layout(title=f"Precision–recall for {classes[1]} (area {curves['average_precision']:.2f})",
                         xaxis=dict(title=f"share of {classes[1]} found (recall)", tickformat=".0%"),
                         yaxis=dict(title=f"share right when it says {classes[1]} (precision)", tickformat=".0%"),
                         height=340, margin=dict(t=40, b=10), showlegend=False)
    left.plotly_chart(figure, key="precision_recall")
    figure = go.Figure(go.Scatter(x=roc["false_positive_rate"], y=roc["true_positive_rate"], mode="lines",
                                  customdata=roc["threshold"],
                                  hovertemplate="from %{customdata:.2f}: finds %{y:.0%}, "
                                                "false alarms %{x:.0%}<extra></extra>"))
    figure.add_trace(go.Scatter(x=[roc["false_positive_rate"][at_roc]], y=[roc["true_positive_rate"][at_roc]],
                                mode="markers", marker=dict(size=14, color="#d62728")))
    figure.update_layout(title=f"ROC (area {curves['roc_auc']:.2f})",
                         xaxis=dict(title=f"{classes[0]} images called {classes[1]}", tickformat=".0%"),
                         yaxis=dict(title=f"{classes[1]} images found", tickformat=".0%"),
                         height=340, margin=dict(t=40, b=10), showlegend=False)
    right.plotly_chart(figure, key="roc")


def _per_class_curves(probabilities, true_indices, classes) -> None:
    curves = per_class_precision_recall(probabilities, true_indices, classes)
    figure = go.Figure()
    for name, curve in curves.items():
        if curve:
            figure.add_trace(go.Scatter(x=curve["recall"], y=curve["precision"], mode="lines",
                                        name=f"{name} (area {curve['average_precision']:.2f})"))
    figure.update_layout(title="Precision–recall per class (each class against the rest)",
                         xaxis=dict(title="share of the class found (recall)", tickformat=".0%"),
                         yaxis=dict(title="share right when it says the class (precision)", tickformat=".0%"),
                         height=360, margin=dict(t=40, b=10))
    st.plotly_chart(figure, key="per_class_precision_recall")
