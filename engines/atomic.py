"""Write files so that a reader sees the old content or the new, never a torn one."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read from /proc (setting it to read it back would race with other threads
    creating files); where /proc does not say, the set-and-restore fallback."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: Path | str, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``.

    The file gets the mode a plain ``open(path, "w")`` would (0666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path | str, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def staging_dir(target: Path) -> Path:
    """A new empty directory beside ``target`` to fill and then ``replace_dir`` into place.

    It gets the mode a plain ``mkdir`` would (0777 less the umask), not mkdtemp's 0700: a bundle, a
    frame set or a teacher cache is read by other users (the service's, a colleague's).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    staging.chmod(0o777 & ~current_umask())
    return staging


def replace_dir(new: Path, target: Path) -> None:
    """Rename the finished directory ``new`` to ``target``; an existing ``target`` is moved aside first,
    then removed. Readers see the old directory or the new one, never a mix; a failed rename puts the
    old one back. Files in the old ``target`` are not carried over (a bundle's cached TensorRT plans,
    built from old weights, must not be reused).
    """
    if not target.exists():
        os.replace(new, target)
        return
    if not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory; refusing to replace it")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
