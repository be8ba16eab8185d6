"""The command line: `python -m engine train|evaluate|predict|runs|backbones|check|card|operating-point|...`.

A thin adapter over the engine. Bad input exits with status 2 and one line
`error: ...` on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

# Keep TensorFlow's C++ start-up chatter out of the terminal; errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from engine import cli_experiments  # noqa: E402
from engine.backbones import BACKBONES  # noqa: E402
from engine.caches import add_cache_arguments, run_cache_command  # noqa: E402
from engine.config import RunConfig, add_arguments, overrides_from_arguments, set_dotted  # noqa: E402
from engine.executors import EXECUTOR_NAMES  # noqa: E402

TRAIN_HELP = {"data.path": "a folder of class subfolders, sample:NAME (sample:digits, sample:cats_vs_dogs) or "
                      "tfds:NAME (a TensorFlow Datasets image-classification dataset, e.g. tfds:beans)"}


class CommandError(Exception):
    """A user error to print on one line."""


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """`--config`, `--runs-dir`, one flag per declared setting and `--set`: what train, sweep and lr-find take."""
    parser.add_argument("--config", help="a JSON or YAML config file (see configs/)")
    parser.add_argument("--runs-dir", help="where run folders go (default $TRANSFER_STUDIO_RUNS or ./runs)")
    # One flag per declared setting (engine.config): help, choices and types come from the declarations.
    add_arguments(parser, extra_help=TRAIN_HELP)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="any other setting by its dotted name, e.g. callbacks.early_stopping.enabled=true")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    # exit_on_error=False: a bad flag value becomes one `error: ...` line (see main), like every other error.
    parser = argparse.ArgumentParser(prog="python -m engine", description="Transfer Studio engine.",
                                     exit_on_error=False)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a classifier on a folder of class subfolders",
                                exit_on_error=False)
    add_train_options(train)
    train.add_argument("--quiet", action="store_true", help="print only the run folder")
    train.add_argument("--detach", action="store_true",
                       help="start through the queue in a background process and print the run id")
    train.add_argument("--max-concurrent", type=int, default=None,
                       help="with --detach: how many runs may train at once in this runs folder")
    train.add_argument("--executor", choices=EXECUTOR_NAMES, default=None,
                       help="with --detach: where the run executes, on this machine (local) or on the Ray "
                            "cluster at $RAY_ADDRESS (ray); default $TRANSFER_STUDIO_EXECUTOR, else local")

    for name, text in (("stop", "ask a run to stop: it finishes its batch, saves and evaluates"),
                       ("kill", "end a run's worker at once (the hard fallback to stop)"),
                       ("resume", "continue a stopped or failed run from its last completed epoch")):
        control = commands.add_parser(name, help=text)
        control.add_argument("run", help="run folder or run id")
        control.add_argument("--runs-dir")
        if name == "resume":
            control.add_argument("--executor", choices=EXECUTOR_NAMES, default=None,
                                 help="continue on this executor (local, or ray at $RAY_ADDRESS); default: the "
                                      "one the run had")

    rename = commands.add_parser("rename", help="give a run a new name (its id stays)")
    rename.add_argument("run", help="run folder or run id")
    rename.add_argument("name")
    rename.add_argument("--runs-dir")
    delete = commands.add_parser("delete", help="move an ended run to the trash (restore brings it back)")
    delete.add_argument("run", help="run folder or run id")
    delete.add_argument("--runs-dir")
    restore = commands.add_parser("restore", help="bring a deleted run back from the trash")
    restore.add_argument("run", help="the run id (see `trash`)")
    restore.add_argument("--runs-dir")
    trash = commands.add_parser("trash", help="list the deleted runs that can be restored")
    trash.add_argument("--runs-dir")
    audit = commands.add_parser("audit", help="the audit log: who started, stopped, deleted… which run")
    audit.add_argument("--runs-dir")

    worker = commands.add_parser("worker", help="train one run folder in this process (what schedulers run)")
    worker.add_argument("run_dir")
    supervise = commands.add_parser("supervise", help="run a worker, record how it ended, start the next queued run")
    supervise.add_argument("run_dir")
    supervise.add_argument("--detach", action="store_true", help="spawn the supervisor in a new session and return")

    evaluate = commands.add_parser("evaluate", help="evaluate a trained run on another folder")
    evaluate.add_argument("--run", required=True, help="run folder or run id")
    evaluate.add_argument("--data", required=True, help="folder of class subfolders")
    evaluate.add_argument("--runs-dir")

    predict = commands.add_parser("predict", help="predict the class of image files")
    predict.add_argument("--run", required=True, help="run folder or run id")
    predict.add_argument("--top-k", type=int, default=3)
    predict.add_argument("--runs-dir")
    predict.add_argument("images", nargs="+", help="image files")

    explain = commands.add_parser("explain", help="write Grad-CAM overlays: where the model looked in each image")
    explain.add_argument("--run", required=True, help="run folder or run id")
    explain.add_argument("--runs-dir")
    explain.add_argument("--out", required=True, help="folder for the overlay PNGs (created if missing)")
    explain.add_argument("--opacity", type=float, default=0.45, help="0 shows only the image, 1 only the heatmap")
    explain.add_argument("images", nargs="+", help="image files")

    export = commands.add_parser("export", help="export a run (SavedModel, TFLite, ONNX, a browser page) and check "
                                                "that the export predicts what the model predicts")
    export.add_argument("--run", required=True, help="run folder or run id")
    export.add_argument("--runs-dir")
    export.add_argument("--format", required=True, choices=("savedmodel", "tflite", "onnx", "browser"))
    export.add_argument("--quantize", default="none", choices=("none", "float16", "int8"),
                        help="TFLite only: float16 (half the size) or int8 (full-integer, uint8 input)")
    export.add_argument("--sample-limit", type=int, default=500,
                        help="at most this many validation images are compared in the parity check")

    card = commands.add_parser("card", help="write a run's model card (HTML, Markdown, JSON) into its folder")
    card.add_argument("--run", required=True, help="run folder or run id")
    card.add_argument("--runs-dir")

    point = commands.add_parser("operating-point",
                                help="show or set where a run answers: its threshold and its minimum confidence")
    point.add_argument("--run", required=True, help="run folder or run id")
    point.add_argument("--runs-dir")
    point.add_argument("--threshold", type=float,
                       help="two-class runs: the second class's probability (0-1) from which it is answered")
    point.add_argument("--minimum-confidence", type=float,
                       help="below this probability (0-1) of the answered class, predictions read 'not sure'")

    runs = commands.add_parser("runs", help="list the runs")
    runs.add_argument("--runs-dir")
    runs.add_argument("--json", action="store_true", help="print JSON instead of a table")

    backbones = commands.add_parser("backbones", help="list backbones and whether their weights are offline")
    backbones.add_argument("--json", action="store_true")

    cache = commands.add_parser("cache", help="what is cached (dataset, backbone, size, last use); clear all or "
                                              "part of it, or trim it to its budget")
    add_cache_arguments(cache)
    cli_experiments.add_commands(commands, add_train_options)

    check = commands.add_parser("check", help="the data doctor: what is wrong or doubtful in a dataset folder")
    check.add_argument("data", help=TRAIN_HELP["data.path"])
    check.add_argument("--json", action="store_true", help="print the whole report as JSON")
    defaults = RunConfig().data
    check.add_argument("--validation-fraction", type=float, default=defaults.validation_fraction,
                       help="for a flat folder: the share split training would hold out for validation")
    check.add_argument("--test-fraction", type=float, default=defaults.test_fraction,
                       help="for a flat folder: the share held out for the final test")
    check.add_argument("--split-seed", type=int, default=defaults.split_seed, help="for a flat folder: the split's seed")
    check.add_argument("--label-issues", action="store_true",
                       help="rank the images whose label looks wrong (out-of-fold logistic regression on the "
                            "backbone's features, ranked with cleanlab); the backbone runs once per image, then "
                            "everything is cached")
    check.add_argument("--backbone", choices=tuple(BACKBONES), default=None,
                       help="with --label-issues: the backbone whose features are used (default: the default run's)")
    return parser


def config_from_arguments(arguments) -> RunConfig:
    """Builds the run config: defaults, then the config file, then flags, then --set."""
    data = RunConfig.load(arguments.config).to_dict() if arguments.config else RunConfig().to_dict()
    for dotted, value in overrides_from_arguments(arguments).items():
        set_dotted(data, dotted, value)
    for assignment in arguments.set:
        if "=" not in assignment:
            raise CommandError(f"--set takes NAME=VALUE; received {assignment!r}.")
        name, value = assignment.split("=", 1)
        set_dotted(data, name.strip(), _parse_value(value))
    data["data"]["path"] = resolve_data_path(data["data"]["path"])
    config = RunConfig.from_dict(data)
    if not config.data.path:
        raise CommandError("No data folder: give --data DIR (or --data sample:digits) or data.path in the config file.")
    return config


def resolve_data_path(path):
    """`sample:NAME` and `tfds:NAME` become the folder the sample is written to (once); others pass through."""
    text = str(path or "")
    if text.startswith("sample:"):
        from engine.samples import ensure_sample

        return str(ensure_sample(text[len("sample:"):]).resolve())
    if text.startswith("tfds:"):
        from engine.tfds_samples import ensure_tfds_dataset

        return str(ensure_tfds_dataset(text[len("tfds:"):]).resolve())
    return path


def _parse_value(text: str):
    """Reads a --set value as JSON when it is JSON (numbers, true/false, null), else as text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def command_train(arguments) -> int:
    from engine.runs import create_run
    from engine.status import State
    from engine.train import run_training

    config = config_from_arguments(arguments)
    if not Path(config.data.path).expanduser().is_dir():
        raise CommandError(f"Data folder {config.data.path!r} does not exist or is not a folder.")
    if arguments.executor is not None and not arguments.detach:
        raise CommandError(f"--executor {arguments.executor} starts the run through the queue: add --detach "
                           "(without it, train runs in this process).")
    if arguments.detach:
        from engine import jobs

        if arguments.max_concurrent is not None:
            jobs.set_max_concurrent(arguments.max_concurrent, arguments.runs_dir, source="cli")
        run_id = jobs.start(config, arguments.runs_dir, source="cli", executor=arguments.executor)
        print(run_id, flush=True)
        from engine.runs import resolve_run
        from engine.status import read_status

        _refuse_failed_launch(read_status(resolve_run(run_id, arguments.runs_dir)))
        return 0
    run_dir = create_run(config, arguments.runs_dir)
    from engine import audit
    from engine.users import local_user

    audit.record(run_dir.parent, local_user(), "start", run_dir.name, "cli")
    print(run_dir, flush=True)
    echo = None if arguments.quiet else sys.stderr
    state = run_training(run_dir, echo=echo)
    if state is State.FAILED:
        from engine.status import read_status

        raise CommandError(f"Run failed: {read_status(run_dir).message} (details in {run_dir}/worker.log)")
    return 0


