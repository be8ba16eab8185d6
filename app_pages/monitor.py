"""Monitor: live curves, progress, Stop/Resume, the worker's log; polls the run folder, never trains."""

from pathlib import Path

import plotly.graph_objects as go
import streamlit as st

from engine import interpret, jobs
from engine.executors import recorded_executor
from engine.images import printable
from engine.interpret import phase_two_start
from engine.metrics_reader import MetricsReader
from engine.status import RunStatus, State
from signin import current_user, escape_markdown, page_user
from ui import access_limits, all_runs, owner_label, permission_note, pick_run, runs_root, thumbnail

REFRESH_SECONDS = 1.5
COLOURS = {"train": "#1f77b4", "validation": "#ff7f0e"}


@st.cache_resource(max_entries=64, show_spinner=False)
def metrics_reader(run_path: str) -> MetricsReader:
    """The one reader of a run's metrics, shared by every viewer of that run.

    It reads only what the run appended since any viewer last looked, so a refresh costs the
    same on hour three of a run as in its first minute, and twenty viewers cost one read.
    """
    return MetricsReader(run_path)


def curve_figure(batches, epochs, metric: str, title: str, boundary):
    """Per-batch training values as a thin line, per-epoch train and validation values as markers."""
    figure = go.Figure()
    if not batches.empty and metric in batches:
        figure.add_trace(go.Scatter(x=batches["progress"], y=batches[metric], mode="lines", name="train (batches)",
                                    line=dict(color=COLOURS["train"], width=1), opacity=0.45))
    if not epochs.empty:
        figure.add_trace(go.Scatter(x=epochs["progress"], y=epochs[metric], mode="lines+markers",
                                    name="train (epoch)", line=dict(color=COLOURS["train"], width=3)))
        figure.add_trace(go.Scatter(x=epochs["progress"], y=epochs[f"val_{metric}"], mode="lines+markers",
                                    name="validation (epoch)", line=dict(color=COLOURS["validation"], width=3)))
    layout = dict(title=title, xaxis_title="epoch", height=340, margin=dict(t=40, b=10),
                  legend=dict(orientation="h", y=-0.25), uirevision="keep")
    if boundary is not None:
        # A shape and a note in the layout draw what `add_vline` draws; `add_vline` (and
        # `update_yaxes`) walk every axis and cost ~10 ms a chart, paid on every refresh.
        layout["shapes"] = [dict(type="line", xref="x", x0=boundary, x1=boundary, yref="y domain", y0=0, y1=1,
                                 line=dict(dash="dash", color="grey"))]
        layout["annotations"] = [dict(xref="x", x=boundary, yref="y domain", y=1, text="fine-tuning starts",
                                      showarrow=False, xanchor="left", yanchor="top")]
    if metric == "accuracy":
        layout["yaxis"] = dict(range=[0, 1.02], tickformat=".0%")
    figure.update_layout(**layout)
    return figure


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
    first.metric("Epoch", f"{epoch or '–'} / {total or '–'}")
    eta = run.eta_seconds
    second.metric("Time left", "–" if eta is None or not running else f"{eta:.0f} s",
                  help="Estimated from the speed of the batches so far.")
    speed = None if batches.empty else batches.iloc[-1].get("images_per_second")
    third.metric("Images / second", "–" if speed is None else f"{speed:.0f}")
    best = run.best_val_accuracy
    fourth.metric("Best validation accuracy", "–" if best is None else f"{best:.1%}",
                  help="Share of held-out images classified correctly, best epoch so far.")
    boundary = phase_two_start(epochs)
    left, right = st.columns(2)
    left.plotly_chart(curve_figure(batches, epochs, "loss", "Loss (lower is better)", boundary), key="loss_chart")
    right.plotly_chart(curve_figure(batches, epochs, "accuracy", "Accuracy", boundary), key="accuracy_chart")
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
                    column.image(thumbnail(path, 160), caption=f"{split} · {label} · {printable(Path(path).name)}")
                except OSError:
                    column.caption(f"{printable(path)} is no longer readable.")


def compare(runs: list[RunStatus], current: RunStatus) -> None:
    others = st.multiselect("Overlay other runs (validation accuracy per epoch)",
                            [run.run_id for run in runs if run.run_id != current.run_id])
    if not others:
        return
    figure = go.Figure()
    for run_id in [current.run_id] + others:
        _, epochs = metrics_reader(str(runs_root() / run_id)).frames()
        if not epochs.empty:
            figure.add_trace(go.Scatter(x=epochs["epoch"], y=epochs["val_accuracy"], mode="lines+markers", name=run_id))
    figure.update_layout(xaxis_title="epoch", yaxis_tickformat=".0%", height=340, margin=dict(t=20, b=10))
    st.plotly_chart(figure, key="compare_chart")


user = page_user()  # first: nothing of this page is drawn for a visitor who is not signed in
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
