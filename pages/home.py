"""Home: what Transfer Studio does, and the runs so far (read from the run folders)."""

import pandas as pd
import streamlit as st

from engine.runs import default_runs_dir, list_runs

st.title("Transfer Studio")
st.markdown(
    "Build an image classifier from a folder of labelled pictures by **transfer learning**: "
    "a network already trained on millions of photos is reused, and only a small new part "
    "learns your classes. Train it, watch it learn, and see which pictures it confuses."
)

runs = list_runs()
st.subheader("Runs")
if not runs:
    st.info(
        "No runs yet. Start one from a terminal, for example: "
        "`python -m engine train --data path/to/folder_of_class_folders`. "
        f"Runs are kept in `{default_runs_dir()}`."
    )
else:
    table = pd.DataFrame([
        {
            "Run": run["run_id"],
            "State": run["state"],
            "Backbone": run["backbone"],
            "Dataset": run["dataset"],
            "Best validation accuracy": run["best_val_accuracy"],
            "Started": run["created"],
        }
        for run in runs
    ])
    st.dataframe(
        table,
        hide_index=True,
        column_config={
            "Best validation accuracy": st.column_config.ProgressColumn(
                "Best validation accuracy", min_value=0.0, max_value=1.0, format="%.3f",
                help="The highest share of validation images classified correctly at the end of any epoch.",
            )
        },
    )
