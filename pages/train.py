"""Train: every engine setting in one form, with presets; Start launches through the job queue."""

import re
from pathlib import Path

import streamlit as st

from engine import jobs
from engine.backbones import BACKBONES, WeightsUnavailableError, check_imagenet_weights, weights_status
from engine.config import (CACHE_MODES, CLASS_WEIGHT_MODES, FLIP_MODES, MONITORS, OPTIMIZERS, RunConfig, set_dotted,
                           with_offline_backbone)
from engine.ingest import data_roots, resolve_in_roots
from ui import runs_root, secret_data_roots

PRESETS_FOLDER = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_SIZE = 0  # shown as "backbone default"


def presets() -> dict:
    """Name → config of every preset shipped in configs/."""
    return {path.stem: RunConfig.load(path) for path in sorted(PRESETS_FOLDER.glob("*.yaml"))}


def load_into_form(config: RunConfig) -> None:
    """Puts a config's values into the form's widgets."""
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}{key}.", inner)
        else:
            flat[prefix.rstrip(".")] = value

    walk("", config.to_dict())
    flat["model.image_size"] = flat["model.image_size"] or DEFAULT_SIZE
    flat["model.alpha"] = "default" if flat["model.alpha"] is None else flat["model.alpha"]
    if flat["model.weights"] not in ("imagenet", "none"):
        flat["weights_path"], flat["model.weights"] = flat["model.weights"], "file"
    for name, value in flat.items():
        st.session_state[f"field.{name}"] = value


def field_error(name: str) -> None:
    """Shows the validation error of one field right under it."""
    message = st.session_state.get("train_errors", {}).get(name)
    if message:
        st.error(message)


def widget(kind, name, label, help_text, **options):
    """A form widget bound to the config field `name`, with its error beneath it."""
    value = kind(label, key=f"field.{name}", help=help_text, **options)
    field_error(name)
    return value


def collect() -> dict:
    """The form's values as a config dictionary."""
    data = RunConfig().to_dict()
    for key, value in st.session_state.items():
        if isinstance(key, str) and key.startswith("field."):
            name = key[len("field."):]
            if name not in ("model.weights", "weights_path"):
                set_dotted(data, name, value)
    weights = st.session_state.get("field.model.weights", "imagenet")
    data["model"]["weights"] = st.session_state.get("field.weights_path", "") if weights == "file" else weights
    data["model"]["image_size"] = data["model"]["image_size"] or None
    data["model"]["alpha"] = None if data["model"]["alpha"] == "default" else data["model"]["alpha"]
    return data


def validate(data: dict):
    """Builds the config or returns {field: message} naming what is wrong."""
    try:
        config = RunConfig.from_dict(data)
    except ValueError as error:
        match = re.search(r"`([a-z_.]+)`", str(error))
        field = match.group(1).split(" ")[0] if match else "general"
        return None, {field: str(error)}
    try:
        resolve_in_roots(config.data.path, data_roots(secret_data_roots()))
    except ValueError as error:
        return None, {"data.path": str(error)}
    if config.model.weights == "imagenet":
        # Say it here, before a run is started, rather than as a failed run.
        try:
            check_imagenet_weights(config.model.backbone, config.model.resolved_alpha, config.model.resolved_image_size)
        except WeightsUnavailableError as error:
            return None, {"model.backbone": str(error)}
    return config, {}


def backbone_label(name: str, offline: dict) -> str:
    ready = "ready offline" if offline.get(name) else "weights not on this machine"
    return f"{name} — {BACKBONES[name].family} ({ready})"


