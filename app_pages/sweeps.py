"""Sweeps: the leaderboard of a group of runs that differ in named settings, and the run to use.

Ranked on validation accuracy; only the chosen run's test accuracy is shown, with the reason. The engine
(`engine.sweeps`) computes the table; this page draws it.
"""

import streamlit as st

from engine.latency import measure_latency
from engine.sweeps import leaderboard, list_sweeps
from signin import escape_markdown, page_user
from ui import keyboard_focus_styles, runs_root

user = page_user()  # first: nothing of this page is drawn for a visitor who is not signed in
keyboard_focus_styles()
st.title("Sweeps")
sweeps = list_sweeps(runs_root())
if not sweeps:
    st.info("No sweeps yet. Start one from the Train page (\"Sweep\") or with "
            "`python -m engine sweep --data DIR --grid model.backbone=A,B --grid training.learning_rate=1e-3,3e-3`.")
    st.stop()
by_id = {sweep["id"]: sweep for sweep in sweeps}
wanted = st.query_params.get("sweep")
chosen_id = st.selectbox("Sweep", list(by_id), index=list(by_id).index(wanted) if wanted in by_id else 0,
                         format_func=lambda sweep_id: f"{by_id[sweep_id]['name']} · {len(by_id[sweep_id]['runs'])} runs",
                         key="sweep_choice")
st.query_params["sweep"] = chosen_id
sweep = by_id[chosen_id]
st.caption("Varied: " + " · ".join(f"`{name}` ∈ {{{', '.join(map(str, values))}}}"
                                   for name, values in sweep["grid"].items()))

table, chosen = leaderboard(sweep, runs_root())
st.dataframe(table, hide_index=True, key="leaderboard",
             column_config={
                 "validation accuracy": st.column_config.NumberColumn(
                     format="percent", help="Share of validation images classified correctly; the ranking's measure."),
                 "training seconds": st.column_config.NumberColumn(format="%.0f", help="Time from start to finish."),
                 "model MB": st.column_config.NumberColumn(format="%.2f", help="The model file's size in megabytes."),
                 "latency ms (1 image)": st.column_config.NumberColumn(
                     format="%.1f", help="Milliseconds to classify one image on this machine (latency).")})
unfinished = int((table["state"] != "finished").sum()) if not table.empty else 0
if unfinished:
    st.caption(f"{unfinished} run(s) not finished yet; the table fills in as they end.")
if chosen:
    test = chosen["test_accuracy"]
    test_text = f"{test:.1%} on {chosen['test_images']} test images" if test is not None else "no test images"
    st.success(f"Best on validation: **{escape_markdown(chosen['name'] or chosen['run_id'])}** "
               f"({chosen['validation_accuracy']:.1%}); "
               f"its test accuracy: **{test_text}**.")
    st.caption(chosen["why"])
    left, middle, right = st.columns(3)
    left.page_link("app_pages/evaluate.py", label="Use this one: open it in Evaluate", icon=":material/grid_on:",
                   query_params={"run": chosen["run_id"]})
    if len(table) > 1:
        middle.page_link("app_pages/compare.py", label="Compare the top two", icon=":material/compare:",
                         query_params={"compare": list(table["run_id"].head(2))})
    missing = [run_id for run_id, latency in zip(table["run_id"], table["latency ms (1 image)"])
               if latency != latency or latency is None]  # NaN or None: not measured yet
    finished = set(table.loc[table["state"] == "finished", "run_id"])
    owners = dict(zip(table["run_id"], table["owner"]))
    # Measuring writes latency.json into the run folder: only runs this user may change (the engine checks too).
    to_measure = [run_id for run_id in missing if run_id in finished and user.can_control(owners[run_id])]
    if to_measure and right.button(f"Measure latency ({len(to_measure)} runs)", key="measure_latency"):
        with st.spinner("Timing each model on one image…"):
            for run_id in to_measure:
                measure_latency(runs_root() / run_id, user=user)
        st.rerun()
