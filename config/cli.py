"""The command line of a DVC stage (DESIGN.md §3): ``main(argv)`` takes its paths as options from ``dvc.yaml`` and
the params file through the strict loader; this parses them the same way for every stage."""

from __future__ import annotations

import argparse
import logging

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def stage_arguments(doc: str, argv: list[str] | None, **options: str | tuple[str | None, str] | None
                    ) -> argparse.Namespace:
    """``--params`` and one ``--<name>`` per keyword (``pseudo_labels`` -> ``--pseudo-labels``), parsed from ``argv``,
    with the stage's logging set up.

    A keyword's value is the option's default, or ``(default, help)``; a default of None makes the option required.
    ``params`` may be given to add a help text to ``--params`` (default ``params.yaml``). The description is the
    first paragraph of the stage's docstring ``doc``.
    """
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    for name, spec in {"params": "params.yaml", **options}.items():
        default, help_text = spec if isinstance(spec, tuple) else (spec, None)
        parser.add_argument(f"--{name.replace('_', '-')}", default=default, required=default is None, help=help_text)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    return args
