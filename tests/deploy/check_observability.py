#!/usr/bin/env python3
"""Static checks of the `observability` compose profile (deploy/observability/).

No container engine is needed; nothing is started. Checked:

- promtool (Debian's `prometheus` package, installed by `scripts/infra.sh test-tools`, which
  `make test` runs): `check config` of prometheus.yml (its rule_files relative to it),
  `check rules` of alerts.yml, `test rules` of alerts_test.yml, and `check rules` of a temporary
  file that records every dashboard query (so each panel's PromQL parses). A missing promtool is a
  failure, never a skip.
- Metric names: the set the code exports is read from the sources — the `counter!` / `gauge!` /
  `histogram!` calls under src/ (metrics-exporter-prometheus: names as written, a histogram's
  `_bucket`/`_sum`/`_count`) and the `Counter` / `Gauge` / `Histogram` constructors of
  ai-inference/ai_inference/ (prometheus_client: a counter gains `_total`) — so a renamed metric
  fails here. Every alert expression and every dashboard target may name only those, plus `up`
  (Prometheus) and `probe_success` (the blackbox exporter).
- The alerts the issue asks for exist (outbox age, consumer lag, DLQ pending, open breakers,
  readiness down), each with `for:`, a severity and summary/description annotations, and
  alerts_test.yml has, for every alert, a case where it fires and one where it stays quiet.
- The dashboard JSON parses, names the provisioned datasource uid, has unique panel ids and covers
  ingest, outbox, lag, dead letters, webhooks and the sidecar.
- The compose profile: prometheus, blackbox and grafana exist with `profiles: [observability]`
  (and no other service is in it), pinned images, health checks, loopback-only published ports,
  bind mounts of files that exist (and the files Prometheus and Grafana read are mounted where
  they read them), named volumes declared; Prometheus's scrape and probe targets are ports the
  compose `app` / `ai-inference` services expose and that serve what is asked, exactly one app
  port is scraped for data (the registry is process-wide), and Grafana's datasource is the
  prometheus service.

Run from anywhere:

    python3 tests/deploy/check_observability.py [repo-root]

Prints one line per check and closes with `N passed, M failed`; exits non-zero on any failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import yaml

PROFILE = "observability"
PROFILE_SERVICES = {"prometheus", "blackbox", "grafana"}
APP, SIDECAR = "app", "ai-inference"

# Series that are not the code's: Prometheus writes `up` per target, the blackbox exporter
# `probe_success` per probe.
EXTERNAL_METRICS = {"up", "probe_success"}

# The alerts: what it calls each -> (alert name, a metric its expression must use).
REQUIRED_ALERTS = {
    "outbox oldest age": ("CornjacketOutboxOldestAgeHigh", "cj_outbox_oldest_age_seconds"),
    "consumer lag": ("CornjacketConsumerLagHigh", "cj_consumer_lag"),
    "DLQ pending": ("CornjacketDeadLettersPending", "cj_dlq_entries"),
    "open webhook breakers": ("CornjacketWebhookBreakerOpen", "cj_webhook_endpoints_not_closed"),
    "readiness down": ("CornjacketNotReady", "probe_success"),
}
SEVERITIES = {"info", "warning", "critical"}

# The dashboard's sections: each needs a panel querying at least one of these.
DASHBOARD_COVERAGE = {
    "ingest": {"cj_events_accepted_total"},
    "outbox backlog": {"cj_outbox_backlog"},
    "outbox age": {"cj_outbox_oldest_age_seconds"},
    "consumer lag": {"cj_consumer_lag"},
    "DLQ pending": {"cj_dlq_entries"},
    "webhook deliveries": {"cj_webhook_deliveries_total"},
    "webhook breakers": {"cj_webhook_endpoints_not_closed", "cj_webhook_breaker_opened_total"},
    "sidecar": {"cj_ai_messages_total", "cj_ai_consumer_lag", "cj_ai_processing_seconds_bucket"},
}

# The app's ports whose router merges `metrics_router()` (src/infra/http.rs): ingestion 8080
# (src/services/ingestion/mod.rs), query 8081 (query/mod.rs), the consumers' health ports 8083 and
# 8084 (scaffold.rs) and the console 8085 (console/mod.rs); the actions API 8082 has neither
# /metrics nor probes (its health port is 8083). The same ports serve /readyz.
APP_METRICS_PORTS = {8080, 8081, 8083, 8084, 8085}
APP_READYZ_PORTS = APP_METRICS_PORTS
# The port whose /metrics refreshes the outbox gauges before rendering (`sample_gauges`).
APP_DATA_PORT = 8080

GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


# --- what the code exports -------------------------------------------------------------------------

RUST_RECORD = re.compile(r"\b(counter|gauge|histogram)!\(\s*\"([A-Za-z_:][A-Za-z0-9_:]*)\"")
PY_METRIC = re.compile(r"\b(Counter|Gauge|Histogram|Summary)\(\s*\"([A-Za-z_:][A-Za-z0-9_:]*)\"")


def rust_metrics(src: Path) -> dict[str, str]:
    """Exported series name -> the metric recorded at a call site under src/."""
    out: dict[str, str] = {}
    for f in sorted(src.rglob("*.rs")):
        for kind, name in RUST_RECORD.findall(f.read_text()):
            if kind == "histogram":
                for suffix in ("_bucket", "_sum", "_count"):
                    out[name + suffix] = name
            else:
                out[name] = name
    return out


def python_metrics(pkg: Path) -> dict[str, str]:
    """Exported series name -> metric, for prometheus_client's naming."""
    out: dict[str, str] = {}
    for f in sorted(pkg.rglob("*.py")):
        for kind, name in PY_METRIC.findall(f.read_text()):
            if kind == "Counter":
                base = name.removesuffix("_total")
                series = [base + "_total", base + "_created"]
            elif kind == "Gauge":
                series = [name]
            elif kind == "Histogram":
                series = [name + s for s in ("_bucket", "_sum", "_count", "_created")]
            else:  # Summary
                series = [name + s for s in ("_sum", "_count", "_created")]
            for s in series:
                out[s] = name
    return out


