"""Home: what Transfer Studio does, the runs so far with their owners, and the next step.

The runs can be searched, filtered (owner, dataset, backbone, state, tag) and sorted. Below
them: naming, describing, tagging and deleting a run (its owner or an admin), the trash, and for
admins the queue and the audit log. Every change goes through `engine.jobs`, which checks
the user again, so a button shown by mistake still cannot change another person's run.
"""

import pandas as pd
import streamlit as st

from engine import audit, jobs
from engine.run_details import SORT_ORDERS, describe, filter_runs, sort_runs
from engine.status import State
from engine.users import Role
from signin import escape_markdown, page_user
from ui import access_limits, all_runs, keyboard_focus_styles, owner_label, permission_note, pick_run, runs_root

ENDED = (State.FINISHED, State.STOPPED, State.FAILED, State.UNKNOWN)


def find_runs(runs) -> list:
    """Filters (owner, dataset, backbone, state, tag, words) and an order, applied by the engine."""
    def choices(values) -> list:
        return [""] + sorted({value for value in values if value})

    words, order = st.columns([3, 1])
    text = words.text_input("Search", key="runs_search", placeholder="words from a name, description, tag, dataset…")
    order = order.selectbox("Order", SORT_ORDERS, key="runs_order")
    columns = st.columns(5)
    filters = {
        "owner": columns[0].selectbox("Owner", choices(owner_label(run) for run in runs), key="runs_owner"),
        "dataset": columns[1].selectbox("Dataset", choices(run.dataset for run in runs), key="runs_dataset"),
        "backbone": columns[2].selectbox("Backbone", choices(run.backbone for run in runs), key="runs_backbone"),
        "state": columns[3].selectbox("State", choices(run.state.value for run in runs), key="runs_state"),
        "tag": columns[4].selectbox("Tag", choices(tag for run in runs for tag in run.tags), key="runs_tag"),
    }
    return sort_runs(filter_runs(runs, text=text, **filters), order)


def runs_table(runs) -> None:
    table = pd.DataFrame([
        {
            "Name": run.name or run.run_id,
            # The id near the front: the grid only lays out the columns in view, and ids are what links use.
            "Run": run.run_id,
            "Tags": ", ".join(run.tags),
            "Owner": owner_label(run),
            "State": run.state.value,
            "Backbone": run.backbone,
            "Dataset": run.dataset,
            "Best validation accuracy": run.best_val_accuracy,
            "Started": run.created,
            "Description": run.description,
        }
        for run in runs
    ])
    st.dataframe(
        table,
        hide_index=True,
        key="runs_table",
        column_config={
            "Best validation accuracy": st.column_config.ProgressColumn(
                "Best validation accuracy", min_value=0.0, max_value=1.0, format="percent",
                help="The highest share of held-out images classified correctly after any epoch.",
            )
        },
    )


def manage_a_run(runs, user) -> None:
    """Name, describe, tag or delete one run: its owner or an admin (the engine checks again)."""
    with st.expander("Name, describe, tag or delete a run"):
        run = pick_run(runs, key="manage_run", label="Run")
        note = permission_note(user, run)
        if note:
            st.caption(note)
        # Keyed per run, so choosing another run shows its own texts.
        name = st.text_input("Name", value=run.name, key=f"manage_name_{run.run_id}", disabled=bool(note))
        description = st.text_area("Description", value=run.description, key=f"manage_description_{run.run_id}",
                                   disabled=bool(note), placeholder="What you tried, and why")
        tags = st.text_input("Tags (separated by commas)", value=", ".join(run.tags), key=f"manage_tags_{run.run_id}",
                             disabled=bool(note), placeholder="baseline, augmentation")
        left, right = st.columns(2)
        if left.button("Save", disabled=bool(note), key="save_details"):
            act(lambda: describe(run.run_id, runs_root(), user=user, name=name, description=description,
                                 tags=tags.split(","), source="page"), "Saved.")
        if right.button("Move to the trash", disabled=bool(note) or run.state not in ENDED, key="delete",
                        help="Nothing is removed: the run can be restored from the trash below. "
                             "A queued or running run must be stopped first."):
            act(lambda: jobs.delete(run.run_id, runs_root(), user=user, source="page"), "Moved to the trash.")


