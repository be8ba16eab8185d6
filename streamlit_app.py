"""Transfer Studio's entry point: it only routes to the pages."""

import streamlit as st

st.set_page_config(page_title="Transfer Studio", page_icon=":material/neurology:", layout="wide")

navigation = st.navigation([
    st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("pages/data.py", title="Data", icon=":material/folder_open:"),
    st.Page("pages/train.py", title="Train", icon=":material/model_training:"),
    st.Page("pages/monitor.py", title="Monitor", icon=":material/monitoring:"),
    st.Page("pages/evaluate.py", title="Evaluate", icon=":material/grid_on:"),
    st.Page("pages/predict.py", title="Predict", icon=":material/image_search:"),
])
navigation.run()
