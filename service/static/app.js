// The live page: one EventSource (/api/events) brings results and a status snapshot every second.
"use strict";
const $ = (id) => document.getElementById(id);
const fmt = (v, d = 1) => (v === null || v === undefined ? "–" : Number(v).toFixed(d));
const recent = [];

function showStatus(s) {
  const ready = $("ready");
  ready.textContent = s.ready ? "ready" : "not ready: " + s.not_ready.join("; ");
  ready.className = "badge " + (s.ready ? "good" : "bad");
  const e = s.engine;
  $("engine").textContent = e.bundle ? `${e.bundle} · ${e.backend || ""} · ${e.precision || ""} · camera ${s.camera.state}` : `engine ${e.state}`;
  const warn = $("warning");
  warn.hidden = e.weights !== "untrained";
  warn.textContent = "This bundle carries untrained stand-in weights: its defects are meaningless.";
  const p = s.pipeline;
  $("fps").textContent = fmt(p.fps);
  $("cam-fps").textContent = fmt(s.camera.fps);
  $("e2e").textContent = fmt(p.latency.end_to_end.recent_p50_ms, 0);
  $("infer").textContent = fmt(p.latency.infer.recent_p50_ms, 0);
  $("n-ok").textContent = p.verdicts.OK;
  $("n-ng").textContent = p.verdicts.NG;
  $("n-unc").textContent = p.verdicts.UNCERTAIN;
  $("n-nof").textContent = p.verdicts.NO_FRAME;
  showStoreDrops(s.store);
  $("drops").textContent = `frames dropped ${s.camera.frames_dropped} · viewers ${s.live.viewers}`;
}

// Records the store did not keep are shown where the operator looks, not in grey small print.
function showStoreDrops(st) {
  const box = $("store-drops");
  const dropped = Object.values(st.dropped).reduce((a, b) => a + b, 0);
  box.hidden = !st.enabled || dropped === 0;
  if (box.hidden) return;
  const reasons = Object.entries(st.dropped).filter(([, n]) => n > 0)
    .map(([reason, n]) => `${n} ${reason.replace("_", " ")}`).join(", ");
  const share = Math.round((100 * dropped) / (dropped + st.written));
  box.textContent = `Store dropped ${dropped} of ${dropped + st.written} records (${share}%): ${reasons}.` +
    " Inspection is not affected: every result is still published (PLC, events)." + (st.last_error ? ` Last error: ${st.last_error}` : "");
}

// The last NG frame with its masks stays on screen until the next NG, so an operator who looks up
// a moment late still sees what was rejected. At most one fetch every 2 s: the daemon draws it.
const lastNg = { shownAt: 0, loading: false };
function showLastNg(r) {
  const now = Date.now();
  if (lastNg.loading || now - lastNg.shownAt < 2000) return;
  lastNg.loading = true;
  lastNg.shownAt = now;
  const img = $("last-ng");
  img.onload = () => { lastNg.loading = false; img.hidden = false; };
  img.onerror = () => { lastNg.loading = false; };
  img.src = `/api/results/${r.id}/overlay.jpg?width=640`;
  $("last-ng-link").href = `/api/results/${r.id}/overlay.jpg`;
  $("last-ng-meta").textContent = `#${r.id} · ${r.defect_count} defect(s)` + (r.part_id ? ` · part ${r.part_id}` : "") +
    ` · ${r.captured_at}`;
}

function showResult(r) {
  if (r.verdict === "NG") showLastNg(r);
  $("latest-verdict").textContent = r.verdict;
  $("latest-meta").textContent = `#${r.id} · frame ${r.acquisition_id}` + (r.part_id ? ` · part ${r.part_id}` : "") +
    ` · ${r.captured_at}` + (r.latency_ms.end_to_end ? ` · ${fmt(r.latency_ms.end_to_end, 0)} ms` : "") +
    (r.reason ? ` · ${r.reason}` : "");
  const body = $("defects");
  body.replaceChildren(...r.defects.slice(0, 12).map((d) => {
    const row = document.createElement("tr");
    for (const v of [d.class, fmt(d.score, 2), d.area_px, d.bbox.join(",")]) {
      const cell = document.createElement("td");
      cell.textContent = v;
      row.appendChild(cell);
    }
    return row;
  }));
  if (r.verdict !== "OK") {
    recent.unshift(r);
    recent.length = Math.min(recent.length, 10);
    $("recent").replaceChildren(...recent.map((x) => {
      const item = document.createElement("li");
      const link = document.createElement("a");
      link.href = `/api/results/${x.id}`;
      link.textContent = `#${x.id} ${x.verdict} ${x.defect_count} defect(s)` + (x.part_id ? ` part ${x.part_id}` : "");
      item.appendChild(link);
      return item;
    }));
  }
}

// A page opened after the last NG still shows it: the newest stored NG (none without a store).
fetch("/api/results?verdict=NG&limit=1")
  .then((resp) => (resp.ok ? resp.json() : { items: [] }))
  .then((page) => { if (page.items.length && lastNg.shownAt === 0) showLastNg(page.items[0]); })
  .catch(() => {});

const events = new EventSource("/api/events");
events.addEventListener("status", (e) => showStatus(JSON.parse(e.data)));
events.addEventListener("result", (e) => showResult(JSON.parse(e.data)));
events.onerror = () => { $("ready").textContent = "disconnected, retrying…"; $("ready").className = "badge bad"; };
// Reconnect the stream if the daemon restarted.
$("live").onerror = () => setTimeout(() => { $("live").src = "/api/live.mjpeg?t=" + Date.now(); }, 2000);
