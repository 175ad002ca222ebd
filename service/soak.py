"""Soak: the daemon under its everyday load for a long while, its memory and open files sampled.

``defectsam soak`` starts ``defectsam serve`` as a child process, so that what is measured is the
daemon alone, with the synthetic camera (unless the config names another), the API and the PLC
server on loopback ports and the record store in a work directory. For ``duration_s`` seconds:

* ``viewers`` MJPEG viewers (``/api/live.mjpeg``) connect, watch for a random 0.5 to 1.5 times
  ``viewer_hold_s``, and disconnect; every other one drops its connection with a TCP reset, as a
  closed browser tab or a pulled cable does, the others close it cleanly;
* ``event_clients`` clients of ``/api/events`` do the same;
* a PLC (a pymodbus Modbus TCP client) reads input 0-115 in one request every ``plc_period_s``,
  checks each result against its checksum word, bumps its heartbeat register every 0.5 s, and
  drops and reopens its connection every ``plc_reconnect_s``;
* a scraper reads ``/metrics`` every ``scrape_s``, as Prometheus does.

Every ``interval_s`` the daemon's resident memory (VmRSS), its peak (VmHWM) and thread count come
from ``/proc/PID/status``, its open file descriptors (sockets among them) from ``/proc/PID/fd``,
and its counters from ``/api/status``.

Growth is measured after the warm-up (``warmup_s``, while heaps, thread pools and caches fill):
the median of the last window of samples minus the median of the first, a window being a fifth of
the post-warm-up samples (3 to 10 of them). Medians, because the heap breathes; and file descriptors
are counted less one per client connection the daemon reports (viewers, event clients, PLCs), because
those come and go by design. The least-squares slope is reported
too. The run passes when RSS growth is within ``rss_bound_mb``, fd growth within ``fd_bound``, and
the load really ran: the daemon inspected frames in the last window, every viewer kind received
data, the PLC reads never failed and never saw a torn result, and the daemon stopped cleanly on
SIGTERM afterwards.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engines.errors import DefectsamError

READY_TIMEOUT_S = 600.0  # a first start may load (or, with TensorRT, build) the engine
STOP_TIMEOUT_S = 60.0
_SERVING = "defectsam: serving the live page at "


@dataclass(frozen=True)
class SoakSample:
    t_s: float  # seconds since the daemon was ready
    rss_mb: float
    fds: int
    sockets: int  # of which sockets
    threads: int
    frames_processed: int
    viewers: int  # MJPEG viewers the daemon counts now
    event_clients: int
    plc_connections: int
    store_written: int

    @property
    def fds_own(self) -> int:
        """Open fds less one per client connection the daemon counts (viewers, event clients, PLCs): what
        stays when the clients come and go, the figure growth is measured on."""
        return self.fds - self.viewers - self.event_clients - self.plc_connections


@dataclass
class LoadCounters:
    """What the load generators did; each kind is updated by its own threads under one lock."""

    mjpeg_sessions: int = 0
    mjpeg_frames: int = 0
    mjpeg_bad_frames: int = 0
    event_sessions: int = 0
    events_result: int = 0
    events_status: int = 0
    resets: int = 0  # sessions ended with a TCP reset
    client_errors: int = 0  # viewer or scraper requests that failed
    last_client_error: str | None = None
    scrapes: int = 0
    plc_reads: int = 0
    plc_errors: int = 0
    plc_torn: int = 0
    plc_reconnects: int = 0
    plc_results_seen: int = 0
    last_plc_error: str | None = None


@dataclass(frozen=True)
class SoakResult:
    command: str
    bundle: str
    frame: str
    duration_s: float
    warmup_s: float
    interval_s: float
    viewers: int
    event_clients: int
    viewer_hold_s: float
    plc_period_s: float
    rss_bound_mb: float
    fd_bound: int
    window: int  # samples per window (first and last after warm-up)
    rss_mb_first: float  # median of the first window after warm-up
    rss_mb_last: float  # median of the last window
    rss_growth_mb: float
    rss_slope_mb_per_h: float
    rss_mb_peak: float  # VmHWM at the end
    fds_first: float  # open fds less client connections (SoakSample.fds_own), median of the first window
    fds_last: float
    fd_growth: float
    threads_first: float
    threads_last: float
    frames_processed: int  # during the measured run
    inspected_fps: float
    store_written: int
    store_dropped: int
    load: LoadCounters
    stop_s: float | None  # SIGTERM -> exit
    exit_code: int | None
    passed: bool
    failures: list[str]
    samples: list[SoakSample] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- /proc


def proc_sample(pid: int) -> tuple[float, float, int, int, int]:
    """(VmRSS MB, VmHWM MB, threads, open fds, sockets among them) of a process, from /proc."""
    values: dict[str, float] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024.0
            elif key == "Threads":
                values[key] = int(rest.strip())
    fds = sockets = 0
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        fds += 1
        with contextlib.suppress(OSError):  # closed between the listing and the readlink
            sockets += os.readlink(f"{fd_dir}/{name}").startswith("socket:")
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0), int(values.get("Threads", 0)), fds, sockets


# ---------------------------------------------------------------------------------------------- clients


def _reset_close(conn: http.client.HTTPConnection, sock: socket.socket | None, reset: bool) -> None:
    if reset and sock is not None:
        with contextlib.suppress(OSError):  # SO_LINGER 0: close() sends RST instead of FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
    if sock is not None:
        sock.close()


class ClientLoad:
    """The viewers, event clients, scraper and PLC, each a thread, until ``stop`` is set."""

    def __init__(self, host: str, port: int, plc_port: int, *, viewers: int, event_clients: int,
                 viewer_hold_s: float, plc_period_s: float, plc_reconnect_s: float, scrape_s: float,
                 seed: int = 0) -> None:
        self.host, self.port, self.plc_port = host, port, plc_port
        self.viewer_hold_s = viewer_hold_s
        self.plc_period_s = plc_period_s
        self.plc_reconnect_s = plc_reconnect_s
        self.scrape_s = scrape_s
        self.counters = LoadCounters()
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._viewer, args=(random.Random(seed + i), i),
                                          name=f"soak-viewer-{i}", daemon=True) for i in range(viewers)]
        self._threads += [threading.Thread(target=self._events, args=(random.Random(seed + 100 + i), i),
                                           name=f"soak-events-{i}", daemon=True) for i in range(event_clients)]
        self._threads += [threading.Thread(target=self._scraper, name="soak-scraper", daemon=True),
                          threading.Thread(target=self._plc, name="soak-plc", daemon=True)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def join(self, timeout: float = 30.0) -> None:
        self.stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self.counters, name, getattr(self.counters, name) + delta)

    def _client_error(self, what: str, exc: BaseException) -> None:
        with self._lock:
            self.counters.client_errors += 1
            self.counters.last_client_error = f"{what}: {type(exc).__name__}: {exc}"

    def _open(self, path: str) -> tuple[http.client.HTTPConnection, socket.socket | None, http.client.HTTPResponse]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        conn.request("GET", path)
        sock = conn.sock
        response = conn.getresponse()
        if response.status != 200:
            body = response.read(200)
            conn.close()
            raise OSError(f"GET {path}: HTTP {response.status} {body!r}")
        return conn, sock, response

    def _viewer(self, rng: random.Random, index: int) -> None:
        """An operator's MJPEG view: every part read whole and checked to be one JPEG."""

        def read(line: bytes, response: http.client.HTTPResponse) -> None:
            if line.startswith(b"Content-Length:"):
                length = int(line.split(b":")[1])
                response.readline()
                jpeg = response.read(length)
                whole = jpeg[:2] == b"\xff\xd8" and jpeg[-2:] == b"\xff\xd9"
                self._count(mjpeg_frames=1, mjpeg_bad_frames=int(not whole))

        self._stream_sessions(rng, "/api/live.mjpeg", "MJPEG viewer", read, reset_parity=index % 2,
                              session_counter="mjpeg_sessions")

    def _events(self, rng: random.Random, index: int) -> None:
        """A client of the event stream: results and status events counted, every data line parsed as JSON."""

        def read(line: bytes, _response: http.client.HTTPResponse) -> None:
            if line.startswith(b"event: result"):
                self._count(events_result=1)
            elif line.startswith(b"event: status"):
                self._count(events_status=1)
            elif line.startswith(b"data:"):
                json.loads(line[5:])  # every event's data is one JSON document

        self._stream_sessions(rng, "/api/events", "event client", read, reset_parity=(index + 1) % 2,
                              session_counter="event_sessions")

    def _stream_sessions(
        self,
        rng: random.Random,
        path: str,
        what: str,
        read: Callable[[bytes, http.client.HTTPResponse], None],
        *,
        reset_parity: int,
        session_counter: str,
    ) -> None:
        """Connect to a streaming ``path``, hand each line to ``read`` for about ``viewer_hold_s``, leave
        (every other session with a TCP reset instead of a close), and again until stopped."""
        session = 0
        while not self.stop.is_set():
            session += 1
            reset = (session + reset_parity) % 2 == 0
            hold = rng.uniform(0.5, 1.5) * self.viewer_hold_s
            sock = None
            try:
                conn, sock, response = self._open(path)
                self._count(**{session_counter: 1})
                until = time.monotonic() + hold
                while time.monotonic() < until and not self.stop.is_set():
                    line = response.readline()
                    if not line:
                        raise OSError(f"{path}: the stream ended")
                    read(line, response)
                _reset_close(conn, sock, reset)
                self._count(resets=int(reset))
            except (OSError, http.client.HTTPException, ValueError) as exc:
                if sock is not None:
                    sock.close()
                if not self.stop.is_set():
                    self._client_error(what, exc)
            self.stop.wait(rng.uniform(0.0, 0.5))

    def _scraper(self) -> None:
        while not self.stop.wait(self.scrape_s):
            try:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
                conn.request("GET", "/metrics")
                response = conn.getresponse()
                body = response.read()
                conn.close()
                if response.status != 200 or b"defectsam_frames_processed_total" not in body:
                    raise OSError(f"GET /metrics: HTTP {response.status}")
                self._count(scrapes=1)
            except (OSError, http.client.HTTPException) as exc:
                self._client_error("scraper", exc)

    def _plc(self) -> None:
        from pymodbus.client import ModbusTcpClient

        from service.plc.registers import BY_NAME, INPUT_WORDS, RESULT_BASE, get, result_checksum

        seen: set[int] = set()
        beat = 0
        while not self.stop.is_set():
            client = ModbusTcpClient(self.host, port=self.plc_port, timeout=5, retries=0)
            opened = time.monotonic()
            next_beat = opened
            try:
                if not client.connect():
                    raise OSError(f"cannot connect to the PLC server on port {self.plc_port}")
                while not self.stop.is_set() and time.monotonic() - opened < self.plc_reconnect_s:
                    reply = client.read_input_registers(0, count=INPUT_WORDS, device_id=1)
                    if reply.isError():
                        raise OSError(f"read input 0-{INPUT_WORDS - 1}: {reply}")
                    words = list(reply.registers)
                    iid = get(words, BY_NAME["inspection_id"])
                    torn = bool(iid) and get(words, BY_NAME["checksum"]) != result_checksum(words[RESULT_BASE:])
                    new = bool(iid) and iid not in seen
                    if new:
                        seen.add(iid)
                    self._count(plc_reads=1, plc_torn=int(torn), plc_results_seen=int(new))
                    if time.monotonic() >= next_beat:
                        beat = (beat + 1) & 0xFFFF
                        if client.write_registers(BY_NAME["plc_heartbeat"].address, [beat], device_id=1).isError():
                            raise OSError("write of the PLC heartbeat refused")
                        next_beat += 0.5
                    self.stop.wait(self.plc_period_s)
                if len(seen) > 100_000:
                    seen = {max(seen)}
            except Exception as exc:  # pymodbus raises its own exception types
                with self._lock:
                    self.counters.plc_errors += 1
                    self.counters.last_plc_error = f"{type(exc).__name__}: {exc}"
                self.stop.wait(0.5)
            finally:
                client.close()
            if not self.stop.is_set():
                self._count(plc_reconnects=1)


