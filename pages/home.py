"""Home: what Transfer Studio does, the runs so far, and the next step."""

import pandas as pd
import streamlit as st

from ui import all_runs, runs_root

st.title("Transfer Studio")
st.markdown(
    "Build an image classifier from folders of labelled pictures by **transfer learning**: "
    "a network already trained on millions of photos is reused, and only a small new part "
    "learns your classes. Train it, watch it learn, and see exactly which pictures it confuses."
)

runs = all_runs()
first, second, third = st.columns(3)
first.page_link("pages/data.py", label="1. Choose your images", icon=":material/folder_open:")
second.page_link("pages/train.py", label="2. Train a classifier", icon=":material/model_training:")
third.page_link("pages/monitor.py", label="3. Watch it learn", icon=":material/monitoring:")

st.subheader("Runs")
if not runs:
    st.info(
        "No runs yet. Start with **1. Choose your images**: the built-in *digits* sample trains in a "
        f"minute. Runs are kept in `{runs_root()}`."
    )
else:
    table = pd.DataFrame([
        {
            "Run": run.run_id,
            "State": run.state.value,
            "Backbone": run.backbone,
            "Dataset": run.dataset,
            "Best validation accuracy": run.best_val_accuracy,
            "Started": run.created,
        }
        for run in runs
    ])
    st.dataframe(
        table,
        hide_index=True,
        column_config={
            "Best validation accuracy": st.column_config.ProgressColumn(
                "Best validation accuracy", min_value=0.0, max_value=1.0, format="percent",
                help="The highest share of held-out images classified correctly after any epoch.",
            )
        },
    )
    left, right = st.columns(2)
    left.page_link("pages/evaluate.py", label="Explore a finished run's mistakes", icon=":material/grid_on:")
    right.page_link("pages/predict.py", label="Try a model on new images", icon=":material/image_search:")
