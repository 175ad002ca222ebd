"""``defectsam-train`` subcommands: one module each, with ``add_parser(subparsers)`` setting ``run``."""
