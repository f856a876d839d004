"""Registry of the reduction subcommands of `jaxpolaron` (synth-run, find-peaks, index, ...).

Each command module defines `add_parser(sub)` which adds its subparser and sets `func=run` (a function
`argparse.Namespace -> int` exit code). User mistakes raise `jaxpolaron.errors.InputError` (one line, exit 2).
"""

from __future__ import annotations

import importlib

COMMAND_MODULES: tuple[str, ...] = (
    "data_pipeline.synth_cli",
    "data_pipeline.index_cli",
    "data_pipeline.reduce_cli",
    "data_pipeline.show_cli",
    "fitting.fit_cli",
    "fitting.demo_cli",
)


def register(sub) -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
