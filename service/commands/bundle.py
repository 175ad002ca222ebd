"""``defectsam bundle inspect DIR``: what a bundle holds, after verifying every checksum."""

from __future__ import annotations

import argparse
import json
from typing import Any

from engines.bundle import DEFAULT_BUNDLE_DIR, load_bundle


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


def run_inspect(args: argparse.Namespace) -> int:
    bundle = load_bundle(args.bundle)
    m = bundle.manifest
    if args.json:
        print(m.to_json(), end="")
        return 0
    print(f"bundle     {bundle.path}")
    print(f"name       {m.name}  (schema {m.schema_version}, created {m.created})")
    print(f"arch       {m.arch}, {m.parameters:,} parameters, precision {m.precision}")
    weights = m.provenance.weights
    print(f"weights    {weights}" + (f": {m.provenance.notes}" if m.provenance.notes else ""))
    if m.provenance.teacher or m.provenance.recipe:
        print(f"training   teacher {m.provenance.teacher or '-'}, recipe {m.provenance.recipe or '-'}")
    print(
        f"input      {m.input.height}x{m.input.width} {m.input.channel_order.upper()}, "
        f"mean {list(m.input.mean)}, std {list(m.input.std)}"
    )
    print(f"prompts    K={m.k} peaks, masks at stride {m.mask_stride}")
    print(f"classes    {', '.join(f'{i}:{c}' for i, c in enumerate(m.classes))}")
    print(f"graphs     fused {m.graphs.fused}" + (f", decoder {m.graphs.decoder}" if m.graphs.decoder else ""))
    for precision, variant in m.variants.items():
        graphs = variant.fused + (f" + {variant.decoder}" if variant.decoder else "")
        print(f"variant    {precision}: {graphs} ({variant.mode}, target {variant.target}, gate {variant.gate})")
    print("files      (sha256 verified)")
    for name, digest in m.files.items():
        print(f"  {name:<20} {bundle.size_bytes(name) / 1e6:8.2f} MB  {digest[:16]}")
    if m.metrics:
        print("metrics")
        for key, value in m.metrics.items():
            print(f"  {key}: {json.dumps(value)}")
    return 0
