"""Data: choose a dataset (sample, TensorFlow Datasets, server folder, zip upload) and see what the scan found.

Two sections work out more, only when opened and asked: which labels look wrong (a gallery with
a decision per image) and a map of the data (`views/labels.py`).

Reruns stay quick on a folder of 30,000 images: the folder's fingerprint is listed again only
when a folder in it changes or a minute has passed, the scan is one shared object per folder
version (not copied per rerun), the split's counts are cached, class counts come from the
cached scan, and the thumbnail grid shows one page at a time.
"""

import os
from pathlib import Path

import pandas as pd
import plotly.express as px
import streamlit as st

from engine.caches import budget_bytes, cache_size, describe_size
from engine.config import ConfigError, RunConfig, get_setting
from engine.data import DataError, dataset_fingerprint, make_split, scan_dataset, split_counts
from engine.doctor import check_dataset, finding_pairs
from engine.images import printable
from engine.ingest import extract_zip, list_dataset_folders, list_uploads, resolve_in_roots
from engine.label_decisions import decisions_stamp
from engine.locations import CACHE_BUDGET_VARIABLE, data_roots
from engine.samples import SAMPLES, SampleUnavailableError, ensure_sample
from engine.tfds_samples import TFDS_SUGGESTIONS, ensure_tfds_dataset
from signin import current_user, page_user
from ui import chart_with_table, image_alt, keyboard_focus_styles, secret_data_roots, thumbnail
from views.labels import show_data_map, show_label_issues

IMAGES_PER_PAGE = 12
# The split sliders write the Train form's own keys (`field.<dotted name>`), so the split
# chosen here is the split the Train page starts from.
SPLIT_SETTINGS = ("data.validation_fraction", "data.test_fraction")
# Pairs shown as thumbnails side by side in the data doctor; the tables list them all.
PAIRS_SHOWN = 3


# The folder's fingerprint (a listing and a stat of every file: 0.4 s at 30,000 images) is worked
# out again when a folder in it changes (a file added, removed or renamed) or after this long
# (a file rewritten in place, or a change deeper down).
FINGERPRINT_SECONDS = 60


def folder_signature(path: str) -> tuple:
    """The modification times of the folder and of the folders one and two levels down (split, class folders).

    A few dozen `stat`s, however many images: adding, removing or renaming a file changes the
    time of the folder it is in.
    """
    signature = []
    pending = [(path, 0)]
    while pending:
        folder, depth = pending.pop()
        try:
            signature.append((folder, os.stat(folder).st_mtime_ns))
            if depth < 2:
                with os.scandir(folder) as entries:
                    pending += [(entry.path, depth + 1) for entry in entries if entry.is_dir(follow_symlinks=False)]
        except OSError:
            signature.append((folder, None))
    return tuple(sorted(signature))


@st.cache_data(ttl=FINGERPRINT_SECONDS, max_entries=50, show_spinner=False)
def cached_fingerprint(path: str, signature: tuple) -> str:
    """The folder's fingerprint, listed again only when `signature` changes or after FINGERPRINT_SECONDS."""
    return dataset_fingerprint(path)


@st.cache_resource(show_spinner="Checking every image…", max_entries=8)
def cached_scan(path: str, fingerprint: str, decisions: str = ""):
    """The scan report and file table; cached by folder fingerprint (and the label decisions' stamp,
    since the scan applies them), so an unchanged folder is instant.

    A shared resource, not cached data: at 30,000 images the scan pickles to 4 MB, which
    `st.cache_data` would copy on every rerun; nothing here changes it.
    """
    scan = scan_dataset(path)
    files = pd.DataFrame([{"path": item.path, "label": item.label, "split": item.split or "",
                           "width": item.width, "height": item.height, "note": item.note} for item in scan.files])
    return scan, scan.report(), files


@st.cache_data(show_spinner="Looking for duplicates and leakage…", max_entries=20)
def cached_doctor(path: str, fingerprint: str, validation_fraction: float, test_fraction: float, _scan):
    """The data doctor's report; cached by folder fingerprint and split (the hashes are cached on disk too)."""
    return check_dataset(path, validation_fraction, test_fraction, scan=_scan)


@st.cache_data(max_entries=50, show_spinner=False)
def cached_split_counts(path: str, fingerprint: str, decisions: str, fractions: tuple, _scan) -> dict:
    """Images per split and class for these fractions (the split itself takes 0.2 s at 30,000 images)."""
    return split_counts(make_split(_scan, *fractions))


