"""Small helpers shared by the dashboard pages (Streamlit only; all real work is in `engine`)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st
from PIL import Image

from engine import jobs
from signin import escape_markdown, read_secrets
from engine.runs import RunListing, default_runs_dir
from engine.status import RunStatus
from engine.users import AccessSettings, Role, User, access_settings


def secret_data_roots() -> list[str]:
    """Extra data roots from `.streamlit/secrets.toml` (`data_roots = ["/srv/images"]`), if any."""
    roots = read_secrets().get("data_roots", [])
    return [str(root) for root in roots] if isinstance(roots, (list, tuple)) else [str(roots)]


def access_limits() -> AccessSettings | None:
    """The server's per-user limits and role lists from `.streamlit/secrets.toml`; None in local mode.

    None, not empty limits: a dashboard in local mode on the same runs folder must not reset a
    team server's limits. A setting of the wrong type is not hidden: `access_settings` names it,
    and an unreadable file is `signin.read_secrets`'s error, as it is for sign-in.
    """
    secrets = read_secrets()
    return access_settings(secrets) if secrets else None


def owner_label(run: RunStatus) -> str:
    """Who owns a run, for lists: their name, or a note for runs from before owners were kept."""
    return run.owner_name or run.owner or "(no owner)"


def run_label(run: RunStatus, show_state: bool = True) -> str:
    """How a run is named in pickers: its name or id, state, best accuracy and owner."""
    best = run.best_val_accuracy
    best_text = f" · best {best:.1%}" if best is not None and show_state else ""
    title = f"{run.name} ({run.run_id})" if run.name else run.run_id
    if show_state:
        return f"{title} · {run.state.value}{best_text} · {owner_label(run)}"
    return f"{title} · {run.backbone} · {owner_label(run)}"


def short_name(run: RunStatus) -> str:
    """A run's name, or for an unnamed run its backbone and start time ("MobileNet · 11-30 15:04")."""
    if run.name:
        return run.name
    stamp = run.run_id[:13]  # YYYYMMDD-HHMM of the id
    if len(stamp) == 13 and stamp[8] == "-":
        return f"{run.backbone} · {stamp[4:6]}-{stamp[6:8]} {stamp[9:11]}:{stamp[11:13]}"
    return run.run_id


def permission_note(user: User, run: RunStatus) -> str:
    """Why the run's controls are off for this user, or "" when they may control it."""
    if user.can_control(run.owner):
        return ""
    if user.role is Role.VIEWER:
        return "You are signed in as a viewer: you can look, not change runs."
    return (f"This run belongs to {escape_markdown(owner_label(run))}: only they or an admin can stop, "
            "resume, rename or delete it.")


def pick_run(runs: list[RunStatus], key: str, label: str = "Run", preferred: str | None = None,
             show_state: bool = True) -> RunStatus | None:
    """A run selectbox that remembers its choice in the address (`?run=`), so a reload reattaches.

    `show_state=False` leaves the state out of the labels, for pages that show it live elsewhere.
    """
    if not runs:
        return None
    ids = [run.run_id for run in runs]
    wanted = st.query_params.get("run") or preferred or st.session_state.get("current_run")
    index = ids.index(wanted) if wanted in ids else 0
    chosen_id = st.selectbox(label, ids, index=index, key=key,
                             format_func=lambda run_id: run_label(runs[ids.index(run_id)], show_state))
    st.query_params["run"] = chosen_id
    st.session_state["current_run"] = chosen_id
    return runs[ids.index(chosen_id)]


def runs_root() -> Path:
    """The runs folder the dashboard reads."""
    return default_runs_dir()


@st.cache_resource(max_entries=8, show_spinner=False)
def _run_listing(root: str) -> RunListing:
    # One listing per runs root, shared by every session: it holds frozen statuses only and
    # re-reads just the status files that changed (engine.runs.RunListing).
    return RunListing(root)


def all_runs() -> list[RunStatus]:
    """Every run, newest first; a status file is read again only when it changed.

    A run that reads `running` but has gone silent is reconciled (its processes may have died
    with nobody left to say so), so no list shows a dead run as running.
    """
    listing = _run_listing(str(runs_root()))
    runs = listing.runs()
    if jobs.reconcile_stale(runs, runs_root()):
        runs = listing.runs()
    return list(runs)


