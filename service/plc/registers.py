"""The PLC register map: ONE typed table (space, address, type, scale, meaning) that the server, the
encoder, the simulator, the tests and docs/plc.md all read. No register address appears anywhere else.

Addresses are zero-based protocol addresses (what goes on the wire; a PLC that counts from 1 adds 1,
and Modicon-style "3xxxx/4xxxx" numbering adds 30001/40001). Two spaces:

* holding registers 0..15: the PLC -> vision control block, the only writable registers;
* input registers 0..115: the vision -> PLC block (status, then the result block), mirrored
  read-only in holding registers 1000..1115 for PLCs that read holding registers only
  (holding register 1000 + n == input register n, served from the same array).

Any other holding address (16..999, 1116..) answers ILLEGAL DATA ADDRESS: reading it is a
programming error worth seeing, not zeros.

32-bit values occupy two consecutive words; ``word_order`` ``big`` (default) puts the high word
first (the Modbus convention, Cognex, Keyence), ``little`` the low word first.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from engines.results import Verdict
from service.pipeline.record import InspectionRecord

WordOrder = Literal["big", "little"]


class Space(enum.Enum):
    HOLDING = "holding"
    INPUT = "input"


@dataclass(frozen=True)
class Register:
    """One field of the map. A repeated field (``repeat`` > 1) sits at ``address + i * stride``."""

    name: str
    space: Space
    address: int
    type: Literal["bits", "u16", "u32"]
    scale: float  # engineering value = raw / scale (1: raw is the value)
    unit: str
    meaning: str
    repeat: int = 1
    stride: int = 0

    @property
    def words(self) -> int:
        return 2 if self.type == "u32" else 1

    def at(self, index: int = 0) -> int:
        if not 0 <= index < self.repeat:
            raise IndexError(f"{self.name}[{index}]: only {self.repeat}")
        return self.address + index * self.stride


@dataclass(frozen=True)
class Bit:
    name: str
    word: str  # the Register it lives in
    bit: int
    meaning: str


H, IN = Space.HOLDING, Space.INPUT
CONTROL_WORDS = 16  # holding 0..15: the writable PLC -> vision block
MIRROR_BASE = 1000  # holding 1000 + n mirrors input n
MAX_DEFECTS = 8  # per-defect records reserved in the map (plc.top_n fills the first top_n)
MAX_GRID = 16  # mask grid rows reserved (one word per row, bit c = column c)
RESULT_BASE = 16
DEFECT_BASE = 36
DEFECT_STRIDE = 8
MASK_BASE = DEFECT_BASE + MAX_DEFECTS * DEFECT_STRIDE  # 100
INPUT_WORDS = MASK_BASE + MAX_GRID  # 116: status + result block fit in ONE read (<= 125 words)

REGISTERS: tuple[Register, ...] = (
    # PLC -> vision (holding, writable)
    Register("control", H, 0, "bits", 1, "", "control word: trigger enable, trigger, buffer enable, results ack, "
             "clear error, set offline (bits below)"),
    Register("plc_heartbeat", H, 1, "u16", 1, "", "PLC heartbeat: change it at least every plc.heartbeat_timeout_s"),
    Register("part_id", H, 2, "u32", 1, "", "part id for the next trigger (echoed with its result)"),
    Register("command", H, 4, "u16", 1, "", "recipe number: a new nonzero value loads that recipe (recipe busy "
             "while it loads, then echoed in input 4; docs/plc.md, Recipes); 0: no request"),
    Register("reserved_control", H, 5, "u16", 1, "", "reserved (writable, ignored)", repeat=11, stride=1),
    # vision -> PLC (input; mirrored at holding 1000 + n)
    Register("status", IN, 0, "bits", 1, "", "status word (bits below)"),
    Register("vision_heartbeat", IN, 1, "u16", 1, "", "vision heartbeat: +1 every 0.5 s (2 Hz), wraps at 65535"),
    Register("error_code", IN, 2, "u16", 1, "", "0 none, 1 camera lost, 2 engine not loaded, 3 PLC heartbeat timeout, "
             "4 trigger refused by the pipeline, 5 unknown recipe, 6 recipe or bundle failed to load (the running "
             "one stays; 5 and 6 hold trigger ready at 0 only when the PLC asked for that recipe)"),
    Register("results_buffered", IN, 3, "u16", 1, "", "results queued behind the one shown (buffering on)"),
    Register("command_echo", IN, 4, "u16", 1, "", "the recipe running now (its number once it is loaded and "
             "inspecting; 0: none, the store's active bundle)"),
    Register("reserved_status", IN, 5, "u16", 1, "", "reserved (0)", repeat=11, stride=1),
    Register("inspection_id", IN, 16, "u32", 1, "", "inspection id (unique across restarts; 0: fail-safe NO_FRAME "
             "written on a fault)"),
    Register("acquisition_id", IN, 18, "u32", 1, "", "camera frame counter (0: no frame)"),
    Register("part_id_echo", IN, 20, "u32", 1, "", "part id of the trigger this result answers (0: none)"),
    Register("verdict", IN, 22, "u16", 1, "", "1 OK, 2 NG, 3 UNCERTAIN, 4 NO_FRAME (reject)"),
    Register("defect_count", IN, 23, "u16", 1, "", "defects found (all, not only the reported top N)"),
    Register("largest_area", IN, 24, "u32", 1, "px", "area of the largest defect"),
    Register("max_score", IN, 26, "u16", 1000, "", "highest defect score x1000 (0..1000)"),
    Register("largest_bbox_x", IN, 27, "u16", 1, "px", "largest defect bounding box: left"),
    Register("largest_bbox_y", IN, 28, "u16", 1, "px", "largest defect bounding box: top"),
    Register("largest_bbox_w", IN, 29, "u16", 1, "px", "largest defect bounding box: width"),
    Register("largest_bbox_h", IN, 30, "u16", 1, "px", "largest defect bounding box: height"),
    Register("processing_time", IN, 31, "u16", 10, "ms", "capture to result, in 0.1 ms (saturates at 6553.5 ms)"),
    Register("frame_width", IN, 32, "u16", 1, "px", "frame width (bbox and grid coordinates refer to it)"),
    Register("frame_height", IN, 33, "u16", 1, "px", "frame height"),
    Register("defects_reported", IN, 34, "u16", 1, "", "per-defect records filled below (min(count, plc.top_n))"),
    Register("checksum", IN, 35, "u16", 1, "", "sum of input words 16..115 except this one, mod 65536"),
    Register("defect_class", IN, DEFECT_BASE, "u16", 1, "", "defect i (highest score first): class id",
             MAX_DEFECTS, DEFECT_STRIDE),
    Register("defect_score", IN, DEFECT_BASE + 1, "u16", 1000, "", "defect i: score x1000", MAX_DEFECTS, DEFECT_STRIDE),
    Register("defect_x", IN, DEFECT_BASE + 2, "u16", 1, "px", "defect i: bbox left", MAX_DEFECTS, DEFECT_STRIDE),
    Register("defect_y", IN, DEFECT_BASE + 3, "u16", 1, "px", "defect i: bbox top", MAX_DEFECTS, DEFECT_STRIDE),
    Register("defect_w", IN, DEFECT_BASE + 4, "u16", 1, "px", "defect i: bbox width", MAX_DEFECTS, DEFECT_STRIDE),
    Register("defect_h", IN, DEFECT_BASE + 5, "u16", 1, "px", "defect i: bbox height", MAX_DEFECTS, DEFECT_STRIDE),
    Register("defect_area", IN, DEFECT_BASE + 6, "u32", 1, "px", "defect i: area", MAX_DEFECTS, DEFECT_STRIDE),
    Register("mask_row", IN, MASK_BASE, "bits", 1, "", "mask grid row r (plc.mask_grid x plc.mask_grid cells over "
             "the frame): bit c set when a defect covers cell (r, c)", MAX_GRID, 1),
)
BY_NAME = {r.name: r for r in REGISTERS}

CONTROL_BITS: tuple[Bit, ...] = (
    Bit("trigger_enable", "control", 0, "1: the PLC may trigger"),
    Bit("trigger", "control", 1, "rising edge triggers; hold it until trigger ack, then drop it"),
    Bit("buffer_enable", "control", 2, "1: results queue (plc.buffer_depth) until acked; 0: newest overwrites"),
    Bit("results_ack", "control", 3, "rising edge: results taken (results valid drops); drop it for the next one"),
    Bit("clear_error", "control", 4, "rising edge clears latched errors, missed trigger and buffer overrun"),
    Bit("set_offline", "control", 5, "1: vision offline (trigger ready 0, triggers missed)"),
)
STATUS_BITS: tuple[Bit, ...] = (
    Bit("trigger_ready", "status", 0, "a trigger now would be taken"),
    Bit("trigger_ack", "status", 1, "the trigger was taken; drops when the PLC drops trigger"),
    Bit("missed_trigger", "status", 2, "a trigger came while not ready (cleared by clear error or the next taken "
        "trigger)"),
    Bit("online", "status", 3, "vision online (not set offline)"),
    Bit("camera_ok", "status", 4, "camera connected"),
    Bit("engine_loaded", "status", 5, "engine loaded, pipeline running"),
    Bit("busy", "status", 6, "a taken trigger waits for its result"),
    Bit("inspection_completed", "status", 7, "toggles with every result written"),
    Bit("results_valid", "status", 8, "the result block holds a result not yet acked"),
    Bit("buffer_overrun", "status", 9, "a result was dropped: the buffer was full (cleared by clear error)"),
    Bit("error", "status", 10, "an error code is set (input 2): camera lost, engine not loaded, PLC heartbeat "
        "timeout, a refused trigger or a failed recipe load"),
    Bit("recipe_busy", "status", 11, "a recipe is loading (trigger ready 0); drops when input 4 echoes it or "
        "error 5/6 is set"),
)
CTRL = {b.name: 1 << b.bit for b in CONTROL_BITS}
STAT = {b.name: 1 << b.bit for b in STATUS_BITS}

ERROR_CAMERA, ERROR_ENGINE, ERROR_HEARTBEAT, ERROR_TRIGGER = 1, 2, 3, 4
ERROR_RECIPE_UNKNOWN, ERROR_RECIPE_FAILED = 5, 6


def put(words: list[int], reg: Register, value: int, *, index: int = 0, base: int = 0,
        word_order: WordOrder = "big") -> None:
    """Write ``value`` (clamped to the type) into ``words`` at the register's address minus ``base``."""
    offset = reg.at(index) - base
    if reg.words == 1:
        words[offset] = min(max(int(value), 0), 0xFFFF)
        return
    value = int(value) & 0xFFFFFFFF
    high, low = value >> 16, value & 0xFFFF
    words[offset], words[offset + 1] = (high, low) if word_order == "big" else (low, high)