# --- PromQL ------------------------------------------------------------------------------------------

PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                   "bool", "offset", "inf", "nan"}


def promql_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions,
    aggregations, keywords, label names (in {...} or by/without/on/ignoring lists), strings,
    durations or Grafana variables."""
    s = re.sub(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|`[^`]*`", '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![A-Za-z0-9_:.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", s):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def grafana_to_promql(expr: str) -> str:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace("${" + var[1:] + "}", value).replace(var, value)
    return expr


# --- helpers -------------------------------------------------------------------------------------------


class Checker:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"ok   {what}")
        else:
            self.failed += 1
            print(f"FAIL {what}" + (f": {detail}" if detail else ""))
        return ok


def find_promtool() -> str | None:
    explicit = os.environ.get("PROMTOOL")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    return shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").is_file() else None)


def run_promtool(c: Checker, promtool: str | None, args: list[str], what: str, cwd: Path) -> None:
    if promtool is None:
        c.check(False, what, "promtool not found: install Debian's `prometheus` package "
                "(`scripts/infra.sh test-tools`, which `make test` runs) or set PROMTOOL=/path/to/promtool")
        return
    try:
        r = subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        c.check(False, what, f"{promtool}: {e}")
        return
    out = (r.stdout + r.stderr).strip()
    c.check(r.returncode == 0, what, "\n    " + out.replace("\n", "\n    "))


def mounts(svc: dict) -> list[tuple[str, str]]:
    """(source, target) of a service's volumes, short syntax or long."""
    out = []
    for v in svc.get("volumes") or []:
        if isinstance(v, dict):
            out.append((str(v.get("source", "")), str(v.get("target", ""))))
        else:
            parts = str(v).split(":")
            out.append((parts[0], parts[1] if len(parts) > 1 else parts[0]))
    return out


def exposed_ports(svc: dict) -> set[int]:
    ports = {int(str(p).split("/")[0]) for p in svc.get("expose") or []}
    for p in svc.get("ports") or []:
        if isinstance(p, dict):
            ports.add(int(p["target"]))
        else:
            ports.add(int(str(p).split("/")[0].split(":")[-1]))
    return ports


