"""Train: every engine setting in one form, with presets; Start launches through the job queue.

Under the form, the experiments (`app_pages/train_experiments.py`): a sweep over a few settings,
"Which backbone fits my data?" and the learning-rate finder.
"""

import streamlit as st

from engine import jobs
from engine.backbones import BACKBONES, WeightsUnavailableError, check_imagenet_weights, weights_status
from engine.config import WEIGHTS_SOURCES, ConfigError, RunConfig, Setting, set_dotted, settings, with_offline_backbone
from engine.executors import where_runs_execute
from engine.ingest import resolve_in_roots
from engine.locations import data_roots, presets_dir
from app_pages import train_experiments as experiments
from signin import page_user
from ui import access_limits, keyboard_focus_styles, runs_root, secret_data_roots

DEFAULT_SIZE = 0  # shown as "backbone default"
SETTINGS = {declared.name: declared for declared in settings()}
# The Data page's split sliders write these same keys, so the split chosen there is the one trained on.
SPLIT_KEYS = ("field.data.validation_fraction", "field.data.test_fraction")


def presets() -> dict:
    """Name → config of every preset shipped in configs/."""
    return {path.stem: RunConfig.load(path) for path in sorted(presets_dir().glob("*.yaml"))}


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
    if flat["model.weights"] not in WEIGHTS_SOURCES:
        flat["weights_path"], flat["model.weights"] = flat["model.weights"], "file"
    for name, value in flat.items():
        st.session_state[f"field.{name}"] = value


def field_error(name: str) -> None:
    """Shows the validation error of one field right under it."""
    message = st.session_state.get("train_errors", {}).get(name)
    if message:
        st.error(message)


def widget(kind, name: str, note: str = "", **options):
    """A form widget bound to the config setting `name`, with its error beneath it.

    Label, help, range and choices come from the setting's declaration in `engine.config`;
    `note` adds what only this form does (e.g. 0 standing for the backbone's size).
    """
    declared = SETTINGS[name]
    help_text = " ".join(part for part in (declared.help, note) if part)
    if kind is st.number_input:
        options = {**number_bounds(declared), **options}
        if declared.range_text():
            help_text += f" Allowed: {declared.range_text()}."
    elif kind in (st.selectbox, st.radio) and "options" not in options:
        options["options"] = list(declared.choices)
    value = kind(declared.label, key=f"field.{name}", help=help_text, **options)
    field_error(name)
    return value


def number_bounds(declared: Setting) -> dict:
    """A number input's min_value and max_value, from the declared range.

    The lower end is 0 when the declared minimum is above it: Streamlit silently replaces a
    number below min_value with the widget's default, so a 0 typed for epochs (0 means "off"
    for several other settings) would turn into a run of the default length without a word.
    From 0 up, the config's own sentence appears under the field instead.
    """
    low = None if declared.low is None else min(declared.low, declared.type(0))
    return {"min_value": low, "max_value": declared.high}


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


def validate(data: dict, check_weights: bool = True):
    """Builds the config or returns {field: message} naming what is wrong.

    `check_weights=False` leaves the backbone's ImageNet weights unchecked, for a sweep that
    replaces the backbone (and checks each of its runs).
    """
    try:
        config = RunConfig.from_dict(data)
    except ConfigError as error:
        return None, {error.field or "general": str(error)}
    try:
        resolve_in_roots(config.data.path, data_roots(secret_data_roots()))
    except ValueError as error:
        return None, {"data.path": str(error)}
    if check_weights and config.model.weights == "imagenet":
        # Say it here, before a run is started, rather than as a failed run.
        try:
            check_imagenet_weights(config.model.backbone, config.model.resolved_alpha, config.model.resolved_image_size)
        except WeightsUnavailableError as error:
            return None, {"model.backbone": str(error)}
    return config, {}


def backbone_label(name: str, offline: dict) -> str:
    ready = "ready offline" if offline.get(name) else "weights not on this machine"
    return f"{name} — {BACKBONES[name].family} ({ready})"