def get(words: Sequence[int], reg: Register, *, index: int = 0, base: int = 0,
        word_order: WordOrder = "big") -> int:
    offset = reg.at(index) - base
    if reg.words == 1:
        return int(words[offset])
    first, second = int(words[offset]), int(words[offset + 1])
    return (first << 16 | second) if word_order == "big" else (second << 16 | first)


def part_number(part_id: str | None) -> int:
    """A part id as the PLC sees it: the number, when it is one that fits 32 bits; else 0."""
    if part_id and part_id.isdigit() and int(part_id) < 2**32:
        return int(part_id)
    return 0


def result_checksum(block: list[int]) -> int:
    """``block`` is input words RESULT_BASE..INPUT_WORDS-1."""
    skip = BY_NAME["checksum"].address - RESULT_BASE
    return (sum(block) - block[skip]) & 0xFFFF


def mask_grid(record: InspectionRecord, grid: int) -> list[int]:
    """One word per grid row, bit c set when any defect mask pixel lies in cell (row, c)."""
    rows = [0] * grid
    width, height = record.result.frame_width, record.result.frame_height
    if width <= 0 or height <= 0:
        return rows
    for defect in record.result.defects:
        x0, y0, w, h = defect.bbox
        mask = defect.mask
        if mask.size == 0 or w <= 0 or h <= 0:
            continue
        mask = mask[:h, :w]
        row_cells = np.clip((np.arange(y0, y0 + mask.shape[0]) * grid) // height, 0, grid - 1)
        col_cells = np.clip((np.arange(x0, x0 + mask.shape[1]) * grid) // width, 0, grid - 1)
        for r in np.unique(row_cells):
            hit = mask[row_cells == r].any(axis=0)
            for c in np.unique(col_cells[hit]):
                rows[int(r)] |= 1 << int(c)
    return rows


def encode_result(record: InspectionRecord | None, *, part_id: int | None = None, top_n: int = MAX_DEFECTS,
                  grid: int = MAX_GRID, word_order: WordOrder = "big") -> list[int]:
    """The result block (input RESULT_BASE..INPUT_WORDS-1) for ``record``; ``None``: the fail-safe NO_FRAME."""
    words = [0] * (INPUT_WORDS - RESULT_BASE)

    def p(name: str, value: int, index: int = 0) -> None:
        put(words, BY_NAME[name], value, index=index, base=RESULT_BASE, word_order=word_order)

    if record is None:
        p("verdict", int(Verdict.NO_FRAME))
        p("part_id_echo", part_id or 0)
    else:
        result = record.result
        defects = result.defects
        p("inspection_id", record.inspection_id)
        p("acquisition_id", record.acquisition_id)
        p("part_id_echo", part_number(record.part_id) if part_id is None else part_id)
        p("verdict", int(result.verdict))
        p("defect_count", len(defects))
        if defects:
            largest = max(defects, key=lambda d: d.area_px)
            p("largest_area", largest.area_px)
            p("max_score", round(max(d.score for d in defects) * 1000))
            for name, value in zip(("largest_bbox_x", "largest_bbox_y", "largest_bbox_w", "largest_bbox_h"),
                                   largest.bbox, strict=True):
                p(name, value)
        end_to_end = record.times.latencies().get("end_to_end")
        if end_to_end is not None:
            p("processing_time", round(end_to_end * 10000))
        p("frame_width", result.frame_width)
        p("frame_height", result.frame_height)
        reported = defects[: min(top_n, MAX_DEFECTS)]
        p("defects_reported", len(reported))
        for i, d in enumerate(reported):
            p("defect_class", d.class_id, i)
            p("defect_score", round(d.score * 1000), i)
            for name, value in zip(("defect_x", "defect_y", "defect_w", "defect_h"), d.bbox, strict=True):
                p(name, value, i)
            p("defect_area", d.area_px, i)
        for r, row in enumerate(mask_grid(record, min(grid, MAX_GRID))):
            p("mask_row", row, r)
    p("checksum", result_checksum(words))
    return words


def decode_result(inputs: Sequence[int], word_order: WordOrder = "big") -> dict[str, Any]:
    """Input registers 0..INPUT_WORDS-1 as named values (the simulator, the tests)."""
    def g(name: str, index: int = 0) -> int:
        return get(inputs, BY_NAME[name], index=index, word_order=word_order)

    status = g("status")
    out: dict[str, Any] = {b.name: int(bool(status & (1 << b.bit))) for b in STATUS_BITS}
    for reg in REGISTERS:
        if reg.space is Space.INPUT and reg.repeat == 1 and reg.name != "status":
            out[reg.name] = g(reg.name)
    reported = min(g("defects_reported"), MAX_DEFECTS)
    out["defects"] = [
        {"class_id": g("defect_class", i), "score": g("defect_score", i) / 1000,
         "bbox": [g(n, i) for n in ("defect_x", "defect_y", "defect_w", "defect_h")], "area": g("defect_area", i)}
        for i in range(reported)
    ]
    out["mask_rows"] = [g("mask_row", r) for r in range(MAX_GRID)]
    try:
        out["verdict_name"] = Verdict(g("verdict")).name
    except ValueError:
        out["verdict_name"] = "-"
    return out


def _addr(reg: Register) -> str:
    last = reg.at(reg.repeat - 1) + reg.words - 1
    if reg.repeat == 1:
        return f"{reg.address}" if reg.words == 1 else f"{reg.address}-{reg.address + 1}"
    if reg.stride == 1 and reg.words == 1:
        return f"{reg.address}-{last}"
    span = f"{reg.address}-{reg.address + 1}" if reg.words == 2 else f"{reg.address}"
    return f"{span} + {reg.stride}·i (i = 0..{reg.repeat - 1})"


def markdown_tables() -> str:
    """docs/plc.md's register tables (a test keeps the doc current: ``python -m service.plc.registers``)."""
    lines = ["<!-- generated from service/plc/registers.py: python -m service.plc.registers -->", ""]
    for space, title in ((H, "Holding registers 0-15: PLC -> vision (writable)"),
                         (IN, f"Input registers 0-{INPUT_WORDS - 1}: vision -> PLC (read-only; also holding "
                             f"{MIRROR_BASE}-{MIRROR_BASE + INPUT_WORDS - 1})")):
        lines += [f"### {title}", "", "| Address | Mirror (holding) | Type | Scale | Unit | Name | Meaning |",
                  "|---|---|---|---|---|---|---|"]
        for reg in REGISTERS:
            if reg.space is not space:
                continue
            mirror = "-" if space is H else _addr(Register(**{**vars(reg), "address": reg.address + MIRROR_BASE}))
            scale = "-" if reg.scale == 1 else f"x{reg.scale:g}"
            lines.append(f"| {_addr(reg)} | {mirror} | {reg.type} | {scale} | {reg.unit or '-'} | `{reg.name}` | "
                         f"{reg.meaning} |")
        lines.append("")
    for bits, title in ((CONTROL_BITS, "Control word (holding 0) bits"), (STATUS_BITS, "Status word (input 0) bits")):
        lines += [f"### {title}", "", "| Bit | Mask | Name | Meaning |", "|---|---|---|---|"]
        lines += [f"| {b.bit} | 0x{1 << b.bit:04X} | `{b.name}` | {b.meaning} |" for b in bits]
        lines.append("")
    return "\n".join(lines)


BEGIN, END = "<!-- register-map:begin -->", "<!-- register-map:end -->"


def render_doc(text: str) -> str:
    """``text`` (docs/plc.md) with the part between the markers regenerated."""
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{markdown_tables()}{END}{tail}"


if __name__ == "__main__":
    from pathlib import Path

    doc = Path(__file__).resolve().parents[2] / "docs" / "plc.md"
    doc.write_text(render_doc(doc.read_text()))
    print(f"wrote {doc}")
