"""What the daemon lends the OPC UA server: the line's state, the trigger, the PLC's command write path.

Pure (no asyncua): the daemon builds a ``Station`` before it knows whether asyncua is installed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engines.errors import DefectsamError


@dataclass(frozen=True)
class LineState:
    camera_ok: bool
    engine_loaded: bool
    not_ready: tuple[str, ...]
    bundle: str
    command_echo: int | None = None  # the PLC's input 4 (the recipe running); None without a PLC
    error_code: int | None = None  # the PLC's input 2 (5 unknown recipe, 6 failed load, ...); None without a PLC


@dataclass(frozen=True)
class Station:
    """What the daemon lends the OPC UA server (all called from the server's loop thread or a worker)."""

    mode: str
    trigger_timeout_s: float
    trigger: Callable[[str | None], Any]  # returns a ticket with .trigger_id; raises when it cannot trigger
    state: Callable[[], LineState]
    write_command: Callable[[int], int] | None  # the PLC's write path; returns the command echo. None: no PLC


def plc_command_writer(plc: Any) -> Callable[[int], int]:
    """The command word written as a Modbus write of holding 4 (function 6) in the PLC server's loop:
    whatever the PLC's write handler does with it (echo, recipe switch) happens for OPC UA too."""
    from service.plc.registers import BY_NAME, get

    address = BY_NAME["command"].address

    def write(value: int) -> int:
        def in_loop() -> int:
            error = plc.store.write(6, address, [value])
            if error is not None:
                raise DefectsamError(f"the PLC refused the command word {value}: {error}")
            return get(plc.store.inputs, BY_NAME["command_echo"])
        return int(plc.call(in_loop))

    return write


def plc_words(plc: Any) -> tuple[int, int]:
    """(command echo, error code): the PLC's inputs 4 and 2 as a PLC reads them now."""
    from service.plc.registers import BY_NAME, get

    inputs = plc.store.inputs
    return int(get(inputs, BY_NAME["command_echo"])), int(get(inputs, BY_NAME["error_code"]))


