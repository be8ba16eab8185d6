"""The experiment commands of `python -m engine`: compare, sweep, lr-find, describe.

Kept apart from `engine/cli.py` (which registers them) so each command stays a thin adapter over
one engine module: `engine.compare`, `engine.sweeps`, `engine.lr_finder`, `engine.run_details`.
"""

from __future__ import annotations

import json
import sys


def add_commands(commands, add_train_options) -> None:
    """Registers the experiment sub-commands on `commands` (argparse sub-parsers).

    Args:
        commands: The CLI's sub-parsers.
        add_train_options: Adds the train command's settings flags, `--config`, `--set` and
            `--runs-dir` to a parser (a sweep and the range test take the same options).
    """
    compare = commands.add_parser("compare", help="compare two runs image by image, with McNemar's exact test")
    compare.add_argument("run_a", help="run folder or id (A)")
    compare.add_argument("run_b", help="run folder or id (B)")
    compare.add_argument("--split", choices=("validation", "test"), default="validation")
    compare.add_argument("--json", action="store_true", help="print the counts, the p-value and every path as JSON")
    compare.add_argument("--runs-dir")

    sweep = commands.add_parser("sweep", help="start runs that differ in named settings; print their leaderboard",
                                exit_on_error=False)
    add_train_options(sweep)
    sweep.add_argument("--grid", action="append", default=[], metavar="NAME=VALUE,VALUE",
                       help="a setting and its values, e.g. model.backbone=MobileNet,EfficientNetLite0 (repeat for "
                            "more settings: every combination is one run)")
    sweep.add_argument("--detach", action="store_true", help="queue the runs and print the sweep id; do not wait")
    sweep.add_argument("--show", metavar="SWEEP_ID", help="print the leaderboard of an existing sweep and exit")
    sweep.add_argument("--executor", choices=("local", "ray"), default=None,
                       help="where the runs execute (default $TRANSFER_STUDIO_EXECUTOR, else local)")

    finder = commands.add_parser("lr-find", help="the learning-rate range test for the head, on cached features",
                                 exit_on_error=False)
    add_train_options(finder)
    finder.add_argument("--json", action="store_true", help="print the whole curve as JSON")

    describe = commands.add_parser("describe", help="set a run's name, description or tags")
    describe.add_argument("run", help="run folder or id")
    describe.add_argument("--name")
    describe.add_argument("--description")
    describe.add_argument("--tag", action="append", default=[], help="add a tag (repeat for more)")
    describe.add_argument("--untag", action="append", default=[], help="remove a tag")
    describe.add_argument("--runs-dir")


def command_compare(arguments) -> int:
    from engine.cli import CommandError
    from engine.compare import image_diff, verdict
    from engine.runs import resolve_run
    from engine.status import read_status

    run_a, run_b = (resolve_run(run, arguments.runs_dir) for run in (arguments.run_a, arguments.run_b))
    try:
        diff = image_diff(run_a, run_b, arguments.split)
    except (FileNotFoundError, ValueError) as error:
        raise CommandError(str(error)) from error
    name_a, name_b = (read_status(run).name or run.name for run in (run_a, run_b))
    summary = {"a": run_a.name, "b": run_b.name, **diff.to_dict(), "verdict": verdict(diff, name_a, name_b)}
    if arguments.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(summary["verdict"])
    if not diff.same_images:
        print(f"(only the {diff.common} images both runs evaluated are compared: {diff.only_a} only in A, "
              f"{diff.only_b} only in B, {diff.label_changed} relabelled)")
    print(f"A = {name_a} ({run_a.name})\nB = {name_b} ({run_b.name})")
    print(f"both right {diff.both_right} · only A right {len(diff.a_right_b_wrong)} · only B right "
          f"{len(diff.b_right_a_wrong)} · both wrong {diff.both_wrong} · McNemar p = {diff.p_value:.3g}")
    for title, rows in (("A right, B wrong", diff.a_right_b_wrong), ("B right, A wrong", diff.b_right_a_wrong)):
        print(f"\n{title} ({len(rows)}):")
        for row in rows.itertuples():
            print(f"  {row.path}  true {row.true}  A {row.predicted_a} {row.confidence_a:.2f}  "
                  f"B {row.predicted_b} {row.confidence_b:.2f}")
    return 0