def draw_form() -> bool:
    offline = {row["name"]: row["available"] or bool(row["available_alphas"]) for row in weights_status()}
    with st.form("train_form"):
        st.subheader("Data")
        widget(st.text_input, "data.path", "Dataset folder", "A folder of class subfolders; choose it on the Data page.")
        left, middle, right = st.columns(3)
        with left:
            widget(st.number_input, "data.validation_fraction", "Validation share", "Held out to score every epoch.",
                   min_value=0.0, max_value=0.9, step=0.05)
        with middle:
            widget(st.number_input, "data.test_fraction", "Test share", "Kept aside for a final score.",
                   min_value=0.0, max_value=0.9, step=0.05)
        with right:
            widget(st.number_input, "data.subset_fraction", "Use this share of the data",
                   "1 uses everything; 0.05 trains on a 20× smaller subset (quick experiments).",
                   min_value=0.0, max_value=1.0, step=0.05)

        st.subheader("Backbone (the pretrained network)")
        left, middle, right = st.columns([3, 1, 1])
        with left:
            widget(st.selectbox, "model.backbone", "Backbone", "The network already trained on ImageNet photos.",
                   options=list(BACKBONES), format_func=lambda name: backbone_label(name, offline))
        with middle:
            widget(st.selectbox, "model.alpha", "Width (alpha)", "MobileNets only: smaller is faster, less accurate.",
                   options=["default", 0.25, 0.35, 0.5, 0.75, 1.0, 1.3, 1.4])
        with right:
            widget(st.number_input, "model.image_size", "Image size (px)", "0 uses the backbone's own size.",
                   min_value=0, max_value=1024, step=16)
        widget(st.radio, "model.weights", "Starting weights",
               "'imagenet' reuses what the network learned; 'none' starts from random numbers.",
               options=["imagenet", "none", "file"], horizontal=True)
        st.text_input("Weights file (when 'file')", key="field.weights_path")

        st.subheader("Head (the new part that learns your classes)")
        left, right = st.columns(2)
        with left:
            widget(st.number_input, "model.dropout", "Dropout", "Randomly ignores features while training, against overfitting.",
                   min_value=0.0, max_value=0.95, step=0.05)
        with right:
            widget(st.number_input, "model.hidden_units", "Hidden layer size", "0 for none; e.g. 128 adds a small layer.",
                   min_value=0, max_value=8192, step=16)

        st.subheader("Phase 1: training the head")
        columns = st.columns(5)
        with columns[0]:
            widget(st.number_input, "training.epochs", "Epochs", "Passes over all training images.", min_value=0, step=1)
        with columns[1]:
            widget(st.number_input, "training.batch_size", "Batch size", "Images per learning step.", min_value=0, step=8)
        with columns[2]:
            widget(st.selectbox, "training.optimizer", "Optimizer", "How weights are updated.", options=list(OPTIMIZERS))
        with columns[3]:
            widget(st.number_input, "training.learning_rate", "Learning rate", "Step size; too high diverges.",
                   min_value=0.0, format="%.6f", step=0.0005)
        with columns[4]:
            widget(st.selectbox, "training.class_weight", "Class weights", "'balanced' helps when classes differ in size.",
                   options=list(CLASS_WEIGHT_MODES))
        widget(st.checkbox, "training.cached_features", "Fast: compute the backbone's features once",
               "The frozen backbone turns each image into the same features every epoch, so they are computed "
               "once, cached, and the head trains on them: many times faster, and a later run that changes only "
               "head settings starts at once. Untick to run every image through the backbone every epoch "
               "(the tutorials' slow path).")

        with st.expander("Phase 2: fine-tuning (optional)"):
            columns = st.columns(3)
            with columns[0]:
                widget(st.number_input, "fine_tuning.layers", "Layers to unfreeze",
                       "0 skips fine-tuning; otherwise the last N layers of the backbone learn too.", min_value=0, step=10)
            with columns[1]:
                widget(st.number_input, "fine_tuning.epochs", "Extra epochs", "Epochs of fine-tuning.", min_value=0, step=1)
            with columns[2]:
                widget(st.number_input, "fine_tuning.learning_rate", "Learning rate", "Keep it low (1e-5).",
                       min_value=0.0, format="%.7f", step=0.00001)

        with st.expander("Callbacks"):
            columns = st.columns(3)
            with columns[0]:
                widget(st.checkbox, "callbacks.early_stopping.enabled", "Early stopping", "Stop when the score stops improving; keep the best weights.")
                widget(st.selectbox, "callbacks.early_stopping.monitor", "Watch", "Which validation score.", options=list(MONITORS))
                widget(st.number_input, "callbacks.early_stopping.patience", "Patience (epochs)", "Epochs without improvement before stopping.", min_value=0)
            with columns[1]:
                widget(st.checkbox, "callbacks.checkpoint.enabled", "Keep the best model", "Save the best epoch as best.keras.")
                widget(st.selectbox, "callbacks.checkpoint.monitor", "Judge by", "Which validation score.", options=list(MONITORS))
            with columns[2]:
                widget(st.checkbox, "callbacks.reduce_lr.enabled", "Lower the learning rate on plateaus", "Multiply it by the factor when stuck.")
                widget(st.number_input, "callbacks.reduce_lr.factor", "Factor", "e.g. 0.5 halves it.", min_value=0.0, max_value=1.0, step=0.1)
                widget(st.number_input, "callbacks.reduce_lr.patience", "Patience (epochs)", "Epochs without improvement first.", min_value=0)

        with st.expander("Augmentation (random changes to training images)"):
            columns = st.columns(4)
            with columns[0]:
                widget(st.selectbox, "augmentation.flip", "Flip", "Mirror images at random.", options=list(FLIP_MODES))
            with columns[1]:
                widget(st.number_input, "augmentation.rotation", "Rotation", "Fraction of a full turn, e.g. 0.1.", min_value=0.0, max_value=1.0, step=0.05)
            with columns[2]:
                widget(st.number_input, "augmentation.zoom", "Zoom", "e.g. 0.1 for ±10%.", min_value=0.0, max_value=0.9, step=0.05)
            with columns[3]:
                widget(st.number_input, "augmentation.contrast", "Contrast", "e.g. 0.1 for ±10%.", min_value=0.0, max_value=1.0, step=0.05)
            widget(st.number_input, "augmentation.views", "Augmented views per image (fast path)",
                   "With the fast path, this many random versions of each training image are computed once; "
                   "each epoch shows the head one of them.", min_value=0, max_value=100, step=1)
            st.caption("With the fast path on, the head trains on a fixed number of augmented views of each image. "
                       "Fully random augmentation in every epoch needs the slow path: untick "
                       "“Fast: compute the backbone's features once” under Phase 1.")
        with st.expander("Advanced"):
            widget(st.number_input, "training.seed", "Seed", "Same seed, same run.", min_value=0, step=1)
            widget(st.number_input, "data.split_seed", "Split seed", "Changes which images are held out.", min_value=0, step=1)
            widget(st.selectbox, "data.cache", "Keep decoded images", "'disk' reuses them across runs.", options=list(CACHE_MODES))
            widget(st.text_input, "name", "Run name", "Optional; shown in run ids.")
        return st.form_submit_button("Start training", type="primary")


