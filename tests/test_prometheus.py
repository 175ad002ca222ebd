"""A real Prometheus (Debian's ``prometheus``) scrapes the daemon; its query API shows the defectsam series."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .daemon_support import PROMETHEUS, base_url, get_json, http, ng_daemon, running_prometheus, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def daemon(tiny_bundle_master: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with ng_daemon(tiny_bundle_master, tmp_path_factory, "prom-daemon") as running:
        yield running


def test_metrics_follow_prometheus_conventions_and_match_the_status_api(daemon: Any) -> None:
    status, headers, body = http("GET", f"{base_url(daemon)}/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for name, kind in [
        ("defectsam_frames_captured", "counter"), ("defectsam_frames_processed", "counter"),
        ("defectsam_frames_dropped", "counter"), ("defectsam_pipeline_fps", "gauge"),
        ("defectsam_latency_seconds", "histogram"), ("defectsam_verdicts", "counter"),
        ("defectsam_defects", "counter"), ("defectsam_camera_reconnects", "counter"),
        ("defectsam_camera_state", "gauge"), ("defectsam_engine_info", "gauge"),  # an Info, as text
        ("defectsam_store_records_written", "counter"), ("defectsam_store_records_dropped", "counter"),
        ("defectsam_live_viewers", "gauge"), ("defectsam_process_resident_memory_bytes", "gauge"),
    ]:
        assert families[name].type == kind, name
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    stages = {dict(labels)["stage"] for (name, labels) in samples if name == "defectsam_latency_seconds_count"}
    assert stages == {"capture_to_preprocess", "preprocess", "infer", "postprocess", "end_to_end"}
    info = next(dict(labels) for (name, labels) in samples if name == "defectsam_engine_info")
    assert info["bundle"] == "tiny-student-ng" and info["weights"] == "untrained" and info["precision"] == "fp32"
    assert samples[("defectsam_camera_state", (("state", "connected"),))] == 1
    # counters only grow, and the JSON status (taken after) is never behind the scrape
    _, snapshot = get_json(f"{base_url(daemon)}/api/status")
    assert snapshot["pipeline"]["frames_processed"] >= samples[("defectsam_frames_processed_total", ())]
    assert snapshot["pipeline"]["verdicts"]["NG"] >= samples[("defectsam_verdicts_total", (("verdict", "NG"),))] > 0


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus binary not found (apt-get install prometheus)")
def test_prometheus_scrapes_the_daemon(daemon: Any, tmp_path: Path) -> None:
    with running_prometheus(tmp_path, daemon.port) as prometheus:
        query = prometheus.query
        processed = wait_for(lambda: query("defectsam_frames_processed_total"), timeout=60, interval=0.5,
                             what="Prometheus to scrape defectsam_frames_processed_total")
        assert processed[0]["metric"]["job"] == "defectsam" and float(processed[0]["value"][1]) > 0
        up = query('up{job="defectsam"}')
        assert up and up[0]["value"][1] == "1"
        buckets = wait_for(lambda: query('defectsam_latency_seconds_bucket{stage="end_to_end"}'), timeout=30,
                           what="latency histogram buckets")
        assert len(buckets) >= 10
        info = query("defectsam_engine_info")
        assert info and info[0]["metric"]["bundle"] == "tiny-student-ng"
        status, names = get_json(f"{prometheus.api}/label/__name__/values")
        assert status == 200 and sum(name.startswith("defectsam_") for name in names["data"]) >= 20