def command_evaluate(arguments) -> int:
    from engine.evaluate import evaluate_folder
    from engine.runs import resolve_run

    run_dir = resolve_run(arguments.run, arguments.runs_dir)
    if not Path(arguments.data).is_dir():
        raise CommandError(f"Data folder {arguments.data!r} does not exist or is not a folder.")
    print(json.dumps(evaluate_folder(run_dir, arguments.data), indent=2))
    return 0


def command_predict(arguments) -> int:
    from engine.predict import predict_images
    from engine.runs import resolve_run

    run_dir = resolve_run(arguments.run, arguments.runs_dir)
    missing = [path for path in arguments.images if not os.path.isfile(path)]
    if missing:
        raise CommandError(f"Image file {missing[0]!r} does not exist.")
    print(json.dumps(predict_images(run_dir, arguments.images, arguments.top_k), indent=2))
    return 0


def command_explain(arguments) -> int:
    from engine.gradcam import explain_images
    from engine.runs import resolve_run

    run_dir = resolve_run(arguments.run, arguments.runs_dir)
    if not 0.0 <= arguments.opacity <= 1.0:
        raise CommandError(f"`--opacity` must be from 0 to 1; received {arguments.opacity}.")
    missing = [path for path in arguments.images if not os.path.isfile(path)]
    if missing:
        raise CommandError(f"Image file {missing[0]!r} does not exist.")
    results = explain_images(run_dir, arguments.images, arguments.out, opacity=arguments.opacity)
    print(json.dumps(results, indent=2))
    # Like predict: an unusable file gets an "error" entry and does not stop the others.
    return 0


