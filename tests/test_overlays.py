"""service/api/overlays.py: the bounded overlay renderer on its own (a daemon under a flood: test_overlay_flood.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from engines.overlay import overlay_scale, render_overlay
from service.api.overlays import OverlayBusyError, OverlayRenderer
from service.config import StoreSection
from service.store import RecordStore

from .daemon_support import make_record
from .support import wait_for


class _Renders:
    """Render functions that count how many run at once, each taking ``seconds``."""

    def __init__(self, seconds: float = 0.05) -> None:
        self.seconds = seconds
        self.running = self.most = self.calls = 0
        self._lock = threading.Lock()
        self.threads: set[int] = set()
        self.policies: set[int] = set()

    def __call__(self, payload: bytes | None = b"x" * 1000) -> Callable[[], bytes | None]:
        def render() -> bytes | None:
            with self._lock:
                self.running += 1
                self.calls += 1
                self.most = max(self.most, self.running)
                self.threads.add(threading.get_native_id())
                if sys.platform == "linux":
                    self.policies.add(os.sched_getscheduler(0))
            time.sleep(self.seconds)
            with self._lock:
                self.running -= 1
            return payload

        return render


def _gather(renderer: OverlayRenderer, calls: list[tuple[Any, Callable[[], bytes | None]]]) -> list[Any]:
    async def main() -> list[Any]:
        return await asyncio.gather(*(renderer.get(key, render) for key, render in calls), return_exceptions=True)

    return asyncio.run(main())


def test_at_most_n_renders_at_once_on_idle_class_threads_and_the_rest_refused() -> None:
    renders = _Renders(0.2)
    renderer = OverlayRenderer(renders=2, waiting=3, wait_s=5.0)
    try:
        got = _gather(renderer, [((i, None), renders()) for i in range(12)])
    finally:
        renderer.close()
    refused = [g for g in got if isinstance(g, OverlayBusyError)]
    assert renders.most == 2 and len(renders.threads) <= 2
    assert len(refused) == 12 - 2 - 3  # two drawn at once, three waited for a slot, the rest refused at once
    assert all(g.retry_after_s >= 1 and "busy" in g.detail for g in refused)
    if sys.platform == "linux":
        assert renders.policies == {os.SCHED_IDLE}
    stats = renderer.stats()
    assert (stats.renders, stats.refused, stats.rendering, stats.waiting) == (5, 7, 0, 0)


def test_a_wait_is_bounded_and_a_slow_render_goes_on_into_the_cache() -> None:
    renders = _Renders(1.0)
    renderer = OverlayRenderer(renders=1, waiting=4, wait_s=0.2, render_wait_s=0.5)

    async def main() -> tuple[list[Any], float, Any]:
        started = time.monotonic()
        got = await asyncio.gather(renderer.get("a", renders()), renderer.get("b", renders()),
                                   return_exceptions=True)
        took = time.monotonic() - started
        await asyncio.sleep(0.8)  # the render of "a" ends; it is cached
        return got, took, await renderer.get("a", renders())

    try:
        (first, second), took, later = asyncio.run(main())
    finally:
        renderer.close()
    assert isinstance(first, OverlayBusyError) and "still being drawn" in first.detail  # its render outlasted 0.5 s
    assert isinstance(second, OverlayBusyError) and "within 0.2 s" in second.detail  # no slot within the wait
    assert took < 0.9
    assert later is not None and later.jpeg == b"x" * 1000 and renders.calls == 1
    assert renderer.stats().cache_hits == 1


def test_the_same_overlay_is_drawn_once_and_then_served_from_the_cache() -> None:
    renders = _Renders(0.2)
    renderer = OverlayRenderer(renders=2, waiting=8, wait_s=5.0)
    try:
        got = _gather(renderer, [((7, 640), renders(b"jpeg")) for _ in range(6)])
        again = _gather(renderer, [((7, 640), renders(b"jpeg"))])
    finally:
        renderer.close()
    assert renders.calls == 1
    assert all(g.jpeg == b"jpeg" and g.etag == got[0].etag for g in got + again)
    assert got[0].etag.startswith('"') and got[0].etag.endswith('"')
    assert renderer.stats().cache_hits == 6  # five that waited for the render, then the repeat


def test_the_cache_keeps_its_byte_budget_least_recently_used_first() -> None:
    renders = _Renders(0.0)
    renderer = OverlayRenderer(cache_bytes=3000)
    try:
        for key in ("a", "b", "c"):
            _gather(renderer, [(key, renders(b"x" * 1000))])
        _gather(renderer, [("a", renders())])  # a hit: "b" is now the least recently used
        _gather(renderer, [("d", renders(b"y" * 1500))])
        _gather(renderer, [("huge", renders(b"z" * 4000))])  # larger than the budget: served, not cached
        stats = renderer.stats()
        assert stats.cache_bytes <= 3000 and stats.cache_entries == 2
        calls = renders.calls
        _gather(renderer, [("a", renders()), ("d", renders())])
        assert renders.calls == calls  # both still cached
        _gather(renderer, [("b", renders()), ("c", renders())])
        assert renders.calls == calls + 2  # evicted
    finally:
        renderer.close()


def test_nothing_to_draw_is_not_cached_and_a_failed_render_frees_its_slot() -> None:
    renders = _Renders(0.0)
    renderer = OverlayRenderer(renders=1)

    def broken() -> bytes | None:
        raise ValueError("corrupt JPEG")

    try:
        assert _gather(renderer, [("gone", renders(None))]) == [None]
        assert _gather(renderer, [("gone", renders(None))]) == [None] and renders.calls == 2
        failed = _gather(renderer, [("bad", broken)])
        assert isinstance(failed[0], ValueError)
        assert _gather(renderer, [("ok", renders())])[0].jpeg == b"x" * 1000
        stats = renderer.stats()
        assert (stats.render_errors, stats.rendering, stats.cache_entries) == (1, 0, 1)
    finally:
        renderer.close()


def test_overlay_scale_caps_the_longer_side_and_never_enlarges() -> None:
    assert overlay_scale(2688, 1520, None, 2048) == pytest.approx(2048 / 2688)
    assert overlay_scale(1520, 2688, None, 2048) == pytest.approx(2048 / 2688)  # portrait: the height
    assert overlay_scale(2688, 1520, 640, 2048) == pytest.approx(640 / 2688)
    assert overlay_scale(512, 288, 4096, 2048) == 1.0
    assert overlay_scale(0, 0, 640, 2048) == 1.0


@pytest.mark.parametrize(("width", "max_side", "shape"), [
    (None, None, (1520, 2688, 3)), (None, 2048, (1158, 2048, 3)), (640, 2048, (362, 640, 3)),
    (300, None, (170, 300, 3)),
])
def test_the_stored_overlay_decodes_reduced_and_matches_the_full_drawing(
    tmp_path: Any, width: int | None, max_side: int | None, shape: tuple[int, int, int],
) -> None:
    """A 4 MP stored frame drawn at 640 wide decodes at 1/4 (672x380) and looks like the full frame drawn at
    that scale: the defects where they are, the frame the same to JPEG noise."""
    import cv2

    store = RecordStore(StoreSection.model_validate({"path": str(tmp_path / "store"), "min_free_mb": 0}))
    store.open()
    store.start()
    frame = np.zeros((1520, 2688, 3), np.uint8)
    frame[:, :, 1] = np.linspace(0, 255, 2688, dtype=np.uint8)[None, :]  # a smooth ramp: JPEG keeps it
    record = dataclasses.replace(make_record(5, size=(1520, 2688)), frame=frame)
    try:
        store.offer(record)
        wait_for(lambda: store.stats().written == 1, what="the record stored")
        data = store.overlay_jpeg(5, width, max_side=max_side)
    finally:
        store.stop()
    got = cv2.imdecode(np.frombuffer(data or b"", np.uint8), cv2.IMREAD_COLOR)
    assert got.shape == shape
    scale = overlay_scale(2688, 1520, width, max_side)
    expected = render_overlay(frame, record.result, scale=scale)
    assert expected.shape == shape
    assert np.abs(got.astype(int) - expected.astype(int)).mean() < 4.0


def test_result_images_count_in_a_request_pool_of_their_own() -> None:
    from service.api.limits import IN_FLIGHT, pool_of
    from service.api.overlays import RENDERS, WAITING

    assert pool_of("/api/results/17/overlay.jpg") == pool_of("/api/results/17/frame.jpg") == "image"
    assert pool_of("/api/results/17") == pool_of("/api/status") == pool_of("/overlay.jpg") == "other"
    assert pool_of("/metrics") == "probe"
    assert IN_FLIGHT["image"] > RENDERS + WAITING  # the endpoint refuses a flood itself, with its own count
