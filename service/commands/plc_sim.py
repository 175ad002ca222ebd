"""``defectsam plc-sim HOST:PORT``: a PLC simulator for commissioning: runs the triggered handshake
(trigger -> ack -> results valid -> read -> results ack) against the vision system and prints each result.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from engines.errors import DefectsamError
from service.plc.registers import (
    BY_NAME,
    CTRL,
    INPUT_WORDS,
    STAT,
    WordOrder,
    decode_result,
    put,
)

HEARTBEAT = BY_NAME["plc_heartbeat"].address
CONTROL = BY_NAME["control"].address


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("plc-sim", help="PLC simulator: run the triggered Modbus handshake, print results",
                                 description=__doc__.splitlines()[0])
    parser.add_argument("target", metavar="HOST:PORT", help="the vision system's Modbus TCP server")
    parser.add_argument("--unit", type=int, default=1, help="unit id (default 1)")
    parser.add_argument("--count", type=int, default=1, help="inspections to trigger (default 1)")
    parser.add_argument("--part-id", type=int, default=1000, help="part id of the first trigger, +1 per trigger")
    parser.add_argument("--word-order", choices=("big", "little"), default="big", help="32-bit word order")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each handshake step")
    parser.set_defaults(run=run)


class PlcSimulator:
    """The PLC side of the handshake over pymodbus's synchronous client (also used by the tests)."""

    def __init__(self, host: str, port: int, unit: int = 1, word_order: WordOrder = "big",
                 timeout: float = 10.0) -> None:
        from pymodbus.client import ModbusTcpClient

        self.client = ModbusTcpClient(host, port=port, timeout=2.0, retries=1)
        self.unit = unit
        self.word_order = word_order
        self.timeout = timeout
        self.control = 0
        self.beat = 0
        if not self.client.connect():
            raise DefectsamError(f"plc-sim: cannot connect to {host}:{port}")

    def close(self) -> None:
        self.client.close()

    def read(self) -> list[int]:
        reply = self.client.read_input_registers(0, count=INPUT_WORDS, device_id=self.unit)
        if reply.isError():
            raise DefectsamError(f"plc-sim: reading input registers: {reply}")
        return list(reply.registers)

    def write_control(self, set_bits: int = 0, clear_bits: int = 0) -> None:
        self.control = (self.control | set_bits) & ~clear_bits
        self.beat = (self.beat + 1) & 0xFFFF
        reply = self.client.write_registers(HEARTBEAT, [self.beat], device_id=self.unit)
        reply = self.client.write_registers(CONTROL, [self.control], device_id=self.unit)
        if reply.isError():
            raise DefectsamError(f"plc-sim: writing the control word: {reply}")

    def wait(self, what: str, predicate: Any) -> list[int]:
        deadline = time.monotonic() + self.timeout
        while True:
            words = self.read()
            if predicate(words[0]):
                return words
            if time.monotonic() > deadline:
                raise DefectsamError(f"plc-sim: timed out waiting for {what} (status 0x{words[0]:04X}, "
                                     f"error code {words[BY_NAME['error_code'].address]})")
            time.sleep(0.005)
            self.write_control()  # keeps the PLC heartbeat moving

    def inspect(self, part_id: int, log: Any = None) -> dict[str, Any]:
        say = log or (lambda _msg: None)
        self.write_control(CTRL["trigger_enable"])
        self.wait("trigger ready", lambda s: s & STAT["trigger_ready"])
        part = [0, 0]
        put(part, BY_NAME["part_id"], part_id, base=BY_NAME["part_id"].address, word_order=self.word_order)
        self.client.write_registers(BY_NAME["part_id"].address, part, device_id=self.unit)
        before = self.read()[0]
        t0 = time.monotonic()
        self.write_control(CTRL["trigger"])
        say(f"trigger     part {part_id}: control 0x{self.control:04X}")
        status = self.wait("trigger ack", lambda s: s & STAT["trigger_ack"])[0]
        say(f"trigger ack status 0x{status:04X} after {1000 * (time.monotonic() - t0):.1f} ms")
        self.write_control(clear_bits=CTRL["trigger"])
        toggle = before & STAT["inspection_completed"]
        words = self.wait("results valid", lambda s: s & STAT["results_valid"]
                          and (s & STAT["inspection_completed"]) != toggle)
        say(f"results valid status 0x{words[0]:04X} after {1000 * (time.monotonic() - t0):.1f} ms")
        result = decode_result(words, self.word_order)
        self.write_control(CTRL["results_ack"])
        self.wait("results valid to drop", lambda s: not s & STAT["results_valid"])
        self.write_control(clear_bits=CTRL["results_ack"])
        return result


def run(args: argparse.Namespace) -> int:
    host, _, port = args.target.rpartition(":")
    if not host or not port.isdigit():
        raise DefectsamError(f"{args.target!r}: expected HOST:PORT, e.g. 127.0.0.1:5020")
    sim = PlcSimulator(host, int(port), args.unit, args.word_order, args.timeout)
    try:
        for n in range(args.count):
            r = sim.inspect(args.part_id + n, log=print)
            print(f"result      inspection {r['inspection_id']} acquisition {r['acquisition_id']} part "
                  f"{r['part_id_echo']}: {r['verdict_name']} ({r['verdict']}), {r['defect_count']} defect(s), "
                  f"largest {r['largest_area']} px at ({r['largest_bbox_x']},{r['largest_bbox_y']} "
                  f"{r['largest_bbox_w']}x{r['largest_bbox_h']}), max score {r['max_score'] / 1000:.3f}, "
                  f"{r['processing_time'] / 10:.1f} ms, frame {r['frame_width']}x{r['frame_height']}")
            for i, d in enumerate(r["defects"]):
                print(f"  defect {i}: class {d['class_id']} score {d['score']:.3f} bbox {d['bbox']} area {d['area']}")
            rows = [row for row in r["mask_rows"] if row]
            if rows:
                print("  mask grid (rows, bit c = column c): " + " ".join(f"{row:04X}" for row in r["mask_rows"]))
    finally:
        sim.close()
    return 0