def command_export(arguments) -> int:
    from engine.runs import resolve_run

    run_dir = resolve_run(arguments.run, arguments.runs_dir)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if arguments.format == "browser":
        from engine.exports.browser import export_browser

        if arguments.quantize != "none":
            raise CommandError("The browser page runs the float32 ONNX export: drop --quantize.")
        try:
            result = export_browser(run_dir, sample_limit=arguments.sample_limit, progress=say)
        except (RuntimeError, FileNotFoundError) as error:  # the runtime missing or failing: one line
            raise CommandError(str(error)) from error
        print(json.dumps({"folder": result["out_dir"], "files": result["files"],
                          "onnx_parity_passed": result["onnx_parity"].get("passed")}, indent=2))
        return 0
    from engine.exports import export_folder, export_run

    try:
        parity = export_run(run_dir, arguments.format, arguments.quantize, sample_limit=arguments.sample_limit,
                            progress=say, source="cli")
    except RuntimeError as error:  # the export's runtime could not load or run it: one line, not a traceback
        raise CommandError(str(error)) from error
    print(json.dumps({"folder": str(export_folder(run_dir, arguments.format, arguments.quantize)), **parity},
                     indent=2, default=str))
    # An export that misses its parity mark is kept with its numbers, but the command says it failed.
    return 0 if parity.get("passed") else 1


