"""``defectsam serve [--config FILE]``: run the daemon (camera, engine, API, live page, metrics).

The config file is YAML (``defectsam config example`` prints every key); without ``--config`` the
file named by $DEFECTSAM_CONFIG is read, else the defaults. DEFECTSAM__SECTION__KEY variables
override any key. A bad key or value stops start-up with one line naming the dotted key.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from service.config import load_config
from service.ops import setup_logging


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("serve", help="run the inspection daemon", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML config file (default: $DEFECTSAM_CONFIG, else built-in defaults)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    setup_logging(config.logging)
    from service.app import run as run_daemon  # imported after config: a config error needs no uvicorn

    return run_daemon(config)
