"""A person as judge: a self-contained review page out, a decisions file back in.

``export_review(cases, page)`` writes one HTML file (images inline as data URIs, no scripts or
styles from elsewhere) with one row per case: the crop, mask A and mask B drawn on it, and radio
buttons A / B / tie plus an optional note. Which of student and teacher is A is the same
pseudo-random bit per case as the vlm judge's, so the reviewer cannot learn a side. The page's
"download decisions" button saves ``decisions.json``, already mapped back::

    {"format": "defectsam-judge-decisions/1", "page": "<page id>",
     "decisions": [{"case_id": "e003:synthetic:12#0", "better": "student", "note": ""}, ...]}

``import_decisions(path, known)`` reads it back as verdicts (judge ``human``, confidence 1);
undecided cases are simply absent. A file that is not JSON, has another format, names a case the
page did not hold, repeats one, or holds another value than student / teacher / tie is one
JudgeError naming the file and the first problem.
"""

from __future__ import annotations

import hashlib
import html
import json
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from engines.atomic import write_text_atomic
from training.judge.base import BETTER, JudgeCase, JudgeError, Verdict
from training.judge.images import case_pngs, data_uri

FORMAT = "defectsam-judge-decisions/1"


def page_id(cases: Sequence[JudgeCase]) -> str:
    return hashlib.sha256("\n".join(c.case_id for c in cases).encode()).hexdigest()[:16]


def render_review(cases: Sequence[JudgeCase], *, title: str = "defectsam: teacher or student?", size: int = 256) -> str:
    """The review page's HTML (see the module docstring)."""
    rows = []
    for n, case in enumerate(cases):
        crop, a, b, swapped = case_pngs(case, size)
        a_is = "teacher" if swapped else "student"
        name = f"c{n}"
        meta = f"{case.class_name or 'defect'} &middot; disagreement {case.disagreement:.2f}"
        radios = "".join(
            f'<label><input type="radio" name="{name}" value="{value}"> {label}</label>'
            for value, label in (("A", "A"), ("B", "B"), ("tie", "tie"))
        )
        rows.append(
            f'<tr class="case" data-case-id="{html.escape(case.case_id, quote=True)}" data-a="{a_is}">'
            f'<td class="id">{n + 1}. {html.escape(case.case_id)}<br><small>{meta}</small></td>'
            f'<td><img alt="crop" src="{data_uri(crop)}"></td>'
            f'<td><img alt="mask A" src="{data_uri(a)}"><div>A</div></td>'
            f'<td><img alt="mask B" src="{data_uri(b)}"><div>B</div></td>'
            f'<td class="pick">{radios}<input class="note" type="text" placeholder="note (optional)"></td></tr>'
        )
    return _PAGE.format(
        title=html.escape(title), count=len(cases), page=page_id(cases), format=FORMAT, rows="\n".join(rows)
    )


def export_review(cases: Sequence[JudgeCase], page: Path | str, **kwargs: Any) -> Path:
    """Write the review page for ``cases`` atomically; returns its path."""
    if not cases:
        raise JudgeError(f"{page}: no cases to review")
    page = Path(page)
    write_text_atomic(page, render_review(cases, **kwargs))
    return page


def import_decisions(path: Path | str, known: Collection[str] | None = None) -> dict[str, Verdict]:
    """A decisions file -> {case_id: Verdict}; ``known``: the case ids the page held (others are an error)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise JudgeError(f"{path}: decisions file cannot be read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise JudgeError(f"{path}: not a JSON decisions file: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("decisions"), list):
        raise JudgeError(f"{path}: expected {{\"format\": \"{FORMAT}\", \"decisions\": [...]}} from the review page")
    return decisions_from(raw["decisions"], known, str(path))


def decisions_from(items: Sequence[Any], known: Collection[str] | None, where: str) -> dict[str, Verdict]:
    verdicts: dict[str, Verdict] = {}
    unknown: list[str] = []
    for n, item in enumerate(items):
        if not isinstance(item, Mapping) or not isinstance(item.get("case_id"), str):
            raise JudgeError(f"{where}: decision {n} is not an object with a case_id")
        cid, better = item["case_id"], item.get("better")
        if better not in BETTER:
            raise JudgeError(f"{where}: case {cid!r}: bad decision {better!r} (expected student, teacher or tie)")
        if cid in verdicts:
            raise JudgeError(f"{where}: case {cid!r} is decided twice")
        if known is not None and cid not in known:
            unknown.append(cid)
            continue
        verdicts[cid] = Verdict(cid, better, 1.0, "human", " ".join(str(item.get("note", "")).split())[:300])
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        shown = ", ".join(map(repr, unknown[:3]))
        raise JudgeError(f"{where}: unknown case ids {shown}{more} (not on the review page)")
    return verdicts


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; }} td {{ border-top: 1px solid #ccc; padding: 6px 10px; vertical-align: top; }}
img {{ image-rendering: pixelated; max-width: 256px; }} td div {{ text-align: center; font-weight: bold; }}
.id {{ font-family: monospace; max-width: 16em; word-break: break-all; }} .pick label {{ display: block; }}
.note {{ margin-top: .5em; width: 12em; }} #bar {{ position: sticky; top: 0; background: #fff; padding: .5em 0; }}
</style></head>
<body data-page="{page}" data-format="{format}">
<h1>{title}</h1>
<p>Each row shows a defect crop and two candidate masks, A and B. Pick the mask that follows the defect's
contour better (covers it without missing parts or spilling onto clean surface), or tie. Rows you skip stay
undecided. Then download the decisions and hand the file back
(<code>defectsam-train judge --run RUN --kind human --import decisions.json</code>).</p>
<div id="bar"><button id="download">download decisions</button> <span id="count">0</span> of {count} decided</div>
<table>
{rows}
</table>
<script>
"use strict";
function decisions() {{
  const out = [];
  for (const row of document.querySelectorAll("tr.case")) {{
    const picked = row.querySelector("input[type=radio]:checked");
    if (!picked) continue;
    const a = row.dataset.a, b = a === "student" ? "teacher" : "student";
    const better = picked.value === "A" ? a : picked.value === "B" ? b : "tie";
    out.push({{case_id: row.dataset.caseId, better: better, note: row.querySelector(".note").value}});
  }}
  return out;
}}
document.addEventListener("change", () => {{
  document.getElementById("count").textContent = decisions().length;
}});
document.getElementById("download").addEventListener("click", () => {{
  const body = {{format: document.body.dataset.format, page: document.body.dataset.page, decisions: decisions()}};
  const blob = new Blob([JSON.stringify(body, null, 1)], {{type: "application/json"}});
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = "decisions.json";
  document.body.appendChild(link);
  link.click();
  link.remove();
}});
</script>
</body></html>
"""


class HumanJudge:
    """The ``human`` judge inside the training loop: the decisions imported so far.

    A person cannot answer while an epoch waits, so a case without an imported decision gets an
    abstention ("not reviewed": no weight changes); the loop exports each pass's review page, and
    importing its decisions (``defectsam-train judge --kind human --import``) re-weights those
    instances for the epochs that follow.
    """

    name = "human"

    def __init__(self, decisions: Mapping[str, Verdict] | None = None) -> None:
        self.decisions = dict(decisions or {})

    def judge(self, case: JudgeCase) -> Verdict:
        decided = self.decisions.get(case.case_id)
        if decided is not None:
            return decided
        return Verdict(case.case_id, "tie", 0.0, self.name, "not reviewed", abstain=True)
