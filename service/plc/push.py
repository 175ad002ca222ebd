"""Push mode: the daemon as Modbus client, writing the status word and result block into a PLC's
holding registers (``plc.push``). Input register n lands in holding ``base_address + n``.

Latest value wins: while the PLC is slow or unreachable, newer results replace unsent ones (and
the loss is counted in ``errors``/``skipped``); the newest unsent one is retried every 0.5 s until
it lands, so a PLC that comes back gets the current result without waiting for the next. Each push
writes the result block first and the status block (with its inspection-completed toggle) last, so
the PLC sees the toggle only after the data. Runs in the PLC service's loop; never blocks the register writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from pymodbus.client import AsyncModbusTcpClient

from service.config.models import PlcPushSection
from service.plc.registers import INPUT_WORDS, RESULT_BASE

log = logging.getLogger(__name__)


class Pusher:
    def __init__(self, config: PlcPushSection, word_order: str) -> None:
        self.config = config
        self.errors = 0
        self.pushed = 0
        self.skipped = 0
        self._latest: list[int] | None = None
        self._event = asyncio.Event()
        self._client = AsyncModbusTcpClient(config.host, port=config.port, timeout=1.0, retries=0,
                                            reconnect_delay=0.0)
        self._task = asyncio.create_task(self._run(), name="plc-push")

    def offer(self, inputs: list[int]) -> None:
        if self._latest is not None:
            self.skipped += 1
        self._latest = inputs
        self._event.set()

    async def _run(self) -> None:
        while True:
            await self._event.wait()
            self._event.clear()
            words, self._latest = self._latest, None
            if words is None:
                continue
            try:
                await self._send(words)
                self.pushed += 1
            except Exception as exc:
                self.errors += 1
                if self.errors <= 10 or self.errors % 1000 == 0:
                    log.warning("plc push to %s:%d failed (%d so far): %s", self.config.host, self.config.port,
                                self.errors, exc)
                await asyncio.sleep(0.5)
                if self._latest is None:  # nothing newer came: retry this one, or the PLC never gets it
                    self._latest = words
                    self._event.set()

    async def _send(self, words: list[int]) -> None:
        if not self._client.connected and not await self._client.connect():
            raise ConnectionError("cannot connect")
        base, unit = self.config.base_address, self.config.unit_id
        for start, stop in ((RESULT_BASE, INPUT_WORDS), (0, RESULT_BASE)):  # result block first, status last
            reply = await self._client.write_registers(base + start, words[start:stop], device_id=unit)
            if reply.isError():
                raise ConnectionError(f"PLC answered {reply}")

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._client.close()
