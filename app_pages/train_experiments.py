"""The Train page's experiments: a sweep, "Which backbone fits my data?" and the learning-rate finder.

A helper of `app_pages/train.py`, not a page: `streamlit_app.py` does not list it. The engine
does the work (`engine.sweeps` starts the runs through the queue, `engine.lr_finder` runs the
range test); this module reads the Sweep section's widgets, checks a plan before anything
starts, and draws the results.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from engine.backbones import BACKBONES, WeightsUnavailableError, check_imagenet_weights, weights_status
from engine.config import RunConfig
from engine.sweeps import MAXIMUM_RUNS, expand, parse_grid, start_sweep
from engine.users import User
from ui import PALETTE, access_limits, chart_with_table, runs_root

# Where the finder's last result is kept, so it survives the reruns that every click makes.
RESULT_KEY = "lr_finder_result"
# The Sweep section's widgets: (session key, the setting it varies, its label, an example).
LISTED_SETTINGS = (("sweep.learning_rates", "training.learning_rate", "Learning rates", "0.001, 0.003, 0.01"),
                   ("sweep.dropouts", "model.dropout", "Dropouts", "0.1, 0.3"))


def ready_widths() -> dict[str, set]:
    """Backbone name → the widths (resolved alphas; None for a backbone without widths) ready offline.

    Only backbones with at least one width ready are listed, in the registry's order.
    """
    ready = {}
    for row in weights_status():
        default = BACKBONES[row["name"]].default_alpha
        widths = ({default} if row["available"] else set()) | set(row["available_alphas"])
        if widths:
            ready[row["name"]] = widths
    return ready


def is_ready_offline(config: RunConfig, ready: dict[str, set]) -> bool:
    """True when the run's ImageNet weights at its width are on this machine (at the default size)."""
    return config.model.resolved_alpha in ready.get(config.model.backbone, set())


def backbone_label(name: str, ready: dict[str, set]) -> str:
    """"MobileNet (α=0.25)" for a backbone ready only at some widths, else its name."""
    widths = sorted(width for width in ready.get(name, ()) if width is not None)
    if not widths or BACKBONES[name].default_alpha in widths:
        return name
    return f"{name} (α={', '.join(map(str, widths))})"


def with_offline_width(config: RunConfig, backbones: list[str], ready: dict[str, set]) -> RunConfig:
    """The base of a sweep over `backbones`, with a width their offline weights have.

    A sweep keeps the base's width for every backbone that has it and uses each other
    backbone's default (`engine.sweeps.expand`). So when one of them is ready offline only at
    some width (MobileNet at α=0.25, say) and the form asks for no particular width, the base
    takes that width; backbones without it still get their default.
    """
    if config.model.weights != "imagenet" or config.model.alpha is not None:
        return config
    for name in backbones:
        if BACKBONES[name].default_alpha not in ready.get(name, set()) and ready.get(name):
            return config.replace(**{"model.backbone": name, "model.alpha": min(ready[name])})
    return config


def backbone_plan(base: RunConfig) -> tuple[RunConfig, dict, list[str]]:
    """What "Which backbone fits my data?" starts: one run per backbone ready offline.

    Args:
        base: Default settings with the form's data folder and split.

    Returns:
        (the sweep's base config, its grid, the ready backbones it has to leave out because one
        sweep takes one width and their offline weights are at another).
    """
    ready = ready_widths()
    if not ready:
        return base, {}, []
    base = with_offline_width(base, list(ready), ready)
    planned = expand(base, {"model.backbone": list(ready)})
    kept = [run.model.backbone for run, _ in planned if is_ready_offline(run, ready)]
    return base, ({"model.backbone": kept} if kept else {}), [name for name in ready if name not in kept]


def backbone_caption(plan: tuple[RunConfig, dict, list[str]]) -> str:
    """Says, before the button is pressed, how many runs "Which backbone fits my data?" starts and of what."""
    _, grid, left_out = plan
    if not grid:
        return ("**Which backbone fits my data?** needs ImageNet weights on this machine, and no backbone has "
                "them; see \"Which backbones are ready offline?\" above.")
    ready = ready_widths()
    names = [backbone_label(name, ready) for name in grid["model.backbone"]]
    text = (f"**Which backbone fits my data?** starts {len(names)} run{'s' * (len(names) != 1)}, one per backbone "
            f"ready offline ({', '.join(names)}), each with the default settings on this form's data folder and "
            "split, and opens them on the Sweeps page.")
    if left_out:
        text += f" Left out (their offline weights are at another width): {', '.join(left_out)}."
    return text


def listed_values(text: str) -> str:
    """"0.001, 0.003" or "0.001 0.003" → "0.001,0.003": people separate numbers either way."""
    return ",".join(str(text).replace(",", " ").split())


def sweep_items() -> list[str]:
    """The Sweep section's choices as `setting=value,value` items (read before its widgets are drawn)."""
    state = st.session_state
    items = []
    if state.get("sweep.backbones"):
        items.append("model.backbone=" + ",".join(state["sweep.backbones"]))
    for key, setting, _, _ in LISTED_SETTINGS:
        values = listed_values(state.get(key, ""))
        if values:
            items.append(f"{setting}={values}")
    items += [line.strip() for line in str(state.get("sweep.other", "")).splitlines() if line.strip()]
    return items