def command_args(svc: dict) -> list[str]:
    cmd = svc.get("command") or []
    return [str(x) for x in cmd] if isinstance(cmd, list) else str(cmd).split()


def flag(args: list[str], name: str) -> str | None:
    for a in args:
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def drops_everything(job: dict) -> bool:
    """A scrape job whose metric_relabel_configs drop every sample (scraped for a side effect)."""
    for r in job.get("metric_relabel_configs") or []:
        if (r.get("action") == "drop" and r.get("source_labels") == ["__name__"]
                and r.get("regex") in (".+", ".*")):
            return True
    return False


def host_port(target: str) -> tuple[str, int | None]:
    if "://" in target:
        u = urlsplit(target)
        return u.hostname or "", u.port or (443 if u.scheme == "https" else 80)
    host, _, port = target.rpartition(":")
    return host, int(port) if port.isdigit() else None


def walk_panels(panels: list) -> list[dict]:
    out = []
    for p in panels or []:
        out.append(p)
        out.extend(walk_panels(p.get("panels") or []))
    return out


# --- the checks -----------------------------------------------------------------------------------------


def run(root: Path) -> Checker:
    c = Checker()
    obs = root / "deploy" / "observability"
    compose_path = root / "docker-compose" / "docker-compose.fullstack.yaml"
    prom_path = obs / "prometheus.yml"
    alerts_path = obs / "alerts.yml"
    tests_path = obs / "alerts_test.yml"
    blackbox_path = obs / "blackbox.yml"
    ds_path = obs / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
    provider_path = obs / "grafana" / "provisioning" / "dashboards" / "provider.yaml"
    dash_dir = obs / "grafana" / "dashboards"
    dash_path = dash_dir / "pipeline.json"

    for p in (prom_path, alerts_path, tests_path, blackbox_path, ds_path, provider_path, dash_path):
        c.check(p.is_file(), f"{p.relative_to(root)} exists")

    # What the code exports --------------------------------------------------------------------
    rust = rust_metrics(root / "src")
    py = python_metrics(root / "ai-inference" / "ai_inference")
    known = {**rust, **py}
    c.check(len(rust) >= 20 and "cj_outbox_backlog" in rust, f"found the platform's metrics in src/ ({len(set(rust.values()))})",
            f"got {sorted(set(rust.values()))}")
    c.check(len(py) >= 5 and any(n.startswith("cj_ai_") for n in py),
            f"found the sidecar's metrics in ai-inference/ai_inference/ ({len(set(py.values()))})", f"got {sorted(py)}")
    catalogue = (root / "src" / "infra" / "metrics_catalogue.rs").read_text()
    # Without buckets metrics-exporter-prometheus renders a histogram as a summary (no _bucket).
    c.check(".set_buckets(" in catalogue, "the platform's histograms have buckets (…_bucket series exist)")
    allowed = set(known) | EXTERNAL_METRICS

    promtool = find_promtool()
    c.check(promtool is not None, f"promtool found ({promtool})" if promtool else "promtool found",
            "install Debian's `prometheus` package (`scripts/infra.sh test-tools`, run by `make test`) "
            "or set PROMTOOL=/path/to/promtool")

    # Prometheus ----------------------------------------------------------------------------------
    run_promtool(c, promtool, ["check", "config", str(prom_path.relative_to(root))],
                 "promtool check config deploy/observability/prometheus.yml", root)
    run_promtool(c, promtool, ["check", "rules", str(alerts_path.relative_to(root))],
                 "promtool check rules deploy/observability/alerts.yml", root)
    run_promtool(c, promtool, ["test", "rules", str(tests_path.relative_to(root))],
                 "promtool test rules deploy/observability/alerts_test.yml", root)

    prom = yaml.safe_load(prom_path.read_text()) or {}
    c.check(all(not Path(f).is_absolute() and (prom_path.parent / f).is_file() for f in prom.get("rule_files") or [])
            and "alerts.yml" in (prom.get("rule_files") or []),
            "prometheus.yml loads alerts.yml by a path relative to itself", f"rule_files {prom.get('rule_files')}")

    # Alerts -----------------------------------------------------------------------------------
    rules = [r for g in (yaml.safe_load(alerts_path.read_text()) or {}).get("groups") or [] for r in g.get("rules") or []]
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    for what, (name, metric) in REQUIRED_ALERTS.items():
        r = alerts.get(name)
        c.check(r is not None and metric in promql_metrics(str(r.get("expr", ""))),
                f"alert for {what}: {name} on {metric}", "missing" if r is None else f"expr {r.get('expr')!r}")
    for name, r in alerts.items():
        expr = str(r.get("expr", ""))
        used = promql_metrics(expr)
        c.check(bool(used) and used <= allowed and "__name__" not in expr,
                f"alert {name} uses only exported metrics {sorted(used)}", f"unknown {sorted(used - allowed)}")
        labels, ann = r.get("labels") or {}, r.get("annotations") or {}
        c.check(bool(r.get("for")) and labels.get("severity") in SEVERITIES and ann.get("summary") and ann.get("description"),
                f"alert {name} has for:, a severity and summary/description",
                f"for {r.get('for')!r}, labels {labels}, annotations {sorted(ann)}")

    # Every alert fires in a case of alerts_test.yml and stays quiet in another.
    unit = yaml.safe_load(tests_path.read_text()) or {}
    c.check(unit.get("rule_files") == ["alerts.yml"], "alerts_test.yml tests alerts.yml", f"rule_files {unit.get('rule_files')}")
    fires, quiet = set(), set()
    for t in unit.get("tests") or []:
        for a in t.get("alert_rule_test") or []:
            (fires if a.get("exp_alerts") else quiet).add(a.get("alertname"))
    for name in alerts:
        c.check(name in fires and name in quiet, f"alerts_test.yml: {name} fires on a failing series and not on a healthy one",
                f"fires case: {name in fires}, quiet case: {name in quiet}")
    c.check((fires | quiet) <= set(alerts), "alerts_test.yml tests only alerts that exist", f"{sorted((fires | quiet) - set(alerts))}")

    # Grafana ---------------------------------------------------------------------------------------
    ds = (yaml.safe_load(ds_path.read_text()) or {}).get("datasources") or []
    prom_ds = [d for d in ds if d.get("type") == "prometheus"]
    c.check(len(prom_ds) == 1 and prom_ds[0].get("uid"), "one provisioned Prometheus datasource with a uid", f"got {ds}")
    uid = prom_ds[0].get("uid") if prom_ds else None

    try:
        dash = json.loads(dash_path.read_text())
        c.check(True, "the dashboard JSON parses")
    except (OSError, json.JSONDecodeError) as e:
        c.check(False, "the dashboard JSON parses", str(e))
        dash = {}
    c.check(bool(dash.get("uid")) and bool(dash.get("title")) and isinstance(dash.get("schemaVersion"), int)
            and dash["schemaVersion"] >= 36, "the dashboard has a uid, a title and a current schemaVersion",
            f"uid {dash.get('uid')!r}, schemaVersion {dash.get('schemaVersion')!r}")
    panels = walk_panels(dash.get("panels") or [])
    ids = [p.get("id") for p in panels]
    c.check(len(ids) == len(set(ids)) and None not in ids, "dashboard panel ids are unique", f"{ids}")
    queried: set[str] = set()
    exprs: list[tuple[str, str]] = []
    for p in panels:
        if p.get("type") == "row":
            continue
        title = p.get("title", f"panel {p.get('id')}")
        targets = p.get("targets") or []
        refs = [(p.get("datasource") or {}).get("uid")] + [(t.get("datasource") or {}).get("uid") for t in targets]
        c.check(bool(targets) and "gridPos" in p and all(r == uid for r in refs),
                f"panel '{title}': positioned, with targets on the provisioned datasource ({uid})",
                f"{len(targets)} targets, gridPos {p.get('gridPos')}, datasource uids {refs}")
        for t in targets:
            expr = str(t.get("expr", ""))
            used = promql_metrics(expr)
            queried |= used
            exprs.append((f"{p.get('id')}_{t.get('refId', 'A')}", expr))
            c.check(bool(used) and used <= allowed and "__name__" not in expr,
                    f"panel '{title}' {t.get('refId')}: exported metrics only {sorted(used)}",
                    f"unknown {sorted(used - allowed)} in {expr!r}")
    for what, names in DASHBOARD_COVERAGE.items():
        c.check(bool(names & queried), f"the dashboard shows {what}", f"no panel queries any of {sorted(names)}")
    # Every panel query parses: promtool checks them as recording rules.
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "dashboard_queries.yml"
        f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": [
            {"record": f"dashboard:panel_{ref}", "expr": grafana_to_promql(e)} for ref, e in exprs]}]}))
        run_promtool(c, promtool, ["check", "rules", str(f)], f"promtool parses every dashboard query ({len(exprs)})", root)

    # Compose: the profile ------------------------------------------------------------------------
    compose = yaml.safe_load(compose_path.read_text()) or {}
    services = compose.get("services") or {}
    compose_dir = compose_path.parent
    in_profile = {n for n, s in services.items() if PROFILE in (s.get("profiles") or [])}
    c.check(in_profile == PROFILE_SERVICES, f"the {PROFILE} profile is {sorted(PROFILE_SERVICES)}", f"got {sorted(in_profile)}")
    for name in sorted(PROFILE_SERVICES):
        svc = services.get(name) or {}
        c.check(svc.get("profiles") == [PROFILE], f"compose {name}: profiles [{PROFILE}]", f"got {svc.get('profiles')}")
        image = str(svc.get("image", ""))
        tag = image.rpartition(":")[2] if ":" in image else ""
        c.check(bool(re.fullmatch(r"v?\d+\.\d+\.\d+", tag)), f"compose {name}: image pinned to a release ({image})")
        c.check(bool((svc.get("healthcheck") or {}).get("test")), f"compose {name}: has a health check")
        for p in svc.get("ports") or []:
            c.check(str(p).startswith("127.0.0.1:"), f"compose {name}: publishes {p} on loopback only")
        for source, target in mounts(svc):
            if source.startswith((".", "/")):
                c.check((compose_dir / source).exists(), f"compose {name}: mount {source} exists")
            else:
                c.check(source in (compose.get("volumes") or {}), f"compose {name}: volume {source} is declared")

    def mounted_at(svc: dict, path: Path) -> str | None:
        for source, target in mounts(svc):
            if source.startswith((".", "/")) and (compose_dir / source).resolve() == path.resolve():
                return target
        return None

    prom_svc = services.get("prometheus") or {}
    prom_cfg = mounted_at(prom_svc, prom_path)
    config_flag = flag(command_args(prom_svc), "--config.file") or "/etc/prometheus/prometheus.yml"
    c.check(prom_cfg == config_flag, "compose prometheus: prometheus.yml mounted where --config.file reads it",
            f"mounted at {prom_cfg}, --config.file {config_flag}")
    rules_at = mounted_at(prom_svc, alerts_path)
    c.check(prom_cfg is not None and rules_at == str(Path(prom_cfg).parent / "alerts.yml"),
            "compose prometheus: alerts.yml mounted beside prometheus.yml (rule_files is relative)", f"at {rules_at}")
    bb_svc = services.get("blackbox") or {}
    bb_cfg = flag(command_args(bb_svc), "--config.file") or "/etc/blackbox_exporter/config.yml"
    c.check(mounted_at(bb_svc, blackbox_path) == bb_cfg, "compose blackbox: blackbox.yml mounted where --config.file reads it")
    graf = services.get("grafana") or {}
    c.check(mounted_at(graf, obs / "grafana" / "provisioning") == "/etc/grafana/provisioning",
            "compose grafana: provisioning mounted at /etc/grafana/provisioning")
    provider = (yaml.safe_load(provider_path.read_text()) or {}).get("providers") or []
    paths = [((p.get("options") or {}).get("path")) for p in provider]
    dash_at = mounted_at(graf, dash_dir)
    c.check(bool(paths) and all(p == dash_at for p in paths), "compose grafana: the dashboards folder is mounted where the provider reads",
            f"provider {paths}, mounted at {dash_at}")
    home = (graf.get("environment") or {}).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    c.check(home is None or (dash_at is not None and home == f"{dash_at}/{dash_path.name}"),
            "compose grafana: the home dashboard is the mounted pipeline.json", f"got {home}")
    ds_url = urlsplit(str(prom_ds[0].get("url", ""))) if prom_ds else urlsplit("")
    c.check(ds_url.hostname == "prometheus" and ds_url.port in exposed_ports(prom_svc),
            "grafana's datasource is the prometheus service on a port it exposes", f"url {ds_url.geturl()}")

    # Compose: what Prometheus scrapes ----------------------------------------------------------------
    # The app's ports are the binary's defaults (src/config/mod.rs `Ports::parse`); all but the
    # actions API serve /metrics and /readyz.
    config_ports = {f: int(n) for f, n in re.findall(r"(\w+):\s*v\.port\(\s*\"CJ_[A-Z_]+\",\s*(\d+)\s*\)",
                                                   (root / "src" / "config" / "mod.rs").read_text())}
    c.check(set(config_ports.values()) - {config_ports.get("actions")} == APP_METRICS_PORTS,
            f"the app's ports with /metrics and /readyz {sorted(APP_METRICS_PORTS)} are the binary's (all but the actions API)",
            f"src/config/mod.rs: {config_ports}")
    sidecar_port = int(re.search(r"\bport:\s*int\s*=\s*Field\(\s*(\d+)",
                                 (root / "ai-inference" / "ai_inference" / "config.py").read_text()).group(1))
    serves = {APP: APP_METRICS_PORTS, SIDECAR: {sidecar_port}}
    data_app_ports: set[int] = set()
    for job in prom.get("scrape_configs") or []:
        jname = job.get("job_name")
        targets = [t for sc in job.get("static_configs") or [] for t in sc.get("targets") or []]
        c.check(bool(targets), f"scrape job {jname} has targets")
        probe = job.get("metrics_path") == "/probe"
        if probe:
            # Blackbox: the targets are URLs, the address is rewritten to the exporter.
            addr = next((r.get("replacement") for r in job.get("relabel_configs") or []
                         if r.get("target_label") == "__address__"), None)
            h, p = host_port(str(addr))
            c.check(h in services and p in exposed_ports(services[h]), f"scrape job {jname}: exporter {addr} is a compose service port")
        for t in targets:
            h, p = host_port(str(t))
            if h == "localhost" and jname == "prometheus":
                c.check(p in exposed_ports(prom_svc), f"scrape job {jname}: {t} is Prometheus itself")
                continue
            svc = services.get(h)
            ok = svc is not None and p in exposed_ports(svc) and p in serves.get(h, set())
            if probe:
                ok = ok and urlsplit(str(t)).path == "/readyz" and p in (APP_READYZ_PORTS if h == APP else {sidecar_port})
            c.check(ok, f"scrape job {jname}: {t} is a port compose {h} exposes and serves " + ("/readyz" if probe else "/metrics"),
                    f"{h} exposes {sorted(exposed_ports(svc)) if svc else 'nothing (no such service)'}")
            if h == APP and not probe and not drops_everything(job):
                data_app_ports.add(p)
    c.check(data_app_ports == {APP_DATA_PORT},
            f"exactly one app port is scraped for data ({APP_DATA_PORT}: one process-wide registry, no double counting)",
            f"got {sorted(data_app_ports)}")
    probed = {host_port(str(t)) for job in prom.get("scrape_configs") or [] if job.get("metrics_path") == "/probe"
              for sc in job.get("static_configs") or [] for t in sc.get("targets") or []}
    want = {(APP, p) for p in APP_READYZ_PORTS} | {(SIDECAR, sidecar_port)}
    c.check(probed == want, "readiness is probed on every port that serves /readyz", f"missing {sorted(want - probed)}")
    return c


def main() -> int:
    root = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else Path(__file__).resolve().parents[2]
    print(f"check_observability: {root / 'deploy' / 'observability'}")
    c = run(root)
    print(f"{c.passed} passed, {c.failed} failed")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