@st.cache_data(ttl=15, show_spinner=False)
def cached_cache_size() -> tuple[int, int]:
    """The cache root's size and budget in bytes (listed again at most every 15 s)."""
    used = cache_size()
    return used, budget_bytes(used=used)


def choose_dataset() -> str | None:
    """The dataset chooser; returns the chosen folder (remembered for the Train page)."""
    roots = data_roots(secret_data_roots())
    source = st.radio("Where are your images?",
                      ["Built-in sample", "TensorFlow Datasets", "Folder on the server", "Upload a zip"],
                      horizontal=True, key="data_source")
    if source == "Built-in sample":
        name = st.selectbox("Sample", list(SAMPLES), format_func=lambda key: f"{key} — {SAMPLES[key]}")
        if st.button("Use this sample", type="primary"):
            try:
                with st.spinner(f"Preparing the {name} sample…"):
                    st.session_state["dataset_path"] = str(ensure_sample(name).resolve())
            except SampleUnavailableError as error:
                st.error(str(error))
    elif source == "TensorFlow Datasets":
        choose_tfds_dataset()
    elif source == "Folder on the server":
        folders = [str(folder) for folder in list_dataset_folders(roots)]
        st.caption("Allowed folders: " + (", ".join(f"`{root}`" for root in roots) or "none configured"))
        picked = st.selectbox("Dataset folder", folders, index=None, placeholder="Pick a folder…")
        typed = st.text_input("…or type a path inside the allowed folders", key="typed_path")
        if st.button("Use this folder", type="primary"):
            try:
                st.session_state["dataset_path"] = str(resolve_in_roots(typed or picked or "", roots))
            except ValueError as error:
                st.error(str(error))
    else:
        upload = st.file_uploader("A .zip of class folders (one folder per class)", type=["zip"])
        if upload is not None and st.button("Unpack and use", type="primary"):
            try:
                st.session_state["dataset_path"] = str(extract_zip(upload, owner=current_user()))
            except (ValueError, PermissionError) as error:
                st.error(str(error))
        uploads = list_uploads()
        if uploads:
            # Each person's uploads are kept in a folder of their own; everyone can train on them.
            earlier = st.selectbox("…or use an earlier upload", uploads, index=None, key="earlier_upload",
                                   format_func=lambda upload: f"{upload.path.name} · {upload.owner_name or upload.owner}"
                                                              f" · {upload.uploaded}")
            if earlier is not None and st.button("Use this upload"):
                try:
                    st.session_state["dataset_path"] = str(resolve_in_roots(earlier.path, roots))
                except ValueError as error:
                    st.error(str(error))
    if "dataset_path" not in st.session_state:
        # First visit: show the built-in sample, so there is something to look at and train on.
        st.session_state["dataset_path"] = str(ensure_sample("digits").resolve())
    return st.session_state.get("dataset_path")


def choose_tfds_dataset() -> None:
    """A suggested TensorFlow Datasets name or any typed one, prepared once as class folders."""
    suggested = st.selectbox("Dataset", list(TFDS_SUGGESTIONS), key="tfds_suggested",
                             format_func=lambda key: f"{key} — {TFDS_SUGGESTIONS[key]}")
    typed = st.text_input("…or type any TensorFlow Datasets image-classification name", key="tfds_typed",
                          placeholder="e.g. malaria or imagenette/160px-v2")
    name = typed.strip() or suggested
    st.caption("Downloaded once from the dataset's own source, then written as class folders into the app's data "
               "folder (`tfds/NAME`); later uses need no network.")
    if st.button("Use this dataset", type="primary", key="use_tfds"):
        bar = st.progress(0.0)
        try:
            with st.spinner(f"Preparing {name} (the first time it is downloaded; large datasets take minutes)…"):
                folder = ensure_tfds_dataset(name, user=current_user(), progress=lambda done, total: bar.progress(
                    min(done / max(total, 1), 1.0), text=f"Writing images: {done} of {total}"))
            st.session_state["dataset_path"] = str(folder.resolve())
        except (ValueError, PermissionError) as error:  # an unknown or unsuitable name, or SampleUnavailableError offline
            st.error(str(error))
        finally:
            bar.empty()


