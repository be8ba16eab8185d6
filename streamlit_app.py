"""Transfer Studio's entry point: it only routes to the pages."""

import streamlit as st

st.set_page_config(page_title="Transfer Studio", page_icon="🧠", layout="wide")

navigation = st.navigation([
    st.Page("pages/home.py", title="Home", icon="🏠", default=True),
])
navigation.run()
