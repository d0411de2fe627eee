#!/usr/bin/env python3
"""Static checks of the Terraform in deploy/ (SPEC §14, seed 004 §2.1, ADR-0006).

No AWS account and no `terraform` binary are needed: the HCL is parsed with python-hcl2 and the
ECS task definition, EFS volumes, secrets, log groups and security groups are checked against the
task of seed 004 §2.1 with the ports of SPEC §2. The ai-inference container is checked against the
sidecar itself: its variables and defaults are read from the `Settings` class in
ai-inference/ai_inference/config.py and its routes from ai_inference/api.py (parsed with `ast`, not
imported, so no sidecar dependency is needed). The Traefik configuration the task ships
(../traefik, read by ecs.tf) is checked for the operator console's routes — /console/ behind
ForwardAuth (which must forward the session cookie), the open login form and assets, the
Server-Sent-Events streams without a buffering middleware, entrypoint timeouts that let a stream
live — and the full-stack compose file for the same ports and probes as the task (parsed with
PyYAML). Run from anywhere:

    python3 tests/deploy/check_terraform.py [deploy-dir]

Prints one line per check and closes with `N passed, M failed`; exits non-zero on any failure.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import hcl2
import yaml

ROOT = Path(__file__).resolve().parents[2]
AI_CONFIG = ROOT / "ai-inference" / "ai_inference" / "config.py"
AI_API = ROOT / "ai-inference" / "ai_inference" / "api.py"


# --- what the sidecar reads ----------------------------------------------------------------------


def sidecar_settings(path: Path = AI_CONFIG) -> dict[str, tuple[list[str], object]]:
    """Field -> (variables, default) of the sidecar's `Settings` class, from
    `Field(default, ..., validation_alias="X" | AliasChoices("X", "Y"))`; the first variable is the
    one an operator sets, the others are aliases."""
    tree = ast.parse(path.read_text(), str(path))
    consts = {
        t.id: n.value.value
        for n in tree.body
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
        for t in n.targets
        if isinstance(t, ast.Name)
    }
    out: dict[str, tuple[list[str], object]] = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Settings"):
        for stmt in cls.body:
            call = stmt.value if isinstance(stmt, ast.AnnAssign) else None
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "Field"):
                continue
            alias = next((k.value for k in call.keywords if k.arg == "validation_alias"), None)
            if isinstance(alias, ast.Constant):
                names = [alias.value]
            elif isinstance(alias, ast.Call):
                names = [a.value for a in alias.args if isinstance(a, ast.Constant)]
            else:
                continue
            default = None
            if call.args:
                d = call.args[0]
                default = consts.get(d.id) if isinstance(d, ast.Name) else ast.literal_eval(d)
            out[stmt.target.id] = (names, default)
    if not out:
        raise SystemExit(f"check_terraform: no settings found in {path}")
    return out


def sidecar_get_routes(path: Path = AI_API) -> set[str]:
    """The paths of `@app.get("/path")` in the sidecar's HTTP application."""
    routes = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            if isinstance(node.func.value, ast.Name) and node.func.value.id == "app" and node.args:
                if isinstance(node.args[0], ast.Constant):
                    routes.add(node.args[0].value)
    return routes


SIDECAR = sidecar_settings()
SIDECAR_VARIABLES = {v for names, _ in SIDECAR.values() for v in names}
AI_PORT = int(SIDECAR["port"][1])

# Seed 004 §2.1 with the ports of SPEC §2 (the platform's own six ports are also checked against
# the binary's configuration defaults by tests/it/deploy_files.rs): ingestion 8080, query 8081,
# actions API 8082, actions health 8083, event handler + tsdb-writer health 8084, console 8085.
EXPECTED_PORTS = {
    "traefik": {80, 8180},
    "app": {8080, 8081, 8082, 8083, 8084, 8085},
    "mqtt-broker": {1883, 18083},
    "redpanda": {9092, 9644},
    "postgres": {5432},
    "ai-inference": {AI_PORT},  # the sidecar's default port (config.py)
}
STATEFUL = {"postgres", "redpanda", "mqtt-broker"}
PUBLIC_PORTS = {80, 1883}
DASHBOARD_PORTS = {8180, 18083, 9644}
INTERNAL_ONLY_PORTS = {5432, 9092, 8080, 8081, 8082, 8083, 8084, 8085, AI_PORT}
# The app's ports that answer the probes (/livez, /readyz, /health): all but the actions API's,
# whose probes are on its health port 8083.
APP_PROBE_PORTS = {8080, 8081, 8083, 8084, 8085}
CONSOLE_PORT = 8085
TASK_CPU, TASK_MEMORY = 1024, 2048
# A plain environment variable whose name says it holds a secret (…_PASSWORD, …_SECRET, …).
SECRET_LIKE = re.compile(r"(^|_)(PASSWORD|SECRET|TOKEN|PRIVATE_KEY|SECRET_KEY)$", re.IGNORECASE)


