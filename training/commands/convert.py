"""``defectsam-train convert --data SPEC --out DIR``: write any dataset in the generic folder layout.

Every reader the registry knows (``mvtec``, ``coco``, ``yolo-seg``, ``neu_seg``, ``magnetic_tile``,
``synthetic``...) is read and written as ``images/``, ``masks/``, ``classes.txt`` and, for each member
of the spec read with a split, ``splits/SPLIT.txt`` (training.data.folder_writer). The folder is
written beside DIR and renamed to it when complete; a non-empty DIR is replaced only with
``--force``. ``--data folder,root=DIR`` reads back the same images and instances.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from training.data.folder_writer import Member, write_folder
from training.data.registry import MergedDataset, build_dataset, dataset_name, parse_spec
from training.data.sample import SampleDataset


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "convert", help="write a dataset (mvtec, coco, yolo-seg, ... any --data spec) in the generic folder layout",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument(
        "--data", required=True,
        help="dataset spec, e.g. 'coco,root=export/annotations/instances_default.json', "
        "'mvtec:test,root=mvtec_ad/bottle', 'yolo-seg:train,root=data.yaml+yolo-seg:val,root=data.yaml'",
    )
    parser.add_argument("--out", required=True, type=Path, help="folder to write (created; written atomically)")
    parser.add_argument("--force", action="store_true", help="replace --out when it exists and is not empty")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    raws = parse_spec(args.data)
    datasets: list[SampleDataset] = [build_dataset(raw) for raw in raws]
    merged = MergedDataset(datasets)  # one class list; each member's indices mapped into it
    members, start = [], 0
    for raw, dataset in zip(raws, datasets, strict=True):
        split = raw.get("split")
        members.append(Member(_Slice(merged, start, len(dataset), dataset_name(dataset)),
                              None if split is None else str(split)))
        start += len(dataset)
    summary = write_folder(
        members, merged.class_names, args.out, force=args.force, log=lambda m: print(m, file=sys.stderr, flush=True)
    )
    counts = ", ".join(f"{name} {summary.instances[name]}" for name in merged.class_names)
    splits = "".join(f", splits/{s}.txt {n}" for s, n in summary.splits.items())
    print(
        f"wrote {summary.images} image(s) to {summary.out} ({summary.with_defects} with defects; instances: {counts}; "
        f"{summary.per_instance} with per-instance masks{splits}); read them with --data folder,root={summary.out}"
    )
    return 0


class _Slice:
    """Samples start..start+length of a merged dataset (one member, with the merged class indices)."""

    def __init__(self, merged: MergedDataset, start: int, length: int, name: str) -> None:
        self.merged, self.start, self.length, self.name = merged, start, length, name
        self.class_names = merged.class_names

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.merged[self.start + index]
