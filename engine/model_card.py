"""The model card: one page in plain words about a finished run.

`card_facts` gathers what the run folder knows (what the model is for, the data, how it was
trained, how right it is per class, calibration, the operating point, weak spots, exports)
into one JSON-ready dictionary, with the sentences a reader sees. `card_markdown` and
`card_html` only draw those facts, so the three files `write_card` saves always agree. Every
source file may be missing (old runs, runs that failed): the card then says what is missing
in words instead of failing.

The one field a person writes, the intended use, is kept in the run folder's `card.json`;
only the run's owner or an admin may set it (`engine.jobs.authorize`).
This module never imports TensorFlow.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re
from pathlib import Path
from typing import Any, Optional

from engine import runfiles

CARD_FILE = "card.json"
MARKDOWN_FILE = "model_card.md"
HTML_FILE = "model_card.html"
JSON_FILE = "model_card.json"
EXPORTS_FOLDER = "exports"
PARITY_FILE = "parity.json"
CARD_SCHEMA = 1

MAX_INTENDED_USE_CHARACTERS = 2000
# Weak spots: the most-confused pairs, and a few of their images as small thumbnails, so the
# HTML file stays well under a megabyte (5 × 3 thumbnails of at most 96 px, about 3 kB each).
MAX_WEAK_PAIRS = 5
MAX_EXAMPLES_PER_PAIR = 3
THUMBNAIL_PIXELS = 96
THUMBNAIL_QUALITY = 70
# Long lists (left-out files, leaks) are cut here on the card; the counts stay whole.
MAX_LISTED = 20


# ---------------------------------------------------------------------------------------------
# The intended use: the one field a person fills in.

def intended_use(run_dir: str | os.PathLike) -> str:
    """What the run's model is for, as its owner wrote it ("" when nobody has)."""
    stored = runfiles.read_json(Path(run_dir) / CARD_FILE)
    text = stored.get("intended_use") if isinstance(stored, dict) else None
    return text if isinstance(text, str) else ""


def set_intended_use(run_dir: str | os.PathLike, text: str, user=None, source: str = "python") -> str:
    """Saves what the run's model is for in the run folder's `card.json`; owner or admin only.

    Args:
        run_dir: The run folder.
        text: Plain words (at most MAX_INTENDED_USE_CHARACTERS); "" clears the field.
        user: Who writes it (`engine.users.User`; None is the local user, an admin).
        source: Where from, for the audit log ("page", "cli" or "python").

    Returns:
        The text as saved (surrounding blank space removed).

    Raises:
        PermissionError: a viewer, or a member who does not own the run.
        ValueError: the text is not text or is too long; or the folder is not a run.
    """
    from engine import audit
    from engine.jobs import authorize
    from engine.status import now_iso, read_status

    run_dir = Path(run_dir)
    if not (run_dir / runfiles.CONFIG_FILE).is_file():
        raise ValueError(f"{run_dir} is not a run folder (no {runfiles.CONFIG_FILE}).")
    acting = authorize(user, read_status(run_dir), "fill in the model card of")
    if not isinstance(text, str):
        raise ValueError(f"The intended use must be text; received {type(text).__name__}.")
    text = text.strip()
    if len(text) > MAX_INTENDED_USE_CHARACTERS:
        raise ValueError(f"The intended use may have at most {MAX_INTENDED_USE_CHARACTERS:,} characters; "
                         f"received {len(text):,}. Shorten it to a few sentences.")
    stored = runfiles.read_json(run_dir / CARD_FILE)
    stored = stored if isinstance(stored, dict) else {}
    stored.update(intended_use=text, updated_by=acting.id, updated_by_name=acting.name, updated_at=now_iso())
    runfiles.atomic_write_json(run_dir / CARD_FILE, stored)
    audit.record(run_dir.parent, acting, "set_intended_use", run_dir.name, source)
    return text


# ---------------------------------------------------------------------------------------------
# Words and numbers.

def _count(number: Any) -> str:
    """A whole number with thousands separators: 1,000."""
    return f"{int(number):,}"


def _percent(share: Optional[float]) -> str:
    """A share as a percentage with one decimal: 96.2 %."""
    if share is None or not isinstance(share, (int, float)) or math.isnan(share):
        return "unknown"
    return f"{100 * share:.1f} %"


def _plural(number: int, word: str, plural: Optional[str] = None) -> str:
    return f"{_count(number)} {word if number == 1 else (plural or word + 's')}"


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "unknown"
    seconds = float(seconds)
    if seconds < 90:
        return f"{seconds:.0f} seconds"
    if seconds < 5400:
        return f"{seconds / 60:.1f} minutes"
    return f"{seconds / 3600:.1f} hours"


