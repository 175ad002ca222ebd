"""The ``defectsam`` command: run bundles on images, inspect and build engines, run the daemon, export its records.

Bad input (a file, a flag, a bundle) ends in one line on stderr naming it and the cause,
and exit status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from engines.errors import DefectsamError
from service.commands import bench, bundle, engine, infer, plc_sim, serve
from service.commands import config as config_command
from service.commands import soak as soak_command
from service.commands import store as store_command

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors follow the same one-line, exit-2 rule as everything else."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="defectsam", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    infer.add_parser(commands)
    bundle.add_parser(commands)
    bench.add_parser(commands)
    engine.add_parser(commands)
    serve.add_parser(commands)
    config_command.add_parser(commands)
    plc_sim.add_parser(commands)
    soak_command.add_parser(commands)
    store_command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except DefectsamError as exc:
        print(f"defectsam: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("defectsam: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
