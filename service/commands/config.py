"""``defectsam config check FILE`` and ``defectsam config example``.

``check`` validates a file exactly as ``serve`` would (environment overrides included) and prints
the effective config, secrets redacted; ``example`` prints the fully commented example YAML that
the config models generate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from service.config import ConfigError, load_config, redacted
from service.config.example import example_yaml


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("config", help="check a daemon config file, print the example")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=type(parser))
    check = actions.add_parser("check", help="validate a config file (as 'serve' would) and print the result")
    check.add_argument("file", type=Path, help="the YAML config file")
    check.add_argument("--quiet", action="store_true", help="print nothing when the file is valid")
    check.add_argument("--json", action="store_true", help="print the effective config as JSON instead of YAML")
    check.set_defaults(run=run_check)
    example = actions.add_parser("example", help="print a fully commented example config (every key, its default)")
    example.set_defaults(run=run_example)


def run_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"defectsam: error: config: {problem}", file=sys.stderr)
        return 2
    if not args.quiet:
        data = redacted(config)
        print(json.dumps(data, indent=2) if args.json else yaml.safe_dump(data, sort_keys=False), end="")
        print(f"{args.file}: valid", file=sys.stderr)
    return 0


def run_example(args: argparse.Namespace) -> int:
    print(example_yaml(), end="")
    return 0