def _number(value: Any) -> Optional[float]:
    """A finite number from a JSON value, or None (old files, hand-edited files, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


# ---------------------------------------------------------------------------------------------
# The facts.

def card_facts(run_dir: str | os.PathLike) -> dict:
    """Everything the model card says about a run, JSON-ready, with the sentences a reader sees.

    Every source may be missing; then its section has `"available": false` and a sentence
    saying so, and `missing` lists the files that were not there.

    Args:
        run_dir: The run folder.

    Returns:
        A dictionary with `schema`, `run`, `intended_use`, `missing`, `data`, `training`,
        `evaluation`, `calibration`, `decision`, `weak_spots` and `exports`.
    """
    from engine.status import now_iso, read_status

    run_dir = Path(run_dir)
    status = read_status(run_dir)
    config = runfiles.read_json(run_dir / runfiles.CONFIG_FILE)
    report = runfiles.read_json(run_dir / runfiles.DATA_REPORT_FILE)
    evaluation = runfiles.read_json(run_dir / runfiles.EVALUATION_FILE)
    missing = [name for name, content in ((runfiles.CONFIG_FILE, config), (runfiles.DATA_REPORT_FILE, report),
                                          (runfiles.EVALUATION_FILE, evaluation))
               if not isinstance(content, dict)]
    if status.state.value == "unknown":
        missing.insert(0, runfiles.STATUS_FILE)
    if not (run_dir / runfiles.PREDICTIONS_FILE).is_file():
        missing.append(runfiles.PREDICTIONS_FILE)
    evaluation_facts = _evaluation_facts(_dict(evaluation))
    use = intended_use(run_dir)
    return {
        "schema": CARD_SCHEMA,
        "generated": now_iso(),
        "run": _run_facts(run_dir, status, _dict(config)),
        "intended_use": use,
        "intended_use_sentence": use or ("Nobody has said yet what this model is for. Its owner (or an admin) can "
                                         "write it on the Evaluate page."),
        "missing": missing,
        "missing_sentence": (f"Missing from the run folder: {', '.join(missing)}; the parts of the card that need "
                             "them say so." if missing else ""),
        "data": _data_facts(_dict(report), report is not None),
        "training": _training_facts(run_dir, status, _dict(config)),
        "evaluation": evaluation_facts,
        "calibration": _calibration_facts(_dict(evaluation).get("calibration")),
        "decision": _decision_facts(run_dir, evaluation_facts.get("classes") or []),
        "weak_spots": _weak_spot_facts(run_dir, evaluation_facts),
        "exports": _export_facts(run_dir),
    }


def _run_facts(run_dir: Path, status, config: dict) -> dict:
    name = status.name or str(config.get("name") or "") or run_dir.name
    return {"id": run_dir.name, "name": name, "owner": status.owner, "owner_name": status.owner_name,
            "state": status.state.value, "message": status.message, "backbone": status.backbone,
            "dataset": status.dataset, "created": status.created, "finished": status.finished}


def _data_facts(report: dict, present: bool) -> dict:
    if not present or not report:
        return {"available": False, "sentences": ["The data report (data_report.json) is missing, so the card "
                                                  "cannot say which images the model learned from."]}
    classes = [str(name) for name in _list(report.get("classes"))]
    class_counts = {str(name): int(count) for name, count in _dict(report.get("class_counts")).items()
                    if _number(count) is not None}
    split_counts = {str(split): {str(name): int(count) for name, count in _dict(rows).items()
                                 if _number(count) is not None}
                    for split, rows in _dict(report.get("split_counts")).items()}
    excluded = [{"path": str(item.get("path", "")), "name": Path(str(item.get("path", ""))).name,
                 "label": item.get("label"), "split": item.get("split"), "reason": str(item.get("reason", ""))}
                for item in _list(report.get("excluded")) if isinstance(item, dict)]
    ignored = [{"path": str(item.get("path", "")), "name": Path(str(item.get("path", ""))).name,
                "reason": str(item.get("reason", ""))}
               for item in _list(report.get("ignored")) if isinstance(item, dict)]
    warnings = [str(warning) for warning in _list(report.get("warnings"))]
    total = sum(class_counts.values())
    sentences = [f"{_plural(len(classes), 'class', 'classes')}: "
                 + ", ".join(f"{name} ({_count(class_counts.get(name, 0))} images)" for name in classes)
                 + f"; {_plural(total, 'image')} in all."]
    if split_counts:
        sentences.append("Split: " + ", ".join(f"{_count(sum(rows.values()))} to {_split_words(split)}"
                                               for split, rows in split_counts.items()) + ".")
    if excluded:
        sentences.append(f"Left out: {_plural(len(excluded), 'file')} that could not be used as images; each is "
                         "listed with the reason.")
    else:
        sentences.append("No file was left out.")
    if ignored:
        sentences.append(f"Ignored: {_plural(len(ignored), 'other file')} in the folder that were not images.")
    doctor = report.get("doctor")
    doctor_facts = _doctor_facts(doctor) if isinstance(doctor, dict) else None
    if doctor_facts:
        sentences.extend(doctor_facts["sentences"])
    else:
        sentences.append("Duplicates and leakage were not checked when this run trained (the data doctor's "
                         "findings are not in its data report).")
    return {"available": True, "classes": classes, "class_counts": class_counts, "split_counts": split_counts,
            "num_images": total, "excluded": excluded, "num_excluded": len(excluded), "ignored": ignored,
            "num_ignored": len(ignored), "warnings": warnings, "doctor": doctor_facts, "sentences": sentences}


def _split_words(split: str) -> str:
    return {"train": "learn from", "validation": "check it while it learned (validation)",
            "test": "test it once at the end"}.get(split, split)


def _doctor_facts(doctor: dict) -> dict:
    leakage = [{"paths": [str(path) for path in _list(leak.get("paths"))],
                "labels": [str(label) for label in _list(leak.get("labels"))],
                "splits": [str(split) for split in _list(leak.get("splits"))],
                "distance": leak.get("distance"), "exact": bool(leak.get("exact"))}
               for leak in _list(doctor.get("leakage")) if isinstance(leak, dict)]
    num_leaks = int(_number(doctor.get("num_leaks")) or len(leakage))
    duplicates = int(_number(doctor.get("num_duplicate_files")) or 0)
    near = int(_number(doctor.get("num_near_duplicate_pairs")) or 0)
    sentences = [
        (f"Exact copies of another file: {_count(duplicates)}." if duplicates
         else "No file was an exact copy of another."),
        (f"Pairs of images that are nearly the same picture: {_count(near)}." if near
         else "No two images were nearly the same picture."),
        (f"Leakage: {_plural(num_leaks, 'training picture')} also found (the same or nearly the same) among the "
         "images used to check the model, so its scores below may be too good." if num_leaks
         else "No leakage: no training picture also appears among the images used to check the model."),
    ]
    return {"num_duplicate_files": duplicates, "num_near_duplicate_pairs": near, "num_leaks": num_leaks,
            "leakage": leakage, "sentences": sentences}


def _training_facts(run_dir: Path, status, config: dict) -> dict:
    if not config:
        return {"available": False, "sentences": ["The settings (config.json) are missing, so the card cannot "
                                                  "say how the model was trained."]}
    model, training = _dict(config.get("model")), _dict(config.get("training"))
    fine_tuning, augmentation = _dict(config.get("fine_tuning")), _dict(config.get("augmentation"))
    weights = str(model.get("weights", ""))
    start = {"imagenet": "pretrained on ImageNet (a large collection of everyday photos)",
             "none": "started from random values (not pretrained)"}.get(weights, "started from a weights file")
    backbone = model.get("backbone") or status.backbone or "an unknown network"
    image_size = model.get("image_size")
    sentences = [f"Built on {backbone}, {start}; only a small final part was trained on these images"
                 + (f", shown at {image_size}×{image_size} pixels." if image_size else ".")]
    rounds_done = status.epoch
    planned = int(_number(training.get("epochs")) or 0)
    layers = int(_number(fine_tuning.get("layers")) or 0)
    if layers:
        planned += int(_number(fine_tuning.get("epochs")) or 0)
    sentences.append(f"Training rounds (one round shows the model every training image once): "
                     f"{_count(rounds_done) if rounds_done is not None else 'unknown'} of {_count(planned)} planned.")
    if layers:
        sentences.append(f"Then the last {_plural(layers, 'layer')} of {backbone} were adjusted too, more gently "
                         "(fine-tuning).")
    changes = [name for name, on in (("flipped", augmentation.get("flip") not in (None, "none")),
                                     ("rotated", bool(_number(augmentation.get("rotation")))),
                                     ("zoomed", bool(_number(augmentation.get("zoom")))),
                                     ("contrast-changed", bool(_number(augmentation.get("contrast")))))
               if on]
    sentences.append(("Training images were randomly " + ", ".join(changes) + " so the model sees more variety."
                      ) if changes else "Training images were used as they are (no random changes).")
    seconds = _training_seconds(run_dir)
    if seconds is not None:
        sentences.append(f"Training took {_duration(seconds)}.")
    return {"available": True, "backbone": backbone, "weights": weights, "image_size": image_size,
            "alpha": model.get("alpha"), "rounds_done": rounds_done, "rounds_planned": planned,
            "fine_tuned_layers": layers, "batch_size": training.get("batch_size"),
            "learning_rate": training.get("learning_rate"), "augmentation": changes,
            "training_seconds": seconds, "state": status.state.value, "sentences": sentences}


def _training_seconds(run_dir: Path) -> Optional[float]:
    if not (run_dir / runfiles.METRICS_FILE).is_file():
        return None
    from engine.interpret import metrics_frames

    _, epochs = metrics_frames(run_dir)
    if epochs.empty or "elapsed_seconds" not in epochs:
        return None
    value = _number(float(epochs["elapsed_seconds"].max()))
    return round(value, 1) if value is not None else None


def _evaluation_facts(evaluation: dict) -> dict:
    splits = {name: split for name, split in _dict(evaluation.get("splits")).items() if isinstance(split, dict)}
    if not splits:
        return {"available": False, "classes": [str(name) for name in _list(evaluation.get("classes"))],
                "splits": {}, "main_split": None,
                "sentences": ["The model was not evaluated (evaluation.json is missing or empty), so the card "
                              "cannot say how often it is right."]}
    classes = [str(name) for name in _list(evaluation.get("classes"))]
    facts = {name: _split_facts(name, split, classes) for name, split in splits.items()}
    # The test images were never used to choose anything, so they give the fairest score.
    main = "test" if "test" in facts else ("validation" if "validation" in facts else next(iter(facts)))
    return {"available": True, "classes": classes, "splits": facts, "main_split": main,
            "sentences": [facts[name]["sentence"] for name in facts]}


def _split_facts(name: str, split: dict, classes: list) -> dict:
    split_classes = [str(label) for label in _list(split.get("classes"))] or classes
    matrix = [[int(value) for value in row] for row in _list(split.get("confusion_matrix"))]
    total = sum(sum(row) for row in matrix) or int(_number(split.get("num_images")) or 0)
    correct = sum(matrix[index][index] for index in range(min(len(matrix), len(split_classes))))
    accuracy = _number(split.get("accuracy"))
    words = "test" if name == "test" else ("validation" if name == "validation" else name)
    sentence = (f"Right on {_count(correct)} of {_count(total)} {words} images ({_percent(correct / total)})."
                if total else f"No {words} images were evaluated.")
    per_class = []
    per_class_source = _dict(split.get("per_class"))
    for index, label in enumerate(split_classes):
        values = _dict(per_class_source.get(label))
        row = matrix[index] if index < len(matrix) else []
        images = sum(row) if row else int(_number(values.get("support")) or 0)
        right = row[index] if index < len(row) else None
        called = sum(other[index] for other in matrix if index < len(other))
        recall, precision = _number(values.get("recall")), _number(values.get("precision"))
        text = (f"{label}: right on {_count(right)} of {_plural(images, words + ' image')} ({_percent(recall)})."
                if right is not None and images else f"{label}: no {words} images.")
        if called:
            text += f" When it said {label}, it was right {_percent(precision)} of the time."
        per_class.append({"class": label, "images": images, "right": right, "precision": precision,
                          "recall": recall, "f1": _number(values.get("f1")), "support": values.get("support"),
                          "sentence": text})
    return {"split": name, "classes": split_classes, "accuracy": accuracy, "macro_f1": _number(split.get("macro_f1")),
            "num_images": total, "correct": correct, "confusion_matrix": matrix, "per_class": per_class,
            "sentence": sentence}


def _calibration_facts(calibration: Any) -> dict:
    calibration = _dict(calibration)
    temperature = _number(calibration.get("temperature"))
    if temperature is None:
        return {"available": False, "sentences": ["The model's confidence was not calibrated (this run has no "
                                                  "calibration), so its stated confidence was not checked "
                                                  "against how often it is right."]}
    errors = _dict(calibration.get("expected_calibration_error"))
    before, after = _number(errors.get("uncalibrated")), _number(errors.get("calibrated"))
    reliability = _dict(calibration.get("reliability"))
    bins = {kind: [{"confidence": _number(entry.get("confidence")), "accuracy": _number(entry.get("accuracy")),
                    "count": int(_number(entry.get("count")) or 0)}
                   for entry in _list(reliability.get(kind)) if isinstance(entry, dict)]
            for kind in ("uncalibrated", "calibrated")}
    fitted_on = str(calibration.get("fitted_on") or "validation")
    fitted_images = _number(calibration.get("num_images"))
    fitted_words = f"the {_count(fitted_images)} {fitted_on} images" if fitted_images else f"the {fitted_on} images"
    sentences = [f"The model's confidence was adjusted with one number (a temperature of {temperature:.2f}, fitted "
                 f"on {fitted_words}) so that \"90 % sure\" means right about 9 times in 10."]
    if before is not None and after is not None:
        sentences.append(f"On the {fitted_on} images, its stated confidence was on average {100 * before:.1f} "
                         f"points away from how often it was right before the adjustment, and {100 * after:.1f} "
                         "points after.")
    # The test images never took part in fitting the temperature: the honest check of the adjustment.
    test_errors = _dict(_dict(_dict(calibration.get("splits")).get("test")).get("expected_calibration_error"))
    test_before, test_after = _number(test_errors.get("uncalibrated")), _number(test_errors.get("calibrated"))
    if test_before is not None and test_after is not None:
        sentences.append(f"On the test images, which the adjustment never saw: {100 * test_before:.1f} points "
                         f"before, {100 * test_after:.1f} after.")
    return {"available": True, "temperature": temperature, "fitted_on": fitted_on,
            "test_expected_calibration_error": {"uncalibrated": test_before, "calibrated": test_after},
            "bins": int(_number(calibration.get("bins")) or len(bins["calibrated"]) or 0),
            "expected_calibration_error": {"uncalibrated": before, "calibrated": after},
            "reliability": bins, "sentences": sentences}


def _decision_facts(run_dir: Path, classes: list) -> dict:
    from engine.operating_point import read_decision

    if not (run_dir / runfiles.DECISION_FILE).is_file():
        return {"available": False, "threshold": None, "minimum_confidence": None,
                "sentences": ["No operating point was chosen: the model names the class it finds most likely, "
                              "however unsure it is."]}
    decision = read_decision(run_dir)
    threshold, minimum = decision.threshold, decision.minimum_confidence
    sentences = []
    if threshold is not None and len(classes) == 2:
        sentences.append(f"It answers {classes[1]} when it is at least {_percent(threshold)} sure of {classes[1]}, "
                         f"otherwise {classes[0]} (the usual cut is 50 %).")
    if minimum is not None:
        sentences.append(f"When it is less than {_percent(minimum)} sure of its answer, it says \"not sure\" "
                         "instead.")
    if not sentences:
        sentences.append("No threshold was chosen: the model names the class it finds most likely.")
    return {"available": True, "threshold": threshold, "minimum_confidence": minimum, "sentences": sentences}


def _weak_spot_facts(run_dir: Path, evaluation: dict) -> dict:
    split = evaluation.get("main_split")
    if not split:
        return {"available": False, "split": None, "pairs": [],
                "sentences": ["Without an evaluation the card cannot say which classes the model mixes up."]}
    from engine.interpret import cell_images, load_predictions, most_confused

    split_facts = evaluation["splits"][split]
    pairs = most_confused(split_facts, count=MAX_WEAK_PAIRS)
    predictions = load_predictions(run_dir) if (run_dir / runfiles.PREDICTIONS_FILE).is_file() else None
    found = []
    for true, predicted, count in pairs:
        examples = []
        if predictions is not None and not predictions.empty:
            for _, row in cell_images(predictions, split, true, predicted).head(MAX_EXAMPLES_PER_PAIR).iterrows():
                examples.append({"path": str(row["path"]), "name": Path(str(row["path"])).name,
                                 "confidence": _number(float(row["confidence"]))})
        found.append({"true": true, "predicted": predicted, "count": count, "examples": examples,
                      "sentence": f"{_plural(count, 'image')} of {true} taken for {predicted}."})
    words = "test" if split == "test" else split
    if not found:
        sentences = [f"It mixed up no two classes on the {words} images."]
    else:
        sentences = [f"The classes it mixes up most on the {words} images (at most {MAX_WEAK_PAIRS} pairs, with up to "
                     f"{MAX_EXAMPLES_PER_PAIR} of each pair's images it was surest about):"]
        if predictions is None:
            sentences.append("No example images: predictions.csv is missing.")
    return {"available": True, "split": split, "pairs": found, "sentences": sentences}


def _export_facts(run_dir: Path) -> dict:
    folder = run_dir / EXPORTS_FOLDER
    formats = []
    if folder.is_dir():
        for entry in sorted(folder.iterdir()):
            if entry.is_dir() and not entry.name.startswith("."):
                parity = runfiles.read_json(entry / PARITY_FILE)
                formats.append({"format": entry.name, "files": sorted(child.name for child in entry.iterdir()
                                                                      if child.is_file()),
                                "parity": parity if isinstance(parity, dict) else None})
    if not formats:
        return {"available": False, "formats": [], "sentences": ["No exports yet."]}
    sentences = [f"{item['format']}: " + (_parity_sentence(item["parity"]) if item["parity"]
                                          else "no parity check recorded.") for item in formats]
    return {"available": True, "formats": formats, "sentences": sentences}


def _parity_sentence(parity: dict) -> str:
    # The parity file's layout belongs to the exporter (issue 14); show what it holds, key by key.
    parts = [f"{key} {_plain_value(value)}" for key, value in parity.items() if not isinstance(value, (dict, list))]
    return "parity check: " + ("; ".join(parts) if parts else "recorded (see model_card.json).") + "."


def _plain_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


# ---------------------------------------------------------------------------------------------
# Markdown.

# Characters that start emphasis, code, links, HTML or table cells anywhere in a line.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|~])")
# What makes text a heading, a list item, a quote or a rule when it starts a line ("# ", "- ", "1. ",
# ">", "---"); "2026-11-30" or "#3" does not, so it is left as it is.
_MARKDOWN_BLOCK_MARK = re.compile(r"^(\s*)(#+(?=\s|$)|[-+](?=\s|$)|>|=+\s*$|-+\s*$)")
_MARKDOWN_NUMBERED = re.compile(r"^(\s*\d+)([.)])(?=\s|$)")


def markdown_escape(text: Any) -> str:
    """Text that cannot change a Markdown page's layout: one line, its special characters escaped.

    Safe anywhere in a line, at its start included (a heading or list mark there is escaped too).
    """
    line = _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))
    line = _MARKDOWN_BLOCK_MARK.sub(r"\1\\\2", line)
    return _MARKDOWN_NUMBERED.sub(r"\1\\\2", line)


def card_markdown(facts: dict) -> str:
    """The model card as Markdown, drawn from `card_facts`."""
    m = markdown_escape
    run = facts["run"]
    lines = [f"# Model card: {m(run['name'])}", ""]
    lines += [f"Run {m(run['id'])}, owned by {m(run['owner_name'] or run['owner'] or 'nobody')}, "
              f"{m(run['state'])}. Card written {m(facts['generated'])}.", ""]
    if facts["missing_sentence"]:
        lines += [f"> {m(facts['missing_sentence'])}", ""]
    lines += ["## What it is for", ""]
    for paragraph in re.split(r"\n\s*\n", facts["intended_use_sentence"]):
        lines += [m(paragraph), ""]

    data = facts["data"]
    lines += ["## The data", ""] + [f"- {m(sentence)}" for sentence in data["sentences"]] + [""]
    if data["available"] and data["split_counts"]:
        splits = list(data["split_counts"])
        lines += ["| class | " + " | ".join(m(split) for split in splits) + " |",
                  "|---|" + "---:|" * len(splits)]
        lines += [f"| {m(name)} | " + " | ".join(_count(data["split_counts"][split].get(name, 0)) for split in splits)
                  + " |" for name in data["classes"]]
        lines.append("")
    if data["available"] and data["excluded"]:
        lines += ["Left-out files:", ""]
        lines += [f"- {m(item['name'])} ({m(item['label'] or '')}): {m(item['reason'])}"
                  for item in data["excluded"][:MAX_LISTED]]
        if len(data["excluded"]) > MAX_LISTED:
            lines.append(f"- … and {_count(len(data['excluded']) - MAX_LISTED)} more (see data_report.json).")
        lines.append("")
    doctor = data.get("doctor") if data["available"] else None
    if doctor and doctor["leakage"]:
        lines += ["Leaks (training picture ~ checking picture):", ""]
        lines += [f"- {m(_leak_text(leak))}" for leak in doctor["leakage"][:MAX_LISTED]] + [""]

    lines += ["## How it was trained", ""] + [f"- {m(sentence)}" for sentence in facts["training"]["sentences"]] + [""]

    evaluation = facts["evaluation"]
    lines += ["## How often it is right", ""]
    if not evaluation["available"]:
        lines += [m(sentence) for sentence in evaluation["sentences"]] + [""]
    for name, split in evaluation["splits"].items():
        lines += [f"### {m(name.capitalize())} images", "", m(split["sentence"]), ""]
        lines += [f"- {m(row['sentence'])}" for row in split["per_class"]] + [""]
        if split["confusion_matrix"]:
            lines += ["Rows: the true class; columns: what the model said.", ""]
            lines += ["| true ↓ / said → | " + " | ".join(m(label) for label in split["classes"]) + " |",
                      "|---|" + "---:|" * len(split["classes"])]
            lines += [f"| {m(label)} | " + " | ".join(_count(value) for value in row) + " |"
                      for label, row in zip(split["classes"], split["confusion_matrix"])]
            lines.append("")

    lines += ["## How far to trust its confidence", ""]
    lines += [f"- {m(sentence)}" for sentence in facts["calibration"]["sentences"]]
    lines += [f"- {m(sentence)}" for sentence in facts["decision"]["sentences"]] + [""]

    weak = facts["weak_spots"]
    lines += ["## Known weak spots", ""] + [m(sentence) for sentence in weak["sentences"]] + [""]
    for pair in weak["pairs"]:
        examples = ", ".join(f"{m(example['name'])} ({_percent(example['confidence'])} sure)"
                             for example in pair["examples"])
        lines.append(f"- {m(pair['sentence'])}" + (f" Examples: {examples}." if examples else ""))
    lines += ["", "## Exports", ""] + [f"- {m(sentence)}" for sentence in facts["exports"]["sentences"]] + [""]
    return "\n".join(lines)


def _leak_text(leak: dict) -> str:
    names = " ~ ".join(Path(path).name for path in leak["paths"])
    closeness = "identical" if leak["exact"] else f"{leak['distance']} bits apart"
    return f"{names} ({', '.join(leak['splits'])}; {closeness})"


# ---------------------------------------------------------------------------------------------
# HTML: one self-contained, printable file.

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2933; max-width: 52rem;
       margin: 2rem auto; padding: 0 1rem; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.2rem; border-bottom: 1px solid #d9dee3;
     padding-bottom: .2rem; margin-top: 1.8rem; } h3 { font-size: 1rem; }
.meta, .note { color: #52606d; font-size: .9rem; }
.missing { background: #fff4e5; border-left: 4px solid #f0a020; padding: .5rem .8rem; }
.use { background: #f0f4f8; padding: .6rem .9rem; white-space: pre-wrap; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .9rem; }
th, td { border: 1px solid #d9dee3; padding: .25rem .5rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
td.cell.dark { color: #fff; }
.pair { margin: .6rem 0; } .thumbs { display: flex; gap: .5rem; flex-wrap: wrap; }
figure { margin: 0; font-size: .75rem; color: #52606d; max-width: 110px; overflow-wrap: anywhere; }
figure img { display: block; border: 1px solid #d9dee3; }
svg text { font-size: 9px; fill: #52606d; }
@media print { body { margin: 0; max-width: none; font-size: 10pt; } h2 { break-after: avoid; }
  table, .pair, svg { break-inside: avoid; } .use, .missing { border: 1px solid #999; }
  td.cell { -webkit-print-color-adjust: exact; print-color-adjust: exact; } }
"""


