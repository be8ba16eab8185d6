"""The parity numbers of a run's exports as rows and as a Markdown table (docs, CLI, bench)."""

from __future__ import annotations

import os

COLUMNS = ["export", "passed", "images", "max abs diff", "top-1 agreement", "accuracy export", "accuracy keras",
           "MB", "load s", "1 image ms", "32 images ms"]


def parity_rows(exports: list[dict]) -> list[dict]:
    """One flat row per export of `engine.exports.list_exports` (an export without parity.json shows blanks)."""
    rows = []
    for item in exports:
        parity = item.get("parity") or {}
        name = item["format"] + ("" if item["quantize"] == "none" else f"-{item['quantize']}")
        rows.append({
            "export": name,
            "passed": "yes" if item.get("passed") else "FAILED",
            "images": parity.get("images"),
            "max abs diff": _number(parity.get("max_abs_difference"), ".1e"),
            "top-1 agreement": _number(parity.get("top1_agreement"), ".1%"),
            "accuracy export": _number(parity.get("accuracy_export"), ".1%"),
            "accuracy keras": _number(parity.get("accuracy_keras"), ".1%"),
            "MB": _number((parity.get("file_bytes") or 0) / 1e6 if parity else None, ".2f"),
            "load s": _number(parity.get("load_seconds"), ".2f"),
            "1 image ms": _number(parity.get("latency_one_ms"), ".2f"),
            "32 images ms": _number(parity.get("latency_batch32_ms"), ".1f"),
        })
    return rows


def markdown_table(exports: list[dict]) -> str:
    """The rows of `parity_rows` as a Markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for row in parity_rows(exports):
        lines.append("| " + " | ".join("" if row[name] is None else str(row[name]) for name in COLUMNS) + " |")
    return "\n".join(lines)


def _number(value, spec: str):
    return None if value is None else format(value, spec)


def describe_run(run_dir: str | os.PathLike) -> str:
    """The run's backbone, image size and validation images, for a table's caption."""
    from engine import runfiles

    config = runfiles.read_json(os.path.join(run_dir, runfiles.CONFIG_FILE)) or {}
    model = config.get("model") or {}
    alpha = f" α={model['alpha']}" if model.get("alpha") else ""
    return f"{model.get('backbone', '?')}{alpha} at {model.get('image_size', '?')} px"