def draw_form(disabled: bool = False) -> str:
    """Every setting in one form, and its buttons (`disabled` for viewers).

    Returns:
        The pressed button: "train", "sweep", "find_rate", "which_backbone", or "" for none.
    """
    offline = {row["name"]: row["available"] or bool(row["available_alphas"]) for row in weights_status()}
    with st.form("train_form"):
        st.subheader("Data")
        widget(st.text_input, "data.path", "Choose it on the Data page.")
        left, middle, right = st.columns(3)
        with left:
            widget(st.number_input, "data.validation_fraction", step=0.05)
        with middle:
            widget(st.number_input, "data.test_fraction", step=0.05)
        with right:
            widget(st.number_input, "data.subset_fraction", step=0.05)

        st.subheader("Backbone (the pretrained network)")
        left, middle, right = st.columns([3, 1, 1])
        with left:
            widget(st.selectbox, "model.backbone", format_func=lambda name: backbone_label(name, offline))
        with middle:
            # "default" stands for null: the backbone's own width.
            widget(st.selectbox, "model.alpha", "'default' uses the backbone's own width.",
                   options=["default", *SETTINGS["model.alpha"].choices])
        with right:
            widget(st.number_input, "model.image_size", "0 uses the backbone's own size.", step=16)
        widget(st.radio, "model.weights", options=[*WEIGHTS_SOURCES, "file"], horizontal=True)
        st.text_input("Weights file (when 'file')", key="field.weights_path")

        st.subheader("Head (the new part that learns your classes)")
        left, right = st.columns(2)
        with left:
            widget(st.number_input, "model.dropout", step=0.05)
        with right:
            widget(st.number_input, "model.hidden_units", step=16)

        st.subheader("Phase 1: training the head")
        columns = st.columns(5)
        with columns[0]:
            widget(st.number_input, "training.epochs", step=1)
        with columns[1]:
            widget(st.number_input, "training.batch_size", step=8)
        with columns[2]:
            widget(st.selectbox, "training.optimizer")
        with columns[3]:
            widget(st.number_input, "training.learning_rate", format="%.6f", step=0.0005)
        with columns[4]:
            widget(st.selectbox, "training.class_weight")
        widget(st.checkbox, "training.cached_features")
        st.caption("Not sure of the learning rate? **Find a learning rate** under the form tries rates from 1e-6 "
                   "to 1 on your images and suggests one.")

        with st.expander("Phase 2: fine-tuning (optional)"):
            columns = st.columns(3)
            with columns[0]:
                widget(st.number_input, "fine_tuning.layers", step=10)
            with columns[1]:
                widget(st.number_input, "fine_tuning.epochs", step=1)
            with columns[2]:
                widget(st.number_input, "fine_tuning.learning_rate", format="%.7f", step=0.00001)
            widget(st.checkbox, "fine_tuning.cached_activations")

        with st.expander("Callbacks"):
            columns = st.columns(3)
            with columns[0]:
                widget(st.checkbox, "callbacks.early_stopping.enabled")
                widget(st.selectbox, "callbacks.early_stopping.monitor")
                widget(st.number_input, "callbacks.early_stopping.patience")
            with columns[1]:
                widget(st.checkbox, "callbacks.checkpoint.enabled")
                widget(st.selectbox, "callbacks.checkpoint.monitor")
            with columns[2]:
                widget(st.checkbox, "callbacks.reduce_lr.enabled")
                widget(st.number_input, "callbacks.reduce_lr.factor", step=0.1)
                widget(st.number_input, "callbacks.reduce_lr.patience")

        with st.expander("Augmentation (random changes to training images)"):
            columns = st.columns(4)
            with columns[0]:
                widget(st.selectbox, "augmentation.flip")
            with columns[1]:
                widget(st.number_input, "augmentation.rotation", step=0.05)
            with columns[2]:
                widget(st.number_input, "augmentation.zoom", step=0.05)
            with columns[3]:
                widget(st.number_input, "augmentation.contrast", step=0.05)
            widget(st.number_input, "augmentation.views", step=1)
            st.caption("With the fast path on, the head trains on a fixed number of augmented views of each image. "
                       "Fully random augmentation in every epoch needs the slow path: untick "
                       "“Fast: compute the backbone's features once” under Phase 1.")
        with st.expander("Advanced"):
            widget(st.number_input, "training.seed", step=1)
            widget(st.number_input, "data.split_seed", step=1)
            widget(st.number_input, "training.gpus", step=1)
            widget(st.selectbox, "data.cache")
            widget(st.text_input, "name")
        return draw_buttons(disabled)