# --- python-hcl2 output, normalised --------------------------------------------------------------
# python-hcl2 (8.x) keeps string literals quoted ('"app"'), marks blocks with "__is_block__" and
# renders expressions as "${...}". `norm` strips the quotes and markers so values compare plainly.


def unquote(s: str) -> str:
    if len(s) >= 2 and s[0] == '"' and s[-1] == '"':
        return s[1:-1]
    return s


def norm(v):
    if isinstance(v, dict):
        return {unquote(k): norm(x) for k, x in v.items() if k != "__is_block__"}
    if isinstance(v, list):
        return [norm(x) for x in v]
    if isinstance(v, str):
        return unquote(v)
    return v


def load(deploy: Path) -> dict:
    """Every top-level block of every .tf file, merged: {"resource": {type: {name: body}}, ...}."""
    merged = {"resource": {}, "data": {}, "variable": {}, "output": {}, "locals": {}, "terraform": []}
    files = sorted(deploy.glob("*.tf"))
    if not files:
        raise SystemExit(f"check_terraform: no .tf files in {deploy}")
    for f in files:
        with f.open() as fh:
            doc = norm(hcl2.load(fh))
        for block in doc.get("resource", []):
            for rtype, by_name in block.items():
                merged["resource"].setdefault(rtype, {}).update(by_name)
        for block in doc.get("data", []):
            for dtype, by_name in block.items():
                merged["data"].setdefault(dtype, {}).update(by_name)
        for block in doc.get("variable", []):
            merged["variable"].update(block)
        for block in doc.get("output", []):
            merged["output"].update(block)
        for block in doc.get("locals", []):
            merged["locals"].update(block)
        merged["terraform"].extend(doc.get("terraform", []))
    return merged


def as_int(v):
    try:
        return int(str(v))
    except (TypeError, ValueError):
        return None


def local_ref(expr) -> str | None:
    """'${jsonencode(local.x)}' or '${local.x}' -> 'x'."""
    m = re.fullmatch(r"\$\{(?:jsonencode\()?local\.([A-Za-z0-9_]+)\)?\}", str(expr).strip())
    return m.group(1) if m else None


# --- the checks ----------------------------------------------------------------------------------


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


