"""Monitor: live curves, progress, Stop/Resume, the worker's log; polls the run folder, never trains."""

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from engine import interpret, jobs
from engine.executors import recorded_executor
from engine.images import printable
from engine.interpret import phase_two_start
from engine.metrics_reader import MetricsReader
from engine.status import RunStatus, State
from signin import current_user, escape_markdown, page_user
from ui import (CURVE_STYLES, access_limits, all_runs, chart_with_table, image_alt, keyboard_focus_styles, owner_label,
                permission_note, pick_run, runs_root, thumbnail)

REFRESH_SECONDS = 1.5
# Plotly marker shapes for overlaid runs, in turn.
OVERLAY_MARKERS = ["circle", "diamond", "square", "triangle-up", "x", "star", "cross"]
# What each curve measures, for axis titles and tables.
METRIC_NAMES = {"loss": "loss", "accuracy": "accuracy (share correct)"}


@st.cache_resource(max_entries=64, show_spinner=False)
def metrics_reader(run_path: str) -> MetricsReader:
    """The one reader of a run's metrics, shared by every viewer of that run.

    It reads only what the run appended since any viewer last looked, so a refresh costs the
    same on hour three of a run as in its first minute, and twenty viewers cost one read.
    """
    return MetricsReader(run_path)


def epoch_trace(epochs, metric: str, part: str):
    """One part's per-epoch values (train or validation), in its own colour, marker and dash."""
    style = CURVE_STYLES[part]
    column = metric if part == "train" else f"val_{metric}"
    return go.Scatter(x=epochs["progress"], y=epochs[column], mode="lines+markers", name=f"{part} (epoch)",
                      line=dict(color=style["color"], width=3, dash=style["dash"]),
                      marker=dict(symbol=style["symbol"], size=8))


def curve_figure(batches, epochs, metric: str, title: str, boundary):
    """Per-batch training values as a thin line, per-epoch train and validation values as markers.

    Train and validation differ in colour, marker and dash (ui.CURVE_STYLES), not in colour alone.
    """
    figure = go.Figure()
    if not batches.empty and metric in batches:
        figure.add_trace(go.Scatter(x=batches["progress"], y=batches[metric], mode="lines", name="train (batches)",
                                    line=dict(color=CURVE_STYLES["train"]["color"], width=1), opacity=0.45))
    if not epochs.empty:
        figure.add_trace(epoch_trace(epochs, metric, "train"))
        figure.add_trace(epoch_trace(epochs, metric, "validation"))
    layout = dict(title=title, xaxis_title="epoch", yaxis_title=METRIC_NAMES[metric], height=340,
                  margin=dict(t=40, b=10),
                  legend=dict(orientation="h", y=-0.25), uirevision="keep")
    if boundary is not None:
        # A shape and a note in the layout draw what `add_vline` draws; `add_vline` (and
        # `update_yaxes`) walk every axis and cost ~10 ms a chart, paid on every refresh.
        layout["shapes"] = [dict(type="line", xref="x", x0=boundary, x1=boundary, yref="y domain", y0=0, y1=1,
                                 line=dict(dash="dash", color="grey"))]
        layout["annotations"] = [dict(xref="x", x=boundary, yref="y domain", y=1, text="fine-tuning starts",
                                      showarrow=False, xanchor="left", yanchor="top")]
    if metric == "accuracy":
        layout["yaxis"] = dict(title=METRIC_NAMES[metric], range=[0, 1.02], tickformat=".0%")
    figure.update_layout(**layout)
    return figure


def curve_table(epochs, metric: str):
    """The per-epoch values a curve draws, one row per epoch, for reading without the chart."""
    if epochs.empty:
        return pd.DataFrame(columns=["epoch", f"train {metric}", f"validation {metric}"])
    return pd.DataFrame({"epoch": epochs["epoch"], f"train {metric}": epochs[metric].round(4),
                         f"validation {metric}": epochs[f"val_{metric}"].round(4)})


def curves(batches, epochs, boundary) -> None:
    """Loss and accuracy side by side, each with a description and its numbers as a table."""
    left, right = st.columns(2)
    for column, metric, title in ((left, "loss", "Loss (lower is better)"), (right, "accuracy", "Accuracy")):
        # The same words on every refresh: Streamlit draws a chart anew when its description changes.
        alt = f"{title}: training and validation {metric} per epoch; the numbers are in the table below."
        chart_with_table(curve_figure(batches, epochs, metric, title, boundary), f"{metric}_chart", alt,
                         curve_table(epochs, metric), container=column)


def controls(run: RunStatus) -> None:
    """Stop, Resume and Kill, for the run's owner or an admin (the engine checks again)."""
    user = current_user()
    note = permission_note(user, run)
    state = run.state
    left, middle, right = st.columns(3)
    try:
        if left.button("Stop", disabled=bool(note) or state not in (State.RUNNING, State.QUEUED), key="stop",
                       help="Finish the current batch, save the model and evaluate it."):
            jobs.stop(run.run_id, runs_root(), user=user, source="page")
        if middle.button("Resume", disabled=bool(note) or state not in (State.STOPPED, State.FAILED), key="resume",
                         help="Continue from the last completed epoch."):
            jobs.resume(run.run_id, runs_root(), user=user, source="page", limits=access_limits())
        if right.button("Kill", disabled=bool(note) or state is not State.RUNNING, key="kill",
                        help="End the worker at once, if Stop does not respond."):
            jobs.kill(run.run_id, runs_root(), user=user, source="page")
    except (PermissionError, ValueError, RuntimeError) as error:  # RuntimeError: a Ray cluster's answer
        st.error(str(error))
    if note:
        st.caption(note)
    st.caption(f"Executes {recorded_executor(run.path).describe()}.")