def sweep_grid() -> tuple[dict, str]:
    """The grid chosen in the Sweep section, and "" or the sentence saying what is wrong with it."""
    try:
        return parse_grid(sweep_items()), ""
    except ValueError as error:
        return {}, str(error)


def run_count(grid: dict) -> int:
    """How many runs a grid makes: the product of its value counts."""
    return math.prod(len(values) for values in grid.values()) if grid else 0


def draw_sweep_section(base: Optional[RunConfig]) -> None:
    """The Sweep section: which settings to vary and their values, and how many runs that makes.

    Args:
        base: The form's settings as last applied (None when they do not make a valid config),
            used to say early that a value is refused.
    """
    ready = ready_widths()
    # Open while something is chosen: each choice reruns the page, and the section must stay in view.
    with st.expander("Sweep: several runs that differ in a few settings", expanded=bool(sweep_items())):
        st.caption("Choose what to vary, then press **Start sweep** under the form: every run takes the form's "
                   "settings except these. The runs go through the queue, and the Sweeps page ranks them.")
        st.multiselect("Backbones", list(ready), key="sweep.backbones",
                       format_func=lambda name: backbone_label(name, ready),
                       help="Only backbones whose ImageNet weights are on this machine.")
        columns = st.columns(len(LISTED_SETTINGS))
        for column, (key, _, label, example) in zip(columns, LISTED_SETTINGS):
            column.text_input(label, key=key, placeholder=example, help="Values separated by commas.")
        st.text_area("Other settings, one per line", key="sweep.other", placeholder="training.epochs=5,10",
                     help="Any setting by its dotted name (as in the run's config.json), then = and its values "
                          "separated by commas.")
        st.text_input("Sweep name", key="sweep.name", placeholder="optional: shown on the Sweeps page")
        grid, problem = sweep_grid()
        if problem:
            st.error(problem)
        elif grid:
            st.markdown(f"**{run_count(grid)} runs**: " + " × ".join(
                f"{len(values)} {name.split('.')[-1].replace('_', ' ')} value{'s' * (len(values) != 1)}"
                for name, values in grid.items()))
            if run_count(grid) > MAXIMUM_RUNS:
                st.error(f"At most {MAXIMUM_RUNS} runs are allowed in one sweep; take fewer values.")
            elif base is not None:
                try:
                    planned_runs(base, grid)
                except ValueError as error:  # includes ConfigError
                    st.error(str(error))


def weights_problem(config: RunConfig) -> str:
    """Why the run's ImageNet weights cannot be had, or "" when they can (or it needs none)."""
    if config.model.weights != "imagenet":
        return ""
    try:
        check_imagenet_weights(config.model.backbone, config.model.resolved_alpha, config.model.resolved_image_size)
    except WeightsUnavailableError as error:
        return str(error)
    return ""


def planned_runs(config: RunConfig, grid: dict) -> tuple[RunConfig, list]:
    """The sweep's base (with an offline width, see `with_offline_width`) and its runs, as `expand` plans them.

    Raises:
        ValueError: see `engine.sweeps.expand`; ConfigError: the width does not suit the config.
    """
    config = with_offline_width(config, grid.get("model.backbone", []), ready_widths())
    return config, expand(config, grid)


def start_and_open(config: RunConfig, grid: dict, user: User, name: str = "") -> None:
    """Starts the sweep and opens it on the Sweeps page; otherwise says, as an error, what stopped it.

    Every run is checked before the first starts, so a grid value a setting refuses or a
    backbone without weights starts nothing.
    """
    try:
        config, planned = planned_runs(config, grid)
    except ValueError as error:  # includes ConfigError
        st.error(str(error))
        return
    for run, varied in planned:
        problem = weights_problem(run)
        if problem:
            settings = ", ".join(f"{key}={value}" for key, value in varied.items())
            st.error(f"The run with {settings} cannot start: {problem}")
            return
    try:
        sweep = start_sweep(config, grid, runs_root(), user=user, name=name, limits=access_limits(), source="page")
    except (PermissionError, ValueError) as error:  # ValueError includes engine.jobs.QuotaExceeded
        st.error(str(error))
        if not isinstance(error, PermissionError):
            st.page_link("app_pages/sweeps.py", label="Runs already started are listed on the Sweeps page",
                         icon=":material/leaderboard:")
        return
    st.switch_page("app_pages/sweeps.py", query_params={"sweep": sweep["id"]})


