"""Recipes: a number the line's controller writes selects a bundle in the store and its thresholds.

``RecipeBook.select(number, source)`` is THE entry point for a recipe change, whoever asks: the Modbus
write path (service/plc/service.py, holding 4) calls it, and so does any other controller interface
(OPC UA). It returns at once; the outcome comes as service.reload.LoadEvent to every listener the
daemon subscribed (the PLC status word and error code, the log, /api/status and /metrics):

    select(n) -> unknown n:  LoadEvent failed, kind "unknown" (PLC error 5); the running recipe stays
              -> known n:    Reloader.request: LoadEvent loading (PLC recipe busy), then
                             active (PLC echo = n) or failed, kind "failed" (PLC error 6; the old stays)

A recipe written while another loads waits behind it; a newer one replaces a waiting one (the last
word the PLC wrote wins). docs/plc.md, "Recipes", has the handshake.
"""

from __future__ import annotations

from collections.abc import Mapping

from service.config.models import RecipeEntry
from service.reload import LoadTarget, Reloader


class RecipeBook:
    def __init__(self, table: Mapping[int, RecipeEntry], reloader: Reloader) -> None:
        self.table = dict(table)
        self.reloader = reloader

    def target(self, number: int, source: str) -> LoadTarget | None:
        entry = self.table.get(number)
        if entry is None:
            return None
        return LoadTarget(bundle=entry.bundle, source=source, recipe=number, score_threshold=entry.score_threshold,
                          uncertain_threshold=entry.uncertain_threshold,
                          candidate_threshold=entry.candidate_threshold)

    def select(self, number: int, source: str) -> None:
        """Switch to recipe ``number`` (1-65535), asked by ``source`` ('modbus', 'opcua', ...); returns at once."""
        target = self.target(number, source)
        if target is None:
            known = ", ".join(str(n) for n in sorted(self.table)) or "none configured"
            self.reloader.refuse(LoadTarget(bundle="", source=source, recipe=number),
                                 f"recipe {number} is not configured (recipes: {known})")
            return
        self.reloader.request(target, queue=True)

    @property
    def active(self) -> int:
        """The recipe running now (0: none, the store's active bundle or one activated by the API)."""
        active = self.reloader.active
        return active.recipe if active is not None else 0