def command_card(arguments) -> int:
    from engine.model_card import write_card
    from engine.runs import resolve_run

    for path in write_card(resolve_run(arguments.run, arguments.runs_dir)).values():
        print(path)
    return 0


def command_operating_point(arguments) -> int:
    from engine.operating_point import read_decision, save_decision
    from engine.runs import resolve_run

    from engine import runfiles

    run_dir = resolve_run(arguments.run, arguments.runs_dir)
    decision = read_decision(run_dir)
    if arguments.threshold is not None or arguments.minimum_confidence is not None:
        # A setting not given keeps its saved value.
        decision = save_decision(run_dir,
                                 decision.threshold if arguments.threshold is None else arguments.threshold,
                                 decision.minimum_confidence if arguments.minimum_confidence is None
                                 else arguments.minimum_confidence, source="cli")
    classes = (runfiles.read_json(Path(run_dir) / runfiles.LABELS_FILE) or {}).get("classes") or []
    print(json.dumps({"threshold": decision.threshold, "minimum_confidence": decision.minimum_confidence,
                      "in_words": decision.describe(classes)}, indent=2))
    return 0


def command_runs(arguments) -> int:
    from engine.jobs import reconcile_stale
    from engine.runs import list_runs

    runs = list_runs(arguments.runs_dir)
    if reconcile_stale(runs, arguments.runs_dir):
        runs = list_runs(arguments.runs_dir)
    if arguments.json:
        print(json.dumps([dict(run.to_dict(), path=run.path) for run in runs], indent=2))
        return 0
    if not runs:
        print("No runs yet.")
        return 0
    print(f"{'run':<44} {'state':<9} {'stage':<18} {'epoch':>7} {'best val acc':>12}  owner")
    for run in runs:
        epoch = f"{run.epoch or '-'}/{run.epochs or '-'}"
        best = "-" if run.best_val_accuracy is None else f"{run.best_val_accuracy:.4f}"
        print(f"{run.run_id:<44} {run.state.value:<9} {run.stage.value:<18} {epoch:>7} {best:>12}  {run.owner or '-'}")
    return 0


def command_backbones(arguments) -> int:
    from engine.backbones import weights_status

    report = weights_status()
    if arguments.json:
        print(json.dumps(report, indent=2))
        return 0
    for row in report:
        where = "offline" if row["available"] else f"missing {row['weights_file']} in {row['folder']}"
        print(f"{row['name']:<18} {row['default_image_size']:>4}px  {where}")
    return 0


def command_check(arguments) -> int:
    from engine.doctor import check_dataset

    # The same check as a training config's: engine.config declares the ranges once.
    RunConfig().replace(**{"data.validation_fraction": arguments.validation_fraction,
                           "data.test_fraction": arguments.test_fraction})
    folder = resolve_data_path(arguments.data)
    if not Path(folder).expanduser().is_dir():
        raise CommandError(f"Data folder {arguments.data!r} does not exist or is not a folder.")
    if arguments.label_issues:
        from engine.images import printable
        from engine.label_issues import find_label_issues_in_folder, format_label_issues

        issues = find_label_issues_in_folder(folder, arguments.backbone)
        print(json.dumps(issues, indent=2) if arguments.json else printable(format_label_issues(issues)))
        return 0
    report = check_dataset(folder, arguments.validation_fraction, arguments.test_fraction, arguments.split_seed)
    if arguments.json:
        print(json.dumps(report, indent=2))
    else:
        from engine.images import printable

        print(printable(format_check_report(report)))
    if not report["trainable"]:
        raise CommandError(report["errors"][0])
    return 0


