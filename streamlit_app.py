"""Transfer Studio's entry point: it only routes to the pages (after sign-in, when it is on)."""

import streamlit as st

import signin

st.set_page_config(page_title="Transfer Studio", page_icon=":material/neurology:", layout="wide")

pages = [
    st.Page("app_pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("app_pages/data.py", title="Data", icon=":material/folder_open:"),
    st.Page("app_pages/train.py", title="Train", icon=":material/model_training:"),
    st.Page("app_pages/monitor.py", title="Monitor", icon=":material/monitoring:"),
    st.Page("app_pages/evaluate.py", title="Evaluate", icon=":material/grid_on:"),
    st.Page("app_pages/compare.py", title="Compare", icon=":material/compare:"),
    st.Page("app_pages/sweeps.py", title="Sweeps", icon=":material/leaderboard:"),
    st.Page("app_pages/predict.py", title="Predict", icon=":material/image_search:"),
    st.Page("app_pages/demo.py", title="Demo", icon=":material/co_present:"),
    st.Page("app_pages/export.py", title="Export", icon=":material/ios_share:"),
]
# Without `[auth]` in the secrets (local mode) every page; with it, only a sign-in screen
# until the visitor has signed in (signin.py).
st.navigation(signin.gate(pages)).run()
