"""One percentile (issue 19, item 2): the API, ``bench plc`` and ``bench report`` print the same p99 for
the same samples, and benches read their own window of the daemon's latencies without clearing it."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from engines.percentiles import LatencyLog, quantile, quantile_ms
from service.commands.bench import plc_latency_rows
from service.pipeline_bench import PipelineBenchResult, markdown_report
from tests.daemon_support import base_url, free_port, get_json, make_config, ng_bundle, running_daemon
from tests.support import wait_for


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_quantile_is_numpys_linear_percentile(n: int) -> None:
    rng = random.Random(n)
    values = [rng.lognormvariate(-3.0, 0.8) for _ in range(n)]
    for q in (0.0, 0.01, 0.5, 0.95, 0.99, 1.0):
        assert quantile(values, q) == pytest.approx(float(np.percentile(values, q * 100)), rel=1e-12, abs=1e-15)
    assert quantile_ms(values, 0.99) == round(float(np.percentile(values, 99)) * 1000, 2)


def test_quantile_of_nothing_is_none_and_q_is_checked() -> None:
    assert quantile([], 0.5) is None and quantile_ms([], 0.99) is None
    for bad in (-0.01, 1.5, float("nan")):
        with pytest.raises(ValueError, match="quantile q must be within"):
            quantile([1.0], bad)


def test_latency_log_cursor_reads_a_window_without_clearing() -> None:
    log = LatencyLog(keep=5)
    for v in (1.0, 2.0, 3.0):
        log.append(v)
    mark = log.cursor()
    assert log.since(mark) == []
    log.append(4.0)
    log.append(5.0)
    assert log.since(mark) == [4.0, 5.0] and log.recent() == [1.0, 2.0, 3.0, 4.0, 5.0]
    for v in (6.0, 7.0, 8.0, 9.0):  # more than kept since the mark: the kept ones
        log.append(v)
    assert log.since(mark) == [5.0, 6.0, 7.0, 8.0, 9.0] and len(log) == 5
    with pytest.raises(ValueError, match="keep must be"):
        LatencyLog(0)

    writer_done = threading.Event()  # one writer, one reader, as the PLC loop and a bench are

    def write() -> None:
        for n in range(20000):
            log.append(float(n))
        writer_done.set()

    threading.Thread(target=write).start()
    while not writer_done.is_set():
        window = log.since(log.cursor() - 3)  # the writer may append between cursor() and since(): 3 to 5
        assert 3 <= len(window) <= 5 and window == [window[0] + i for i in range(len(window))], window
    assert log.since(log.cursor() - 2) == [19998.0, 19999.0]


def _p99_cell(rows: list[str]) -> float:
    return float(rows[2].strip("|").split("|")[3])


@pytest.mark.slow
def test_api_bench_plc_and_bench_report_agree_on_the_same_samples(tiny_bundle_master: Path,
                                                                  tmp_path: Path) -> None:
    config = make_config(tmp_path, ng_bundle(tiny_bundle_master, tmp_path),
                         plc={"enabled": True, "host": "127.0.0.1", "port": free_port()})
    with running_daemon(config) as daemon:
        plc = daemon.plc
        wait_for(lambda: len(plc.latencies) >= 20, what="20 results in the PLC registers", timeout=60)
        with daemon.pipeline.hold():
            written = -1
            while written != plc.results_written:  # the last published result reached the registers
                written = plc.results_written
                time.sleep(0.3)
            samples = plc.latencies.recent()
            status, body = get_json(f"{base_url(daemon)}/api/status")
    assert status == 200 and len(samples) >= 20
    api_p50, api_p99 = body["plc"]["capture_to_register_p50_ms"], body["plc"]["capture_to_register_p99_ms"]
    assert api_p99 == round(float(np.percentile(samples, 99)) * 1000, 2)

    bench_plc_p99 = _p99_cell(plc_latency_rows({"capture -> result registers written (server)": samples}))

    report = PipelineBenchResult(  # what `bench pipeline` / `bench report` build from a window's samples
        bundle="b", backend="cpu", frame="512x288 synthetic", engine_fps_median=1.0, engine_latency_ms_p50=1.0,
        engine_latency_ms_p99=1.0, pipeline_fps=1.0, ratio=1.0, rounds=[], camera_fps=1.0, frames_captured=1,
        frames_dropped=0, inspected=1, window_s=1.0, latency_ms_p50=1.0, latency_ms_p99=1.0, stage_ms_p50={},
        rss_mb_start=1.0, rss_mb_end=1.0, rss_mb_peak=1.0, cpu_percent=1.0, store_written=0, store_dropped=0,
        plc_results=len(samples), plc_latency_ms_p50=quantile_ms(samples, 0.50),
        plc_latency_ms_p99=quantile_ms(samples, 0.99))
    assert api_p99 == bench_plc_p99 == report.plc_latency_ms_p99
    assert api_p50 == report.plc_latency_ms_p50
    assert f"{api_p50:.2f} / {api_p99:.2f}" in markdown_report(report)
