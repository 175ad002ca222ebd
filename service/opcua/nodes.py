"""The OPC UA node tree: one typed table (path, data type, meaning) and the values of a result.

Pure (no asyncua import): the server (service.py) builds its address space from ``tree(top_n)``,
``result_values`` turns a published record into the values of LastResult, and ``markdown_table``
is docs/opcua.md's node table (a test keeps the doc current: ``python -m service.opcua.nodes``).

Every LastResult value comes from ``InspectionRecord.to_dict``, the dict /api/results/{id} is
built from, so an OPC UA client reads exactly what the API answers for the same result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from service.pipeline.record import STAGES, InspectionRecord

DataType = Literal["Boolean", "UInt16", "UInt32", "UInt64", "Double", "String", "DateTime"]


@dataclass(frozen=True)
class NodeSpec:
    """A variable under Objects/Defectsam/<station>: ``path`` is relative to the station, '/'-separated."""

    path: str
    type: DataType
    meaning: str
    writable: bool = False


DEFECT_FIELDS: tuple[tuple[str, DataType, str], ...] = (
    ("ClassId", "UInt16", "class id"),
    ("Class", "String", "class name ('' when fewer defects were found)"),
    ("Score", "Double", "defect score 0..1"),
    ("PredictedIou", "Double", "the model's predicted IoU of the mask"),
    ("AreaPx", "UInt32", "area in frame pixels"),
    ("BboxX", "UInt32", "bounding box left (frame px)"),
    ("BboxY", "UInt32", "bounding box top (frame px)"),
    ("BboxWidth", "UInt32", "bounding box width (px)"),
    ("BboxHeight", "UInt32", "bounding box height (px)"),
    ("CentroidX", "Double", "centroid x (frame px)"),
    ("CentroidY", "Double", "centroid y (frame px)"),
)
TIMING_NODES = {stage: "".join(w.capitalize() for w in stage.split("_")) + "Ms" for stage in STAGES}

STATE: tuple[NodeSpec, ...] = (
    NodeSpec("State/Ready", "Boolean", "camera connected and engine loaded (as /readyz)"),
    NodeSpec("State/NotReady", "String", "why not ready ('; '-separated, '' when ready)"),
    NodeSpec("State/CameraOk", "Boolean", "camera connected"),
    NodeSpec("State/EngineLoaded", "Boolean", "engine loaded, pipeline running"),
    NodeSpec("State/TriggerReady", "Boolean", "a Trigger call now would be taken"),
    NodeSpec("State/Busy", "Boolean", "a Trigger taken through OPC UA waits for its result"),
    NodeSpec("State/ErrorCode", "UInt16", "the Modbus error code (input 2): 0 none, 1 camera lost, 2 engine not "
             "loaded, 5 unknown recipe, 6 recipe failed to load, ..."),
    NodeSpec("State/Mode", "String", "pipeline.mode: free_run or triggered"),
    NodeSpec("State/Bundle", "String", "the engine bundle's name ('' while none is loaded)"),
    NodeSpec("State/Heartbeat", "UInt32", "+1 every 0.5 s while the server runs"),
    NodeSpec("State/CommandEcho", "UInt16", "the recipe running (Modbus input 4): a Command once that recipe "
             "is loaded"),
)
COMMAND = NodeSpec("Command", "UInt16", "recipe/command word: a write is taken as a Modbus write of holding 4 "
                   "(needs plc.enabled); read State/CommandEcho", writable=True)
RESULT_HEAD: tuple[NodeSpec, ...] = (
    NodeSpec("LastResult/InspectionId", "UInt64", "inspection id, unique across restarts (/api: id)"),
    NodeSpec("LastResult/AcquisitionId", "UInt64", "camera frame counter (0: no frame)"),
    NodeSpec("LastResult/TriggerId", "UInt32", "the trigger this result answers (0: none)"),
    NodeSpec("LastResult/PartId", "String", "part id of the trigger ('' when none)"),
    NodeSpec("LastResult/Verdict", "String", "OK, NG, UNCERTAIN or NO_FRAME (reject)"),
    NodeSpec("LastResult/VerdictCode", "UInt16", "1 OK, 2 NG, 3 UNCERTAIN, 4 NO_FRAME (the Modbus verdict)"),
    NodeSpec("LastResult/CapturedAt", "DateTime", "capture time (the trigger time for NO_FRAME), UTC"),
    NodeSpec("LastResult/FrameWidth", "UInt32", "frame width (px; bbox coordinates refer to it)"),
    NodeSpec("LastResult/FrameHeight", "UInt32", "frame height (px)"),
    NodeSpec("LastResult/DefectCount", "UInt32", "defects found (all, not only those under Defects)"),
    NodeSpec("LastResult/DefectsReported", "UInt32", "Defect0.. filled (min(DefectCount, opcua.top_n))"),
    NodeSpec("LastResult/MaxPeakScore", "Double", "how close the frame came to a defect, 0..1"),
    NodeSpec("LastResult/Bundle", "String", "the bundle that inspected it"),
    NodeSpec("LastResult/Reason", "String", "why a NO_FRAME result has no frame ('' otherwise)"),
    *(NodeSpec(f"LastResult/Timings/{name}", "Double", f"{stage.replace('_', ' ')} (ms; 0 for NO_FRAME)")
      for stage, name in TIMING_NODES.items()),
    NodeSpec("LastResult/Json", "String", "the whole result as one JSON object (as /api/results/{id}, without "
             "polygons): a structured value, never torn"),
)
RESULT_SEQ = NodeSpec("LastResult/ResultSeq", "UInt32", "+1 per result published here; written LAST, after "
                      "every other LastResult value (how to read a result whole: docs/opcua.md)")
COUNTERS: tuple[NodeSpec, ...] = (
    NodeSpec("Counters/Results", "UInt64", "results published to OPC UA since start"),
    NodeSpec("Counters/Ok", "UInt64", "OK results"),
    NodeSpec("Counters/Ng", "UInt64", "NG results"),
    NodeSpec("Counters/Uncertain", "UInt64", "UNCERTAIN results"),
    NodeSpec("Counters/NoFrame", "UInt64", "NO_FRAME results"),
    NodeSpec("Counters/ResultsDropped", "UInt64", "results dropped before the OPC UA writer (handoff full)"),
    NodeSpec("Counters/TriggersTaken", "UInt32", "Trigger calls taken"),
    NodeSpec("Counters/TriggersRefused", "UInt32", "Trigger calls refused (not ready, busy, bad part id)"),
    NodeSpec("Counters/WritesRefused", "UInt32", "writes refused (bad type, not writable, not allowed)"),
)


def defect_nodes(top_n: int) -> tuple[NodeSpec, ...]:
    return tuple(NodeSpec(f"LastResult/Defects/Defect{i}/{name}", kind, f"defect {i} (highest score first): {what}")
                 for i in range(top_n) for name, kind, what in DEFECT_FIELDS)


def tree(top_n: int) -> tuple[NodeSpec, ...]:
    """Every variable, in the order the writer writes a result: State, Command, the result's fields,
    ResultSeq (last of the result), Counters."""
    return (*STATE, COMMAND, *RESULT_HEAD, *defect_nodes(top_n), RESULT_SEQ, *COUNTERS)


def default(kind: DataType) -> Any:
    return {"Boolean": False, "String": "", "Double": 0.0,
            "DateTime": datetime(1601, 1, 1, tzinfo=timezone.utc)}.get(kind, 0)


def result_values(record: InspectionRecord, top_n: int) -> dict[str, Any]:
    """LastResult's values for ``record`` (every node but ResultSeq), from the dict /api answers with."""
    out = record.to_dict(with_polygons=False)
    values: dict[str, Any] = {
        "LastResult/InspectionId": out["id"],
        "LastResult/AcquisitionId": out["acquisition_id"],
        "LastResult/TriggerId": out["trigger_id"] or 0,
        "LastResult/PartId": out["part_id"] or "",
        "LastResult/Verdict": out["verdict"],
        "LastResult/VerdictCode": int(record.verdict),
        "LastResult/CapturedAt": datetime.fromtimestamp(record.wall_time, timezone.utc),
        "LastResult/FrameWidth": out["frame"]["width"],
        "LastResult/FrameHeight": out["frame"]["height"],
        "LastResult/DefectCount": out["defect_count"],
        "LastResult/DefectsReported": min(out["defect_count"], top_n),
        "LastResult/MaxPeakScore": float(out["max_peak_score"]),
        "LastResult/Bundle": out["bundle"],
        "LastResult/Reason": out["reason"] or "",
        "LastResult/Json": json.dumps(out, separators=(",", ":")),
    }
    for stage, name in TIMING_NODES.items():
        values[f"LastResult/Timings/{name}"] = float(out["latency_ms"].get(stage, 0.0))
    defects = out["defects"]
    for i in range(top_n):
        d = defects[i] if i < len(defects) else None
        base = f"LastResult/Defects/Defect{i}/"
        if d is None:
            values.update({base + name: default(kind) for name, kind, _ in DEFECT_FIELDS})
            continue
        x, y, w, h = d["bbox"]
        values.update({
            base + "ClassId": d["class_id"], base + "Class": d["class"], base + "Score": float(d["score"]),
            base + "PredictedIou": float(d["predicted_iou"]), base + "AreaPx": d["area_px"],
            base + "BboxX": x, base + "BboxY": y, base + "BboxWidth": w, base + "BboxHeight": h,
            base + "CentroidX": float(d["centroid"][0]), base + "CentroidY": float(d["centroid"][1]),
        })
    return values


def markdown_table(top_n: int = 1) -> str:
    """docs/opcua.md's node table (Defect0 stands for every Defect<i>)."""
    lines = ["<!-- generated from service/opcua/nodes.py: python -m service.opcua.nodes -->", "",
             "| Node (under Objects/Defectsam/<station>) | Data type | Access | Meaning |", "|---|---|---|---|"]
    for spec in tree(top_n):
        path = spec.path.replace("Defect0/", "Defect<i>/")
        lines.append(f"| `{path}` | {spec.type} | {'read/write' if spec.writable else 'read'} | {spec.meaning} |")
    lines.append("| `Trigger(PartId: String) -> TriggerId: UInt32` | method | call | inspect the next frame "
                 "(triggered mode) or tag it (free run); refused with a status code when not ready (below) |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- node-table:begin -->", "<!-- node-table:end -->"


def render_doc(text: str) -> str:
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{markdown_table()}{END}{tail}"


if __name__ == "__main__":
    from pathlib import Path

    doc = Path(__file__).resolve().parents[2] / "docs" / "opcua.md"
    doc.write_text(render_doc(doc.read_text()))
    print(f"wrote {doc}")
