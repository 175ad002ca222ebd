"""Operations: logging (plain or JSON), systemd notification and watchdog, signal handling.

sd_notify is the datagram protocol of sd_notify(3), spoken directly over ``$NOTIFY_SOCKET`` (a
path, or ``@name`` for the abstract namespace), so the daemon needs no libsystemd binding:
``READY=1`` once the API serves and the engine has settled (loaded, or failed with its reason in
``STATUS=``), ``WATCHDOG=1`` every half ``$WATCHDOG_USEC`` while the pipeline is healthy, and
``STOPPING=1`` when shutdown begins. Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

from service.config.models import LoggingSection

log = logging.getLogger(__name__)

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def lower_thread_priority(increment: int, *, idle_class: bool = False) -> bool:
    """Raise the calling thread's nice value by ``increment`` (Linux: a thread has its own).

    For background work that must not take the cores from inference when they are scarce (the
    record store's JPEG encoding on a 2-core box): the kernel runs it only on time the pipeline
    leaves. ``idle_class`` goes further and moves the thread to Linux's SCHED_IDLE class: it runs
    only when a core would otherwise idle and yields at once when a pipeline thread wakes. Nice 19
    still takes about 1/70 of a contended core and, worse, holds it until its time slice ends,
    which stretches every parallel step of an ONNX Runtime call that waits on that core.
    Returns False where the platform has no per-thread priority or it was refused.
    """
    if sys.platform != "linux" or (increment <= 0 and not idle_class):
        return False
    import os
    import threading

    try:
        tid = threading.get_native_id()
        if increment > 0:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
        if idle_class:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: the calling thread
    except (OSError, AttributeError):
        return False
    return True


MMAP_THRESHOLD = 16 << 20  # bytes; see tune_allocator


def tune_allocator() -> bool:
    """Keep a months-long process's heap from creeping: glibc only, a no-op elsewhere.

    glibc raises its mmap threshold after large blocks are freed, so later multi-megabyte frames
    and tensors land in a heap that never shrinks, and each thread may get its own malloc arena.
    A fixed threshold of 16 MiB stops the drift; two arenas bound the per-thread fragmentation.
    Buffers up to a 4 MP BGR frame (11.7 MiB) come from the heap and are reused frame after frame;
    larger ones are mapped and returned to the kernel on free.

    The threshold was 1 MiB until the pipeline benchmark showed its cost: every frame's resized
    copy and 7 MB engine tensor became a fresh mapping, page-faulted in and unmapped again (a TLB
    shootdown across cores, dear in a VM), and the preprocess took 8.5 ms instead of 2.5 ms.
    Returns True when both settings took.
    """
    import ctypes
    import ctypes.util

    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    m_mmap_threshold, m_arena_max = -3, -8  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(mallopt(m_arena_max, 2))


def root_warning() -> str | None:
    """The start-up warning for a daemon running as root (effective uid 0), or None.

    Nothing the daemon does needs root: the installed unit runs it as the system user 'defectsam' with
    CAP_NET_BIND_SERVICE alone (Modbus port 502), the container as UID 10001 (deploy/README.md). As root,
    a flaw in the HTTP or Modbus handling, in an image decoder or in a bundle's graphs would own the box.
    """
    geteuid = getattr(os, "geteuid", None)
    if geteuid is None or geteuid() != 0:
        return None
    return ("running as root (euid 0): nothing the daemon does needs it; run it as a service user, as "
            "deploy/install.sh and deploy/defectsam.service do (user 'defectsam', CAP_NET_BIND_SERVICE for port "
            "502), or give the container a non-root user (Dockerfile.jetson: UID 10001)")


def setup_logging(config: LoggingSection, stream: Any = None) -> None:
    """Configure the root logger (and uvicorn's) once, from config."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if config.json_format:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


class SystemdNotifier:
    """sd_notify(3) over the datagram socket systemd names in $NOTIFY_SOCKET."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if address.startswith("@"):
            self._address = "\0" + address[1:]  # the abstract namespace
        elif address.startswith("/"):
            self._address = address
        self.watchdog_interval: float | None = None
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2.0  # notify at half the timeout
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=value`` lines; False (logged once) when the socket is absent or refuses."""
        if self._address is None:
            return False
        message = "\n".join(fields).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(message, self._address)
                return True
            except OSError as exc:
                log.warning("sd_notify to %r failed: %s", self._address, exc)
                return False

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class Watchdog:
    """Sends WATCHDOG=1 every ``interval`` seconds while ``healthy()`` says so."""

    def __init__(self, notifier: SystemdNotifier, healthy: Callable[[], bool]) -> None:
        self._notifier = notifier
        self._healthy = healthy
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pings = 0

    def start(self) -> None:
        interval = self._notifier.watchdog_interval
        if interval is None or not self._notifier.enabled:
            return
        self._thread = threading.Thread(target=self._run, args=(interval,), name="sd-watchdog", daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        warned = False
        while not self._stop.wait(interval):
            if self._healthy():
                self._notifier.notify("WATCHDOG=1")
                self.pings += 1
                warned = False
            elif not warned:
                log.error("pipeline unhealthy (a stage thread stalled or died): withholding the systemd watchdog")
                warned = True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)


def install_signal_handlers(on_stop: Callable[[str], None]) -> None:
    """SIGTERM and SIGINT call ``on_stop(name)`` (main thread only)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        on_stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