def run(deploy: Path) -> Checker:
    c = Checker()
    tf = load(deploy)
    res = tf["resource"]

    for name in ("variables.tf", "outputs.tf", "versions.tf", "README.md"):
        c.check((deploy / name).is_file(), f"deploy/{name} exists")
    providers = {}
    for t in tf["terraform"]:
        for rp in t.get("required_providers", []):
            providers.update(rp)
    c.check(
        providers.get("aws", {}).get("source") == "hashicorp/aws",
        "versions.tf requires the hashicorp/aws provider",
        str(providers),
    )

    # Task definition ------------------------------------------------------------------------------
    tds = res.get("aws_ecs_task_definition", {})
    if not c.check(len(tds) == 1, "exactly one aws_ecs_task_definition", f"found {sorted(tds)}"):
        return c
    (td_name, td), = tds.items()
    c.check(as_int(td.get("cpu")) == TASK_CPU, f"task cpu is {TASK_CPU} (1 vCPU)", f"got {td.get('cpu')!r}")
    c.check(as_int(td.get("memory")) == TASK_MEMORY, f"task memory is {TASK_MEMORY} (2 GB)", f"got {td.get('memory')!r}")
    c.check(td.get("network_mode") == "awsvpc", "network_mode awsvpc", f"got {td.get('network_mode')!r}")
    c.check("FARGATE" in (td.get("requires_compatibilities") or []), "requires FARGATE")

    ref = local_ref(td.get("container_definitions", ""))
    defs = tf["locals"].get(ref) if ref else None
    if not c.check(
        isinstance(defs, list) and all(isinstance(d, dict) for d in defs),
        "container_definitions is jsonencode(local.<list of literal objects>)",
        f"got {td.get('container_definitions')!r}",
    ):
        return c
    by_name = {d.get("name"): d for d in defs}
    c.check(
        len(defs) == len(by_name) and set(by_name) == set(EXPECTED_PORTS),
        "the six containers of seed 004 §2.1: " + ", ".join(sorted(EXPECTED_PORTS)),
        f"got {[d.get('name') for d in defs]}",
    )

    for name, want in sorted(EXPECTED_PORTS.items()):
        d = by_name.get(name)
        if d is None:
            continue
        mappings = d.get("portMappings")
        ports = {as_int(m.get("containerPort")) for m in mappings} if isinstance(mappings, list) else None
        c.check(ports == want, f"{name} ports {sorted(want)}", f"got {mappings!r}")
        c.check(d.get("essential") is True, f"{name} is essential")
        hc = d.get("healthCheck")
        c.check(
            isinstance(hc, dict) and isinstance(hc.get("command"), list) and hc["command"][:1] in (["CMD"], ["CMD-SHELL"]),
            f"{name} has a health check",
            f"got {hc!r}",
        )
        lc = d.get("logConfiguration") or {}
        group = str((lc.get("options") or {}).get("awslogs-group", ""))
        c.check(
            lc.get("logDriver") == "awslogs" and "aws_cloudwatch_log_group." in group,
            f"{name} logs to a CloudWatch log group",
            f"got {lc!r}",
        )
        env = d.get("environment", [])
        env_names = [e.get("name") for e in env] if isinstance(env, list) else None
        leaked = [n for n in env_names or [] if SECRET_LIKE.search(str(n))]
        c.check(env_names is not None and not leaked, f"{name} has no secret in its plain environment", f"{leaked or env!r}")
        for s in d.get("secrets") or []:
            c.check(
                "aws_secretsmanager_secret." in str(s.get("valueFrom", "")),
                f"{name} secret {s.get('name')} comes from Secrets Manager",
                f"got {s!r}",
            )

    # Health checks must be able to gate dependencies.
    for name, d in by_name.items():
        for dep in d.get("dependsOn") or []:
            target = by_name.get(dep.get("containerName"))
            c.check(
                target is not None and (dep.get("condition") != "HEALTHY" or target.get("healthCheck")),
                f"{name} depends on {dep.get('containerName')} ({dep.get('condition')})",
                "unknown container or no health check",
            )

    # The platform's settings (SPEC §3, §11) ------------------------------------------------------
    app = by_name.get("app", {})
    app_env = {e.get("name"): e.get("value") for e in app.get("environment") or []}
    for var, want in (("CJ_AUTH_MODE", "gateway"), ("CJ_BIND_ADDR", "0.0.0.0"), ("CJ_KAFKA_BROKERS", "localhost:9092")):
        c.check(app_env.get(var) == want, f"app {var}={want}", f"got {app_env.get(var)!r}")
    c.check(str(app_env.get("CJ_MQTT_URL", "")).startswith("mqtt://localhost:1883"), "app CJ_MQTT_URL is the task's EMQX")
    app_secrets = {s.get("name"): str(s.get("valueFrom", "")) for s in app.get("secrets") or []}
    for var, secret in (("CJ_DATABASE_URL", "database"), ("CJ_JWT_SECRET", "jwt"), ("CJ_MQTT_PASSWORD", "mqtt")):
        c.check(
            f"aws_secretsmanager_secret.{secret}." in app_secrets.get(var, ""),
            f"app {var} from the {secret} secret",
            f"got {app_secrets.get(var)!r}",
        )
    # Liveness on every probe port (a database blip must not get the task replaced), each probe
    # within the check's timeout when they run in turn.
    app_hc_cmd = (app.get("healthCheck") or {}).get("command") or []
    app_hc = " ".join(str(x) for x in app_hc_cmd)
    app_asked = set(re.findall(r"://([A-Za-z0-9_.\-]+):(\d+)(/[A-Za-z0-9_./\-]*)", app_hc))
    c.check(
        {(int(p), path) for _, p, path in app_asked} == {(p, "/livez") for p in APP_PROBE_PORTS}
        and all(h in ("localhost", "127.0.0.1") for h, _, _ in app_asked),
        f"app health check asks only localhost /livez, on {sorted(APP_PROBE_PORTS)}",
        app_hc,
    )
    probe_times = [int(t) for t in re.findall(r"--max-time\s+(\d+)", app_hc)]
    hc_timeout = as_int((app.get("healthCheck") or {}).get("timeout"))
    c.check(
        len(probe_times) == len(app_asked) and hc_timeout is not None and sum(probe_times) < hc_timeout,
        "app health check: every probe has --max-time and together they end before its timeout",
        f"--max-time {probe_times}, timeout {hc_timeout}",
    )
    app_port_names = {m.get("name"): as_int(m.get("containerPort")) for m in app.get("portMappings") or []}
    c.check(app_port_names.get("console") == CONSOLE_PORT, f"app port mapping 'console' is {CONSOLE_PORT}", f"got {app_port_names}")
    pg_secrets = {s.get("name"): str(s.get("valueFrom", "")) for s in by_name.get("postgres", {}).get("secrets") or []}
    c.check("aws_secretsmanager_secret.database." in pg_secrets.get("POSTGRES_PASSWORD", ""), "postgres password from the database secret")
    mq_secrets = {s.get("name"): str(s.get("valueFrom", "")) for s in by_name.get("mqtt-broker", {}).get("secrets") or []}
    c.check("aws_secretsmanager_secret.mqtt." in mq_secrets.get("MQTT_PASSWORD", ""), "mqtt-broker user password from the mqtt secret")
    mq_env = {e.get("name"): e.get("value") for e in by_name.get("mqtt-broker", {}).get("environment") or []}
    c.check(
        mq_env.get("EMQX_AUTHENTICATION__1__BACKEND") == "built_in_database"
        and mq_env.get("EMQX_AUTHENTICATION__1__MECHANISM") == "password_based",
        "mqtt-broker uses EMQX built-in username/password authentication",
    )
    # Nothing else may listen on the platform's ports inside the shared network namespace.
    rp_args = " ".join(str(a) for a in by_name.get("redpanda", {}).get("command") or [])
    clashes = sorted(p for p in EXPECTED_PORTS["app"] if re.search(rf":{p}\b", rp_args))
    c.check(not clashes, "redpanda listens on none of the app's ports (pandaproxy moved off 8082)", f"clashes on {clashes}")
    c.check("log_retention_ms=86400000" in rp_args, "redpanda retention 24 h")
    c.check(
        mq_env.get("EMQX_LISTENERS__WS__DEFAULT__ENABLE") == "false" and mq_env.get("EMQX_LISTENERS__WSS__DEFAULT__ENABLE") == "false",
        "mqtt-broker WebSocket listeners (8083/8084) are off",
    )

    # The ai-inference sidecar (SPEC §9) -------------------------------------------------------------
    ai = by_name.get("ai-inference", {})
    ai_env = {e.get("name"): str(e.get("value")) for e in ai.get("environment") or []}
    ai_secrets = {s.get("name"): str(s.get("valueFrom", "")) for s in ai.get("secrets") or []}
    cj = sorted(n for n in [*ai_env, *ai_secrets] if str(n).startswith("CJ_"))
    unknown = [n for n in cj if n not in SIDECAR_VARIABLES]
    c.check(not unknown, "ai-inference sets only variables the sidecar reads", f"unknown {unknown}; reads {sorted(SIDECAR_VARIABLES)}")

    def ai_setting(field: str):
        """(variable, value) the sidecar takes for a field: the first of its variables that is set
        (a secret's value is its valueFrom), else (None, default)."""
        names, default = SIDECAR[field]
        for n in names:
            if n in ai_env:
                return n, ai_env[n]
            if n in ai_secrets:
                return n, ai_secrets[n]
        return None, default

    c.check(str(ai_setting("port")[1]) == str(AI_PORT), f"ai-inference listens on the sidecar's port {AI_PORT}", f"got {ai_setting('port')}")
    c.check(ai_setting("bind_addr")[1] == "0.0.0.0", "ai-inference CJ_BIND_ADDR=0.0.0.0", f"got {ai_setting('bind_addr')}")
    ai_hc = " ".join(str(x) for x in (ai.get("healthCheck") or {}).get("command") or [])
    # Liveness only (a database blip must not get the task replaced); readiness is Traefik's check.
    asked = set(re.findall(r"://([A-Za-z0-9_.\-]+):(\d+)(/[A-Za-z0-9_./\-]*)", ai_hc))
    c.check(
        {"/livez", "/readyz", "/health"} <= sidecar_get_routes()
        and {(p, path) for _, p, path in asked} == {(str(AI_PORT), "/livez")}
        and all(h in ("localhost", "127.0.0.1") for h, _, _ in asked),
        f"ai-inference health check asks only localhost:{AI_PORT}/livez (a GET route of {AI_API.name})",
        ai_hc,
    )
    app_ports = {m.get("name"): as_int(m.get("containerPort")) for m in app.get("portMappings") or []}
    ingest = str(ai_setting("ingest_url")[1])
    c.check(
        ingest.rstrip("/") == f"http://localhost:{app_ports.get('ingestion')}",
        "ai-inference CJ_AI_INGEST_URL is the app's ingestion port on the task's localhost",
        f"got {ingest!r}, app ports {app_ports}",
    )
    c.check(
        ai_setting("kafka_brokers")[1] == app_env.get("CJ_KAFKA_BROKERS"),
        "ai-inference uses the app's brokers",
        f"got {ai_setting('kafka_brokers')}",
    )
    db_var, db_from = ai_setting("database_url")
    c.check(
        db_var in ai_secrets and "aws_secretsmanager_secret.database." in db_from,
        "ai-inference database URL from the database secret",
        f"got {db_var}={db_from!r}",
    )
    tok_var, _ = ai_setting("ingest_token")
    jwt_var, jwt_from = ai_setting("jwt_secret")
    c.check(
        tok_var in ai_secrets or (jwt_var in ai_secrets and "aws_secretsmanager_secret.jwt." in jwt_from),
        "ai-inference ingest credentials (token, or the JWT secret) from Secrets Manager",
        f"token {tok_var}, jwt {jwt_var}={jwt_from!r}",
    )
    for field in ("jwt_issuer", "jwt_audience", "topic_prefix"):
        names = SIDECAR[field][0]
        mine = next((ai_env[n] for n in names if n in ai_env), None)
        apps = next((app_env[n] for n in names if n in app_env), None)
        c.check(mine == apps, f"ai-inference {names[0]} is the app's", f"ai-inference {mine!r}, app {apps!r}")
    ai_deps = {d.get("containerName"): d.get("condition") for d in ai.get("dependsOn") or []}
    c.check(
        all(ai_deps.get(n) == "HEALTHY" for n in ("postgres", "redpanda", "app")),
        "ai-inference starts when postgres, redpanda and app are healthy",
        f"got {ai_deps}",
    )

    # Secrets exist and the execution role may read them.
    secrets = res.get("aws_secretsmanager_secret", {})
    c.check({"jwt", "database", "mqtt"} <= set(secrets), "Secrets Manager secrets jwt, database, mqtt", f"got {sorted(secrets)}")
    iam_text = str(tf["data"].get("aws_iam_policy_document", {}))
    c.check(
        "secretsmanager:GetSecretValue" in iam_text and all(f"aws_secretsmanager_secret.{s}.arn" in iam_text for s in ("jwt", "database", "mqtt")),
        "the execution role may read the three secrets",
    )

    # EFS volumes for the stateful three ---------------------------------------------------------
    volumes = {v.get("name"): v for v in td.get("volume") or []}
    efs_volumes = {n for n, v in volumes.items() if v.get("efs_volume_configuration")}
    for name in sorted(EXPECTED_PORTS):
        d = by_name.get(name, {})
        mounted = {m.get("sourceVolume") for m in d.get("mountPoints") or []}
        on_efs = mounted & efs_volumes
        if name in STATEFUL:
            c.check(len(on_efs) == 1, f"{name} keeps its data on an EFS volume", f"mounts {sorted(mounted)}")
        else:
            c.check(not mounted, f"{name} is stateless (no volume)", f"mounts {sorted(mounted)}")
        c.check(mounted <= set(volumes), f"{name} mounts only declared volumes", f"mounts {sorted(mounted)}")
    for vname in sorted(efs_volumes):
        cfg = volumes[vname]["efs_volume_configuration"]
        cfg = cfg[0] if isinstance(cfg, list) else cfg
        auth = cfg.get("authorization_config") or [{}]
        auth = auth[0] if isinstance(auth, list) else auth
        c.check(
            cfg.get("transit_encryption") == "ENABLED" and "aws_efs_access_point." in str(auth.get("access_point_id", "")),
            f"EFS volume {vname}: encrypted in transit, through an access point",
        )
    fs = res.get("aws_efs_file_system", {})
    c.check(bool(fs) and all(v.get("encrypted") is True for v in fs.values()), "EFS file system encrypted at rest")

    # CloudWatch log groups -----------------------------------------------------------------------
    groups = res.get("aws_cloudwatch_log_group", {})
    c.check(bool(groups), "CloudWatch log groups declared")
    names_local = tf["locals"].get("container_names")
    if isinstance(names_local, list):
        c.check(set(names_local) == set(EXPECTED_PORTS), "a log group per container", f"got {names_local}")

    # ECR ---------------------------------------------------------------------------------------
    ecr = res.get("aws_ecr_repository", {})
    c.check({"app", "ai_inference"} <= set(ecr), "ECR repositories app and ai-inference", f"got {sorted(ecr)}")
    for cname, repo in (("app", "app"), ("ai-inference", "ai_inference")):
        image = by_name.get(cname, {}).get("image")
        image = tf["locals"].get(local_ref(image) or "", image)
        c.check(f"aws_ecr_repository.{repo}." in str(image), f"{cname} image from its ECR repository", f"got {image!r}")

    # Security groups (ADR-0006) -------------------------------------------------------------------
    c.check(
        not any(sg.get("ingress") for sg in res.get("aws_security_group", {}).values()),
        "no inline ingress blocks (every rule is a separate resource)",
    )
    public_ports = {as_int(v) for v in (tf["locals"].get("public_ports") or {}).values()}
    dash_ports = {as_int(v) for v in (tf["locals"].get("dashboard_ports") or {}).values()}
    c.check(public_ports == PUBLIC_PORTS, f"public ports {sorted(PUBLIC_PORTS)}", f"got {sorted(public_ports)}")
    c.check(dash_ports == DASHBOARD_PORTS, f"dashboard ports {sorted(DASHBOARD_PORTS)}", f"got {sorted(dash_ports)}")
    rules = res.get("aws_vpc_security_group_ingress_rule", {})
    public_rule, dash_rule = rules.get("public", {}), rules.get("dashboards", {})
    c.check(
        "var.public_cidr_blocks" in str(tf["locals"].get("public_rules")) and "local.public_rules" in str(public_rule.get("for_each")),
        "public rules open only the public ports",
    )
    c.check(
        "var.admin_cidr_blocks" in str(tf["locals"].get("dashboard_rules")) and "local.dashboard_rules" in str(dash_rule.get("for_each")),
        "dashboard rules are limited to var.admin_cidr_blocks",
    )
    admin_var = tf["variable"].get("admin_cidr_blocks", {})
    c.check("default" not in admin_var and bool(admin_var.get("validation")), "admin_cidr_blocks has no default and is validated")
    others = {}
    for rname, r in rules.items():
        if rname in ("public", "dashboards"):
            continue
        others[rname] = r
        lo, hi = as_int(r.get("from_port")), as_int(r.get("to_port"))
        if lo is None or hi is None:
            c.check(False, f"ingress rule {rname} has literal ports", f"{r!r}")
            continue
        exposed = {p for p in INTERNAL_ONLY_PORTS | PUBLIC_PORTS | DASHBOARD_PORTS if lo <= p <= hi}
        c.check(
            not exposed and "aws_security_group.task." not in str(r.get("security_group_id")),
            f"ingress rule {rname} ({lo}-{hi}) opens no task port",
            f"exposes {sorted(exposed)}",
        )
    for p in sorted(INTERNAL_ONLY_PORTS):
        c.check(p not in public_ports | dash_ports, f"port {p} is internal only (no ingress)")
    return c


