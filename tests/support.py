"""Helpers shared by the test modules (not tests themselves)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from engines.errors import DefectsamError


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.02, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something true (and return that), or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what or predicate}")
        time.sleep(interval)


def run_command_module(
    module: Any, argv: list[str], capsys: pytest.CaptureFixture[str], prog: str = "defectsam-train"
) -> tuple[int, str, str]:
    """Run one CLI command module as its CLI does (DefectsamError -> one line, exit 2): (code, stdout, stderr)."""
    parser = argparse.ArgumentParser(prog=prog)
    module.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        code = int(args.run(args) or 0)
    except DefectsamError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        code = 2
    out, err = capsys.readouterr()
    return code, out, err


def set_dotted(raw: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """Set ``changes`` in a nested config mapping, keys written ``a__b__c`` (missing levels created); returns raw."""
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return raw
