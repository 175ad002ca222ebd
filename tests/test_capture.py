"""Camera sources: the latest-frame slot, the worker (reconnect, backoff, stop), synthetic, files, opencv.

Everything here runs real threads against real files and real decoders; nothing is mocked.
"""

from __future__ import annotations

import itertools
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from service.capture import (
    _PLUGINS,
    CameraConfigError,
    CameraState,
    CameraWorker,
    Frame,
    LatestFrameSlot,
    ReconnectConfig,
    camera_types,
    create_worker,
    parse_camera_config,
)
from service.capture.backoff import Backoff

from .support import wait_for

FAST_RECONNECT = {"initial_s": 0.05, "max_s": 0.4, "factor": 2.0}


def _frame(acquisition_id: int, captured_at: float | None = None) -> Frame:
    now = time.monotonic() if captured_at is None else captured_at
    return Frame(np.zeros((2, 2), np.uint8), acquisition_id, now, time.time(), "test")


@pytest.fixture()
def workers() -> Iterator[list[CameraWorker]]:
    """Workers a test starts; stopped afterwards whatever happens."""
    started: list[CameraWorker] = []
    yield started
    for worker in started:
        worker.stop()


def _start(workers: list[CameraWorker], data: dict[str, Any], name: str = "camera0") -> CameraWorker:
    worker = create_worker(parse_camera_config(data), name=name)
    workers.append(worker)
    worker.start()
    return worker


# -------------------------------------------------------------------------------------------
# The slot


def test_slot_counts_frames_replaced_unread() -> None:
    slot = LatestFrameSlot()
    for i in (1, 2, 3):
        slot.put(_frame(i))
    assert slot.dropped == 2
    got = slot.get(0)
    assert got is not None and got.acquisition_id == 3
    slot.put(_frame(4))  # replaces a frame that was read: not a drop
    assert slot.dropped == 2
    assert slot.peek() is not None and slot.dropped == 2  # peeking does not read
    slot.put(_frame(5))
    assert slot.dropped == 3


def test_slot_get_waits_for_a_newer_frame_and_times_out() -> None:
    slot = LatestFrameSlot()
    slot.put(_frame(1))
    start = time.monotonic()
    assert slot.get(0.1, newer_than=1) is None
    assert time.monotonic() - start >= 0.09

    timer = threading.Timer(0.1, slot.put, args=(_frame(2),))
    timer.start()
    got = slot.get(5, newer_than=1)
    timer.join()
    assert got is not None and got.acquisition_id == 2
    assert slot.get(0, newer_than=0) is got  # the latest is still there for whoever asks


def test_slot_captured_after_and_close() -> None:
    slot = LatestFrameSlot()
    slot.put(_frame(1, captured_at=10.0))
    assert slot.get(0, captured_after=10.0) is None
    slot.put(_frame(2, captured_at=10.5))
    got = slot.get(0, captured_after=10.0)
    assert got is not None and got.acquisition_id == 2

    waiter_result: list[Frame | None] = []
    waiter = threading.Thread(target=lambda: waiter_result.append(slot.get(None, newer_than=2)))
    waiter.start()
    time.sleep(0.05)
    slot.close()  # the camera stopped for good: waiters wake with None
    waiter.join(2)
    assert not waiter.is_alive() and waiter_result == [None]


def test_slot_producer_consumer_accounts_for_every_frame() -> None:
    """A fast producer and a slower consumer: ids only increase, and consumed + dropped == produced."""
    slot = LatestFrameSlot()
    produced = 3000
    consumed: list[int] = []

    def consume() -> None:
        last = 0
        while last < produced:
            frame = slot.get(5, newer_than=last)
            assert frame is not None
            assert frame.acquisition_id > last
            last = frame.acquisition_id
            consumed.append(last)
            if len(consumed) % 10 == 0:
                time.sleep(0.0005)  # a consumer slower than the producer

    consumer = threading.Thread(target=consume)
    consumer.start()
    for i in range(1, produced + 1):
        slot.put(_frame(i))
    consumer.join(10)
    assert not consumer.is_alive()
    assert consumed == sorted(set(consumed)) and consumed[-1] == produced
    assert len(consumed) + slot.dropped == produced
    assert slot.dropped > 0  # the consumer was slower: frames were dropped, not queued


