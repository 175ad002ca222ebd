"""The bundle store: installed bundles as immutable versions, one of them active, with a history to roll back.

::

    STORE/
      panel-a-3f2a9c1d0b7e/     one installed bundle, named by its manifest (name + manifest digest, 12 hex):
        manifest.json           files read-only (0444), the directory too (0555); never changed again
        segment.onnx ...
      panel-b-81c07e55a2d4/
      active -> panel-b-81c07e55a2d4    the active bundle: a symlink, replaced with one rename
      history.json              activations, oldest first (rollback goes back along it), written atomically
      .lock                     flock: one writer at a time (install, activate, rollback)

``install`` verifies every checksum of the source first, copies it into a temporary directory in the
store, verifies the copy, makes it read-only and renames it into place: a reader sees the whole
version or none. Installing a version that is there already changes nothing. Nothing here ever
deletes an installed version. The daemon runs ``active`` (``engine.bundle_store``) and follows it
when it changes (service/reload.py): ``activate`` and ``rollback`` switch a running station.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.atomic import write_text_atomic
from engines.bundle import MANIFEST_NAME, Bundle, load_bundle, manifest_digest, utc_now
from engines.errors import DefectsamError

ACTIVE = "active"
HISTORY = "history.json"
LOCK = ".lock"
HASH_CHARS = 12  # of the manifest digest, in a version's directory name
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_VERSION = re.compile(r"^(?P<name>.+)-(?P<hash>[0-9a-f]{12})$")


class StoreError(DefectsamError):
    """A store operation that cannot be done: one line naming the store or the bundle and the cause."""


@dataclass(frozen=True)
class Version:
    """One installed bundle."""

    directory: str  # name inside the store: <name>-<hash12>
    name: str  # the manifest's name
    digest: str  # the manifest digest (64 hex), what the directory is named by
    installed_at: str  # UTC, ISO 8601 (the directory's modification time at install)
    path: Path

    @property
    def short(self) -> str:
        return self.digest[:HASH_CHARS]


@dataclass(frozen=True)
class Installed:
    version: Version
    new: bool  # False: the same bundle was installed already; nothing changed


def content_digest(bundle_dir: Path) -> str:
    """The manifest digest of a bundle's manifest as it is on disk (what ``manifest_sha256`` holds when intact)."""
    raw = json.loads((bundle_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    return manifest_digest(raw)


def version_dir_name(name: str, digest: str) -> str:
    safe = _UNSAFE.sub("-", name).strip(".-") or "bundle"
    return f"{safe}-{digest[:HASH_CHARS]}"


class BundleStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    # ------------------------------------------------------------------ reading
    def versions(self) -> list[Version]:
        """Installed versions, oldest install first."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            match = _VERSION.match(entry.name)
            if match is None or entry.is_symlink() or not entry.is_dir() or not (entry / MANIFEST_NAME).is_file():
                continue
            try:
                raw = json.loads((entry / MANIFEST_NAME).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            digest = manifest_digest(raw)
            installed = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry.stat().st_mtime))
            found.append(Version(entry.name, str(raw.get("name", match["name"])), digest, installed, entry))
        return sorted(found, key=lambda v: (v.installed_at, v.directory))

    def active(self) -> Version | None:
        """The version ``active`` points at; None when nothing is active."""
        target = self.active_target()
        if target is None:
            return None
        return next((v for v in self.versions() if v.directory == target), None)

    def active_target(self) -> str | None:
        """The directory name ``active`` points at (read with one readlink; no version is opened)."""
        try:
            return os.readlink(self.root / ACTIVE)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StoreError(f"{self.root / ACTIVE}: cannot be read: {exc.strerror or exc}") from None

    def history(self) -> list[dict[str, Any]]:
        """Activations, oldest first: {"bundle": directory, "at": UTC time, "how": activate|rollback|install}."""
        path = self.root / HISTORY
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path}: cannot be read: {exc}") from None
        entries = raw.get("activations") if isinstance(raw, dict) else None
        if not isinstance(entries, list):
            raise StoreError(f"{path}: malformed (no 'activations' list)")
        return [e for e in entries if isinstance(e, dict) and isinstance(e.get("bundle"), str)]

    def resolve(self, ref: str) -> Version:
        """A version by directory name, by manifest digest (or a prefix of at least 4 hex digits) or by
        manifest name (when only one version has it)."""
        ref = ref.strip()
        versions = self.versions()
        if not ref:
            raise StoreError("a bundle must be named (its name, its hash or name-hash from 'defectsam bundle list')")
        for v in versions:
            if v.directory == ref:
                return v
        by_hash = [v for v in versions if len(ref) >= 4 and v.digest.startswith(ref.lower())]
        by_name = [v for v in versions if v.name == ref]
        matches = by_hash or by_name
        if len(matches) == 1:
            return matches[0]
        if not matches:
            have = ", ".join(v.directory for v in versions) or "none"
            raise StoreError(f"bundle {ref!r} is not installed in {self.root} (installed: {have})")
        names = ", ".join(v.directory for v in matches)
        raise StoreError(f"bundle {ref!r} is ambiguous in {self.root}: {names}; name one by its hash")

    def load(self, ref: str) -> Bundle:
        """Resolve and verify (every checksum) an installed version."""
        return load_bundle(self.resolve(ref).path)

    # ------------------------------------------------------------------ writing (under the lock)
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            handle = open(self.root / LOCK, "a")  # noqa: SIM115 - held for the block
        except OSError as exc:
            raise StoreError(f"bundle store {self.root}: cannot be written: {exc.strerror or exc}") from None
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def install(self, source: Path | str) -> Installed:
        """Verify ``source`` and copy it in as a read-only version; the same bundle twice is a no-op."""
        source = Path(source)
        bundle = load_bundle(source)  # schema and every checksum, before anything is copied
        if bundle.manifest_check == "edited":
            raise StoreError(
                f"{source / MANIFEST_NAME}: edited since it was written (its content no longer matches "
                f"manifest_sha256); 'defectsam bundle seal {source}' accepts the edit, then install it")
        digest = content_digest(source)
        directory = version_dir_name(bundle.manifest.name, digest)
        with self._locked():
            target = self.root / directory
            if target.exists():
                existing = load_bundle(target)  # a version there must still verify
                if content_digest(target) != digest:
                    raise StoreError(f"{target}: holds another manifest than {source} under the same name-hash")
                del existing
                return Installed(self._version(directory), new=False)
            staging = Path(tempfile.mkdtemp(prefix=f".{directory}.tmp-", dir=self.root))
            try:
                for name in (MANIFEST_NAME, *bundle.manifest.files):
                    shutil.copyfile(source / name, staging / name)
                load_bundle(staging)  # the copy verifies too
                for name in (MANIFEST_NAME, *bundle.manifest.files):
                    (staging / name).chmod(0o444)
                    with open(staging / name, "rb") as handle:
                        os.fsync(handle.fileno())
                staging.chmod(0o555)
                os.replace(staging, target)
                _fsync_dir(self.root)
            except BaseException:
                with contextlib.suppress(OSError):
                    staging.chmod(0o755)
                shutil.rmtree(staging, ignore_errors=True)
                raise
        return Installed(self._version(directory), new=True)

    def activate(self, ref: str, *, how: str = "activate") -> Version:
        """Point ``active`` at a version (verified first) and record it in the history."""
        version = self.resolve(ref)
        load_bundle(version.path)
        with self._locked():
            self._point(version, how)
        return version

    def rollback(self) -> Version:
        """Activate the version active before the current one (the history goes back one step)."""
        with self._locked():
            entries = self.history()
            current = self.active_target()
            while entries and entries[-1]["bundle"] == current:
                entries.pop()
            if not entries:
                raise StoreError(f"bundle store {self.root}: nothing to roll back to (no earlier activation)")
            previous = entries[-1]["bundle"]
            version = self._version(previous)
            load_bundle(version.path)
            self._point(version, "rollback", history=entries)
        return version

    def _point(self, version: Version, how: str, history: list[dict[str, Any]] | None = None) -> None:
        """Replace the ``active`` symlink with one rename, then write the history."""
        link = self.root / ACTIVE
        if link.exists() and not link.is_symlink():
            raise StoreError(f"{link}: exists and is not a symlink; refusing to replace it")
        staging = self.root / f".{ACTIVE}.tmp-{os.getpid()}"
        staging.unlink(missing_ok=True)
        os.symlink(version.directory, staging)
        os.replace(staging, link)
        _fsync_dir(self.root)
        entries = self.history() if history is None else history
        if how == "rollback":
            entries = entries[:]  # the entries above the target were dropped by rollback
        elif not entries or entries[-1]["bundle"] != version.directory:
            entries = [*entries, {"bundle": version.directory, "at": utc_now(), "how": how}]
        write_text_atomic(self.root / HISTORY, json.dumps({"activations": entries}, indent=2) + "\n")

    def _version(self, directory: str) -> Version:
        for v in self.versions():
            if v.directory == directory:
                return v
        raise StoreError(f"bundle {directory!r} is not installed in {self.root}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