# --- the gateway the task ships (../traefik) and the full-stack compose file ---------------------

CONSOLE_SERVICE_URL = f"http://app:{CONSOLE_PORT}"
# Console paths that need a session (ForwardAuth), one per kind of page or form.
CONSOLE_GUARDED = ["/console", "/console/", "/console/devices", "/console/devices/d-1", "/console/devices/d-1/series",
                   "/console/dead-letters", "/console/dead-letters/tsdb/1/replay", "/console/docs", "/console/docs/query.yaml",
                   "/console/logout"]
# Its Server-Sent-Events streams: guarded, and never buffered.
CONSOLE_LIVE = ["/console/live/overview"]
# What the console itself leaves open: the login form (GET, POST) and the static assets.
CONSOLE_OPEN = ["/console/login", "/console/assets/console.js", "/console/assets/vendor/htmx.min.js"]
# Never routed: the probes, the metrics, the verify endpoint.
UNROUTED = ["/livez", "/readyz", "/health", "/metrics", "/internal/auth/verify", "/consoles", "/console-x"]
# An SSE stream must outlive a minute (the old 60s timeouts cut it); 0 is "no timeout".
MIN_STREAM_SECONDS = 10 * 60


def duration_seconds(v) -> float | None:
    """Traefik durations: an integer (seconds) or Go's '1h30m', '90s', '250ms'."""
    if isinstance(v, (int, float)):
        return float(v)
    text = str(v).strip()
    if re.fullmatch(r"\d+", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    unit = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * unit[u] for n, u in parts)