def test_backoff_grows_to_its_cap_and_resets() -> None:
    backoff = Backoff(0.5, 4.0)
    assert [backoff.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.attempts == 6
    backoff.reset()
    assert backoff.next() == 0.5


# -------------------------------------------------------------------------------------------
# Config


def test_camera_types_and_config_errors_name_the_key() -> None:
    assert camera_types() == ["basler", "files", "opencv", "synthetic"]
    assert parse_camera_config({"type": "synthetic"}).type == "synthetic"
    cases = {
        "camera.type: must be one of 'basler', 'files', 'opencv', 'synthetic'": {"type": "webcam"},
        "camera.fpz: Extra inputs are not permitted": {"type": "synthetic", "fpz": 3},
        "camera.fps: Input should be greater than 0": {"type": "synthetic", "fps": -1},
        "camera.path: Field required": {"type": "files"},
        "camera.mode: Input should be 'loop' or 'once'": {"type": "files", "path": "x", "mode": "twice"},
        "camera.reconnect.max_s: Input should be greater than 0": {"type": "opencv", "device": 0,
                                                                   "reconnect": {"max_s": 0}},
        "camera.trigger: Input should be 'free_run' or 'software'": {"type": "basler", "trigger": "hardware"},
        "width x height must be at least 135x76 pixels, got 128x720": {"type": "synthetic", "width": 128,
                                                                      "height": 720},
    }
    for expected, data in cases.items():
        with pytest.raises(CameraConfigError) as info:
            parse_camera_config(data)
        assert expected in str(info.value)
    assert parse_camera_config({"type": "opencv", "device": "2"}).device == 2  # type: ignore[union-attr]


def test_every_camera_option_is_documented() -> None:
    models = [*(plugin.Config for plugin in _PLUGINS.values()), ReconnectConfig]
    undocumented = [
        f"{model.__module__}.{name}"
        for model in models
        for name, field in model.model_fields.items()
        if not (field.title and field.description)
    ]
    assert not undocumented


# -------------------------------------------------------------------------------------------
# Synthetic


def test_synthetic_camera_streams_4mp_frames_at_its_rate_without_queueing(workers: list[CameraWorker]) -> None:
    worker = _start(workers, {"type": "synthetic", "fps": 25, "pool_size": 2})
    first = worker.slot.get(30)  # the pool is rendered in the camera thread first
    assert first is not None and first.acquisition_id == 1
    assert first.image.shape == (1520, 2688, 3) and first.image.dtype == np.uint8
    assert first.source == "synthetic:seed=0"
    with pytest.raises(ValueError, match="read-only"):
        first.image[0, 0] = 0  # shared with every consumer: nobody may draw on it

    # a slow consumer: it reads a frame every 0.2 s while the camera delivers every 0.04 s
    start_count = worker.stats().frames_captured
    t0 = time.monotonic()
    images: set[int] = set()
    seen = [first]
    while time.monotonic() - t0 < 1.6:
        time.sleep(0.2)
        frame = worker.slot.get(1, newer_than=seen[-1].acquisition_id)
        assert frame is not None
        seen.append(frame)
        images.add(id(frame.image))
    elapsed = time.monotonic() - t0
    stats = worker.stats()
    captured = stats.frames_captured - start_count
    assert 0.7 * 25 * elapsed <= captured <= 1.1 * 25 * elapsed + 2
    assert 18 <= stats.fps <= 27
    # nothing queues: the slot kept the latest, the rest were dropped and counted, and no frame
    # allocated new pixels (every image is one of the two pre-rendered ones)
    assert stats.frames_dropped >= stats.frames_captured - len(seen) - 1
    assert stats.frames_dropped > 0
    assert len(images) <= 2
    assert [f.acquisition_id for f in seen] == sorted({f.acquisition_id for f in seen})
    assert stats.state is CameraState.CONNECTED and stats.last_error is None

    # triggered use of a free-running camera: the first frame captured after the request
    requested = worker.trigger()
    frame = worker.slot.get(2, captured_after=requested)
    assert frame is not None and frame.captured_at > requested
    following = worker.next_frame(2)
    assert following is not None and following.acquisition_id > frame.acquisition_id

    worker.stop()
    assert worker.stats().state is CameraState.STOPPED
    assert worker.slot.closed


# -------------------------------------------------------------------------------------------
# Files


@pytest.fixture()
def png_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "line"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"frame{i}.png"), np.full((48, 64, 3), 40 * (i + 1), np.uint8))
    (folder / "notes.txt").write_text("not an image")
    return folder