STATE_LINES = {State.RUNNING: st.info, State.QUEUED: st.info, State.FINISHED: st.success,
               State.STOPPED: st.warning, State.FAILED: st.error}


@st.fragment(run_every=REFRESH_SECONDS)
def live_view(run_path: str) -> None:
    """Redrawn every REFRESH_SECONDS from the run folder alone, so a reload simply reattaches."""
    # The one place this page decides liveness: a run whose worker died is recorded as failed.
    run = jobs.reconcile(run_path)
    seen = (run.run_id, run.state)
    if st.session_state.get("monitor_seen") not in (None, seen):
        # The state changed: rerun the whole page, so the controls above follow it.
        st.session_state["monitor_seen"] = seen
        st.rerun()
    st.session_state["monitor_seen"] = seen
    STATE_LINES.get(run.state, st.info)(f"**{run.state.value.upper()}** — {run.message}")
    st.caption(f"Owner: {escape_markdown(owner_label(run))}")
    batches, epochs = metrics_reader(str(run_path)).frames()
    epoch, total = run.epoch or 0, run.epochs or 0
    running = run.state is State.RUNNING
    step_fraction = 0.0
    if not batches.empty and running:
        last = batches.iloc[-1]
        step_fraction = float(last["step"]) / float(last["steps"]) if last["epoch"] == epoch else 0.0
    done = ((epoch - 1 + step_fraction) / total) if total and running else (1.0 if run.state is State.FINISHED else 0.0)
    st.progress(min(max(done, 0.0), 1.0))
    first, second, third, fourth = st.columns(4)
    first.metric("Epoch", f"{epoch or '–'} / {total or '–'}",
                 help="An epoch is one pass over all the training images: the one under way, of how many.")
    eta = run.eta_seconds
    second.metric("Time left", "–" if eta is None or not running else f"{eta:.0f} s",
                  help="Estimated from the speed of the batches so far.")
    speed = None if batches.empty else batches.iloc[-1].get("images_per_second")
    third.metric("Images / second", "–" if speed is None else f"{speed:.0f}",
                 help="Training images processed per second in the latest batch.")
    best = run.best_val_accuracy
    fourth.metric("Best validation accuracy", "–" if best is None else f"{best:.1%}",
                  help="Share of held-out images classified correctly, best epoch so far.")
    boundary = phase_two_start(epochs)
    curves(batches, epochs, boundary)
    with st.expander("Worker log (last lines)"):
        st.code(jobs.logs(run_path) or "(empty)", language=None)


def data_findings(run_path: str) -> None:
    """Leakage and duplicates the doctor found in this run's split: a warning when accuracy may be optimistic."""
    findings = interpret.data_findings(run_path)
    if not findings["checked"]:
        return
    if not findings["num_leaks"]:
        st.caption(findings["sentence"])
        return
    st.warning(findings["sentence"], icon=":material/content_copy:")
    with st.expander(f"The {findings['num_leaks']} leaked picture(s), side by side"):
        for pair in findings["leakage"][:12]:
            left, right = st.columns(2)
            for column, path, split, label in zip((left, right), pair["paths"], pair["splits"], pair["labels"]):
                try:
                    name = printable(Path(path).name)
                    column.image(thumbnail(path, 160), caption=f"{split} · {label} · {name}",
                                 alt=image_alt(name, true=label) + f", in the {split} images")
                except OSError:
                    column.caption(f"{printable(path)} is no longer readable.")


def compare(runs: list[RunStatus], current: RunStatus) -> None:
    others = st.multiselect("Overlay other runs (validation accuracy per epoch)",
                            [run.run_id for run in runs if run.run_id != current.run_id])
    if not others:
        return
    figure = go.Figure()
    rows = []
    for number, run_id in enumerate([current.run_id] + others):
        _, epochs = metrics_reader(str(runs_root() / run_id)).frames()
        if not epochs.empty:
            # A marker shape per run as well as a colour, so runs are told apart without colour.
            figure.add_trace(go.Scatter(x=epochs["epoch"], y=epochs["val_accuracy"], mode="lines+markers", name=run_id,
                                        marker=dict(symbol=OVERLAY_MARKERS[number % len(OVERLAY_MARKERS)], size=8)))
            rows += [{"run": run_id, "epoch": epoch, "validation accuracy": round(value, 4)}
                     for epoch, value in zip(epochs["epoch"], epochs["val_accuracy"])]
    figure.update_layout(title="Validation accuracy per epoch", xaxis_title="epoch",
                         yaxis_title="validation accuracy (share correct)", yaxis_tickformat=".0%", height=340,
                         margin=dict(t=40, b=10))
    chart_with_table(figure, "compare_chart", f"Validation accuracy per epoch of {len(others) + 1} runs.",
                     pd.DataFrame(rows))


user = page_user()  # first: nothing of this page is drawn for a visitor who is not signed in
keyboard_focus_styles()
st.title("Monitor")
runs = all_runs()
if not runs:
    st.info("No runs yet. Start one on the Train page.")
    st.page_link("app_pages/train.py", label="Go to Train", icon=":material/model_training:")
    st.stop()
current = pick_run(runs, key="monitor_run", show_state=False)  # the live view below shows the state
# Outside the live view: a click is never lost to the fragment redrawing itself every 1.5 s.
controls(jobs.reconcile(current.path))
live_view(current.path)
data_findings(str(current.path))
compare(runs, current)