def trash_section(user) -> None:
    deleted = jobs.trash(runs_root())
    if not deleted:
        return
    with st.expander(f"Trash ({len(deleted)})"):
        for run in deleted:
            left, right = st.columns([4, 1])
            left.write(f"{run.run_id} · {run.state.value} · {escape_markdown(owner_label(run))}")
            if right.button("Restore", key=f"restore-{run.run_id}", disabled=not user.can_control(run.owner)):
                act(lambda run_id=run.run_id: jobs.restore(run_id, runs_root(), user=user, source="page"),
                    "Restored.")


def administration(runs, user) -> None:
    """For admins: how many runs train at once, the queue's order, and the audit log."""
    with st.expander("Administration: queue and audit log"):
        count = st.number_input("Runs that may train at once", min_value=1, max_value=64, step=1,
                                value=jobs.max_concurrent(runs_root()), key="max_concurrent",
                                help="On a CPU machine one run at a time is usually fastest overall.")
        if st.button("Apply", key="apply_max_concurrent"):
            act(lambda: jobs.set_max_concurrent(int(count), runs_root(), user=user, source="page"), "Applied.")
        queued = [run for run in runs if run.state is State.QUEUED]
        st.markdown(f"**Queue** ({len(queued)} waiting; runs start in turn across people)")
        for run in queued:
            left, middle, right = st.columns([4, 1, 1])
            left.write(f"{run.run_id} · {escape_markdown(owner_label(run))}")
            if middle.button("To the front", key=f"front-{run.run_id}"):
                act(lambda run_id=run.run_id: jobs.move_to_front(run_id, runs_root(), user=user, source="page"),
                    "Moved to the front.")
            if right.button("Cancel", key=f"cancel-{run.run_id}"):
                act(lambda run_id=run.run_id: jobs.stop(run_id, runs_root(), user=user, source="page"), "Cancelled.")
        entries = audit.read(runs_root())
        st.markdown(f"**Audit log** ({len(entries)} entries, newest first)")
        if entries:
            st.dataframe(pd.DataFrame(reversed(entries[-500:])), hide_index=True, key="audit_log")


def act(change, done: str) -> None:
    """Runs one change through the engine, saying what happened or why it was refused."""
    try:
        change()
    except (PermissionError, ValueError) as error:
        st.error(str(error))
        return
    st.toast(done)
    st.rerun()


user = page_user()  # first: nothing of this page is drawn for a visitor who is not signed in
keyboard_focus_styles()
st.title("Transfer Studio")
st.markdown(
    "Build an image classifier from folders of labelled pictures by **transfer learning**: "
    "a network already trained on millions of photos is reused, and only a small new part "
    "learns your classes. Train it, watch it learn, and see exactly which pictures it confuses."
)

access_limits()  # a malformed access setting in secrets.toml is reported here, on the first page
runs = all_runs()
first, second, third = st.columns(3)
first.page_link("app_pages/data.py", label="1. Choose your images", icon=":material/folder_open:")
second.page_link("app_pages/train.py", label="2. Train a classifier", icon=":material/model_training:")
third.page_link("app_pages/monitor.py", label="3. Watch it learn", icon=":material/monitoring:")

st.subheader("Runs")
if not runs:
    st.info(
        "No runs yet. Start with **1. Choose your images**: the built-in *digits* sample trains in a "
        f"minute. Runs are kept in `{runs_root()}`."
    )
else:
    found = find_runs(runs)
    if found:
        runs_table(found)
    else:
        st.caption(f"No run matches these filters (of {len(runs)}).")
    left, right = st.columns(2)
    left.page_link("app_pages/evaluate.py", label="Explore a finished run's mistakes", icon=":material/grid_on:")
    right.page_link("app_pages/predict.py", label="Try a model on new images", icon=":material/image_search:")
    manage_a_run(runs, user)
trash_section(user)
if user.role is Role.ADMIN:
    administration(runs, user)
