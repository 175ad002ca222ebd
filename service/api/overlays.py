"""Overlays on demand (``/api/results/{id}/overlay.jpg``), bounded in memory, CPU and waiting requests.

Drawing one reads the stored frame and its label mask, draws the defects and encodes a JPEG: for a
4 MP frame at full size about 25 MB and 100 ms of a core. The route once did it in FastAPI's thread
pool, 40 at once: 120 requests for 4 MP overlays took the daemon from 257 MB to 1.2 GB and inspection
from 1.9 to 0.06 FPS on 2 cores. Now:

* **Work per request**: the output is at most ``MAX_SIDE`` px on its longer side (``width`` asks for
  less), and the stored JPEG is decoded at the smallest scale that holds it (RecordStore.overlay_jpeg).
* **Renders at once**: at most ``RENDERS``, on a pool of that many threads of their own in Linux's
  SCHED_IDLE class (service.ops.lower_thread_priority), so they run on CPU time inspection leaves;
  each frees its decoded frame when it returns.
* **Waiting**: at most ``WAITING`` requests wait, for a render slot or for the same overlay that is
  being drawn, each at most ``WAIT_S``; one more, or one whose wait runs out, is answered 503 with
  Retry-After at once. Requests never queue beyond that, and hold no thread while they wait. The
  request that started a render waits for it at most ``RENDER_WAIT_S`` (on cores inspection keeps
  busy an idle-class render can take that long): then it too gets 503, the render goes on and its
  overlay is cached for the retry.
* **Cache**: the rendered JPEGs, least recently used evicted first, at most ``CACHE_BYTES`` in all,
  keyed by (id, width). Ids are never handed out twice (service/ids.py), so an entry is that result's
  overlay for good; a record retention deletes can still be served from the cache until it is evicted.

So the bound on memory is ``RENDERS`` renders (about 25 MB each at 4 MP full size) and the cache;
the flood test (tests/test_overlay_flood.py) holds the daemon's RSS growth under 150 MB.

Everything but the render itself runs on the server's event loop thread; ``stats()`` reads plain
counters and may be called from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.ops import lower_thread_priority

if TYPE_CHECKING:
    from service.metrics import OverlaySnapshot

log = logging.getLogger(__name__)

MAX_SIDE = 2048  # px: the longest side of an overlay (a 2688x1520 frame is drawn at 2048x1158)
RENDERS = 2  # overlays drawn at once
WAITING = 4  # requests waiting for a render at once: with RENDERS, 6 in flight, within the 8 of the images'
# pool (service/api/limits.py), so this endpoint's own 503 answers a flood
WAIT_S = 2.0  # the longest a request waits for a render slot (or for another's render) before its 503
RENDER_WAIT_S = 10.0  # the longest a request waits for the render it started (which goes on, and is cached)
RETRY_AFTER_S = 1
CACHE_BYTES = 32 << 20  # rendered JPEGs kept (a 2048 px overlay is 0.3-1 MB, a 640 px one 40-100 KB)


@dataclass(frozen=True)
class Overlay:
    jpeg: bytes
    etag: str  # a strong validator: '"<hash of the bytes>"'


class OverlayBusyError(Exception):
    """No render slot within the wait: answer 503 with Retry-After."""

    def __init__(self, detail: str, retry_after_s: int = RETRY_AFTER_S) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after_s = retry_after_s


def _render_thread_setup() -> None:
    if not lower_thread_priority(0, idle_class=True):
        lower_thread_priority(19)


def _drawn(render: Callable[[], bytes | None]) -> Overlay | None:
    """Runs on a render thread."""
    jpeg = render()
    if jpeg is None:
        return None
    return Overlay(jpeg, f'"{hashlib.blake2b(jpeg, digest_size=12).hexdigest()}"')


class OverlayRenderer:
    """Draws overlays on its own bounded pool, caches them and refuses what it cannot take in time."""

    def __init__(self, *, renders: int = RENDERS, waiting: int = WAITING, wait_s: float = WAIT_S,
                 render_wait_s: float = RENDER_WAIT_S, cache_bytes: int = CACHE_BYTES) -> None:
        self.renders = renders
        self.max_waiting = waiting
        self.wait_s = wait_s
        self.render_wait_s = render_wait_s
        self.cache_budget = cache_bytes
        self._pool: ThreadPoolExecutor | None = None
        self._cache: OrderedDict[Hashable, Overlay] = OrderedDict()
        self._cache_bytes = 0
        self._drawing: set[Hashable] = set()  # keys being rendered
        self._changed: asyncio.Future[None] | None = None  # resolved (and replaced) when a render ends
        self._waiting = 0
        self._renders = self._errors = self._hits = self._refused = 0
        self._closed = False

    def stats(self) -> OverlaySnapshot:
        from service.metrics import OverlaySnapshot  # imported late: service.metrics needs service.pipeline first

        return OverlaySnapshot(renders=self._renders, render_errors=self._errors, cache_hits=self._hits,
                            refused=self._refused, rendering=len(self._drawing), waiting=self._waiting,
                            cache_entries=len(self._cache), cache_bytes=self._cache_bytes,
                            cache_budget_bytes=self.cache_budget)

    async def get(self, key: Hashable, render: Callable[[], bytes | None]) -> Overlay | None:
        """The overlay for ``key``: from the cache, or drawn by ``render`` (on a render thread; None: there is
        nothing to draw, not cached). Raises OverlayBusyError when no render slot frees within the wait."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        queued = False
        try:
            while True:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
                    self._hits += 1
                    return hit
                if key not in self._drawing and len(self._drawing) < self.renders:
                    return await self._draw(loop, key, render)
                if not queued:  # the same overlay is being drawn, or every slot is taken: wait, if there is room
                    if self._waiting >= self.max_waiting:
                        raise self._refuse(f"{len(self._drawing)} overlays are being drawn and {self._waiting} "
                                           f"requests wait for one")
                    self._waiting += 1
                    queued = True
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise self._refuse(f"no overlay render slot freed within {self.wait_s:g} s")
                if self._changed is None:
                    self._changed = loop.create_future()
                await asyncio.wait({self._changed}, timeout=remaining)
        finally:
            if queued:
                self._waiting -= 1

    def _refuse(self, why: str) -> OverlayBusyError:
        self._refused += 1
        return OverlayBusyError(f"busy: {why}; retry in {RETRY_AFTER_S} s")

    async def _draw(self, loop: asyncio.AbstractEventLoop, key: Hashable,
                    render: Callable[[], bytes | None]) -> Overlay | None:
        if self._closed:
            raise OverlayBusyError("the daemon is stopping")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.renders, thread_name_prefix="overlay",
                                            initializer=_render_thread_setup)
        self._drawing.add(key)
        done: asyncio.Future[Overlay | None] = loop.create_future()
        # A request that goes away (its task cancelled) leaves its render to finish and be cached: the slot
        # is given back when the render thread is done, never before.
        done.add_done_callback(lambda f: f.cancelled() or f.exception())  # no "exception never retrieved"
        try:
            job = self._pool.submit(_drawn, render)
        except RuntimeError:  # the pool was shut down
            self._drawing.discard(key)
            raise OverlayBusyError("the daemon is stopping") from None

        def finished(job: Future[Overlay | None]) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop is closed: the daemon stopped
                loop.call_soon_threadsafe(self._finished, key, job, done)

        job.add_done_callback(finished)
        try:
            return await asyncio.wait_for(asyncio.shield(done), self.render_wait_s)
        except TimeoutError:
            raise self._refuse(f"the overlay is still being drawn after {self.render_wait_s:g} s (render threads "
                               f"run on CPU time inspection leaves); it is cached when done") from None

    def _finished(self, key: Hashable, job: Future[Overlay | None], done: asyncio.Future[Overlay | None]) -> None:
        """On the event loop: a render ended; cache it, answer its request, wake the waiting ones."""
        self._drawing.discard(key)
        try:
            overlay = job.result()
        except BaseException as exc:  # a failed render (or a cancelled one, at shutdown) answers its request
            self._errors += 1
            log.warning("overlay %s: render failed: %s: %s", key, type(exc).__name__, exc)
            done.set_exception(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
        else:
            if overlay is not None:
                self._renders += 1
                self._store(key, overlay)
            done.set_result(overlay)
        if self._changed is not None:
            self._changed.set_result(None)
            self._changed = None

    def _store(self, key: Hashable, overlay: Overlay) -> None:
        size = len(overlay.jpeg)
        if size > self.cache_budget:
            return
        old = self._cache.pop(key, None)
        if old is not None:
            self._cache_bytes -= len(old.jpeg)
        while self._cache and self._cache_bytes + size > self.cache_budget:
            _, evicted = self._cache.popitem(last=False)
            self._cache_bytes -= len(evicted.jpeg)
        self._cache[key] = overlay
        self._cache_bytes += size

    def close(self) -> None:
        """Stop the render threads (a render under way finishes; queued ones are dropped)."""
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
