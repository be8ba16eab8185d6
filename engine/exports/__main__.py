"""`python -m engine.exports RUN_DIR [--sample-limit N] [--formats tflite-int8 onnx ...]`

Exports a run in every format (or those named) and prints the parity table: the command
behind the real-data table of docs/exports.md. `python -m engine export` is the one-format
command of the app's CLI.
"""

from __future__ import annotations

import argparse
import sys

from engine.exports import DEFAULT_SAMPLE_LIMIT, FORMATS, export_name, export_run, list_exports
from engine.exports.report import describe_run, markdown_table


def main(arguments=None) -> int:
    names = {export_name(format, quantize): (format, quantize)
             for format, quantizations in FORMATS.items() for quantize in quantizations}
    parser = argparse.ArgumentParser(prog="python -m engine.exports", description=__doc__.splitlines()[2])
    parser.add_argument("run_dir")
    parser.add_argument("--sample-limit", type=int, default=DEFAULT_SAMPLE_LIMIT)
    parser.add_argument("--formats", nargs="*", choices=sorted(names), default=list(names))
    options = parser.parse_args(arguments)
    failures = []
    for name in options.formats:
        try:
            export_run(options.run_dir, *names[name], sample_limit=options.sample_limit,
                       progress=lambda text: print(text, file=sys.stderr, flush=True))
        except ValueError as error:
            failures.append(f"{name}: {error}")
    print(f"{describe_run(options.run_dir)}, parity on up to {options.sample_limit} validation images:\n")
    print(markdown_table(list_exports(options.run_dir)))
    for failure in failures:
        print(f"\nnot exported: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