def _collect(worker: CameraWorker, count: int, timeout: float = 10.0) -> list[Frame]:
    frames: list[Frame] = []
    deadline = time.monotonic() + timeout
    while len(frames) < count and time.monotonic() < deadline:
        frame = worker.slot.get(0.5, newer_than=frames[-1].acquisition_id if frames else 0)
        if frame is not None:
            frames.append(frame)
        elif worker.slot.closed:
            break
    return frames


def test_files_folder_loops_in_name_order(workers: list[CameraWorker], png_folder: Path) -> None:
    worker = _start(workers, {"type": "files", "path": str(png_folder), "fps": 40})
    frames = _collect(worker, 7)
    names = [Path(f.source).name for f in frames]
    order = ["frame0.png", "frame1.png", "frame2.png"]
    # consecutive frames read follow the folder's order (a dropped frame may skip one)
    for a, b in itertools.pairwise(names):
        assert (order.index(b) - order.index(a)) % 3 in (1, 2)
    assert frames[0].image.shape == (48, 64, 3) and names[0] == "frame0.png"
    assert worker.stats().state is CameraState.CONNECTED


def test_files_folder_once_ends_cleanly(workers: list[CameraWorker], png_folder: Path) -> None:
    worker = _start(workers, {"type": "files", "path": str(png_folder), "mode": "once", "fps": 0})
    wait_for(lambda: worker.stats().state is CameraState.STOPPED, what="the end of the folder")
    stats = worker.stats()
    assert stats.frames_captured == 3 and stats.end_of_stream and stats.last_error is None
    last = worker.slot.get(0)
    assert last is not None and Path(last.source).name == "frame2.png"
    assert worker.slot.get(5, newer_than=last.acquisition_id) is None  # returns at once: the slot is closed


@pytest.fixture()
def short_video(tmp_path: Path) -> Path:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 20, (64, 48))
    assert writer.isOpened()
    for i in range(8):
        image = np.zeros((48, 64, 3), np.uint8)
        image[:, : 8 * (i + 1)] = 255  # a bar that grows frame by frame
        writer.write(image)
    writer.release()
    return path


def test_files_video_loop_and_once(workers: list[CameraWorker], short_video: Path) -> None:
    looping = _start(workers, {"type": "files", "path": str(short_video), "fps": 0}, name="loop")
    wait_for(lambda: looping.stats().frames_captured > 20, what="the video to loop")
    assert looping.stats().state is CameraState.CONNECTED and looping.stats().reconnects == 0
    looping.stop()

    once = _start(workers, {"type": "files", "path": str(short_video), "mode": "once"}, name="once")
    frames = _collect(once, 8)  # the video plays at its own 20 fps: every frame can be read
    wait_for(lambda: once.stats().state is CameraState.STOPPED, what="the end of the video")
    stats = once.stats()
    assert stats.frames_captured == 8 and stats.end_of_stream and stats.last_error is None
    assert [f.source for f in frames] == [f"{short_video}#{i}" for i in range(8)]
    widths = [int((f.image[24] > 128).all(axis=-1).sum()) for f in frames]
    assert widths == sorted(widths) and widths[0] < widths[-1]