def run_action(action: str, user: User, form_data: dict, checked: Callable[..., RunConfig]) -> None:
    """What "Start sweep", "Which backbone fits my data?" or "Find a learning rate" does.

    Args:
        action: "sweep", "which_backbone" or "find_rate".
        user: Who pressed it.
        form_data: The form's values as a config dictionary.
        checked: The Train page's check: (config dictionary, check_weights) → RunConfig; on an
            error it shows the messages under the fields instead of returning.
    """
    if action == "sweep":
        grid, problem = sweep_grid()
        if problem:
            st.error(problem)
            return
        # A sweep over backbones replaces the form's backbone, so its weights are checked per run instead.
        config = checked(form_data, "model.backbone" not in grid)
        start_and_open(config, grid, user, st.session_state.get("sweep.name", ""))
    elif action == "which_backbone":
        config = checked({**RunConfig().to_dict(), "data": form_data["data"]}, False)
        base, grid, _ = backbone_plan(config)
        start_and_open(base, grid, user, f"which backbone · {Path(config.data.path).name}")
    elif action == "find_rate":
        find_rate(checked(form_data, True))


def find_rate(config: RunConfig) -> None:
    """Runs the range test on the config's data with a progress bar and keeps the result in the session."""
    from engine.lr_finder import find_learning_rate

    bar = st.progress(0.0, text="Finding a learning rate: reading the images…")

    def report(what: str, done: int, total: int) -> None:
        share = min(done / total, 1.0) if total else 0.0
        bar.progress(share, text=f"Finding a learning rate: {what}, {done} of {total}")

    try:
        result = find_learning_rate(config, report)
    except (ValueError, WeightsUnavailableError) as error:  # ValueError includes engine.data.DataError
        bar.empty()
        st.error(str(error))
        return
    bar.empty()
    st.session_state[RESULT_KEY] = {**result, "data_path": config.data.path,
                                    "current_rate": config.training.learning_rate}


def rounded_rate(rate: float) -> float:
    """Two significant digits: a rate is never known more finely, and 0.043 reads better than 0.0431687."""
    return float(f"{rate:.2g}")


def use_rate(rate: float) -> None:
    """Callback of "Use this rate": runs before the page, so the form's field can still be set."""
    st.session_state["field.training.learning_rate"] = rate


def rate_figure(result: dict) -> go.Figure:
    """The loss and the smoothed loss against the learning rate (log axis), the suggestion marked."""
    figure = go.Figure()
    figure.add_trace(go.Scatter(x=result["learning_rates"], y=result["losses"], mode="lines", name="loss (each step)",
                                line=dict(width=1, color=PALETTE[5], dash="dot")))
    figure.add_trace(go.Scatter(x=result["learning_rates"], y=result["smoothed"], mode="lines", name="smoothed loss",
                                line=dict(width=3, color=PALETTE[0])))
    layout = dict(title="Learning-rate range test: the training loss as the rate grows", height=380,
                  xaxis=dict(type="log", title="learning rate (log scale)", exponentformat="e"),
                  yaxis=dict(title="training loss", rangemode="tozero"),
                  legend=dict(orientation="h", y=-0.25), margin=dict(t=50, b=10))
    if result["smoothed"]:
        # The raw loss explodes at the end; the smoothed curve sets the scale so the dip stays visible.
        layout["yaxis"]["range"] = [0, 1.15 * max(result["smoothed"])]
    if result["suggested"] is not None:
        layout["shapes"] = [dict(type="line", xref="x", x0=result["suggested"], x1=result["suggested"],
                                 yref="y domain", y0=0, y1=1, line=dict(dash="dash", color=PALETTE[1]))]
        layout["annotations"] = [dict(xref="x", x=math.log10(result["suggested"]), yref="y domain", y=1,
                                      text=f"suggested {result['suggested']:.1e}", showarrow=False,
                                      xanchor="left", yanchor="top")]
    figure.update_layout(**layout)
    return figure


def draw_rate_result(disabled: bool = False) -> None:
    """The finder's last result: the suggestion in words, the curve, its numbers and "Use this rate"."""
    result = st.session_state.get(RESULT_KEY)
    if not result:
        return
    st.subheader("Learning-rate finder")
    where = f"{result['images']} training images of {Path(result['data_path']).name}, {result['backbone']} features"
    if result["suggested"] is None:
        st.warning(f"The range test took no step on {where}: no rate to suggest.")
        return
    suggested = rounded_rate(result["suggested"])
    st.markdown(f"Suggested learning rate: **{suggested:g}**. The smoothed loss was lowest at "
                f"{result['minimum_at']:.1e}; a tenth of that still learns fast without diverging. "
                f"Measured on {where}, {result['steps']} steps"
                f"{' (stopped once the loss blew up)' if result['stopped_early'] else ''}; "
                f"the form's rate when you pressed the button: {result['current_rate']:g}.")
    chart_with_table(rate_figure(result), "lr_finder_chart",
                     f"The training loss against the learning rate on a log scale; the smoothed loss is lowest at "
                     f"{result['minimum_at']:.1e} and the suggested rate {suggested:g} is marked.",
                     pd.DataFrame({"learning rate": result["learning_rates"], "loss": result["losses"],
                                   "smoothed loss": result["smoothed"]}))
    st.button(f"Use this rate ({suggested:g})", key="use_learning_rate", on_click=use_rate, args=(suggested,),
              disabled=disabled, help="Writes it into the form's learning rate (Phase 1).")