def format_check_report(report: dict) -> str:
    """The data doctor's report as text for a terminal: counts first, then every finding."""
    root = report["root"]

    def short(path: str) -> str:
        return os.path.relpath(path, root) if path.startswith(root + os.sep) else path

    lines = [f"Data doctor: {root}"]
    split = report["split"]
    if report["layout"] == "split":
        lines.append("Layout: pre-split (train/validation/test folders, used as given)")
    else:
        lines.append(f"Layout: flat (the engine splits it: validation {split['validation_fraction']:g}, "
                     f"test {split['test_fraction']:g}, seed {split['seed']})")
    counts = ", ".join(f"{label} {count}" for label, count in report["class_counts"].items())
    lines.append(f"Classes: {len(report['classes'])} ({counts})")
    lines.append(f"Usable images: {report['num_images']}   excluded: {report['num_excluded']}   "
                 f"ignored: {report['num_ignored']} ({report['num_hidden_ignored']} hidden)")
    for name, rows in split["counts"].items():
        lines.append(f"  {name}: {sum(rows.values())} ({', '.join(f'{label} {count}' for label, count in rows.items())})")
    lines.append(f"Rule: {report['rules'][0]}")

    def section(title: str, entries: list, total: Optional[int] = None) -> None:
        total = len(entries) if total is None else total
        if not total:
            lines.append(f"\n{title}: none")
            return
        shown = f", the first {len(entries)} listed" if len(entries) < total else ""
        lines.append(f"\n{title}: {total}{shown}")
        lines.extend(f"  {entry}" for entry in entries)

    section("Excluded (not trained on)", [f"{short(item['path'])}: {item['reason']}" for item in report["excluded"]])
    section("Ignored", [f"{short(item['path'])}: {item['reason']}" for item in report["ignored"]])
    section("Notes (used, converted on the fly)", [f"{short(item['path'])}: {item['note']}" for item in report["notes"]])
    section("Exact duplicates (identical files)", [
        " = ".join(short(path) for path in group["paths"])
        + ("" if group["same_class"] else f"   [in different classes: {', '.join(sorted(set(group['labels'])))}]")
        for group in report["duplicates"]])
    rule = report["near_duplicate_rule"]
    section(f"Near-duplicates ({rule['hash']}, at most {rule['max_distance']} bits apart)", [
        f"{short(pair['paths'][0])} ~ {short(pair['paths'][1])}   (distance {pair['distance']}"
        + ("" if pair["same_class"] else ", different classes") + ")"
        for pair in report["near_duplicates"]], report["num_near_duplicate_pairs"])
    if report["leakage_checked"]:
        section("Leakage (the same picture in train and in validation/test)", [
            f"train {short(leak['paths'][0])} ~ {leak['splits'][1]} {short(leak['paths'][1])}   "
            f"({'identical' if leak['exact'] else 'distance ' + str(leak['distance'])})"
            for leak in report["leakage"]], report["num_leaks"])
    else:
        lines.append("\nLeakage: not checked (there is no split; see the error below)")
    imbalance = report["imbalance"]
    if imbalance["ratio"] is not None:
        lines.append(f"\nImbalance: {imbalance['ratio']:.2f}× between the largest and smallest class"
                     + (f". {imbalance['suggestion']}" if imbalance["imbalanced"] else " (balanced enough)"))
    section("Warnings", list(report["warnings"]))
    lines.append("\nTrainable: " + ("yes" if report["trainable"] else "no"))
    return "\n".join(lines)


def command_control(arguments) -> int:
    from engine import jobs

    if arguments.command == "resume":
        status = jobs.resume(arguments.run, arguments.runs_dir, source="cli", executor=arguments.executor)
        _refuse_failed_launch(status)
    else:
        action = {"stop": jobs.stop, "kill": jobs.kill}[arguments.command]
        status = action(arguments.run, arguments.runs_dir, source="cli")
    print(f"{status.state.value}: {status.message}")
    return 0


def _refuse_failed_launch(status) -> None:
    """A run that failed as it was launched (its executor refused it, a Ray cluster that does not
    answer) is an error of the command that launched it, not a quiet line."""
    from engine.status import State

    if status.state is State.FAILED:
        raise CommandError(f"Run {status.run_id}: {status.message}")


def command_rename(arguments) -> int:
    from engine import jobs

    status = jobs.rename(arguments.run, arguments.name, arguments.runs_dir, source="cli")
    print(f"{status.run_id}: {status.name}")
    return 0