def card_html(facts: dict) -> str:
    """The model card as one self-contained, printable HTML page, drawn from `card_facts`.

    Styles are inline, the reliability diagram is inline SVG and weak-spot examples are small
    embedded JPEG thumbnails; nothing is fetched from elsewhere. Every user-supplied string is escaped.
    """
    e = html.escape
    run = facts["run"]
    body = [f"<h1>Model card: {e(run['name'])}</h1>",
            f"<p class=\"meta\">Run {e(run['id'])}, owned by {e(run['owner_name'] or run['owner'] or 'nobody')}, "
            f"{e(run['state'])}. Card written {e(facts['generated'])}.</p>"]
    if facts["missing_sentence"]:
        body.append(f"<p class=\"missing\">{e(facts['missing_sentence'])}</p>")
    body += ["<h2>What it is for</h2>", f"<div class=\"use\">{e(facts['intended_use_sentence'])}</div>"]

    data = facts["data"]
    body += ["<h2>The data</h2>", _html_list(data["sentences"])]
    if data["available"] and data["split_counts"]:
        splits = list(data["split_counts"])
        rows = "".join(f"<tr><td>{e(name)}</td>" + "".join(
            f"<td>{_count(data['split_counts'][split].get(name, 0))}</td>" for split in splits) + "</tr>"
                       for name in data["classes"])
        body.append("<table><tr><th>class</th>" + "".join(f"<th>{e(split)}</th>" for split in splits)
                    + f"</tr>{rows}</table>")
    if data["available"] and data["excluded"]:
        body.append("<h3>Left-out files</h3>" + _html_list(
            [f"{item['name']} ({item['label'] or ''}): {item['reason']}" for item in data["excluded"][:MAX_LISTED]]
            + ([f"… and {_count(len(data['excluded']) - MAX_LISTED)} more (see data_report.json)."]
               if len(data["excluded"]) > MAX_LISTED else [])))
    doctor = data.get("doctor") if data["available"] else None
    if doctor and doctor["leakage"]:
        body.append("<h3>Leaks (training picture ~ checking picture)</h3>"
                    + _html_list([_leak_text(leak) for leak in doctor["leakage"][:MAX_LISTED]]))

    body += ["<h2>How it was trained</h2>", _html_list(facts["training"]["sentences"])]

    evaluation = facts["evaluation"]
    body.append("<h2>How often it is right</h2>")
    if not evaluation["available"]:
        body.append(_html_list(evaluation["sentences"]))
    for name, split in evaluation["splits"].items():
        body += [f"<h3>{e(name.capitalize())} images</h3>", f"<p>{e(split['sentence'])}</p>",
                 _html_list([row["sentence"] for row in split["per_class"]]), _confusion_table(split)]

    body += ["<h2>How far to trust its confidence</h2>",
             _html_list(facts["calibration"]["sentences"] + facts["decision"]["sentences"])]
    if facts["calibration"]["available"]:
        body.append(_reliability_svg(facts["calibration"]["reliability"]))

    weak = facts["weak_spots"]
    body += ["<h2>Known weak spots</h2>", _html_list(weak["sentences"])]
    for pair in weak["pairs"]:
        figures = "".join(_thumbnail_figure(example) for example in pair["examples"])
        body.append(f"<div class=\"pair\"><p>{e(pair['sentence'])}</p><div class=\"thumbs\">{figures}</div></div>")
    body += ["<h2>Exports</h2>", _html_list(facts["exports"]["sentences"])]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Model card: {e(run['name'])}</title><style>{_STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _html_list(sentences: list) -> str:
    return "<ul>" + "".join(f"<li>{html.escape(str(sentence))}</li>" for sentence in sentences) + "</ul>"


def _confusion_table(split: dict) -> str:
    matrix, classes = split["confusion_matrix"], split["classes"]
    if not matrix:
        return ""
    e = html.escape
    rows = []
    for label, row in zip(classes, matrix):
        total = sum(row) or 1
        cells = []
        for value in row:
            # Shaded by the share of the true class's images, so small and large classes read alike.
            share = value / total
            dark = " dark" if share > 0.6 else ""
            cells.append(f"<td class=\"cell{dark}\" style=\"background: rgba(37, 99, 235, {share:.2f})\" "
                         f"title=\"{_percent(share)} of {e(label)}\">{_count(value)}</td>")
        rows.append(f"<tr><th>{e(label)}</th>{''.join(cells)}</tr>")
    header = "<tr><th>true ↓ / said →</th>" + "".join(f"<th>{e(label)}</th>" for label in classes) + "</tr>"
    return ("<p class=\"note\">Rows: the true class; columns: what the model said; darker is a larger share "
            f"of the row.</p><table>{header}{''.join(rows)}</table>")


def _reliability_svg(reliability: dict) -> str:
    """A small reliability diagram: stated confidence against how often it was right, per bin."""
    size, margin = 200, 28
    inner = size - 2 * margin

    def point(confidence: float, accuracy: float) -> tuple[float, float]:
        return margin + confidence * inner, size - margin - accuracy * inner

    parts = [f"<rect x=\"{margin}\" y=\"{margin}\" width=\"{inner}\" height=\"{inner}\" fill=\"none\" "
             "stroke=\"#d9dee3\"/>",
             f"<line x1=\"{margin}\" y1=\"{size - margin}\" x2=\"{size - margin}\" y2=\"{margin}\" "
             "stroke=\"#9aa5b1\" stroke-dasharray=\"3 3\"/>"]
    for kind, colour in (("uncalibrated", "#f0a020"), ("calibrated", "#2563eb")):
        points = [point(entry["confidence"], entry["accuracy"]) for entry in reliability.get(kind, [])
                  if entry["count"] and entry["confidence"] is not None and entry["accuracy"] is not None]
        if points:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
            parts.append(f"<polyline points=\"{path}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\"/>")
            parts += [f"<circle cx=\"{x:.1f}\" cy=\"{y:.1f}\" r=\"2.5\" fill=\"{colour}\"/>" for x, y in points]
    parts += [f"<text x=\"{margin}\" y=\"{size - 8}\">stated confidence →</text>",
              f"<text x=\"4\" y=\"{margin - 8}\">share right ↑</text>",
              f"<text x=\"{size - margin - 70}\" y=\"{margin + 12}\" style=\"fill:#f0a020\">before</text>",
              f"<text x=\"{size - margin - 70}\" y=\"{margin + 24}\" style=\"fill:#2563eb\">after</text>"]
    return (f"<figure style=\"max-width:none\"><svg width=\"{size}\" height=\"{size}\" viewBox=\"0 0 {size} {size}\" "
            f"role=\"img\" aria-label=\"reliability diagram\">{''.join(parts)}</svg><figcaption>On the dashed line, "
            "stated confidence matches how often the model is right; before (orange) and after (blue) the "
            "adjustment.</figcaption></figure>")


def _thumbnail_figure(example: dict) -> str:
    e = html.escape
    caption = f"{e(example['name'])}<br>{_percent(example['confidence'])} sure"
    data = _thumbnail(example["path"])
    if data is None:
        return f"<figure>(image unreadable or moved)<br>{caption}</figure>"
    return (f"<figure><img src=\"data:image/jpeg;base64,{data}\" alt=\"{e(example['name'])}\">"
            f"{caption}</figure>")


def _thumbnail(path: str) -> Optional[str]:
    """The image as a base64 JPEG of at most THUMBNAIL_PIXELS a side, or None when it cannot be read."""
    from PIL import Image

    from engine.images import load_rgb

    try:
        image = Image.fromarray(load_rgb(path))
    except Exception:  # noqa: BLE001 - a moved or damaged file only loses its thumbnail on the card
        return None
    image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------
# Writing the card.

def write_card(run_dir: str | os.PathLike) -> dict[str, Path]:
    """Writes `model_card.md`, `model_card.html` and `model_card.json` into the run folder (atomically).

    Returns:
        The paths written, by format: {"markdown": …, "html": …, "json": …}.

    Raises:
        ValueError: the folder is not a run folder.
    """
    run_dir = Path(run_dir)
    if not (run_dir / runfiles.CONFIG_FILE).is_file() and not (run_dir / runfiles.STATUS_FILE).is_file():
        raise ValueError(f"{run_dir} is not a run folder (no {runfiles.CONFIG_FILE} or {runfiles.STATUS_FILE}).")
    facts = card_facts(run_dir)
    paths = {"markdown": run_dir / MARKDOWN_FILE, "html": run_dir / HTML_FILE, "json": run_dir / JSON_FILE}
    runfiles.atomic_write_text(paths["markdown"], card_markdown(facts))
    runfiles.atomic_write_text(paths["html"], card_html(facts))
    runfiles.atomic_write_json(paths["json"], facts)
    return paths