class TraefikRouter:
    TERM = re.compile(r"^(PathPrefix|Path)\(`([^`]+)`\)$")

    def __init__(self, name: str, body: dict) -> None:
        self.name = name
        self.rule = str(body.get("rule", ""))
        self.terms = []
        for t in self.rule.split("||"):
            m = self.TERM.match(t.strip())
            self.terms.append((m.group(1) == "PathPrefix", m.group(2)) if m else None)
        # Traefik's default priority is the length of the rule.
        self.priority = int(body["priority"]) if "priority" in body else len(self.rule)
        self.service = str(body.get("service", "")).split("@")[0]
        self.middlewares = [str(m).split("@")[0] for m in body.get("middlewares") or []]
        self.entry_points = body.get("entryPoints") or []

    @property
    def parsed(self) -> bool:
        return all(t is not None for t in self.terms)

    def matches(self, path: str) -> bool:
        return any(t and (path.startswith(t[1]) if t[0] else path == t[1]) for t in self.terms)


def traefik_dynamic(traefik: Path) -> dict:
    """The dynamic files merged under `http`, as ecs.tf merges them."""
    http: dict = {}
    for f in sorted((traefik / "dynamic").glob("*.yaml")):
        for section, items in (yaml.safe_load(f.read_text()) or {}).get("http", {}).items():
            http.setdefault(section, {}).update(items or {})
    return http