st.title("Train")
all_presets = presets()
if "dataset_path" not in st.session_state:
    from engine.samples import ensure_sample

    # Nothing chosen yet: the built-in digits sample, so Start works on a fresh install.
    st.session_state["dataset_path"] = str(ensure_sample("digits").resolve())
    st.info("Using the built-in **digits** sample; choose your own images on the Data page.")
preset = st.selectbox("Start from a preset", ["default"] + list(all_presets),
                      help="The three tutorial recipes, with their settings filled in.")
if st.session_state.get("loaded_preset") != preset or "field.training.epochs" not in st.session_state:
    chosen = all_presets.get(preset) or with_offline_backbone(RunConfig())
    load_into_form(chosen.replace(**{"data.path": st.session_state.get("dataset_path", "")}))
    st.session_state["loaded_preset"] = preset
    st.session_state["train_errors"] = {}
if st.session_state.get("dataset_path") and st.session_state.get("loaded_dataset") != st.session_state["dataset_path"]:
    # A dataset chosen on the Data page since the form was filled replaces the form's folder.
    st.session_state["field.data.path"] = st.session_state["dataset_path"]
    st.session_state["loaded_dataset"] = st.session_state["dataset_path"]

with st.expander("Which backbones are ready offline?"):
    st.caption("A backbone is ready when its ImageNet weights are on this machine. For the others, put the "
               "named file in the named folder (or start with weights 'none').")
    st.dataframe([{"backbone": row["name"], "ready offline": row["available"] or bool(row["available_alphas"]),
                   "weights file": row["weights_file"], "folder": row["folder"]} for row in weights_status()],
                 hide_index=True)

if draw_form():
    config, errors = validate(collect())
    st.session_state["train_errors"] = errors
    if errors:
        st.rerun()
    run_id = jobs.start(config, runs_root())
    st.session_state["current_run"] = run_id
    st.query_params["run"] = run_id
    st.switch_page("pages/monitor.py")
if st.session_state.get("train_errors"):
    st.error("Some settings need fixing; see the messages under the fields.")
