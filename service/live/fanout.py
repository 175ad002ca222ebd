"""Hand items from worker threads to asyncio consumers (MJPEG viewers, SSE clients) without blocking.

Each consumer has a bounded queue on its own event loop; ``publish`` (any thread) schedules the
put with ``call_soon_threadsafe`` and returns at once. A full queue drops its oldest item, counted:
a slow client misses items, it never slows the publisher.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any


class Subscription:
    def __init__(self, fanout: AsyncFanout, maxsize: int) -> None:
        self._fanout = fanout
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=maxsize)

    def _offer(self, item: Any) -> None:  # on the subscriber's loop
        if self.queue.full():
            self.queue.get_nowait()
            self._fanout.count_drop()
        self.queue.put_nowait(item)

    async def get(self) -> Any:
        return await self.queue.get()


class AsyncFanout:
    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._lock = threading.Lock()
        self._subscribers: set[Subscription] = set()
        self._dropped = 0

    def subscribe(self) -> Subscription:
        """Call on the consumer's event loop; pair with ``unsubscribe`` in a ``finally``."""
        sub = Subscription(self, self.maxsize)
        with self._lock:
            self._subscribers.add(sub)
        return sub

    def try_subscribe(self, limit: int) -> Subscription | None:
        """``subscribe`` unless ``limit`` consumers are subscribed (then None): the count and the add are
        one step, so a burst of simultaneous clients never passes the limit."""
        sub = Subscription(self, self.maxsize)
        with self._lock:
            if len(self._subscribers) >= limit:
                return None
            self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subscribers.discard(sub)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._subscribers)

    @property
    def dropped(self) -> int:
        with self._lock:
            return self._dropped

    def count_drop(self) -> None:
        with self._lock:
            self._dropped += 1

    def publish(self, item: Any) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for sub in subscribers:
            try:
                sub.loop.call_soon_threadsafe(sub._offer, item)
            except RuntimeError:  # its loop is closed: the server is shutting down
                self.unsubscribe(sub)
