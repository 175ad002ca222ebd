"""``defectsam soak``: run the daemon under live viewers and a PLC for a while; report RSS and open fds over time.

The daemon runs as a child process (``defectsam serve``) with the synthetic camera and the embedded
default bundle unless ``--config`` or ``--bundle`` say otherwise; its API and PLC ports are on
loopback and its store in a work directory. Exit status 0 when growth after the warm-up is within
the bounds and the load ran without errors, 1 otherwise (the report says why). docs/reliability.md
has the figures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from engines.atomic import write_text_atomic
from engines.errors import DefectsamError


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("soak", help="long run under viewers and a PLC: RSS and open fds over time",
                                 description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None,
                        help="daemon config file (default: built-in defaults: synthetic 4 MP camera, the embedded "
                             "bundle); its API and PLC ports and store path are replaced")
    parser.add_argument("--bundle", type=Path, default=None, help="engine bundle (default: the config's)")
    parser.add_argument("--camera-fps", type=float, default=None, help="synthetic camera rate (default: the config's)")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load, warm-up included (default 600)")
    parser.add_argument("--warmup", type=float, default=60.0,
                        help="seconds before growth is measured (heaps, pools and caches fill; default 60)")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples (default 10)")
    parser.add_argument("--viewers", type=int, default=4, help="MJPEG viewers connecting and disconnecting (default 4)")
    parser.add_argument("--event-clients", type=int, default=2,
                        help="/api/events clients connecting and disconnecting (default 2)")
    parser.add_argument("--viewer-hold", type=float, default=5.0,
                        help="mean seconds a viewer stays connected (0.5x to 1.5x; default 5)")
    parser.add_argument("--plc-period", type=float, default=0.1,
                        help="seconds between the PLC's reads of input 0-115 (default 0.1)")
    parser.add_argument("--plc-reconnect", type=float, default=30.0,
                        help="seconds after which the PLC drops its connection and opens a new one (default 30)")
    parser.add_argument("--scrape", type=float, default=5.0, help="seconds between /metrics scrapes (default 5)")
    parser.add_argument("--rss-bound", type=float, default=32.0,
                        help="largest resident-memory growth after the warm-up that passes, MB (default 32)")
    parser.add_argument("--fd-bound", type=int, default=4,
                        help="largest growth of open file descriptors after the warm-up that passes (default 4)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the daemon's config, log and store here (default: a temporary directory)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result, every sample included, here")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from service.config.loader import config_path_from_env, read_yaml
    from service.soak import SAMPLE_HEADER, markdown_report, run_soak, sample_row

    path = config_path_from_env(args.config)
    base = read_yaml(path) if path is not None else {}
    if args.camera_fps is not None and args.camera_fps <= 0:
        raise DefectsamError("--camera-fps must be > 0")
    print(f"soak: {args.duration:g} s ({args.warmup:g} s warm-up), a sample every {args.interval:g} s", flush=True)
    print(SAMPLE_HEADER, flush=True)
    result = run_soak(
        base, duration_s=args.duration, warmup_s=args.warmup, interval_s=args.interval, viewers=args.viewers,
        event_clients=args.event_clients, viewer_hold_s=args.viewer_hold, plc_period_s=args.plc_period,
        plc_reconnect_s=args.plc_reconnect, scrape_s=args.scrape, rss_bound_mb=args.rss_bound,
        fd_bound=args.fd_bound, bundle=args.bundle, camera_fps=args.camera_fps, workdir=args.workdir,
        on_sample=lambda s: print(sample_row(s), flush=True),
    )
    print()
    print(markdown_report(result))
    if args.json is not None:
        from engines.benchmark import machine_description

        payload = {"machine": machine_description(), **result.to_dict()}
        write_text_atomic(args.json, json.dumps(payload, indent=2) + "\n")
    return 0 if result.passed else 1