def draw_buttons(disabled: bool) -> str:
    """The form's buttons; which was pressed ("" for none).

    They are all submit buttons: a form sends what was typed into it only when submitted,
    so a plain button beside it would start a sweep or find a rate for the settings as they
    were before the latest edits.
    """
    count = experiments.run_count(experiments.sweep_grid()[0])
    plan = experiments.backbone_plan(RunConfig())
    columns = st.columns(4)
    pressed = {
        "train": columns[0].form_submit_button("Start training", type="primary", disabled=disabled),
        "sweep": columns[1].form_submit_button(
            f"Start sweep ({count} runs)" if count else "Start sweep", key="start_sweep",
            disabled=disabled or not count, help="Choose what to vary in the Sweep section below first."),
        "find_rate": columns[2].form_submit_button(
            "Find a learning rate", key="find_learning_rate", disabled=disabled,
            help="The learning-rate range test on this form's data, backbone and head; takes from seconds to a "
                 "few minutes (the backbone reads every image once, then its features are cached)."),
        "which_backbone": columns[3].form_submit_button(
            "Which backbone fits my data?", key="which_backbone", disabled=disabled or not plan[1]),
    }
    st.caption(experiments.backbone_caption(plan))
    return next((action for action, was_pressed in pressed.items() if was_pressed), "")


def form_config(data: dict, check_weights: bool = True):
    """The config of `data`; when it has errors, keeps them for the fields and reruns to show them."""
    config, errors = validate(data, check_weights)
    st.session_state["train_errors"] = errors
    if errors:
        st.rerun()
    return config


def applied_config():
    """The form's settings as last applied, or None when they do not make a valid config."""
    try:
        return RunConfig.from_dict(collect())
    except ConfigError:
        return None


user = page_user()  # first: nothing of this page is drawn for a visitor who is not signed in
keyboard_focus_styles()
st.title("Train")
try:
    st.caption(where_runs_execute())
except ValueError as error:  # the server's executor settings are wrong: say so before anyone starts a run
    st.error(str(error))
all_presets = presets()
if "dataset_path" not in st.session_state:
    from engine.samples import ensure_sample

    # Nothing chosen yet: the built-in digits sample, so Start works on a fresh install.
    st.session_state["dataset_path"] = str(ensure_sample("digits").resolve())
    st.info("Using the built-in **digits** sample; choose your own images on the Data page.")
preset = st.selectbox("Start from a preset", ["default"] + list(all_presets),
                      help="The three tutorial recipes, with their settings filled in.")
for key in SPLIT_KEYS:
    if key in st.session_state:
        # Streamlit forgets a widget's value when a page without that widget runs, and does not
        # hand it to another page's widget of the same key; saved again as a plain value, the
        # split set by the Data page's sliders reaches this form.
        st.session_state[key] = st.session_state[key]
if st.session_state.get("loaded_preset") != preset or "field.training.epochs" not in st.session_state:
    # Refilling the form keeps the split chosen on the Data page; choosing a preset here replaces it.
    chosen_split = {key: st.session_state[key] for key in SPLIT_KEYS if key in st.session_state}
    preset_changed = st.session_state.get("loaded_preset", preset) != preset
    chosen = all_presets.get(preset) or with_offline_backbone(RunConfig())
    load_into_form(chosen.replace(**{"data.path": st.session_state.get("dataset_path", "")}))
    if not preset_changed:
        st.session_state.update(chosen_split)
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

if not user.can_start:
    st.warning("You are signed in as a viewer: you can look at every run, but not start one.")
action = draw_form(disabled=not user.can_start)
if action == "train":
    config = form_config(collect())
    try:
        run_id = jobs.start(config, runs_root(), user=user, limits=access_limits(), source="page")
    except (PermissionError, ValueError) as error:  # ValueError: a quota, or the server's executor settings
        st.error(str(error))
        st.stop()
    st.session_state["current_run"] = run_id
    st.query_params["run"] = run_id
    st.switch_page("app_pages/monitor.py")
experiments.draw_sweep_section(applied_config())
if action:
    experiments.run_action(action, user, collect(), form_config)
experiments.draw_rate_result(disabled=not user.can_start)
errors = st.session_state.get("train_errors", {})
if errors:
    st.error("Some settings need fixing; see the messages under the fields.")
    for name, message in errors.items():
        if f"field.{name}" not in st.session_state:
            st.error(message)  # a setting without a field in this form: said here instead