def runs_having(file_name: str) -> list[RunStatus]:
    """The runs whose folder holds `file_name` (e.g. evaluation.json, model.keras), newest first."""
    return [run for run in all_runs() if (Path(run.path) / file_name).is_file()]


@st.cache_data(max_entries=2000)
def _cached_thumbnail(path: str, modified: float, size: int):
    from engine.images import load_rgb

    image = Image.fromarray(load_rgb(path))
    image.thumbnail((size, size))
    return image


def thumbnail(path: str, size: int = 160):
    """A small upright preview of an image file, so a grid sends kilobytes, not whole photos.

    Cached by path and modification time, so a changed file is read again.
    """
    return _cached_thumbnail(path, Path(path).stat().st_mtime, size)


# Okabe and Ito's colour-blind-safe palette ("Color Universal Design", 2008): its colours stay
# apart for protanopia, deuteranopia and tritanopia. Ordered so the first four keep 3:1 or more
# against both the light and the dark background (WCAG 1.4.11 for chart marks); the paler
# orange, sky blue and yellow come last. .streamlit/config.toml gives Plotly the same list.
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442"]
# Train and validation differ in colour (blue and vermillion), marker and dash, so neither
# colour vision nor a grey-scale print is needed to tell them apart.
CURVE_STYLES = {
    "train": {"color": PALETTE[0], "symbol": "circle", "dash": "solid"},
    "validation": {"color": PALETTE[1], "symbol": "diamond", "dash": "dash"},
}


def image_alt(file_name: str, true: str | None = None, predicted: str | None = None,
              confidence: float | None = None, overlay: bool = False) -> str:
    """What a picture shows, for screen readers: its file name, true class, the answer and how sure.

    >>> image_alt("cat_1.png", true="cats", predicted="dogs", confidence=0.72)
    'Picture cat_1.png, true class cats, predicted dogs with 72% confidence'
    """
    parts = [f"Picture {file_name}"]
    if true is not None:
        parts.append(f"true class {true}")
    if predicted is not None:
        sure = f" with {confidence:.0%} confidence" if confidence is not None else ""
        parts.append(f"predicted {predicted}{sure}")
    text = ", ".join(parts)
    # Grad-CAM colours are drawn over the picture: a reader should know the colours are not the photo's.
    return text + ("; the parts that counted most for the answer are drawn over it in warm colours" if overlay else "")


def chart_with_table(figure, key: str, alt: str, table, container=None, **chart_arguments):
    """A Plotly chart with a short description for screen readers and its numbers in an expander below.

    A chart is a picture; the table under "Show the numbers as a table" lets a screen-reader user
    (or anyone) read every value the chart draws.

    Args:
        figure: The Plotly figure, with its title and axis titles set.
        key: The chart's widget key; the table gets `<key>_table`.
        alt: What the chart shows, in one sentence.
        table: A DataFrame (or anything `st.dataframe` takes) of the plotted values.
        container: Where to draw (a column); the page itself when None.
        **chart_arguments: Passed on to `st.plotly_chart` (e.g. `on_select`).

    Returns:
        What `st.plotly_chart` returns (the selection, with `on_select`).
    """
    where = container or st
    drawn = where.plotly_chart(figure, key=key, alt=alt, **chart_arguments)
    with where.expander("Show the numbers as a table"):
        st.dataframe(table, hide_index=True, key=f"{key}_table")
    return drawn


def keyboard_focus_styles() -> None:
    """A clear ring around whatever has the keyboard focus; call it at the top of every page.

    Streamlit marks a focused sidebar link only by a faint grey background, the same the current
    page's link already has, so a keyboard user cannot see where they are (WCAG 2.4.7). The ring
    is the theme's primary colour, 3.5:1 or more against both themes' backgrounds.
    """
    colour = st.get_option("theme.primaryColor") or "#1b6ec2"
    st.html(f"<style>a:focus-visible, button:focus-visible, summary:focus-visible, [role='tab']:focus-visible, "
            f"[tabindex]:focus-visible {{outline: 2px solid {colour} !important; outline-offset: 2px;}}</style>")