def command_sweep(arguments) -> int:
    from engine.cli import CommandError, config_from_arguments
    from engine.latency import measure_latency
    from engine.sweeps import leaderboard, parse_grid, read_sweep, start_sweep, wait_for_sweep

    if arguments.show:
        try:
            return _print_leaderboard(read_sweep(arguments.show, arguments.runs_dir), arguments.runs_dir)
        except FileNotFoundError as error:
            raise CommandError(str(error)) from error
    if not arguments.grid:
        raise CommandError("A sweep needs at least one --grid NAME=VALUE,VALUE "
                           "(e.g. --grid model.backbone=MobileNet,EfficientNetLite0).")
    try:
        grid = parse_grid(arguments.grid)
        # --name (the train option) names the sweep; its runs are named after it and what they vary.
        sweep = start_sweep(config_from_arguments(arguments), grid, arguments.runs_dir, source="cli",
                            executor=arguments.executor)
    except ValueError as error:
        raise CommandError(str(error)) from error
    print(f"sweep {sweep['id']}: {len(sweep['runs'])} runs queued", flush=True)
    if arguments.detach:
        for entry in sweep["runs"]:
            print(entry["run_id"])
        return 0
    seen: dict = {}

    def progress(statuses) -> None:
        for status in statuses:
            if seen.get(status.run_id) != status.state:
                seen[status.run_id] = status.state
                print(f"  {status.run_id}: {status.state.value}", file=sys.stderr, flush=True)

    statuses = wait_for_sweep(sweep, arguments.runs_dir, progress=progress)
    root_runs = [status for status in statuses if status.state.value == "finished"]
    for status in root_runs:
        measure_latency(status.path)
    table, _ = leaderboard(sweep, arguments.runs_dir)
    _print_leaderboard(sweep, arguments.runs_dir, table)
    return 0 if len(root_runs) == len(statuses) else 1


def _print_leaderboard(sweep: dict, runs_dir, table=None) -> int:
    import pandas as pd

    from engine.sweeps import leaderboard

    computed, chosen = leaderboard(sweep, runs_dir)
    table = computed if table is None else table
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 60):
        print(f"\nLeaderboard of sweep {sweep['id']} ({sweep['name']}), best validation accuracy first:\n")
        print(table.drop(columns=["owner"], errors="ignore").to_string(index=False))
    if chosen:
        test = chosen["test_accuracy"]
        test_text = f"{test:.3f} on {chosen['test_images']} test images" if test is not None else "no test images"
        print(f"\nChosen: {chosen['name']} ({chosen['run_id']}), validation {chosen['validation_accuracy']:.3f}; "
              f"test accuracy {test_text}.\n{chosen['why']}")
    return 0


def command_lr_find(arguments) -> int:
    from engine.cli import CommandError, config_from_arguments
    from engine.data import DataError
    from engine.lr_finder import find_learning_rate

    config = config_from_arguments(arguments)
    try:
        result = find_learning_rate(config)
    except (DataError, ValueError) as error:
        raise CommandError(str(error)) from error
    if arguments.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['images']} training images, {config.model.backbone} features, {result['steps']} steps")
    print(" learning rate   smoothed loss")
    step = max(1, len(result["learning_rates"]) // 12)
    for rate, loss in list(zip(result["learning_rates"], result["smoothed"]))[::step]:
        print(f"  {rate:11.2e}   {loss:.4f}")
    if result["suggested"] is None:
        raise CommandError("The range test gave no finite loss; check the data.")
    print(f"lowest smoothed loss at {result['minimum_at']:.2e}; suggested head learning rate "
          f"{result['suggested']:.2e} (train with --learning-rate {result['suggested']:.2g})")
    return 0


def command_describe(arguments) -> int:
    from engine.cli import CommandError
    from engine.run_details import describe
    from engine.runs import resolve_run
    from engine.status import read_status

    tags = None
    if arguments.tag or arguments.untag:
        current = list(read_status(resolve_run(arguments.run, arguments.runs_dir)).tags)
        removed = {" ".join(tag.split()).lower() for tag in arguments.untag}
        tags = [tag for tag in current + arguments.tag if " ".join(tag.split()).lower() not in removed]
    try:
        status = describe(arguments.run, arguments.runs_dir, name=arguments.name, description=arguments.description,
                          tags=tags, source="cli")
    except (PermissionError, ValueError) as error:
        raise CommandError(str(error)) from error
    print(json.dumps({"run_id": status.run_id, "name": status.name, "description": status.description,
                      "tags": list(status.tags)}, indent=2))
    return 0


COMMANDS = {"compare": command_compare, "sweep": command_sweep, "lr-find": command_lr_find,
            "describe": command_describe}
