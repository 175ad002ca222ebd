"""The basler camera against pylon's own camera emulation, fed with synthetic 4 MP frames.

pypylon (the ``basler`` extra: ``pip install '.[basler]'``) ships the emulation transport layer;
``PYLON_CAMEMU=<n>`` makes n emulated cameras enumerate (serials 0815-0000 ...). Its image-file
mode (TestImageSelector Off, ImageFileMode On, ImageFilename = a file or a folder) serves our
PNGs. Without pypylon these tests skip, except the one that checks the missing-package message.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from engines.synthetic import FRAME_HEIGHT, FRAME_WIDTH, render_frame
from service.capture import (
    CameraState,
    CameraUnavailableError,
    CameraWorker,
    Frame,
    create_worker,
    parse_camera_config,
)

from .support import wait_for

EMULATED = "0815-0000"

# pypylon's SWIG bindings warn on import under Python 3.11+; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:builtin type [Ss]wig:DeprecationWarning")

def test_missing_pypylon_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pypylon", None)  # what `import pypylon` meets when it is not installed
    config = parse_camera_config({"type": "basler"})
    with pytest.raises(CameraUnavailableError) as info:
        create_worker(config)
    message = str(info.value)
    assert "'basler'" in message and "pypylon" in message and "pip install 'defectsam[basler]'" in message


@pytest.fixture(scope="module")
def synthetic_pngs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    """Two synthetic 4 MP panels as PNGs in a folder, and their pixels."""
    folder = tmp_path_factory.mktemp("emulation")
    images = []
    for seed in (3, 4):
        image = render_frame(seed, with_masks=False).image
        cv2.imwrite(str(folder / f"panel{seed}.png"), image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        images.append(image)
    return folder, images


@pytest.fixture()
def emulation(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pypylon", reason="pypylon is not installed (the 'basler' extra: pip install '.[basler]')")
    monkeypatch.setenv("PYLON_CAMEMU", "1")  # read by pylon when it enumerates devices


@pytest.fixture()
def workers() -> Iterator[list[CameraWorker]]:
    started: list[CameraWorker] = []
    yield started
    for worker in started:
        worker.stop()


def _start(workers: list[CameraWorker], data: dict[str, Any]) -> CameraWorker:
    worker = create_worker(parse_camera_config(data), name="line-camera")
    workers.append(worker)
    worker.start()
    return worker


def _emulated(folder: Path, **extra: Any) -> dict[str, Any]:
    return {
        "type": "basler", "serial": EMULATED, "device_class": "BaslerCamEmu",
        "emulation_images": str(folder), "pixel_format": "BGR8Packed",
        "width": FRAME_WIDTH, "height": FRAME_HEIGHT, **extra,
    }


def _which(image: np.ndarray, images: list[np.ndarray]) -> int:
    matches = [i for i, reference in enumerate(images) if np.array_equal(image, reference)]
    assert len(matches) == 1, "the emulator's frame is none of the synthetic panels"
    return matches[0]


def test_free_run_streams_the_synthetic_panels(
    emulation: None, workers: list[CameraWorker], synthetic_pngs: tuple[Path, list[np.ndarray]]
) -> None:
    folder, images = synthetic_pngs
    worker = _start(workers, _emulated(folder, frame_rate=20))
    frames: list[Frame] = []
    last = 0
    while len(frames) < 4:
        frame = worker.slot.get(15, newer_than=last)
        assert frame is not None, worker.stats()
        frames.append(frame)
        last = frame.acquisition_id
    for frame in frames:
        assert frame.image.shape == (FRAME_HEIGHT, FRAME_WIDTH, 3) and frame.image.dtype == np.uint8
        assert frame.source == f"basler:{EMULATED}"
        _which(frame.image, images)  # pixel-exact BGR, not swapped to RGB
    assert {_which(f.image, images) for f in frames} == {0, 1}  # the emulator serves the folder in turn
    stats = worker.stats()
    assert stats.state is CameraState.CONNECTED and stats.fps > 0 and stats.last_error is None
    assert not stats.triggerable  # free run: a trigger only marks the time
    requested = worker.trigger()
    after = worker.slot.get(5, captured_after=requested)
    assert after is not None and after.captured_at > requested


def test_software_trigger_gives_one_frame_per_trigger(
    emulation: None, workers: list[CameraWorker], synthetic_pngs: tuple[Path, list[np.ndarray]]
) -> None:
    folder, images = synthetic_pngs
    worker = _start(workers, _emulated(folder, trigger="software"))
    wait_for(lambda: worker.stats().state is CameraState.CONNECTED, what="the emulated camera to open")
    time.sleep(0.5)
    assert worker.stats().frames_captured == 0  # no trigger, no frame
    assert worker.stats().triggerable

    served = []
    for n in range(1, 4):
        requested = time.monotonic()
        frame = worker.next_frame(10)
        assert frame is not None, worker.stats()
        assert frame.captured_at > requested and frame.acquisition_id == n
        assert worker.stats().frames_captured == n
        served.append(_which(frame.image, images))
    assert served == [0, 1, 0]  # one frame per trigger, the folder in turn
    time.sleep(0.3)
    assert worker.stats().frames_captured == 3 and worker.stats().frames_dropped == 0


def test_a_camera_that_is_not_there_is_retried(emulation: None, workers: list[CameraWorker]) -> None:
    worker = _start(workers, {"type": "basler", "serial": "0815-0042",
                              "reconnect": {"initial_s": 0.05, "max_s": 0.2}})
    wait_for(lambda: worker.stats().disconnects >= 2, what="failed attempts")
    stats = worker.stats()
    assert stats.state is CameraState.RECONNECTING
    assert stats.last_error is not None and "no camera found (serial 0815-0042" in stats.last_error
