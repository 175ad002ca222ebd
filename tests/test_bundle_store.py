"""The bundle store on real bundle copies: install (verified, read-only, idempotent, never deleting), list,
activate, rollback, and a tampered bundle refused; through the real ``defectsam`` CLI."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from engines.bundle import DEFAULT_BUNDLE_DIR, MANIFEST_NAME, load_bundle, write_bundle
from service.bundle_store import ACTIVE, HISTORY, BundleStore
from service.cli import main


def _copy_default(tmp_path: Path, name: str, rename: str | None = None) -> Path:
    """engines/default copied; ``rename``: rewritten (write_bundle) as another bundle name, so another version."""
    target = tmp_path / name
    shutil.copytree(DEFAULT_BUNDLE_DIR, target)
    if rename is not None:
        bundle = load_bundle(target)
        fields = bundle.manifest.model_dump(mode="json", exclude={"files"})
        fields["name"] = rename
        staging = tmp_path / f"{name}-src"
        shutil.copytree(target, staging)
        write_bundle(target, fields, {n: staging / n for n in bundle.manifest.files})
    return target


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_install_copies_a_verified_read_only_version_named_by_its_manifest(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _copy_default(tmp_path, "src")
    store_dir = tmp_path / "store"
    code, out, err = _cli(capsys, "bundle", "install", str(source), "--store", str(store_dir))
    assert code == 0, err
    digest = load_bundle(source).manifest.manifest_sha256
    assert digest is not None
    directory = f"{load_bundle(source).manifest.name}-{digest[:12]}"
    assert f"installed {directory}" in out
    version = store_dir / directory
    assert load_bundle(version).manifest.files == load_bundle(source).manifest.files
    for path in [version, *version.iterdir()]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert not mode & 0o222, f"{path} is writable ({oct(mode)})"
    # the same bundle again: nothing changes
    before = {p.name: p.stat().st_mtime_ns for p in version.iterdir()}
    code, out, _ = _cli(capsys, "bundle", "install", str(source), "--store", str(store_dir))
    assert code == 0 and "already installed" in out
    assert {p.name: p.stat().st_mtime_ns for p in version.iterdir()} == before
    # installing an installed version from inside the store deletes nothing
    code, out, _ = _cli(capsys, "bundle", "install", str(version), "--store", str(store_dir))
    assert code == 0 and "already installed" in out
    assert load_bundle(version).manifest.name == load_bundle(source).manifest.name
    assert [p.name for p in store_dir.iterdir() if not p.name.startswith(".")] == [directory]


@pytest.mark.parametrize("tamper", ["graph byte", "manifest edited"])
def test_a_tampered_bundle_is_refused_and_nothing_is_installed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], tamper: str) -> None:
    source = _copy_default(tmp_path, "src")
    if tamper == "graph byte":
        graph = source / "segment.onnx"
        data = bytearray(graph.read_bytes())
        data[len(data) // 2] ^= 0xFF
        graph.write_bytes(bytes(data))
        expect = "segment.onnx: checksum mismatch"
    else:
        raw = json.loads((source / MANIFEST_NAME).read_text())
        raw["segment"]["max_windows"] = 3
        (source / MANIFEST_NAME).write_text(json.dumps(raw))
        expect = "edited since it was written"
    store_dir = tmp_path / "store"
    code, out, err = _cli(capsys, "bundle", "install", str(source), "--store", str(store_dir))
    assert code == 2 and out == ""
    assert expect in err and len(err.strip().splitlines()) == 1
    assert BundleStore(store_dir).versions() == []


def test_list_activate_rollback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store_dir = tmp_path / "store"
    a = _copy_default(tmp_path, "a", rename="panel-a")
    b = _copy_default(tmp_path, "b", rename="panel-b")
    for source in (a, b):
        assert _cli(capsys, "bundle", "install", str(source), "--store", str(store_dir))[0] == 0
    store = BundleStore(store_dir)
    va, vb = store.resolve("panel-a"), store.resolve("panel-b")
    code, out, _ = _cli(capsys, "bundle", "list", "--store", str(store_dir))
    assert code == 0 and "panel-a" in out and "panel-b" in out and "*" not in out
    assert store.active() is None

    assert _cli(capsys, "bundle", "activate", "panel-a", "--store", str(store_dir))[0] == 0
    assert os.readlink(store_dir / ACTIVE) == va.directory
    assert _cli(capsys, "bundle", "activate", vb.digest[:8], "--store", str(store_dir))[0] == 0  # by hash prefix
    assert store.active() == vb
    code, out, _ = _cli(capsys, "bundle", "list", "--store", str(store_dir), "--json")
    listed = {row["name"]: row for row in json.loads(out)}
    assert listed["panel-b"]["active"] and not listed["panel-a"]["active"]
    assert listed["panel-a"]["hash"] == va.digest
    code, out, _ = _cli(capsys, "bundle", "list", "--store", str(store_dir))
    assert next(line for line in out.splitlines() if line.startswith("*")).split()[1] == "panel-b"

    code, out, _ = _cli(capsys, "bundle", "rollback", "--store", str(store_dir))
    assert code == 0 and f"active {va.directory}" in out
    assert store.active() == va
    code, _, err = _cli(capsys, "bundle", "rollback", "--store", str(store_dir))
    assert code == 2 and "nothing to roll back to" in err
    assert store.active() == va
    assert [e["bundle"] for e in json.loads((store_dir / HISTORY).read_text())["activations"]] == [va.directory]
    # both versions are still installed and intact
    assert {v.directory for v in store.versions()} == {va.directory, vb.directory}
    for v in store.versions():
        load_bundle(v.path)


def test_activate_names_what_it_cannot_find(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store_dir = tmp_path / "store"
    assert _cli(capsys, "bundle", "install", str(_copy_default(tmp_path, "a")), "--store", str(store_dir))[0] == 0
    code, _, err = _cli(capsys, "bundle", "activate", "nope", "--store", str(store_dir))
    assert code == 2 and "'nope' is not installed" in err and "(installed: " in err
    assert not (store_dir / ACTIVE).exists()
    code, _, err = _cli(capsys, "bundle", "list")
    assert code == 2 and "no bundle store" in err