@st.cache_resource(max_entries=8, show_spinner=False)
def cached_figures(path: str, fingerprint: str, decisions: str, _report: dict, _files: pd.DataFrame) -> tuple:
    """The class-balance bars and the image-size scatter of one scan (0.25 s to build at 30,000 images), built once.

    The figures are only read afterwards (drawn), so every session may share them.
    """
    counts = pd.DataFrame({"class": list(_report["class_counts"]), "images": list(_report["class_counts"].values())})
    balance = px.bar(counts, x="class", y="images", text="images", title="Images per class",
                     labels={"class": "class", "images": "images"})
    balance.update_layout(height=320, margin=dict(t=40, b=10), xaxis_title="class", yaxis_title="images")
    if _files.empty:
        return balance, None
    sample = _files.sample(min(len(_files), 3000), random_state=0)
    sizes = px.scatter(sample, x="width", y="height", color="label", opacity=0.6, title="Image sizes (pixels)",
                       symbol="label")
    sizes.update_layout(height=320, margin=dict(t=40, b=10), xaxis_title="width (pixels)",
                        yaxis_title="height (pixels)")
    return balance, sizes


def show_balance(figure, report: dict) -> None:
    # No advice here: the scan's own imbalance warning (engine.data) is shown with the other warnings.
    counts = pd.DataFrame({"class": list(report["class_counts"]), "images": list(report["class_counts"].values())})
    chart_with_table(figure, "balance", f"Bar chart of the number of images in each of {len(counts)} classes.",
                     counts)


def show_split(scan, report: dict, fingerprint: str, decisions: str) -> tuple:
    """The split table; returns the (validation, test) fractions chosen."""
    st.subheader("The split that will be used")
    if report["layout"] == "split":
        st.caption("This folder is already split into train / validation / test folders; they are used as given.")
        fractions = (0.1, 0.1)
    else:
        left, right = st.columns(2)
        fractions = (split_slider(left, SPLIT_SETTINGS[0]), split_slider(right, SPLIT_SETTINGS[1]))
        try:
            RunConfig().replace(**dict(zip(SPLIT_SETTINGS, fractions)))
        except ConfigError as error:
            st.error(str(error))
            return fractions
    try:
        counts = cached_split_counts(scan.root, fingerprint, decisions, tuple(fractions), scan)
        st.dataframe(pd.DataFrame(counts).fillna(0).astype(int), key="split_table")
    except DataError as error:
        st.error(str(error))
    return fractions


def split_slider(column, name: str) -> float:
    """A slider for one split share, with the range, label and help the config declares."""
    declared = get_setting(name)
    key = f"field.{name}"
    # Saved again as a plain value so it outlives pages without this widget (see pages/train.py),
    # and given its default here rather than as `value=`, which Streamlit refuses beside a key's value.
    st.session_state[key] = st.session_state.get(key, declared.default)
    # From 0 even when 0 itself is refused: the config's sentence then says why (as on the Train page).
    return column.slider(declared.label, min(declared.low, 0.0), declared.high, step=0.05, key=key,
                         help=declared.help)