# ---------------------------------------------------------------------------------------------- the daemon


def _repo_root() -> Path:
    import service

    return Path(service.__file__).resolve().parent.parent


def soak_config(base: dict[str, Any], workdir: Path, *, bundle: Path | None = None,
                camera_fps: float | None = None) -> dict[str, Any]:
    """The daemon's config for a soak: ``base`` with loopback ports, the PLC on, the store in ``workdir``."""
    data = json.loads(json.dumps(base))  # a deep copy of plain YAML data
    data.setdefault("api", {}).update({"host": "127.0.0.1", "port": 0})
    data.setdefault("plc", {}).update({"enabled": True, "host": "127.0.0.1", "port": 0})
    data.setdefault("store", {})["path"] = str(workdir / "store")
    if bundle is not None:
        data.setdefault("engine", {})["bundle"] = str(bundle)
    camera = data.setdefault("camera", {})
    if camera_fps is not None and camera.get("type", "synthetic") == "synthetic":
        camera["fps"] = camera_fps
    return data


class DaemonProcess:
    """``defectsam serve --config FILE`` as a child process, its stdout and stderr in files."""

    def __init__(self, config_file: Path, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.out_path, self.log_path = workdir / "daemon.out", workdir / "daemon.log"
        root = str(_repo_root())
        environ = dict(os.environ if env is None else env)
        environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, environ.get("PYTHONPATH", "")) if p)
        self._out = open(self.out_path, "wb")  # noqa: SIM115 - closed in close()
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--config", str(config_file)],
                                     cwd=root, env=environ, stdout=self._out, stderr=self._log,
                                     stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        self.port = 0

    def wait_serving(self, timeout: float) -> int:
        """The API port, once the daemon printed its URL; raises DefectsamError if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.out_path.read_text(errors="replace").splitlines():
                if line.startswith(_SERVING):
                    self.port = int(line[len(_SERVING):].split()[0].rstrip("/").rsplit(":", 1)[1])
                    return self.port
            if self.proc.poll() is not None:
                raise DefectsamError(f"the daemon exited with status {self.proc.returncode} before serving: "
                                     f"{self.log_tail()}")
            time.sleep(0.1)
        raise DefectsamError(f"the daemon did not serve within {timeout:.0f} s: {self.log_tail()}")

    def get_json(self, path: str, timeout: float = 10.0) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """/api/status once /readyz answers 200; raises DefectsamError with the reasons otherwise."""
        deadline = time.monotonic() + timeout
        reasons: Any = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DefectsamError(f"the daemon exited with status {self.proc.returncode}: {self.log_tail()}")
            with contextlib.suppress(OSError, ValueError, http.client.HTTPException):
                status, body = self.get_json("/readyz")
                if status == 200:
                    return dict(self.get_json("/api/status")[1])
                reasons = body.get("reasons", body)
                if any("engine failed" in str(r) for r in reasons):
                    raise DefectsamError(f"the daemon is not ready: {'; '.join(map(str, reasons))}")
            time.sleep(0.5)
        raise DefectsamError(f"the daemon was not ready within {timeout:.0f} s: {reasons}")

    def terminate(self, timeout: float = STOP_TIMEOUT_S) -> tuple[int | None, float | None]:
        """SIGTERM, then wait: (exit code, seconds it took); killed (None, None) past ``timeout``."""
        if self.proc.poll() is not None:
            return self.proc.returncode, None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None, None
        return code, time.monotonic() - started

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._out.close()
        self._log.close()


# ---------------------------------------------------------------------------------------------- the run


def _window(count: int) -> int:
    return max(1, min(10, max(3, count // 5), count))


def _slope_per_hour(times: list[float], values: list[float]) -> float:
    if len(times) < 2:
        return 0.0
    mean_t, mean_v = statistics.fmean(times), statistics.fmean(values)
    var = sum((t - mean_t) ** 2 for t in times)
    if var == 0:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in zip(times, values, strict=True)) / var * 3600.0


def run_soak(
    config: dict[str, Any], *, duration_s: float = 600.0, warmup_s: float = 60.0, interval_s: float = 10.0,
    viewers: int = 4, event_clients: int = 2, viewer_hold_s: float = 5.0, plc_period_s: float = 0.1,
    plc_reconnect_s: float = 30.0, scrape_s: float = 5.0, rss_bound_mb: float = 32.0, fd_bound: int = 4,
    bundle: Path | None = None, camera_fps: float | None = None, workdir: Path | None = None,
    on_sample: Callable[[SoakSample], None] | None = None,
) -> SoakResult:
    """Run the soak described in the module docstring. ``config`` is the daemon's config data (a YAML
    mapping); :func:`soak_config` puts its ports, store, ``bundle`` and ``camera_fps`` in place."""
    if duration_s <= 0 or warmup_s < 0 or interval_s <= 0 or warmup_s >= duration_s:
        raise DefectsamError("--duration must be > 0 and above --warmup (>= 0), --interval > 0")
    if viewers < 0 or event_clients < 0 or viewer_hold_s <= 0 or plc_period_s <= 0 or scrape_s <= 0:
        raise DefectsamError("--viewers and --event-clients must be >= 0; --viewer-hold, --plc-period and "
                             "--scrape > 0")
    if (duration_s - warmup_s) / interval_s < 2:
        raise DefectsamError("at least two samples after the warm-up are needed: lower --interval")
    from service.config import load_config

    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="defectsam-soak-")))
        workdir.mkdir(parents=True, exist_ok=True)
        data = soak_config(config, workdir, bundle=bundle, camera_fps=camera_fps)
        config_file = workdir / "daemon.yaml"
        config_file.write_text(yaml.safe_dump(data, sort_keys=False))
        checked = load_config(config_file)  # fails here, in one line, as serve would
        daemon = DaemonProcess(config_file, workdir)
        stack.callback(daemon.close)
        daemon.wait_serving(120.0)
        status = daemon.wait_ready(READY_TIMEOUT_S)
        plc_port = int(str(status["plc"]["listen"]).rsplit(":", 1)[1])
        engine = status["engine"]
        camera = checked.camera
        frame = (f"{camera.width}x{camera.height} synthetic at {camera.fps:g} fps"
                 if camera.type == "synthetic" else f"{camera.type} camera")
        load = ClientLoad("127.0.0.1", daemon.port, plc_port, viewers=viewers, event_clients=event_clients,
                          viewer_hold_s=viewer_hold_s, plc_period_s=plc_period_s, plc_reconnect_s=plc_reconnect_s,
                          scrape_s=scrape_s)
        samples: list[SoakSample] = []
        failures: list[str] = []
        begun = time.monotonic()
        load.start()
        try:
            next_at = begun
            while True:
                now = time.monotonic()
                if daemon.proc.poll() is not None:
                    failures.append(f"the daemon exited with status {daemon.proc.returncode} after "
                                    f"{now - begun:.0f} s: {daemon.log_tail()}")
                    break
                if now >= next_at:
                    try:
                        rss, _, threads, fds, sockets = proc_sample(daemon.pid)
                        snap = daemon.get_json("/api/status")[1]
                    except (OSError, ValueError, http.client.HTTPException) as exc:
                        failures.append(f"sampling the daemon failed at {now - begun:.0f} s: {exc}")
                        break
                    sample = SoakSample(
                        t_s=round(now - begun, 1), rss_mb=round(rss, 1), fds=fds, sockets=sockets, threads=threads,
                        frames_processed=snap["pipeline"]["frames_processed"], viewers=snap["live"]["viewers"],
                        event_clients=snap["live"]["event_clients"], plc_connections=snap["plc"]["connections"],
                        store_written=snap["store"]["written"])
                    samples.append(sample)
                    if on_sample is not None:
                        on_sample(sample)
                    next_at += interval_s
                    if now - begun >= duration_s:
                        break
                time.sleep(max(0.0, min(next_at - time.monotonic(), 1.0)))
        finally:
            load.join()
        final = peak = None
        with contextlib.suppress(OSError, ValueError, http.client.HTTPException):
            final = daemon.get_json("/api/status")[1]
            peak = proc_sample(daemon.pid)[1]
        exit_code, stop_s = daemon.terminate()
        log_tail = daemon.log_tail()

    counters = load.counters
    after = [s for s in samples if s.t_s >= warmup_s]
    window = _window(len(after))
    first, last = after[:window], after[-window:]

    def med(rows: list[SoakSample], key: str) -> float:
        return float(statistics.median(getattr(s, key) for s in rows)) if rows else 0.0

    rss_growth = med(last, "rss_mb") - med(first, "rss_mb")
    fd_growth = med(last, "fds_own") - med(first, "fds_own")
    elapsed = samples[-1].t_s - samples[0].t_s if len(samples) > 1 else 0.0
    processed = samples[-1].frames_processed - samples[0].frames_processed if samples else 0
    if len(after) < 2:
        failures.append(f"only {len(after)} sample(s) after the warm-up")
    if rss_growth > rss_bound_mb:
        failures.append(f"resident memory grew {rss_growth:.1f} MB after the warm-up (bound {rss_bound_mb:g} MB)")
    if fd_growth > fd_bound:
        failures.append(f"open file descriptors grew by {fd_growth:g} after the warm-up (bound {fd_bound})")
    if len(last) >= 2 and last[-1].frames_processed <= last[0].frames_processed:
        failures.append("the daemon inspected nothing in the last window")
    if viewers and (counters.mjpeg_sessions == 0 or counters.mjpeg_frames == 0):
        failures.append("no MJPEG viewer session received a frame")
    if counters.mjpeg_bad_frames:
        failures.append(f"{counters.mjpeg_bad_frames} MJPEG part(s) were not whole JPEGs")
    if event_clients and counters.events_status == 0:
        failures.append("no event-stream client received an event")
    if counters.client_errors:
        failures.append(f"{counters.client_errors} viewer/scraper request(s) failed; "
                        f"last: {counters.last_client_error}")
    if counters.plc_reads == 0 or counters.plc_errors:
        failures.append(f"PLC: {counters.plc_reads} reads, {counters.plc_errors} failed; "
                        f"last: {counters.last_plc_error}")
    if counters.plc_torn:
        failures.append(f"PLC: {counters.plc_torn} read(s) of a result that did not match its checksum")
    if exit_code != 0:
        failures.append(f"the daemon did not stop cleanly on SIGTERM (exit {exit_code}): {log_tail}")
    store: dict[str, Any] = final["store"] if final else {"written": 0, "dropped": {}}
    return SoakResult(
        command="defectsam soak",
        bundle=f"{engine['bundle']} ({engine['arch']}, {engine['precision']}, {engine['backend']})",
        frame=frame,
        duration_s=duration_s, warmup_s=warmup_s, interval_s=interval_s, viewers=viewers,
        event_clients=event_clients, viewer_hold_s=viewer_hold_s, plc_period_s=plc_period_s,
        rss_bound_mb=rss_bound_mb, fd_bound=fd_bound, window=window,
        rss_mb_first=round(med(first, "rss_mb"), 1), rss_mb_last=round(med(last, "rss_mb"), 1),
        rss_growth_mb=round(rss_growth, 1),
        rss_slope_mb_per_h=round(_slope_per_hour([s.t_s for s in after], [s.rss_mb for s in after]), 1),
        rss_mb_peak=round(peak or 0.0, 1),
        fds_first=med(first, "fds_own"), fds_last=med(last, "fds_own"), fd_growth=fd_growth,
        threads_first=med(first, "threads"), threads_last=med(last, "threads"),
        frames_processed=processed, inspected_fps=round(processed / elapsed, 2) if elapsed else 0.0,
        store_written=int(store["written"]), store_dropped=int(sum(store["dropped"].values())),
        load=counters, stop_s=None if stop_s is None else round(stop_s, 2), exit_code=exit_code,
        passed=not failures, failures=failures, samples=samples,
    )


def sample_row(sample: SoakSample) -> str:
    s = sample
    return (f"| {s.t_s:.0f} | {s.rss_mb:.1f} | {s.fds} | {s.fds_own} | {s.sockets} | {s.threads} | "
            f"{s.frames_processed} | {s.viewers} | {s.event_clients} | {s.plc_connections} | {s.store_written} |")


SAMPLE_HEADER = ("| t s | RSS MB | fds | fds less clients | sockets | threads | inspected | MJPEG viewers | "
                 "event clients | PLC connections | stored |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def markdown_report(result: SoakResult, max_rows: int = 30) -> str:
    r, c = result, result.load
    step = max(1, -(-len(r.samples) // max_rows))
    rows = r.samples[::step]
    if r.samples and rows[-1] is not r.samples[-1]:
        rows.append(r.samples[-1])
    verdict = "PASS" if r.passed else "FAIL: " + "; ".join(r.failures)
    return "\n".join([
        f"daemon: {r.bundle}; camera {r.frame}",
        f"load: {r.viewers} MJPEG viewers and {r.event_clients} event clients reconnecting every "
        f"~{r.viewer_hold_s:g} s, "
        f"a PLC reading input 0-115 every {r.plc_period_s * 1000:g} ms, /metrics scraped",
        "",
        SAMPLE_HEADER,
        *(sample_row(s) for s in rows),
        "",
        "| measure | value |",
        "|---|---:|",
        f"| run, warm-up, sample interval s | {r.duration_s:g}, {r.warmup_s:g}, {r.interval_s:g} |",
        f"| RSS MB after warm-up: first / last window (median of {r.window}) | {r.rss_mb_first:.1f} / "
        f"{r.rss_mb_last:.1f} |",
        f"| RSS growth MB (bound {r.rss_bound_mb:g}) / slope MB per hour | {r.rss_growth_mb:+.1f} / "
        f"{r.rss_slope_mb_per_h:+.1f} |",
        f"| RSS peak MB (VmHWM) | {r.rss_mb_peak:.1f} |",
        f"| open fds less client connections: first / last window, growth (bound {r.fd_bound}) | "
        f"{r.fds_first:g} / {r.fds_last:g}, "
        f"{r.fd_growth:+g} |",
        f"| threads: first / last window | {r.threads_first:g} / {r.threads_last:g} |",
        f"| inspected, FPS | {r.frames_processed}, {r.inspected_fps:.2f} |",
        f"| records stored / dropped | {r.store_written} / {r.store_dropped} |",
        f"| MJPEG sessions, frames | {c.mjpeg_sessions}, {c.mjpeg_frames} |",
        f"| event-stream sessions, result / status events | {c.event_sessions}, {c.events_result} / "
        f"{c.events_status} |",
        f"| sessions ended by a TCP reset | {c.resets} |",
        f"| PLC reads, failed, torn, reconnects, results seen | {c.plc_reads}, {c.plc_errors}, {c.plc_torn}, "
        f"{c.plc_reconnects}, {c.plc_results_seen} |",
        f"| /metrics scrapes, failed client requests | {c.scrapes}, {c.client_errors} |",
        f"| SIGTERM -> exit | {'-' if r.stop_s is None else f'{r.stop_s:.1f} s'}, status {r.exit_code} |",
        "",
        f"verdict: {verdict}",
    ])