def command_delete(arguments) -> int:
    from engine import jobs

    print(f"moved to the trash: {jobs.delete(arguments.run, arguments.runs_dir, source='cli')}")
    return 0


def command_restore(arguments) -> int:
    from engine import jobs

    print(f"restored: {jobs.restore(arguments.run, arguments.runs_dir, source='cli')}")
    return 0


def command_trash(arguments) -> int:
    from engine import jobs

    deleted = jobs.trash(arguments.runs_dir)
    if not deleted:
        print("The trash is empty.")
    for run in deleted:
        print(f"{run.run_id:<44} {run.state.value:<9} {run.owner_name or run.owner or '-'}")
    return 0


def command_audit(arguments) -> int:
    from engine import audit
    from engine.runs import default_runs_dir

    def shown(value) -> str:
        # Names come from the identity provider: a newline or escape code must not forge a line.
        return "".join(character if character.isprintable() else "?" for character in str(value or ""))

    for entry in audit.read(arguments.runs_dir or default_runs_dir()):
        print(f"{shown(entry.get('time'))}  {shown(entry.get('user_name'))} <{shown(entry.get('user'))}> "
              f"({shown(entry.get('source'))})  {shown(entry.get('action'))}  {shown(entry.get('run'))}")
    return 0


def command_worker(arguments) -> int:
    from engine.executors import LAUNCH_VARIABLE, RAY_JOB_VARIABLE
    from engine.status import State
    from engine.train import run_training

    run_dir = Path(arguments.run_dir)
    if not (run_dir / "config.json").is_file():
        raise CommandError(f"{run_dir} is not a run folder (no config.json).")
    launch_id = os.environ.get(LAUNCH_VARIABLE) or None
    ray_address = os.environ.get(RAY_JOB_VARIABLE)
    if ray_address:
        from engine.ray_executor import watch_job_supervisor

        # Fate-sharing with the Ray job: a worker whose cluster went away ends and says so.
        watch_job_supervisor(run_dir, launch_id, ray_address)
    # Started by our supervisor or the Ray executor: adopt its launch. Started directly (by another
    # scheduler): a launch of its own.
    state = run_training(run_dir, launch_id=launch_id)
    if ray_address:
        _schedule_after_ray_job(run_dir)
    return 0 if state in (State.FINISHED, State.STOPPED) else 1


def _schedule_after_ray_job(run_dir: Path) -> None:
    """Starts the next queued run, as the local supervisor does when its worker ends.

    On a Ray cluster there is no supervisor of ours: the worker's own job moves the queue on.
    A failure here must not change how the run ended, so it is only logged.
    """
    import logging
    import traceback

    from engine import jobs

    try:
        jobs.schedule(run_dir.parent)
    except Exception:  # noqa: BLE001 - the run is over; the next call of schedule will try again
        logging.getLogger("engine").warning("Could not start the next queued run:\n%s", traceback.format_exc())


def command_supervise(arguments) -> int:
    from engine import executors, jobs

    if arguments.detach:
        executors.launch_detached_supervisor(arguments.run_dir)
        return 0
    code = executors.supervise(arguments.run_dir)
    # The run's slot is free now: start the next queued run, so the queue moves on with no page open.
    jobs.schedule(Path(arguments.run_dir).parent)
    return code


COMMANDS = {
    "stop": command_control,
    "kill": command_control,
    "resume": command_control,
    "rename": command_rename,
    "delete": command_delete,
    "restore": command_restore,
    "trash": command_trash,
    "audit": command_audit,
    "worker": command_worker,
    "supervise": command_supervise,
    "train": command_train,
    "evaluate": command_evaluate,
    "predict": command_predict,
    "runs": command_runs,
    "backbones": command_backbones,
    "check": command_check,
    "card": command_card,
    "export": command_export,
    "explain": command_explain,
    "operating-point": command_operating_point,
    "cache": run_cache_command,
    **cli_experiments.COMMANDS,
}


def main(argv=None) -> int:
    """Runs one CLI command; returns the process exit status."""
    try:
        arguments = build_parser().parse_args(argv)
    except argparse.ArgumentError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    from engine.backbones import WeightsUnavailableError

    try:
        return COMMANDS[arguments.command](arguments)
    except (CommandError, ValueError, PermissionError, WeightsUnavailableError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`python -m engine runs | head -1`): end quietly, as the Python docs
        # advise (signal module, "Note on SIGPIPE"): point stdout at /dev/null so the interpreter's
        # final flush does not raise again, and exit 1.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