def test_files_camera_lost_and_found_again(workers: list[CameraWorker], png_folder: Path) -> None:
    worker = _start(workers, {"type": "files", "path": str(png_folder), "fps": 50, "reconnect": FAST_RECONNECT})
    wait_for(lambda: worker.stats().frames_captured >= 3, what="frames")
    moved = png_folder.with_name("unmounted")
    png_folder.rename(moved)  # the share goes away

    retries: list[float] = []

    def backing_off() -> bool:
        stats = worker.stats()
        delay = stats.retry_in_s if stats.state is CameraState.RECONNECTING else None
        if delay is not None and (not retries or retries[-1] != delay):
            retries.append(delay)
        return len(retries) >= 3

    wait_for(backing_off, what="three growing retry delays")
    stats = worker.stats()
    assert retries == sorted(retries) and retries[-1] > retries[0]
    assert stats.disconnects >= 3 and stats.reconnects == 0
    assert stats.last_error is not None and "line" in stats.last_error
    before = stats.frames_captured

    moved.rename(png_folder)  # and comes back
    wait_for(lambda: worker.stats().frames_captured > before + 2, what="frames after the folder returned")
    stats = worker.stats()
    assert stats.state is CameraState.CONNECTED and stats.reconnects == 1
    assert stats.retry_in_s is None and stats.last_error is not None  # the last failure stays visible
    frame = worker.slot.get(1)
    assert frame is not None and frame.acquisition_id > before  # ids carry on across the reconnection


def test_stop_interrupts_a_long_backoff(workers: list[CameraWorker], tmp_path: Path) -> None:
    worker = _start(workers, {"type": "files", "path": str(tmp_path / "absent"),
                              "reconnect": {"initial_s": 30, "max_s": 60}})
    wait_for(lambda: worker.stats().state is CameraState.RECONNECTING, what="RECONNECTING")
    assert worker.stats().retry_in_s == 30
    start = time.monotonic()
    worker.stop()
    assert time.monotonic() - start < 2 and not worker.is_alive()
    assert worker.stats().state is CameraState.STOPPED


# -------------------------------------------------------------------------------------------
# OpenCV


def test_opencv_reads_a_video_file_to_its_end(workers: list[CameraWorker], short_video: Path) -> None:
    worker = _start(workers, {"type": "opencv", "device": str(short_video)})
    wait_for(lambda: worker.stats().state is CameraState.STOPPED, what="the end of the video")
    stats = worker.stats()
    assert stats.frames_captured == 8 and stats.end_of_stream and stats.last_error is None
    frame = worker.slot.get(0)
    assert frame is not None and frame.image.shape == (48, 64, 3) and frame.source == f"opencv:{short_video}"


def test_opencv_stream_that_fails_backs_off_then_recovers(
    workers: list[CameraWorker], short_video: Path, tmp_path: Path
) -> None:
    url = "rtsp://operator:hunter2@127.0.0.1:9/line"  # nothing listens on the discard port
    worker = _start(workers, {"type": "opencv", "device": url, "reconnect": FAST_RECONNECT}, name="rtsp")
    wait_for(lambda: worker.stats().disconnects >= 4, what="four failed attempts")
    stats = worker.stats()
    assert stats.state is CameraState.RECONNECTING and stats.frames_captured == 0
    assert stats.retry_in_s is not None and stats.retry_in_s >= 0.4  # 0.05 -> 0.1 -> 0.2 -> 0.4 (the cap)
    assert stats.last_error is not None and "cannot open" in stats.last_error
    assert "hunter2" not in stats.last_error  # credentials are masked
    worker.stop()

    # a device that appears later: the camera connects on a retry, and the reconnection is counted
    later = tmp_path / "later.avi"
    late = _start(workers, {"type": "opencv", "device": str(later), "reconnect": FAST_RECONNECT}, name="late")
    wait_for(lambda: late.stats().disconnects >= 2, what="failed attempts")
    shutil.copy(short_video, tmp_path / "partial")
    (tmp_path / "partial").rename(later)  # appears whole
    wait_for(lambda: late.stats().frames_captured == 8, what="frames once the device appeared")
    assert late.stats().reconnects == 1
