"""``defectsam bundle inspect DIR``: what a bundle holds, after verifying every checksum, and whether its
manifest was edited since it was written; ``defectsam bundle seal DIR`` records the manifest's digest.

The bundle store (service/bundle_store.py, docs/bundle.md): ``bundle install DIR`` (verified, copied in
read-only; the same bundle twice changes nothing), ``bundle list``, ``bundle activate NAME|HASH``,
``bundle rollback``. The store is ``--store DIR``, else the config's ``engine.bundle_store`` (``--config``,
else $DEFECTSAM_CONFIG, with DEFECTSAM__* overrides). A running daemon on that store follows ``active``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from engines.bundle import DEFAULT_BUNDLE_DIR, DIGEST_KEY, Bundle, load_bundle, seal_manifest
from service.bundle_store import BundleStore, StoreError, Version


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("bundle", help="work with engine bundles")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=type(parser))
    inspect = actions.add_parser("inspect", help="verify a bundle and print its manifest")
    inspect.add_argument(
        "bundle", nargs="?", default=str(DEFAULT_BUNDLE_DIR),
        help="bundle directory (default: the embedded default bundle)",
    )
    inspect.add_argument("--json", action="store_true", help="print the manifest as JSON instead of a summary")
    inspect.set_defaults(run=run_inspect)
    seal = actions.add_parser(
        "seal", help="record the digest of a bundle's manifest as it is now (a bundle written before manifests "
        "carried one, or a hand edit meant to stay)")
    seal.add_argument("bundle", help="bundle directory")
    seal.set_defaults(run=run_seal)

    install = actions.add_parser(
        "install", help="verify a bundle and copy it into the store as a read-only version (never deletes)")
    install.add_argument("bundle", nargs="?", default=str(DEFAULT_BUNDLE_DIR),
                         help="bundle directory (default: the embedded default bundle)")
    install.add_argument("--activate", action="store_true", help="also make it the active bundle")
    listing = actions.add_parser("list", help="the store's bundles: name, hash, installed at, the active one")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    activate = actions.add_parser(
        "activate", help="make an installed bundle the active one (a daemon on the store switches to it)")
    activate.add_argument("bundle", help="its name, its hash (4+ hex digits) or name-hash, as 'bundle list' shows")
    rollback = actions.add_parser("rollback", help="activate the bundle that was active before the current one")
    for sub, run in ((install, run_install), (listing, run_list), (activate, run_activate), (rollback, run_rollback)):
        sub.add_argument("--store", type=Path, default=None,
                         help="bundle store directory (default: the config's engine.bundle_store)")
        sub.add_argument("--config", type=Path, default=None,
                         help="daemon config naming engine.bundle_store (default: $DEFECTSAM_CONFIG)")
        sub.set_defaults(run=run)


def manifest_line(bundle: Bundle) -> str:
    """What ``bundle inspect`` says of the manifest itself."""
    if bundle.manifest_check == "intact":
        return f"as written ({DIGEST_KEY} {(bundle.manifest.manifest_sha256 or '')[:16]} matches its content)"
    if bundle.manifest_check == "edited":
        return (f"EDITED since it was written: its content no longer matches {DIGEST_KEY} (thresholds, metrics "
                f"or specs changed by hand?); 'defectsam bundle seal' accepts it as it is")
    return f"not recorded (written before manifests carried {DIGEST_KEY}; 'defectsam bundle seal' records it)"


def run_inspect(args: argparse.Namespace) -> int:
    bundle = load_bundle(args.bundle)
    m = bundle.manifest
    if bundle.manifest_check == "edited":
        print(f"defectsam: warning: {bundle.path}/manifest.json was edited since it was written (its content no "
              f"longer matches {DIGEST_KEY})", file=sys.stderr)
    if args.json:
        print(m.to_json(seal=False), end="")
        return 0
    print(f"bundle     {bundle.path}")
    print(f"manifest   {manifest_line(bundle)}")
    print(f"name       {m.name}  (schema {m.schema_version}, created {m.created})")
    print(f"models     segmenter {m.segment.arch} ({m.segment.parameters:,} parameters)"
          + (f", finder {m.find.arch} ({m.find.parameters:,})" if m.find else ", no finder (tiles only)")
          + f"; precision {m.precision}")
    weights = m.provenance.weights
    print(f"weights    {weights}" + (f": {m.provenance.notes}" if m.provenance.notes else ""))
    if m.provenance.teacher or m.provenance.recipe:
        print(f"training   teacher {m.provenance.teacher or '-'}, recipe {m.provenance.recipe or '-'}")
    if m.find is not None:
        print(f"find pass  the frame in grey at 1/{m.find.reduction} (block mean, min, max), candidates per "
              f"{8 * m.find.reduction} x {8 * m.find.reduction} frame pixels")
    print(f"windows    {m.segment.window} x {m.segment.window} px at 1:1, at most {m.segment.max_windows} per frame; "
          f"RGB mean {list(m.segment.mean)}, std {list(m.segment.std)}")
    print(f"classes    {', '.join(f'{i + 1}:{c}' for i, c in enumerate(m.classes))} (0: background)")
    if m.thresholds is not None:
        t = m.thresholds
        print(f"thresholds score {t.score_threshold:g}, uncertain {t.uncertain_threshold:g}"
              + (f", candidate {t.candidate_threshold:g}" if t.candidate_threshold is not None else "")
              + " (calibrated)")
    print(f"graphs     segment {m.graphs.segment}" + (f", find {m.graphs.find}" if m.graphs.find else ""))
    for precision, variant in m.variants.items():
        graphs = variant.segment + (f" + {variant.find}" if variant.find else "")
        print(f"variant    {precision}: {graphs} ({variant.mode}, target {variant.target}, gate {variant.gate})")
    print("files      (sha256 verified)")
    for name, digest in m.files.items():
        print(f"  {name:<20} {bundle.size_bytes(name) / 1e6:8.2f} MB  {digest[:16]}")
    if m.metrics:
        print("metrics")
        for key, value in m.metrics.items():
            print(f"  {key}: {json.dumps(value)}")
    return 0


def run_seal(args: argparse.Namespace) -> int:
    before = load_bundle(args.bundle).manifest_check
    bundle = seal_manifest(args.bundle)
    print(f"{bundle.path}/manifest.json: {DIGEST_KEY} {bundle.manifest.manifest_sha256} recorded (it was {before})")
    return 0


def open_store(args: argparse.Namespace) -> BundleStore:
    if args.store is not None:
        return BundleStore(args.store)
    from service.config import load_config

    store = load_config(args.config).engine.bundle_store
    if store is None:
        raise StoreError("no bundle store: pass --store DIR or set engine.bundle_store in the config")
    return BundleStore(store)


def _line(v: Version) -> str:
    return f"{v.directory} ({v.name}, hash {v.short})"


def run_install(args: argparse.Namespace) -> int:
    store = open_store(args)
    installed = store.install(args.bundle)
    v = installed.version
    if installed.new:
        print(f"installed {_line(v)} in {store.root}")
    else:
        print(f"already installed: {_line(v)} in {store.root} (nothing changed)")
    if args.activate:
        if store.active_target() == v.directory:
            print(f"already active: {v.directory}")
        else:
            store.activate(v.directory)
            print(f"active: {v.directory}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    store = open_store(args)
    versions = store.versions()
    active = store.active_target()
    if args.json:
        print(json.dumps([{"directory": v.directory, "name": v.name, "hash": v.digest, "installed_at": v.installed_at,
                           "active": v.directory == active} for v in versions], indent=2))
        return 0
    if not versions:
        print(f"no bundles installed in {store.root} ('defectsam bundle install DIR')")
        return 0
    width = max(len(v.name) for v in versions)
    print(f"  {'NAME':<{width}}  {'HASH':<12}  INSTALLED             DIRECTORY")
    for v in versions:
        mark = "*" if v.directory == active else " "
        print(f"{mark} {v.name:<{width}}  {v.short}  {v.installed_at}  {v.directory}")
    if active is not None and all(v.directory != active for v in versions):
        print(f"warning: active points at {active!r}, which is not installed", file=sys.stderr)
    return 0


def run_activate(args: argparse.Namespace) -> int:
    store = open_store(args)
    v = store.activate(args.bundle)
    print(f"active: {_line(v)} (a daemon on {store.root} switches to it)")
    return 0


def run_rollback(args: argparse.Namespace) -> int:
    store = open_store(args)
    v = store.rollback()
    print(f"rolled back: active {_line(v)}")
    return 0
