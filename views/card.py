"""The model card on Evaluate: what the model is for (its owner writes it) and the card to download."""

from pathlib import Path

import streamlit as st

from engine import runfiles
from engine.users import User


@st.cache_data(max_entries=16, show_spinner="Writing the model card…")
def _card_files(run_path: str, signature: tuple) -> dict:
    """The card in its three formats, rebuilt when any file it is made from changes."""
    import json

    from engine.model_card import card_facts, card_html, card_markdown

    # Made in memory: a page only reads run folders (`python -m engine card` writes the files).
    facts = card_facts(run_path)
    return {"html": card_html(facts).encode("utf-8"), "markdown": card_markdown(facts).encode("utf-8"),
            "json": json.dumps(facts, indent=2, ensure_ascii=False).encode("utf-8")}


def _signature(run_path: str) -> tuple:
    folder = Path(run_path)
    names = ("config.json", "status.json", "evaluation.json", "data_report.json", "predictions.csv",
             "metrics.jsonl", runfiles.DECISION_FILE, "card.json")
    exports = sorted(str(path.stat().st_mtime) for path in folder.glob("exports/*/*"))
    return tuple((folder / name).stat().st_mtime if (folder / name).exists() else 0 for name in names) + tuple(exports)


def card_section(run_path: str, run_id: str, can_edit: bool, user: User) -> None:
    """The intended-use field (owner or admin) and download buttons for HTML, Markdown and JSON."""
    from engine.model_card import MAX_INTENDED_USE_CHARACTERS, intended_use, set_intended_use
    from signin import escape_markdown

    st.subheader("Model card")
    st.caption("One page in plain words for people who will use this model: what it is for, the data, how good it "
               "is per class, how sure it is, its weak spots.")
    current = intended_use(run_path)
    if can_edit:
        # Keys per run: a field left from another run must never be saved onto this one.
        with st.form(key=f"intended_use_form_{run_id}"):
            text = st.text_area("What is this model for?", current, key=f"intended_use_{run_id}",
                                max_chars=MAX_INTENDED_USE_CHARACTERS,
                                placeholder="e.g. Sorting our own photos of cats and dogs; not for medical or "
                                            "safety decisions.")
            if st.form_submit_button("Save"):
                try:
                    set_intended_use(run_path, text, user, source="page")
                    st.toast("Saved on the model card.")
                except (PermissionError, ValueError) as error:
                    st.error(str(error))
    elif current:
        st.markdown(f"**What it is for:** {escape_markdown(current)}")
    files = _card_files(run_path, _signature(run_path))
    columns = st.columns(3)
    for column, (kind, label, extension, mime) in zip(columns, (
            ("html", "Model card (HTML, printable)", "html", "text/html"),
            ("markdown", "Markdown", "md", "text/markdown"),
            ("json", "The facts (JSON)", "json", "application/json"))):
        column.download_button(label, files[kind], file_name=f"model_card_{run_id}.{extension}", mime=mime,
                               key=f"card_{kind}")