def show_grid(files: pd.DataFrame, classes: list) -> None:
    st.subheader("Sample images")
    left, right = st.columns([2, 1])
    label = left.selectbox("Class", classes, key="grid_class")
    chosen = files[files["label"] == label] if not files.empty else files
    pages = max(1, -(-len(chosen) // IMAGES_PER_PAGE))
    page = right.number_input(f"Page (of {pages})", 1, pages, 1, key="grid_page")
    shown = chosen.iloc[(page - 1) * IMAGES_PER_PAGE: page * IMAGES_PER_PAGE]
    columns = st.columns(6)
    for position, row in enumerate(shown.itertuples()):
        with columns[position % 6]:
            name = printable(Path(row.path).name)
            st.image(thumbnail(row.path), caption=name, alt=image_alt(name, true=label))


def show_sizes(figure, files: pd.DataFrame) -> None:
    """The image-size scatter, and the same sizes counted per class as a table."""
    if figure is None:
        return
    table = (files.groupby(["label", "width", "height"]).size().reset_index(name="images")
             .rename(columns={"label": "class", "width": "width (pixels)", "height": "height (pixels)"})
             .sort_values("images", ascending=False))
    chart_with_table(figure, "sizes", "Scatter plot of image widths against heights in pixels, one colour and "
                     "symbol per class.", table)


def show_problems(report: dict) -> None:
    st.subheader("Files left out")
    if report["excluded"]:
        st.error(f"{report['num_excluded']} file(s) cannot be used and will not be trained on:")
        excluded = pd.DataFrame(report["excluded"])[["path", "reason"]]
        st.dataframe(excluded.assign(path=excluded["path"].map(printable)), hide_index=True, key="excluded")
    else:
        st.success("Every image file can be used.")
    if report["ignored"]:
        st.caption(f"{report['num_ignored']} other file(s) ignored ({report['num_hidden_ignored']} hidden):")
        ignored = pd.DataFrame(report["ignored"])
        st.dataframe(ignored.assign(path=ignored["path"].map(printable)), hide_index=True, key="ignored")
    if report.get("relabelled"):
        st.info(f"{report['num_relabelled']} image(s) moved to another class for the next run "
                "(see Check these labels); the files stay where they are:")
        moved = pd.DataFrame(report["relabelled"])[["path", "from", "to", "by"]]
        st.dataframe(moved.assign(path=moved["path"].map(printable)), hide_index=True, key="relabelled")
    if report["notes"]:
        with st.expander(f"{len(report['notes'])} file(s) converted or fixed on the fly"):
            notes = pd.DataFrame(report["notes"])
            st.dataframe(notes.assign(path=notes["path"].map(printable)), hide_index=True)


def show_doctor(path: str, fingerprint: str, scan, fractions: tuple) -> None:
    """Duplicates, near-duplicates and leakage, worked out only once the section is opened."""
    section = st.expander("Data doctor: duplicates, near-duplicates, leakage", key="doctor", on_change="rerun")
    with section:
        if not section.open:
            return
        doctor = cached_doctor(path, fingerprint, *fractions, scan)
        rule = doctor["near_duplicate_rule"]
        st.caption(" ".join(doctor["rules"]))
        first, second, third = st.columns(3)
        first.metric("Duplicate files", doctor["num_duplicate_files"], help="Files whose bytes are identical.")
        second.metric("Near-duplicate pairs", doctor["num_near_duplicate_pairs"],
                      help=f"The same picture resized, re-encoded or retouched: {rule['hash']}, "
                           f"at most {rule['max_distance']} bits apart, with similar colours.")
        third.metric("Leaks", doctor["num_leaks"],
                     help="The same or nearly the same picture in train and in validation or test: "
                          "it makes the held-out scores look better than they are.")
        if not doctor["leakage_checked"]:
            st.info("Leakage is not checked: there is no split yet (see the error above).")
        for title, rows in finding_pairs(doctor).items():
            if not rows:
                continue
            st.markdown(f"**{title}**")
            table = pd.DataFrame(rows)
            shown = {column: table[column].map(lambda file: printable(os.path.relpath(file, path)))
                     for column in ("first", "second")}
            st.dataframe(table.assign(**shown), hide_index=True, key=f"doctor_{title}")
            for row in rows[:PAIRS_SHOWN]:
                left, right = st.columns(2)
                for column, side in ((left, "first"), (right, "second")):
                    name = printable(Path(row[side]).name)
                    column.image(thumbnail(row[side]), width=160, alt=image_alt(name, true=row[f"{side} class"]),
                                 caption=f"{row[f'{side} class']}: {name}"
                                         + (f" ({row['how close']})" if side == "second" else ""))


user = page_user()  # first: nothing of this page is drawn for a visitor who is not signed in
keyboard_focus_styles()
st.title("Data")
path = choose_dataset()
if not path:
    st.info("Choose a dataset above. New here? Pick the built-in **digits** sample.")
    st.stop()

st.markdown(f"**Dataset:** `{printable(path)}`")
try:
    fingerprint = cached_fingerprint(path, folder_signature(path))
    decisions = decisions_stamp(path)
    scan, report, files = cached_scan(path, fingerprint, decisions)
except DataError as error:
    st.error(str(error))
    st.stop()
classes = report["classes"]
first, second, third, fourth = st.columns(4)
first.metric("Classes", len(classes), help="Kinds of picture the model will learn to tell apart: one per folder.")
second.metric("Usable images", report["num_images"], help="Images that can be read and will be trained on.")
third.metric("Left out", report["num_excluded"], help="Files that look like images but cannot be read.")
fourth.metric("Ignored", report["num_ignored"], help="Hidden files and files that are not images.")
used, budget = cached_cache_size()
st.caption(f"Caches (scans, decoded images, features, hashes): {describe_size(used)} of a {describe_size(budget)} "
           f"budget ({CACHE_BUDGET_VARIABLE}); the least recently used go first. "
           "`python -m engine cache` lists and clears them.")
for warning in report["warnings"]:
    st.warning(warning)
balance_figure, sizes_figure = cached_figures(path, fingerprint, decisions, report, files)
show_balance(balance_figure, report)
fractions = show_split(scan, report, fingerprint, decisions)
show_grid(files, classes)
show_sizes(sizes_figure, files)
show_problems(report)
show_label_issues(path, user)
show_data_map(path)
show_doctor(path, fingerprint, scan, fractions)
if st.button("Train on this data →", type="primary"):
    st.switch_page("app_pages/train.py")