def check_gateway(c: Checker, root: Path) -> None:
    traefik = root / "traefik"
    http = traefik_dynamic(traefik)
    middlewares = http.get("middlewares", {})
    services = http.get("services", {})
    routers = [TraefikRouter(n, b) for n, b in http.get("routers", {}).items()]
    bad = [r.name for r in routers if not r.parsed]
    c.check(not bad, "traefik routers: rules are Path/PathPrefix terms joined by ||", f"unparsed {bad}")

    def kind(name: str) -> str:
        m = middlewares.get(name) or {}
        return next(iter(m), "undefined")

    auth = [n for n, m in middlewares.items() if "forwardAuth" in (m or {})]
    if not c.check(len(auth) == 1, "traefik: one forwardAuth middleware", f"got {auth}"):
        return
    fa = middlewares[auth[0]]["forwardAuth"]
    req_headers = fa.get("authRequestHeaders")
    # Unset, Traefik forwards every request header; set, only those listed.
    c.check(
        req_headers is None or {"Authorization", "Cookie"} <= {str(h).title() for h in req_headers},
        "ForwardAuth forwards Authorization and Cookie (the console's session) to the verify endpoint",
        f"authRequestHeaders {req_headers}",
    )
    c.check(
        re.fullmatch(r"http://app:8080/internal/auth/verify", str(fa.get("address", ""))) is not None,
        "ForwardAuth asks the ingestion port's /internal/auth/verify",
        str(fa.get("address")),
    )

    def winner(path: str):
        """The router Traefik picks for a path on the web entrypoint: the highest priority."""
        hits = sorted((r for r in routers if "web" in r.entry_points and r.matches(path)), key=lambda r: -r.priority)
        if len(hits) > 1 and hits[0].priority == hits[1].priority:
            return None, f"{hits[0].name} and {hits[1].name} tie at priority {hits[0].priority}"
        return (hits[0], "") if hits else (None, "no router matches")

    console = services.get("console", {}).get("loadBalancer", {})
    c.check(
        [s.get("url") for s in console.get("servers") or []] == [CONSOLE_SERVICE_URL],
        f"traefik service console is {CONSOLE_SERVICE_URL} (ecs.tf rewrites app: to localhost:)",
        f"got {console.get('servers')}",
    )
    c.check(CONSOLE_PORT in EXPECTED_PORTS["app"], f"the console port {CONSOLE_PORT} is one of the app's")
    c.check(
        (console.get("healthCheck") or {}).get("path") == "/readyz" and "port" not in (console.get("healthCheck") or {}),
        "traefik service console: health check on its own port's /readyz",
        f"got {console.get('healthCheck')}",
    )
    c.check(console.get("passHostHeader") is not False, "traefik service console keeps the Host (the console checks Origin against it)")

    for path in CONSOLE_GUARDED + CONSOLE_LIVE + CONSOLE_OPEN:
        r, why = winner(path)
        if not c.check(r is not None and r.service == "console", f"{path} is routed to the console", why or (r and f"{r.name} → {r.service}")):
            continue
        kinds = [kind(m) for m in r.middlewares]
        guarded = auth[0] in r.middlewares
        c.check("undefined" not in kinds, f"{path}: router {r.name}'s middlewares are defined", f"{r.middlewares}")
        c.check("rateLimit" in kinds, f"{path}: router {r.name} is rate-limited", f"{r.middlewares}")
        if path in CONSOLE_OPEN:
            c.check(not guarded, f"{path}: router {r.name} is open (no ForwardAuth)", f"{r.middlewares}")
        else:
            c.check(guarded, f"{path}: router {r.name} goes through ForwardAuth", f"{r.middlewares}")
        if path in CONSOLE_LIVE:
            # `buffering` holds the whole response until the service ends it: an SSE stream never
            # reaches the browser.
            c.check("buffering" not in kinds, f"{path}: router {r.name} does not buffer (Server-Sent Events)", f"{r.middlewares}")
        else:
            c.check("buffering" in kinds, f"{path}: router {r.name} limits the body size", f"{r.middlewares}")
        if guarded and "buffering" in kinds:
            c.check(kinds.index("forwardAuth") < kinds.index("buffering"), f"{path}: authenticated before the body is buffered")
    # Only the console's own open paths skip ForwardAuth.
    for r in routers:
        if auth[0] in r.middlewares:
            continue
        c.check(
            all(t in ((False, "/console/login"), (True, "/console/assets/")) for t in r.terms),
            f"router {r.name} skips ForwardAuth only for /console/login and /console/assets/",
            r.rule,
        )
    for path in UNROUTED:
        r, _ = winner(path)
        c.check(r is None, f"{path} is not routed", r and r.name)

    # The web entrypoint's timeouts end a request that outlives them, streams included.
    st = yaml.safe_load((traefik / "traefik.yaml").read_text())
    web = (st.get("entryPoints") or {}).get("web") or {}
    timeouts = (web.get("transport") or {}).get("respondingTimeouts") or {}
    for t in ("readTimeout", "writeTimeout"):
        # Traefik v3's defaults: readTimeout 60s, writeTimeout 0.
        v = timeouts.get(t, "60s" if t == "readTimeout" else 0)
        sec = duration_seconds(v)
        c.check(
            sec is not None and (sec == 0 or sec >= MIN_STREAM_SECONDS),
            f"traefik web {t} lets an SSE stream stay open (0 or at least {MIN_STREAM_SECONDS // 60} min)",
            f"got {v!r}",
        )

    # The full-stack compose file: the same ports and probes as the task ------------------------
    compose = yaml.safe_load((root / "docker-compose" / "docker-compose.fullstack.yaml").read_text())
    app = (compose.get("services") or {}).get("app") or {}
    exposed = {int(str(p)) for p in app.get("expose") or []}
    c.check(exposed == EXPECTED_PORTS["app"], f"compose app exposes {sorted(EXPECTED_PORTS['app'])}", f"got {sorted(exposed)}")
    c.check(not app.get("ports"), "compose app publishes no port (the APIs and the console go through Traefik)", f"got {app.get('ports')}")
    test = (app.get("healthcheck") or {}).get("test") or []
    hc = " ".join(str(x) for x in test) if isinstance(test, list) else str(test)
    asked = set(re.findall(r"://([A-Za-z0-9_.\-]+):(\d+)(/[A-Za-z0-9_./\-]*)", hc))
    c.check(
        {(int(p), path) for _, p, path in asked} == {(p, "/livez") for p in APP_PROBE_PORTS},
        f"compose app health check asks /livez on {sorted(APP_PROBE_PORTS)}",
        hc,
    )
    probe_times = [int(t) for t in re.findall(r"--max-time\s+(\d+)", hc)]
    timeout = duration_seconds((app.get("healthcheck") or {}).get("timeout", "30s"))
    c.check(
        len(probe_times) == len(asked) and timeout is not None and sum(probe_times) < timeout,
        "compose app health check: every probe has --max-time and together they end before its timeout",
        f"--max-time {probe_times}, timeout {timeout}",
    )


def main() -> int:
    deploy = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "deploy"
    print(f"check_terraform: {deploy}")
    c = run(deploy)
    check_gateway(c, deploy.resolve().parent)
    print(f"{c.passed} passed, {c.failed} failed")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
