//! Static checks of the deployment files against the binary (SPEC §14): there is no container
//! engine here, so the Dockerfile, the compose files, Traefik's configuration and the Terraform are
//! read as data and every port, route, health check and `CJ_*` variable in them is compared with
//! what the code itself says — the configuration parser (`Config::known_variables()`, the defaults
//! of `Config::from_map`), the services' route tables (`ROUTES`, `query::routes()`, the consumers'
//! DLQ API `dlq::api::ROUTES`), ports (`Service::ALL`) and scope table (`scope_rules()`), and for
//! the ai-inference sidecar its settings class (`ai-inference/ai_inference/config.py`: variable
//! names and defaults) and its HTTP routes (`ai_inference/api.py`). Nothing is copied from SPEC.
//! The Terraform task definition is checked in more depth by tests/deploy/check_terraform.py.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use axum::http::Method;
use cornjacket::config::{Config, DEFAULT_DATABASE_URL};
use cornjacket::infra::auth::required_scope;
use cornjacket::infra::dlq;
use cornjacket::services::{Service, actions, ingestion, query, scope_rules};
use regex::Regex;
use serde_yaml::{Mapping, Value};

const SKELETON: &str = "docker-compose/docker-compose.yaml";
const FULLSTACK: &str = "docker-compose/docker-compose.fullstack.yaml";
const TRAEFIK_STATIC: &str = "traefik/traefik.yaml";
const TRAEFIK_DYNAMIC_DIR: &str = "traefik/dynamic";
/// The compose service that runs the platform image.
const APP_SERVICE: &str = "app";
/// The compose service (and ECS container) that runs the ai-inference sidecar.
const AI_SERVICE: &str = "ai-inference";
/// The sidecar's directory: its image's build context.
const AI_DIR: &str = "ai-inference";
/// The sidecar's settings class (every variable it reads, with its default).
const AI_CONFIG: &str = "ai-inference/ai_inference/config.py";
/// The sidecar's HTTP application (its routes).
const AI_API: &str = "ai-inference/ai_inference/api.py";
/// Liveness: the process serves; asks no dependency. What container/task health checks ask (a
/// failure restarts or replaces the container).
const LIVENESS: &str = "/livez";
/// Readiness: the deep check (= `/health`). What the gateway's load-balancer checks ask (a failure
/// takes the server out of traffic).
const READINESS: &str = "/readyz";
/// Every probe path a port of the binary or the sidecar serves beside its API.
const PROBES: [&str; 3] = [LIVENESS, READINESS, "/health"];

// --- reading files --------------------------------------------------------------------------------

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml(rel: &str) -> Value {
    serde_yaml::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} does not parse as YAML: {e}"))
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn mapping<'a>(v: &'a Value, what: &str) -> &'a Mapping {
    v.as_mapping()
        .unwrap_or_else(|| panic!("{what} should be a mapping, got {v:?}"))
}

fn entries<'a>(v: &'a Value, what: &str) -> Vec<(String, &'a Value)> {
    mapping(v, what)
        .iter()
        .map(|(k, v)| (scalar(k).expect("string keys"), v))
        .collect()
}

// --- what the binary says -------------------------------------------------------------------------

fn defaults() -> Config {
    Config::from_map(&HashMap::new()).expect("the configuration defaults are valid")
}

fn known_variables() -> BTreeSet<String> {
    Config::known_variables().into_iter().collect()
}

/// A configuration's ports by service.
fn ports_of(cfg: &Config) -> BTreeMap<&'static str, u16> {
    let p = &cfg.ports;
    BTreeMap::from([
        ("ingestion", p.ingestion),
        ("query", p.query),
        ("actions", p.actions),
        ("actions_health", p.actions_health),
        ("eventhandler_health", p.eventhandler_health),
        ("console", p.console),
    ])
}

/// The binary's ports by service, from the configuration defaults.
fn app_ports() -> BTreeMap<&'static str, u16> {
    ports_of(&defaults())
}

fn app_port_set() -> BTreeSet<u16> {
    app_ports().into_values().collect()
}

/// The ports on which `cornjacket serve` answers the probes (`/livez`, `/readyz`, `/health`): each
/// service's own health port, else its main port (services that share a port, like the event
/// handler and the tsdb-writer, share it).
fn app_health_ports() -> BTreeSet<u16> {
    let cfg = defaults();
    Service::ALL
        .iter()
        .map(|s| s.health_port(&cfg).unwrap_or_else(|| s.port(&cfg)))
        .collect()
}

/// The port that answers the probes for traffic sent to `port` (the actions API's is its health
/// port).
fn health_port_for(port: u16) -> u16 {
    let cfg = defaults();
    let owners: BTreeSet<u16> = Service::ALL
        .iter()
        .filter(|s| s.port(&cfg) == port || s.health_port(&cfg) == Some(port))
        .map(|s| s.health_port(&cfg).unwrap_or_else(|| s.port(&cfg)))
        .collect();
    assert_eq!(
        owners.len(),
        1,
        "port {port} belongs to one service's health: {owners:?}"
    );
    owners.into_iter().next().unwrap()
}

/// Every (port, path) a health check command asks (`http://host:PORT/path`).
fn probes_in(cmd: &str) -> BTreeSet<(u16, String)> {
    Regex::new(r"https?://[A-Za-z0-9_.\-]+:(\d+)(/[A-Za-z0-9_.~/\-]*)?")
        .unwrap()
        .captures_iter(cmd)
        .map(|c| {
            (
                c[1].parse().unwrap(),
                c.get(2).map_or("/", |p| p.as_str()).to_string(),
            )
        })
        .collect()
}

/// A container (or task) health check: it asks liveness, and only liveness (never the deep
/// check, which would restart the container when a dependency blips), on exactly `ports`.
fn assert_liveness_check(what: &str, cmd: &str, ports: &BTreeSet<u16>) {
    let want: BTreeSet<(u16, String)> = ports.iter().map(|p| (*p, LIVENESS.to_string())).collect();
    assert!(!want.is_empty(), "{what}: no ports to check");
    assert_eq!(
        probes_in(cmd),
        want,
        "{what}: the health check should ask {LIVENESS} on every probe port {ports:?} and nothing else: '{cmd}'"
    );
}

/// A route template as a concrete path (`{type}` → `x`), for prefix matching.
fn concrete(path: &str) -> String {
    Regex::new(r"\{[^}]+\}")
        .unwrap()
        .replace_all(path, "x")
        .into_owned()
}

/// The consumers whose DLQ API `serve` runs, by the name in its paths (`{consumer}`: the
/// service's name, which tests/it/openapi.rs asks each port for), with the port that serves it: the
/// consumer service's health port (the event handler's and the tsdb-writer's are one, 8084).
fn dlq_consumers() -> Vec<(&'static str, u16)> {
    let cfg = defaults();
    [Service::Eventhandler, Service::Tsdb, Service::Actions]
        .into_iter()
        .map(|s| {
            (
                s.name(),
                s.health_port(&cfg).unwrap_or_else(|| s.port(&cfg)),
            )
        })
        .collect()
}

/// Every route of the binary with the port that serves it (a DLQ route once per consumer, its
/// `{consumer}` filled in).
fn routes_with_ports() -> Vec<(&'static str, String, u16)> {
    let ports = app_ports();
    let mut all = Vec::new();
    for (method, path) in ingestion::ROUTES {
        all.push((*method, path.to_string(), ports["ingestion"]));
    }
    for (method, path) in query::routes() {
        all.push((method, path.to_string(), ports["query"]));
    }
    for (method, path) in actions::ROUTES {
        all.push((*method, path.to_string(), ports["actions"]));
    }
    for (consumer, port) in dlq_consumers() {
        for (method, path) in dlq::api::ROUTES {
            all.push((*method, path.replace("{consumer}", consumer), port));
        }
    }
    for (method, path) in cornjacket::services::console::ROUTES {
        all.push((*method, path.to_string(), ports["console"]));
    }
    all
}

/// Routes meant for clients (through the gateway) versus internal ones (ForwardAuth's verify).
fn is_public(path: &str) -> bool {
    path.starts_with("/api/") || path == "/console" || path.starts_with("/console/")
}

// --- what the sidecar says -------------------------------------------------------------------------

/// One field of the sidecar's `Settings` class: the variables it is read from (the first is the
/// name an operator sets, the others aliases) and its default as written in Python.
struct SidecarSetting {
    field: String,
    vars: Vec<String>,
    default: Option<String>,
}

/// The arguments of the call whose '(' is at `open`, split at top-level commas (Python source).
fn call_args(text: &str, open: usize) -> Vec<String> {
    let mut args = Vec::new();
    let mut current = String::new();
    let mut depth = 0usize;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for ch in text[open..].chars() {
        if let Some(q) = quote {
            current.push(ch);
            if escaped {
                escaped = false;
            } else if ch == '\\' {
                escaped = true;
            } else if ch == q {
                quote = None;
            }
            continue;
        }
        match ch {
            '"' | '\'' => {
                quote = Some(ch);
                current.push(ch);
            }
            '(' | '[' | '{' => {
                depth += 1;
                if depth > 1 {
                    current.push(ch);
                }
            }
            ')' | ']' | '}' => {
                depth -= 1;
                if depth == 0 {
                    args.push(current.trim().to_string());
                    args.retain(|a| !a.is_empty());
                    return args;
                }
                current.push(ch);
            }
            ',' if depth == 1 => args.push(std::mem::take(&mut current).trim().to_string()),
            _ => current.push(ch),
        }
    }
    panic!("unbalanced call in Python source at byte {open}")
}

/// Every setting of the sidecar, parsed from `Field(default, ..., validation_alias=...)` in its
/// settings class: `validation_alias="X"` or `AliasChoices("X", "Y")`.
fn sidecar_settings() -> Vec<SidecarSetting> {
    let text = read(AI_CONFIG);
    // Module constants used as defaults (DEFAULT_DATABASE_URL = "...").
    let constants: HashMap<String, String> =
        Regex::new(r#"(?m)^([A-Z][A-Z0-9_]*)\s*=\s*"([^"]*)""#)
            .unwrap()
            .captures_iter(&text)
            .map(|c| (c[1].to_string(), c[2].to_string()))
            .collect();
    let literal = |v: &str| -> Option<String> {
        let v = v.trim();
        if v == "None" {
            None
        } else if let Some(inner) = v
            .strip_prefix('"')
            .and_then(|x| x.strip_suffix('"'))
            .or_else(|| v.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')))
        {
            Some(inner.to_string())
        } else {
            Some(constants.get(v).cloned().unwrap_or_else(|| v.to_string()))
        }
    };
    let field = Regex::new(r"(?m)^\s+([a-z_][a-z0-9_]*)\s*:[^=\n]*=\s*Field\(").unwrap();
    let keyword = Regex::new(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=").unwrap();
    let quoted = Regex::new(r#""([^"]+)"|'([^']+)'"#).unwrap();
    let settings: Vec<SidecarSetting> = field
        .captures_iter(&text)
        .map(|c| {
            let name = c[1].to_string();
            let args = call_args(&text, c.get(0).unwrap().end() - 1);
            let default = args
                .first()
                .filter(|a| !keyword.is_match(a))
                .and_then(|a| literal(a));
            let alias = args
                .iter()
                .find(|a| {
                    keyword
                        .captures(a)
                        .is_some_and(|k| &k[1] == "validation_alias")
                })
                .unwrap_or_else(|| panic!("{AI_CONFIG}: field {name} has no validation_alias"));
            let vars: Vec<String> = quoted
                .captures_iter(alias.split_once('=').unwrap().1)
                .map(|q| q.get(1).or(q.get(2)).unwrap().as_str().to_string())
                .collect();
            assert!(
                !vars.is_empty() && vars.iter().all(|v| v.starts_with("CJ_")),
                "{AI_CONFIG}: field {name} reads {vars:?}"
            );
            SidecarSetting {
                field: name,
                vars,
                default,
            }
        })
        .collect();
    assert!(
        !settings.is_empty(),
        "{AI_CONFIG}: no Field(..., validation_alias=...) found"
    );
    settings
}

/// Every environment variable the sidecar reads (with its aliases).
fn sidecar_variables() -> BTreeSet<String> {
    sidecar_settings()
        .into_iter()
        .flat_map(|s| s.vars)
        .collect()
}

/// The value a sidecar setting takes in a container whose environment is `env` (over the
/// sidecar image's ENV): the first of its variables that is set, else its default.
fn sidecar_value(env: &BTreeMap<String, String>, field: &str) -> Option<String> {
    let setting = sidecar_settings()
        .into_iter()
        .find(|s| s.field == field)
        .unwrap_or_else(|| panic!("{AI_CONFIG}: no setting named {field}"));
    let mut merged: BTreeMap<String, String> = dockerfile_env(&format!("{AI_DIR}/Dockerfile"))
        .into_iter()
        .collect();
    merged.extend(env.iter().map(|(k, v)| (k.clone(), v.clone())));
    setting
        .vars
        .iter()
        .find_map(|v| merged.get(v).filter(|x| !x.trim().is_empty()).cloned())
        .or(setting.default)
}

/// The GET routes of the sidecar's HTTP application (`@app.get("/path")`).
fn sidecar_get_routes() -> BTreeSet<String> {
    Regex::new(r#"@app\.get\(\s*"([^"]+)""#)
        .unwrap()
        .captures_iter(&read(AI_API))
        .map(|c| c[1].to_string())
        .collect()
}

/// The sidecar serves liveness, readiness and (for compatibility) `/health`; readiness is
/// `/health`'s own handler (its decorators stacked on the one function), so the two cannot drift.
fn assert_sidecar_serves_the_probes() {
    let routes = sidecar_get_routes();
    for probe in PROBES {
        assert!(
            routes.contains(probe),
            "{AI_API} serves GET {probe}: {routes:?}"
        );
    }
    let text = read(AI_API);
    let handler_of = |path: &str| -> String {
        let re = Regex::new(&format!(
            r#"(?m)^\s*@app\.get\(\s*"{}"[^\n]*\n(?:\s*@[^\n]*\n)*\s*(?:async\s+)?def\s+(\w+)"#,
            regex::escape(path)
        ))
        .unwrap();
        re.captures(&text)
            .unwrap_or_else(|| panic!("{AI_API}: no function under @app.get(\"{path}\")"))[1]
            .to_string()
    };
    assert_eq!(
        handler_of(READINESS),
        handler_of("/health"),
        "{AI_API}: {READINESS} answers with /health's handler"
    );
    assert_ne!(
        handler_of(LIVENESS),
        handler_of("/health"),
        "{AI_API}: {LIVENESS} must not run the deep check"
    );
}

// --- compose ----------------------------------------------------------------------------------

fn services(file: &str) -> Vec<(String, Value)> {
    let doc = yaml(file);
    entries(&doc["services"], &format!("{file}: services"))
        .into_iter()
        .map(|(k, v)| (k, v.clone()))
        .collect()
}

/// The services of the full stack (skeleton + overlay), as `docker compose -f ... -f ...` sees them.
fn all_services() -> BTreeMap<String, Value> {
    let mut all = BTreeMap::new();
    for file in [SKELETON, FULLSTACK] {
        for (name, svc) in services(file) {
            all.insert(name, svc);
        }
    }
    all
}

fn environment(svc: &Value) -> BTreeMap<String, String> {
    match &svc["environment"] {
        Value::Null => BTreeMap::new(),
        Value::Sequence(items) => items
            .iter()
            .map(|i| {
                let s = scalar(i).expect("environment entries are strings");
                let (k, v) = s.split_once('=').unwrap_or((&s, ""));
                (k.to_string(), v.to_string())
            })
            .collect(),
        m @ Value::Mapping(_) => entries(m, "environment")
            .into_iter()
            .map(|(k, v)| (k, scalar(v).unwrap_or_default()))
            .collect(),
        other => panic!("environment should be a list or a mapping, got {other:?}"),
    }
}

/// Compose interpolation with the defaults written in the file: `${X:-d}`/`${X-d}` → d, `${X}` → "".
fn interpolate(s: &str) -> String {
    let re = Regex::new(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}").unwrap();
    re.replace_all(s, |c: &regex::Captures| {
        if &c[0] == "$$" {
            "$".to_string()
        } else {
            c.get(2).map(|d| d.as_str().to_string()).unwrap_or_default()
        }
    })
    .into_owned()
}

/// The variable names a compose file interpolates (`${NAME...}`).
fn interpolated_names(text: &str) -> BTreeSet<String> {
    let re = Regex::new(r"\$\{([A-Za-z_][A-Za-z0-9_]*)").unwrap();
    re.captures_iter(text).map(|c| c[1].to_string()).collect()
}

/// A compose `ports` entry: (host port if published, container port).
fn port_entry(v: &Value) -> (Option<u16>, u16) {
    let num = |s: &str| -> u16 {
        s.parse()
            .unwrap_or_else(|_| panic!("port '{s}' should be a single number (no ranges)"))
    };
    match v {
        Value::Mapping(_) => (
            scalar(&v["published"]).map(|s| num(&s)),
            num(&scalar(&v["target"]).expect("long port syntax has a target")),
        ),
        _ => {
            let s = scalar(v).expect("port entries are strings or numbers");
            let s = s.split('/').next().unwrap();
            let parts: Vec<&str> = s.split(':').collect();
            let container = num(parts[parts.len() - 1]);
            let host = (parts.len() >= 2).then(|| num(parts[parts.len() - 2]));
            (host, container)
        }
    }
}

fn ports(svc: &Value) -> Vec<(Option<u16>, u16)> {
    svc["ports"]
        .as_sequence()
        .map(|s| s.iter().map(port_entry).collect())
        .unwrap_or_default()
}

fn healthcheck_text(svc: &Value) -> String {
    match &svc["healthcheck"]["test"] {
        Value::Sequence(parts) => parts
            .iter()
            .filter_map(scalar)
            .collect::<Vec<_>>()
            .join(" "),
        other => scalar(other).unwrap_or_default(),
    }
}

fn command_args(svc: &Value) -> Vec<String> {
    match &svc["command"] {
        Value::Sequence(parts) => parts.iter().filter_map(scalar).collect(),
        other => scalar(other)
            .map(|s| s.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default(),
    }
}

/// The numbers after ':' in a string ("internal://0.0.0.0:9092,external://0.0.0.0:19092").
fn ports_in(s: &str) -> Vec<u16> {
    Regex::new(r":(\d{2,5})\b")
        .unwrap()
        .captures_iter(s)
        .filter_map(|c| c[1].parse().ok())
        .collect()
}

fn service_with_image<'a>(all: &'a BTreeMap<String, Value>, needle: &str) -> (&'a str, &'a Value) {
    let found: Vec<_> = all
        .iter()
        .filter(|(_, s)| scalar(&s["image"]).is_some_and(|i| i.contains(needle)))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "exactly one compose service runs an image like '{needle}'"
    );
    (found[0].0.as_str(), found[0].1)
}

/// postgres://user:password@host:port/db?... → (user, password, host, port, db)
fn parse_pg_url(url: &str) -> (String, String, String, u16, String) {
    let re = Regex::new(r"^postgres(?:ql)?://([^:@/]+):([^@/]*)@([^:/]+):(\d+)/([^?]+)").unwrap();
    let c = re.captures(url).unwrap_or_else(|| {
        panic!("not a postgres URL with user, password, host, port and db: {url}")
    });
    (
        c[1].to_string(),
        c[2].to_string(),
        c[3].to_string(),
        c[4].parse().unwrap(),
        c[5].to_string(),
    )
}

#[test]
fn compose_files_parse_and_every_service_has_a_health_check() {
    for file in [SKELETON, FULLSTACK] {
        let list = services(file);
        assert!(!list.is_empty(), "{file}: no services");
        for (name, svc) in &list {
            let hc = healthcheck_text(svc);
            assert!(
                !hc.trim().is_empty(),
                "{file}: service {name} has no healthcheck"
            );
            assert!(
                scalar(&svc["image"]).is_some() || !svc["build"].is_null(),
                "{file}: service {name} has neither image nor build"
            );
        }
        // Named volumes used by services are declared at the top level.
        let doc = yaml(file);
        for (name, svc) in &list {
            for v in svc["volumes"].as_sequence().into_iter().flatten() {
                let v = scalar(v).unwrap_or_default();
                let source = v.split(':').next().unwrap_or_default();
                if !source.is_empty() && !source.starts_with('.') && !source.starts_with('/') {
                    assert!(
                        doc["volumes"].get(source).is_some(),
                        "{file}: service {name} uses volume '{source}', not declared under volumes:"
                    );
                }
            }
        }
    }
}

#[test]
fn every_cj_variable_in_the_deployment_files_is_read_by_the_program_that_gets_it() {
    let binary = known_variables();
    let sidecar = sidecar_variables();
    let either: BTreeSet<String> = binary.union(&sidecar).cloned().collect();
    let mut unknown = Vec::new();
    // The variables a compose service or ECS container may set: the sidecar's for the sidecar,
    // the binary's for the platform, none for the off-the-shelf containers.
    let readable = |name: &str| -> &BTreeSet<String> {
        if name == AI_SERVICE {
            &sidecar
        } else {
            &binary
        }
    };

    for file in [SKELETON, FULLSTACK] {
        for (name, svc) in services(file) {
            for var in environment(&svc).into_keys() {
                if var.starts_with("CJ_") && !readable(&name).contains(&var) {
                    unknown.push(format!("{file}: service {name} sets {var}"));
                }
            }
        }
        for var in interpolated_names(&read(file)) {
            if var.starts_with("CJ_") && !either.contains(&var) {
                unknown.push(format!("{file}: interpolates ${{{var}}}"));
            }
        }
    }
    for (var, _) in dockerfile_env("Dockerfile") {
        if var.starts_with("CJ_") && !binary.contains(&var) {
            unknown.push(format!("Dockerfile: ENV {var}"));
        }
    }
    let ai_dockerfile = format!("{AI_DIR}/Dockerfile");
    for (var, _) in dockerfile_env(&ai_dockerfile) {
        if var.starts_with("CJ_") && !sidecar.contains(&var) {
            unknown.push(format!("{ai_dockerfile}: ENV {var}"));
        }
    }
    let cj = Regex::new(r"\bCJ_[A-Z0-9_]*[A-Z0-9]\b").unwrap();
    let tf_files = terraform_files();
    assert!(!tf_files.is_empty(), "no deploy/*.tf files");
    for (file, text) in &tf_files {
        for m in cj.find_iter(text) {
            if !either.contains(m.as_str()) {
                unknown.push(format!("{file}: {}", m.as_str()));
            }
        }
    }
    let containers = tf_containers();
    for required in [APP_SERVICE, AI_SERVICE] {
        assert!(
            containers.contains_key(required),
            "the ECS task has no '{required}' container: {:?}",
            containers.keys()
        );
    }
    for (name, body) in &containers {
        for m in cj.find_iter(body) {
            let ok = match name.as_str() {
                APP_SERVICE | AI_SERVICE => readable(name).contains(m.as_str()),
                _ => false,
            };
            if !ok {
                unknown.push(format!("deploy: container {name} sets {}", m.as_str()));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "variables the program that gets them never reads (typo, wrong container, or not implemented yet):\n  {}\nbinary: {binary:?}\nsidecar ({AI_CONFIG}): {sidecar:?}",
        unknown.join("\n  ")
    );
}

#[test]
fn the_platform_container_environment_is_valid_for_the_binary() {
    let all = all_services();
    let app = all
        .get(APP_SERVICE)
        .unwrap_or_else(|| panic!("{FULLSTACK}: no '{APP_SERVICE}' service"));
    let env: HashMap<String, String> = environment(app)
        .into_iter()
        .map(|(k, v)| (k, interpolate(&v)))
        .collect();

    let cfg =
        Config::from_map(&env).unwrap_or_else(|e| panic!("{FULLSTACK}: app environment: {e}"));
    assert_eq!(
        env.get("CJ_AUTH_MODE").map(String::as_str),
        Some("gateway"),
        "behind Traefik the platform runs with CJ_AUTH_MODE=gateway (SPEC §11)"
    );
    assert!(
        cfg.bind_addr.is_unspecified(),
        "in a container the platform must bind every interface (CJ_BIND_ADDR=0.0.0.0), got {}",
        cfg.bind_addr
    );
    assert_eq!(
        ports_of(&cfg),
        app_ports(),
        "the compose environment moves the platform's ports; Traefik and the health checks expect the defaults"
    );

    // Every host the platform connects to is a service of the stack, on the port it listens on.
    let (_, _, db_host, db_port, _) = parse_pg_url(cfg.database_url(Service::Ingestion));
    let pg = &all[&db_host];
    assert!(
        scalar(&pg["image"]).is_some_and(|i| i.contains("postgres") || i.contains("timescale")),
        "CJ_DATABASE_URL points at '{db_host}', which is not the PostgreSQL service"
    );
    assert_eq!(db_port, 5432, "PostgreSQL's container port");
    for service in Service::ALL {
        assert_eq!(
            parse_pg_url(service.database_url(&cfg)).2,
            db_host,
            "{}'s database",
            service.name()
        );
    }
    for broker in cfg.kafka.brokers.split(',') {
        let (host, port) = broker.trim().rsplit_once(':').unwrap();
        let rp = all
            .get(host)
            .unwrap_or_else(|| panic!("CJ_KAFKA_BROKERS names '{host}', not a compose service"));
        let args = command_args(rp).join(" ");
        assert!(
            args.contains(&format!("{host}:{port}")),
            "the platform uses {host}:{port} but {host} does not advertise it: {args}"
        );
    }
    let mqtt = cfg
        .mqtt
        .as_ref()
        .expect("MQTT ingestion is on in the full stack");
    let broker = all
        .get(&mqtt.host)
        .unwrap_or_else(|| panic!("CJ_MQTT_URL names '{}', not a compose service", mqtt.host));
    assert!(
        ports(broker).iter().any(|(_, c)| *c == mqtt.port),
        "{} does not listen on {}",
        mqtt.host,
        mqtt.port
    );
    // The broker's bootstrap user is the platform's MQTT user.
    let broker_env: HashMap<String, String> = environment(broker)
        .into_iter()
        .map(|(k, v)| (k, interpolate(&v)))
        .collect();
    assert_eq!(broker_env.get("MQTT_USERNAME"), Some(&mqtt.username));
    assert_eq!(
        broker_env.get("MQTT_PASSWORD").map(String::as_str),
        Some(mqtt.password_exposed().as_str())
    );
    assert_eq!(
        broker_env
            .get("EMQX_AUTHENTICATION__1__BACKEND")
            .map(String::as_str),
        Some("built_in_database"),
        "EMQX authenticates with its built-in database (anonymous refused)"
    );
}

#[test]
fn platform_ports_and_health_checks_in_compose_are_the_binary_ports() {
    let all = all_services();
    let app = &all[APP_SERVICE];
    let port_set = app_port_set();
    let ingestion_port = app_ports()["ingestion"];

    for (host, container) in ports(app) {
        assert!(
            port_set.contains(&container),
            "app publishes container port {container}, not one of the binary's ports {port_set:?}"
        );
        if let Some(h) = host {
            assert_eq!(h, container, "app port {container} is published as {h}");
        }
    }
    let exposed: BTreeSet<u16> = app["expose"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|p| scalar(p).unwrap().parse().unwrap())
        .collect();
    assert_eq!(exposed, port_set, "app exposes exactly the binary's ports");
    let hc = healthcheck_text(app);
    assert!(
        hc.contains(&format!(":{ingestion_port}{LIVENESS}")),
        "app health check should ask :{ingestion_port}{LIVENESS}, got '{hc}'"
    );
    assert_liveness_check(
        &format!("{FULLSTACK} {APP_SERVICE}"),
        &hc,
        &app_health_ports(),
    );
}

#[test]
fn the_ai_inference_service_in_compose_matches_the_sidecar() {
    let all = all_services();
    let svc = all
        .get(AI_SERVICE)
        .unwrap_or_else(|| panic!("{FULLSTACK}: no '{AI_SERVICE}' service"));
    assert_eq!(
        compose_build_contexts().get(AI_SERVICE).map(String::as_str),
        Some(AI_DIR),
        "{AI_SERVICE} builds its image from {AI_DIR}/"
    );
    let env: BTreeMap<String, String> = environment(svc)
        .into_iter()
        .map(|(k, v)| (k, interpolate(&v)))
        .collect();
    let value = |field: &str| sidecar_value(&env, field);

    // Its port and health check are the sidecar's, published on loopback only.
    let port: u16 = value("port")
        .expect("the sidecar's port")
        .parse()
        .expect("a port number");
    assert_eq!(
        value("bind_addr").as_deref(),
        Some("0.0.0.0"),
        "in a container the sidecar binds every interface (CJ_BIND_ADDR=0.0.0.0)"
    );
    let published = ports(svc);
    assert!(
        published.contains(&(Some(port), port)),
        "{AI_SERVICE} publishes its port {port}: {published:?}"
    );
    for p in svc["ports"].as_sequence().into_iter().flatten() {
        let loopback = match p {
            Value::Mapping(_) => scalar(&p["host_ip"]).as_deref() == Some("127.0.0.1"),
            _ => scalar(p).is_some_and(|s| s.starts_with("127.0.0.1:")),
        };
        assert!(
            loopback,
            "{AI_SERVICE} publishes {p:?} beyond loopback (it is internal only)"
        );
    }
    let hc = healthcheck_text(svc);
    assert_liveness_check(
        &format!("{FULLSTACK} {AI_SERVICE}"),
        &hc,
        &BTreeSet::from([port]),
    );
    assert_sidecar_serves_the_probes();

    // It submits ai.anomaly to the platform's ingestion port, on the compose network.
    let ingest = value("ingest_url").expect("an ingest URL");
    let (host, p, path) = parse_http_url(&ingest);
    assert_eq!(
        host, APP_SERVICE,
        "CJ_AI_INGEST_URL {ingest}: the platform's service"
    );
    assert_eq!(
        p,
        defaults().ports.ingestion,
        "CJ_AI_INGEST_URL {ingest}: the ingestion port"
    );
    assert_eq!(
        path, "/",
        "CJ_AI_INGEST_URL is a base URL (the sidecar appends the API path)"
    );

    // Same database server, brokers, topics and token claims as the platform.
    let app_env: HashMap<String, String> = environment(&all[APP_SERVICE])
        .into_iter()
        .map(|(k, v)| (k, interpolate(&v)))
        .collect();
    let cfg = Config::from_map(&app_env).unwrap_or_else(|e| panic!("app environment: {e}"));
    let db = value("database_url").expect("a database URL");
    let (_, _, db_host, db_port, db_name) = parse_pg_url(&db);
    let (_, _, app_host, app_port, app_db) = parse_pg_url(cfg.database_url(Service::Ingestion));
    assert_eq!(
        (db_host, db_port, db_name),
        (app_host, app_port, app_db),
        "{AI_SERVICE} uses the platform's PostgreSQL"
    );
    assert_eq!(
        value("kafka_brokers"),
        Some(cfg.kafka.brokers.clone()),
        "brokers"
    );
    assert_eq!(
        value("topic_prefix").unwrap_or_default(),
        cfg.kafka.topic_prefix,
        "topic prefix"
    );
    assert_eq!(value("jwt_issuer"), cfg.auth.issuer, "JWT issuer");
    assert_eq!(value("jwt_audience"), cfg.auth.audience, "JWT audience");
    let token = value("ingest_token").filter(|t| !t.is_empty());
    let secret = value("jwt_secret");
    assert!(
        token.is_some() || (secret.is_some() && secret == app_env.get("CJ_JWT_SECRET").cloned()),
        "{AI_SERVICE} needs an ingest token or the platform's JWT secret"
    );
    let group = value("consumer_group").expect("a consumer group");
    for other in [
        &cfg.eventhandler.consumer_group,
        &cfg.tsdb.consumer_group,
        &cfg.actions.consumer_group,
    ] {
        assert_ne!(&group, other, "the sidecar's consumer group is its own");
    }

    // It starts once its database, the bus and the platform are healthy.
    for dep in [db_host_of(&db), broker_host(&cfg), APP_SERVICE.to_string()] {
        assert_eq!(
            scalar(&svc["depends_on"][dep.as_str()]["condition"]).as_deref(),
            Some("service_healthy"),
            "{AI_SERVICE} depends on {dep} being healthy"
        );
    }
}

fn db_host_of(url: &str) -> String {
    parse_pg_url(url).2
}

fn broker_host(cfg: &Config) -> String {
    let first = cfg.kafka.brokers.split(',').next().unwrap().trim();
    first.rsplit_once(':').unwrap().0.to_string()
}

#[test]
fn no_host_port_is_published_twice_or_clashes_with_the_platform_on_the_host() {
    // In skeleton mode the binary runs on the host with its default ports.
    let port_set = app_port_set();
    let mut seen: BTreeMap<u16, String> = BTreeMap::new();
    for (name, svc) in all_services() {
        for (host, _) in ports(&svc) {
            let Some(h) = host else { continue };
            if let Some(other) = seen.insert(h, name.clone()) {
                panic!("host port {h} is published by both {other} and {name}");
            }
            if name != APP_SERVICE {
                assert!(
                    !port_set.contains(&h),
                    "{name} publishes host port {h}, one of the platform's ports {port_set:?}"
                );
            }
        }
    }
}

#[test]
fn skeleton_infrastructure_matches_the_binary_defaults() {
    let cfg = defaults();
    let skeleton: BTreeMap<String, Value> = services(SKELETON).into_iter().collect();

    // PostgreSQL: the default database URL works against the skeleton from the host.
    let (user, password, _, port, db) = parse_pg_url(DEFAULT_DATABASE_URL);
    let (name, pg) = service_with_image(&skeleton, "timescale");
    let env = environment(pg);
    assert_eq!(env.get("POSTGRES_USER"), Some(&user), "{name} user");
    assert_eq!(
        env.get("POSTGRES_PASSWORD"),
        Some(&password),
        "{name} password"
    );
    assert_eq!(env.get("POSTGRES_DB"), Some(&db), "{name} database");
    assert!(
        ports(pg).contains(&(Some(port), 5432)),
        "{name} publishes {port} on the host"
    );

    // Redpanda: the default brokers reach it from the host; retention is the bus retention.
    let (name, rp) = service_with_image(&skeleton, "redpandadata/redpanda");
    let args = command_args(rp);
    for broker in cfg.kafka.brokers.split(',') {
        let (host, port) = broker.trim().rsplit_once(':').unwrap();
        let port: u16 = port.parse().unwrap();
        assert!(
            ports(rp).iter().any(|(h, _)| *h == Some(port)),
            "{name} does not publish {port} for the host binary's default {broker}"
        );
        assert!(
            args.iter().any(|a| a.starts_with("--advertise-kafka-addr")
                && a.contains(&format!("{host}:{port}"))),
            "{name} does not advertise {host}:{port} to the host"
        );
    }
    let retention_ms = cfg.kafka.retention.as_millis();
    assert!(
        args.iter()
            .any(|a| a.contains(&format!("log_retention_ms={retention_ms}"))),
        "{name} retention should be the platform's bus retention ({retention_ms} ms): {args:?}"
    );
    // Pandaproxy (default 8082) and the schema registry (default 8081) must leave the app's ports.
    let port_set = app_port_set();
    for a in args.iter().filter(|a| a.contains("-addr")) {
        let clash: Vec<u16> = ports_in(a)
            .into_iter()
            .filter(|p| port_set.contains(p))
            .collect();
        assert!(
            clash.is_empty(),
            "{name}: '{a}' uses the platform's ports {clash:?}"
        );
    }
    for a in ["--pandaproxy-addr", "--schema-registry-addr"] {
        assert!(
            args.iter().any(|x| x.starts_with(a)),
            "{name}: set {a} explicitly (its default is one of the platform's ports)"
        );
    }
}

// --- Traefik ----------------------------------------------------------------------------------

struct Router {
    name: String,
    /// (is a prefix, path)
    matchers: Vec<(bool, String)>,
    service: String,
    middlewares: Vec<String>,
}

impl Router {
    fn matches(&self, path: &str) -> bool {
        self.matchers.iter().any(|(prefix, p)| {
            if *prefix {
                path.starts_with(p.as_str())
            } else {
                path == p
            }
        })
    }
}

/// Every file of the dynamic configuration, merged under `http`.
fn traefik_http() -> BTreeMap<String, BTreeMap<String, Value>> {
    let mut files: Vec<_> = std::fs::read_dir(root().join(TRAEFIK_DYNAMIC_DIR))
        .expect("traefik/dynamic")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no traefik/dynamic/*.yaml");
    let mut http: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
    for f in files {
        let rel = f
            .strip_prefix(root())
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let doc = yaml(&rel);
        for (section, items) in entries(&doc["http"], &format!("{rel}: http")) {
            for (name, item) in entries(items, &format!("{rel}: http.{section}")) {
                let previous = http
                    .entry(section.clone())
                    .or_default()
                    .insert(name.clone(), item.clone());
                assert!(previous.is_none(), "http.{section}.{name} is defined twice");
            }
        }
    }
    http
}

/// The middleware name without a provider suffix (`auth@file` → `auth`).
fn local_name(s: &str) -> String {
    s.split('@').next().unwrap().to_string()
}

fn routers(http: &BTreeMap<String, BTreeMap<String, Value>>) -> Vec<Router> {
    let term = Regex::new(r"^(PathPrefix|Path)\(`([^`]+)`\)$").unwrap();
    let routers = http.get("routers").expect("http.routers");
    assert!(!routers.is_empty(), "no routers");
    routers
        .iter()
        .map(|(name, r)| {
            let rule = scalar(&r["rule"]).unwrap_or_else(|| panic!("router {name} has no rule"));
            // The test understands the rules it checks: Path/PathPrefix terms joined by `||`.
            let matchers = rule
                .split("||")
                .map(|t| {
                    let c = term.captures(t.trim()).unwrap_or_else(|| {
                        panic!("router {name}: unsupported rule term '{t}' (use Path/PathPrefix joined by ||)")
                    });
                    (&c[1] == "PathPrefix", c[2].to_string())
                })
                .collect();
            Router {
                name: name.clone(),
                matchers,
                service: local_name(&scalar(&r["service"]).unwrap_or_else(|| panic!("router {name} has no service"))),
                middlewares: r["middlewares"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .map(|m| local_name(&scalar(m).unwrap()))
                    .collect(),
            }
        })
        .collect()
}

/// (host, port, path) of an http URL.
fn parse_http_url(url: &str) -> (String, u16, String) {
    let re = Regex::new(r"^http://([^:/]+)(?::(\d+))?(/[^?]*)?").unwrap();
    let c = re
        .captures(url)
        .unwrap_or_else(|| panic!("not an http URL: {url}"));
    (
        c[1].to_string(),
        c.get(2).map_or(80, |p| p.as_str().parse().unwrap()),
        c.get(3).map_or("/".to_string(), |p| p.as_str().to_string()),
    )
}

/// The (host, port) of every server of a load-balancer service.
fn service_servers(
    http: &BTreeMap<String, BTreeMap<String, Value>>,
    service: &str,
) -> Vec<(String, u16)> {
    let svc = http
        .get("services")
        .and_then(|s| s.get(service))
        .unwrap_or_else(|| panic!("service {service} is not defined"));
    let servers = svc["loadBalancer"]["servers"]
        .as_sequence()
        .unwrap_or_else(|| panic!("service {service}: no loadBalancer.servers"));
    assert!(!servers.is_empty(), "service {service} has no servers");
    servers
        .iter()
        .map(|s| {
            let (host, port, _) = parse_http_url(&scalar(&s["url"]).expect("server url"));
            (host, port)
        })
        .collect()
}

fn middleware<'a>(http: &'a BTreeMap<String, BTreeMap<String, Value>>, name: &str) -> &'a Value {
    http.get("middlewares")
        .and_then(|m| m.get(name))
        .unwrap_or_else(|| panic!("middleware {name} is not defined"))
}

#[test]
fn traefik_static_configuration() {
    let st = yaml(TRAEFIK_STATIC);
    assert_eq!(
        scalar(&st["entryPoints"]["web"]["address"]).as_deref(),
        Some(":80")
    );
    let dashboard_ep = scalar(&st["ping"]["entryPoint"]).unwrap_or_else(|| "traefik".into());
    let dashboard = scalar(&st["entryPoints"][dashboard_ep.as_str()]["address"])
        .expect("the dashboard entrypoint has an address");
    assert_eq!(dashboard, ":8180", "dashboard entrypoint");
    assert_eq!(st["api"]["dashboard"], Value::Bool(true));
    assert!(!st["accessLog"].is_null(), "access log enabled");
    let dir = scalar(&st["providers"]["file"]["directory"]).expect("file provider directory");

    // The fullstack compose mounts traefik/ where the static config and the provider expect it.
    let all = all_services();
    let (name, traefik) = service_with_image(&all, "traefik");
    let mounts: Vec<String> = traefik["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(scalar)
        .collect();
    let target = mounts
        .iter()
        .find_map(|m| {
            let mut parts = m.split(':');
            (parts.next() == Some("../traefik"))
                .then(|| parts.next().unwrap_or_default().to_string())
        })
        .unwrap_or_else(|| panic!("{name} does not mount ../traefik: {mounts:?}"));
    assert_eq!(
        format!("{target}/dynamic"),
        dir,
        "file provider directory inside {name}"
    );
    let cmd = command_args(traefik).join(" ");
    assert!(
        cmd.contains(&format!("{target}/traefik.yaml")),
        "{name} should start with --configFile={target}/traefik.yaml: {cmd}"
    );
    let published: BTreeSet<u16> = ports(traefik).iter().filter_map(|(h, _)| *h).collect();
    assert!(
        published.contains(&80) && published.contains(&8180),
        "{name} publishes 80 and 8180: {published:?}"
    );
}

#[test]
fn every_public_route_reaches_its_service_port_through_traefik() {
    let http = traefik_http();
    let routers = routers(&http);
    let ports = app_ports();
    let compose = all_services();

    let expected: Vec<(String, u16)> = routes_with_ports()
        .into_iter()
        .filter(|(_, path, _)| is_public(path))
        .map(|(_, path, port)| (concrete(&path), port))
        .collect();
    assert!(
        expected.iter().any(|(_, p)| *p == ports["actions"]),
        "the actions API has public routes"
    );
    for health in ["eventhandler_health", "actions_health"] {
        assert!(
            expected.iter().any(|(_, p)| *p == ports[health]),
            "the DLQ API has public routes on the {health} port"
        );
    }

    for (path, port) in expected {
        let matching: Vec<&Router> = routers.iter().filter(|r| r.matches(&path)).collect();
        assert!(!matching.is_empty(), "no Traefik router matches {path}");
        for r in matching {
            for (host, p) in service_servers(&http, &r.service) {
                assert_eq!(
                    p, port,
                    "router {} sends {path} to {host}:{p}, the binary serves it on {port}",
                    r.name
                );
                assert!(
                    compose.contains_key(&host),
                    "router {}: server host '{host}' is not a compose service",
                    r.name
                );
            }
        }
    }
    // Every server of every service is one of the binary's ports.
    let port_set = app_port_set();
    for r in &routers {
        for (_, p) in service_servers(&http, &r.service) {
            assert!(
                port_set.contains(&p),
                "router {} targets port {p}, not one of {port_set:?}",
                r.name
            );
        }
    }
    // And no router matcher is dead: each matches a public route served on its target port.
    let public: Vec<(String, u16)> = routes_with_ports()
        .into_iter()
        .filter(|(_, path, _)| is_public(path))
        .map(|(_, path, port)| (concrete(&path), port))
        .collect();
    for r in &routers {
        let targets: BTreeSet<u16> = service_servers(&http, &r.service)
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        for (prefix, m) in &r.matchers {
            let single = Router {
                name: r.name.clone(),
                matchers: vec![(*prefix, m.clone())],
                service: r.service.clone(),
                middlewares: vec![],
            };
            assert!(
                public
                    .iter()
                    .any(|(path, p)| single.matches(path) && targets.contains(p)),
                "router {}: {m} matches no route the binary serves on {targets:?}",
                r.name
            );
        }
    }
}

/// The gateway's ForwardAuth grants a request only what the scope table opens: every public route
/// needs a scope (else the gateway refuses it with 403), and every line of the table opens a
/// route that a router sends on.
#[test]
fn every_public_route_needs_a_scope_and_every_scope_rule_has_a_router() {
    let routers = routers(&traefik_http());
    let rules = scope_rules();
    let method = |m: &str| Method::from_bytes(m.to_uppercase().as_bytes()).unwrap();
    let public: Vec<(Method, String)> = routes_with_ports()
        .into_iter()
        .filter(|(_, path, _)| is_public(path))
        .map(|(m, path, _)| (method(m), concrete(&path)))
        .collect();
    for (m, path) in &public {
        assert!(
            required_scope(&rules, m, path).is_some(),
            "{m} {path} is served but no scope opens it: ForwardAuth would refuse every token"
        );
    }
    for rule in &rules {
        let under = |p: &str| {
            p.strip_prefix(rule.prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        };
        let routed: Vec<&(Method, String)> = public
            .iter()
            .filter(|(m, p)| under(p) && required_scope(&rules, m, p) == Some(rule.scope))
            .filter(|(_, p)| routers.iter().any(|r| r.matches(p)))
            .collect();
        assert!(
            !routed.is_empty(),
            "scope rule {} ({}) opens no route that a Traefik router sends on",
            rule.prefix,
            rule.scope
        );
    }
}

/// In `CJ_AUTH_MODE=gateway` the gateway is where the rate and body limits and the public routes
/// are enforced (the app still verifies every token), so a port that serves an API must be
/// reachable only through Traefik.
#[test]
fn in_gateway_mode_no_api_port_of_the_app_is_published() {
    let all = all_services();
    let app = &all[APP_SERVICE];
    let env = environment(app);
    assert_eq!(
        env.get("CJ_AUTH_MODE").map(String::as_str),
        Some("gateway"),
        "{FULLSTACK}: the app runs behind the gateway"
    );
    let api_ports: BTreeSet<u16> = routes_with_ports()
        .into_iter()
        .filter(|(_, path, _)| is_public(path))
        .map(|(_, _, port)| port)
        .collect();
    for (host, container) in ports(app) {
        assert!(
            host.is_none() || !api_ports.contains(&container),
            "{FULLSTACK}: app publishes port {container}, which serves an API without checking tokens"
        );
    }
}

#[test]
fn internal_health_and_metrics_paths_are_not_routed() {
    let routers = routers(&traefik_http());
    let mut private: Vec<String> = routes_with_ports()
        .into_iter()
        .filter(|(_, path, _)| !is_public(path))
        .map(|(_, path, _)| concrete(&path))
        .collect();
    assert!(
        private.iter().any(|p| p.starts_with("/internal/")),
        "the ForwardAuth verify route should be among the ingestion routes"
    );
    private.extend(["/internal", "/internal/", "/metrics"].map(String::from));
    // The probes, exactly and as a prefix of anything a router could match under them.
    for probe in PROBES {
        private.extend([probe.to_string(), format!("{probe}/"), format!("{probe}/x")]);
    }
    // The sidecar's probes and routes: nothing routes to the sidecar at all.
    private.extend(sidecar_get_routes());
    for path in private {
        for r in &routers {
            assert!(
                !r.matches(&path),
                "router {} routes {path}, which must stay internal",
                r.name
            );
        }
    }
}

#[test]
fn forward_auth_rate_limit_and_body_limit_guard_every_router() {
    let http = traefik_http();
    let routers = routers(&http);
    let ingestion_port = app_ports()["ingestion"];

    // ForwardAuth: the verify route of the ingestion service, on the ingestion port.
    let auth: Vec<(&String, &Value)> = http
        .get("middlewares")
        .expect("http.middlewares")
        .iter()
        .filter(|(_, m)| !m["forwardAuth"].is_null())
        .collect();
    assert_eq!(auth.len(), 1, "one forwardAuth middleware");
    let (auth_name, auth_mw) = auth[0];
    let (host, port, path) =
        parse_http_url(&scalar(&auth_mw["forwardAuth"]["address"]).expect("address"));
    assert!(
        ingestion::ROUTES
            .iter()
            .any(|(m, p)| *m == "get" && *p == path && !is_public(p)),
        "ForwardAuth calls {path}, which is not an internal GET route of the ingestion service: {:?}",
        ingestion::ROUTES
    );
    assert_eq!(port, ingestion_port, "ForwardAuth port");
    let ingestion_router = routers
        .iter()
        .find(|r| r.matches("/api/v1/ingest"))
        .expect("an ingestion router");
    assert!(
        service_servers(&http, &ingestion_router.service)
            .iter()
            .all(|(h, _)| *h == host),
        "ForwardAuth host {host} is not the ingestion service's host"
    );
    let response_headers: BTreeSet<String> = auth_mw["forwardAuth"]["authResponseHeaders"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(scalar)
        .collect();
    for h in ["X-Auth-Subject", "X-Auth-Scopes"] {
        assert!(
            response_headers.contains(h),
            "authResponseHeaders should copy {h}"
        );
    }
    assert_ne!(
        auth_mw["forwardAuth"]["trustForwardHeader"],
        Value::Bool(true),
        "clients must not choose the X-Forwarded-Uri the verify endpoint checks"
    );

    let batch_limit = defaults().ingestion.max_batch_body_bytes as u64;
    for r in &routers {
        let mws: Vec<&Value> = r.middlewares.iter().map(|m| middleware(&http, m)).collect();
        // The console's login form and assets are open (the console's own open paths): their
        // router may skip ForwardAuth, as long as it routes nothing else.
        let open_console = r.matches("/console/login")
            && r.matches("/console/assets/x")
            && ![
                "/console/",
                "/console/devices",
                "/console/dead-letters/tsdb/x/replay",
                "/api/v1/ingest",
            ]
            .iter()
            .any(|p| r.matches(p));
        assert!(
            open_console || r.middlewares.contains(auth_name),
            "router {} skips ForwardAuth",
            r.name
        );
        let rate = mws
            .iter()
            .find(|m| !m["rateLimit"].is_null())
            .unwrap_or_else(|| panic!("router {} has no rateLimit", r.name));
        let rl = &rate["rateLimit"];
        assert!(
            rl["average"].as_u64().unwrap_or(0) > 0 && rl["burst"].as_u64().unwrap_or(0) > 0,
            "router {}: average/burst",
            r.name
        );
        assert!(
            !rl["sourceCriterion"]["ipStrategy"].is_null(),
            "router {}: rate limit per client IP",
            r.name
        );
        // Traefik's buffering middleware buffers the response too, which would hold the
        // console's Server-Sent-Events streams for ever: their router (GET only, no body; the
        // app's own body limit stands) goes without it, and routes nothing else.
        if r.matches("/console/live/overview")
            && !r.matches("/console/devices")
            && !r.matches("/api/v1/ingest")
        {
            assert!(
                mws.iter().all(|m| m["buffering"].is_null()),
                "router {} buffers the SSE streams",
                r.name
            );
            continue;
        }
        let buffering = mws
            .iter()
            .find(|m| !m["buffering"].is_null())
            .unwrap_or_else(|| panic!("router {} has no body-size limit (buffering)", r.name));
        let max = buffering["buffering"]["maxRequestBodyBytes"]
            .as_u64()
            .unwrap_or(0);
        assert!(max > 0, "router {}: maxRequestBodyBytes", r.name);
        if r.matches("/api/v1/ingest/batch") {
            assert!(
                max >= batch_limit,
                "router {}: gateway body limit {max} is below the app's batch limit {batch_limit}",
                r.name
            );
        }
        // Auth runs before the body is buffered.
        let Some(auth_at) = r.middlewares.iter().position(|m| m == auth_name) else {
            continue; // the open console router (checked above)
        };
        let buf_at = r
            .middlewares
            .iter()
            .position(|m| !middleware(&http, m)["buffering"].is_null())
            .unwrap();
        assert!(
            auth_at < buf_at,
            "router {}: authenticate before buffering the body",
            r.name
        );
    }
}

/// Traefik's health checks decide traffic: readiness (the deep check), so a service whose database
/// is away is taken out of rotation rather than its container restarted.
#[test]
fn traefik_health_checks_use_readiness_on_the_binary_ports() {
    let http = traefik_http();
    let services = http.get("services").expect("http.services");
    assert!(!services.is_empty(), "no Traefik services");
    for (name, svc) in services {
        let hc = &svc["loadBalancer"]["healthCheck"];
        assert_eq!(
            scalar(&hc["path"]).as_deref(),
            Some(READINESS),
            "service {name} health check path (traffic follows readiness)"
        );
        // Traefik asks the server's port unless the check names another: it must be the port
        // where the binary serves that service's probes (the actions API's is its health port).
        for (host, server_port) in service_servers(&http, name) {
            let asked = hc["port"].as_u64().map_or(server_port, |p| p as u16);
            let want = health_port_for(server_port);
            assert_eq!(
                asked, want,
                "service {name} ({host}:{server_port}) health check asks port {asked}; {READINESS} for it is on {want}"
            );
        }
    }
}

// --- Dockerfile -------------------------------------------------------------------------------

/// The instructions of a Dockerfile's last stage, continuation lines joined: (KEYWORD, rest).
fn dockerfile_final_stage(rel: &str) -> Vec<(String, String)> {
    let text = read(rel);
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') && current.is_empty() {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(t);
        if !current.trim().is_empty() {
            joined.push(std::mem::take(&mut current));
        }
        current.clear();
    }
    let last_from = joined
        .iter()
        .rposition(|l| l.to_ascii_uppercase().starts_with("FROM "))
        .expect("a FROM");
    joined[last_from..]
        .iter()
        .map(|l| {
            let (k, rest) = l.split_once(char::is_whitespace).unwrap_or((l, ""));
            (k.to_ascii_uppercase(), rest.trim().to_string())
        })
        .collect()
}

fn dockerfile_env(rel: &str) -> Vec<(String, String)> {
    let re = Regex::new(r#"([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S*)"#).unwrap();
    dockerfile_final_stage(rel)
        .into_iter()
        .filter(|(k, _)| k == "ENV")
        .flat_map(|(_, rest)| {
            re.captures_iter(&rest)
                .map(|c| (c[1].to_string(), c[2].trim_matches('"').to_string()))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn dockerfile_exposes_the_binary_ports_and_checks_health() {
    let stage = dockerfile_final_stage("Dockerfile");
    let find = |k: &str| -> Vec<&String> {
        stage
            .iter()
            .filter(|(kk, _)| kk == k)
            .map(|(_, r)| r)
            .collect()
    };

    let exposed: BTreeSet<u16> = find("EXPOSE")
        .iter()
        .flat_map(|r| r.split_whitespace())
        .map(|p| p.split('/').next().unwrap().parse().expect("EXPOSE port"))
        .collect();
    assert_eq!(
        exposed,
        app_port_set(),
        "EXPOSE should list exactly the binary's ports"
    );

    let hc = find("HEALTHCHECK");
    assert_eq!(hc.len(), 1, "one HEALTHCHECK in the runtime stage");
    let ingestion_port = app_ports()["ingestion"];
    assert_liveness_check(
        "Dockerfile HEALTHCHECK",
        hc[0],
        &BTreeSet::from([ingestion_port]),
    );
    assert!(
        find("ENTRYPOINT").iter().any(|e| e.contains("cornjacket")),
        "ENTRYPOINT runs cornjacket"
    );
    assert!(
        find("CMD").iter().any(|c| c.contains("serve")),
        "CMD is serve"
    );
    let user = find("USER")
        .last()
        .map(|u| u.to_string())
        .expect("a USER in the runtime stage");
    let uid = user.split(':').next().unwrap();
    assert!(
        uid != "root" && uid != "0",
        "the runtime image must not run as root ({user})"
    );

    // The image's environment is valid for the binary and binds every interface.
    let env: HashMap<String, String> = dockerfile_env("Dockerfile").into_iter().collect();
    let cfg = Config::from_map(&env).unwrap_or_else(|e| panic!("Dockerfile ENV: {e}"));
    assert!(
        cfg.bind_addr.is_unspecified(),
        "Dockerfile should set CJ_BIND_ADDR=0.0.0.0"
    );

    let ignore: BTreeSet<String> = read(".dockerignore")
        .lines()
        .map(|l| l.trim().trim_end_matches('/').to_string())
        .collect();
    for entry in ["target", ".git", ".env", ".infra"] {
        assert!(
            ignore.contains(entry),
            ".dockerignore should exclude {entry}"
        );
    }
}

/// The sidecar image's HEALTHCHECK asks liveness on the sidecar's port: written either as the
/// number or as `%s' % os.environ.get('<its port variable>', '<its default>')`.
#[test]
fn the_sidecar_image_checks_liveness_on_its_port() {
    let rel = format!("{AI_DIR}/Dockerfile");
    let stage = dockerfile_final_stage(&rel);
    let hc: Vec<&String> = stage
        .iter()
        .filter(|(k, _)| k == "HEALTHCHECK")
        .map(|(_, r)| r)
        .collect();
    assert_eq!(hc.len(), 1, "{rel}: one HEALTHCHECK in the runtime stage");
    let port = sidecar_value(&BTreeMap::new(), "port").expect("the sidecar's port");
    let setting = sidecar_settings()
        .into_iter()
        .find(|s| s.field == "port")
        .expect("a port setting");
    let mut cmd = hc[0].to_string();
    if cmd.contains(":%s/") {
        let c = Regex::new(r#"os\.environ\.get\(\s*['"]([A-Z0-9_]+)['"]\s*,\s*['"](\d+)['"]\s*\)"#)
            .unwrap()
            .captures(&cmd)
            .unwrap_or_else(|| {
                panic!("{rel}: the HEALTHCHECK's %s port is os.environ.get(VAR, DEFAULT): {cmd}")
            });
        assert!(
            setting.vars.contains(&c[1].to_string()),
            "{rel}: the HEALTHCHECK reads {}, not the sidecar's port variable {:?}",
            &c[1],
            setting.vars
        );
        assert_eq!(
            Some(c[2].to_string()),
            setting.default,
            "{rel}: the HEALTHCHECK's default port is the sidecar's"
        );
        cmd = cmd.replace(":%s/", &format!(":{port}/"));
    }
    assert_liveness_check(
        &format!("{rel} HEALTHCHECK"),
        &cmd,
        &BTreeSet::from([port.parse().expect("a port number")]),
    );
    assert_sidecar_serves_the_probes();
}

// --- Terraform and CI (structure; tests/deploy/check_terraform.py parses the HCL) ---------------

fn terraform_files() -> Vec<(String, String)> {
    let mut files: Vec<_> = std::fs::read_dir(root().join("deploy"))
        .expect("deploy/")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "tf"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let rel = p
                .strip_prefix(root())
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let text = read(&rel);
            (rel, text)
        })
        .collect()
}

/// The ECS task's container definitions as HCL text (comments removed), by container name: the
/// objects of the `container_definitions = [ {...}, ... ]` local. A light reading (strings and
/// comments respected, braces counted); tests/deploy/check_terraform.py parses the HCL fully.
fn tf_containers() -> BTreeMap<String, String> {
    let start_re = Regex::new(r"container_definitions\s*=\s*\[").unwrap();
    let (file, text) = terraform_files()
        .into_iter()
        .find(|(_, t)| start_re.is_match(t))
        .expect("a `container_definitions = [...]` local in deploy/*.tf");
    let name_re = Regex::new(r#"(?m)^\s*name\s*=\s*"([^"]+)"\s*$"#).unwrap();
    let mut out = BTreeMap::new();
    let mut depth = 0usize;
    let mut body = String::new();
    let (mut in_string, mut escaped) = (false, false);
    let mut chars = text[start_re.find(&text).unwrap().end()..]
        .chars()
        .peekable();
    while let Some(ch) = chars.next() {
        if in_string {
            body.push(ch);
            if escaped {
                escaped = false;
            } else if ch == '\\' {
                escaped = true;
            } else if ch == '"' {
                in_string = false;
            }
            continue;
        }
        match ch {
            '#' => {
                while chars.next_if(|c| *c != '\n').is_some() {}
                continue;
            }
            '"' => in_string = true,
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    body.push(ch);
                    let name = name_re
                        .captures(&body)
                        .unwrap_or_else(|| panic!("{file}: a container definition without a name"))
                        [1]
                    .to_string();
                    let previous = out.insert(name.clone(), std::mem::take(&mut body));
                    assert!(
                        previous.is_none(),
                        "{file}: container {name} is defined twice"
                    );
                    continue;
                }
            }
            ']' if depth == 0 => break,
            _ => {}
        }
        if depth > 0 {
            body.push(ch);
        }
    }
    assert!(!out.is_empty(), "{file}: no container definitions");
    out
}

/// The `containerPort`s of a container definition.
fn tf_container_ports(body: &str) -> BTreeSet<u16> {
    Regex::new(r"containerPort\s*=\s*(\d+)")
        .unwrap()
        .captures_iter(body)
        .map(|c| c[1].parse().unwrap())
        .collect()
}

/// The text of a container definition's `healthCheck = { ... }`.
fn tf_health_check(body: &str) -> String {
    Regex::new(r"(?s)healthCheck\s*=\s*\{(.*?)\n\s*\}")
        .unwrap()
        .captures(body)
        .map(|c| c[1].to_string())
        .unwrap_or_default()
}

/// A container's plain `environment` (`{ name = "X", value = ... }`, the value unquoted or the
/// expression as written) and the names of its `secrets` (`{ name = "X", valueFrom = ... }`).
fn tf_environment(body: &str) -> (BTreeMap<String, String>, BTreeSet<String>) {
    let env = Regex::new(
        r#"\{\s*name\s*=\s*"([A-Za-z_][A-Za-z0-9_]*)"\s*,\s*value\s*=\s*("[^"]*"|[^,}\s]+)"#,
    )
    .unwrap()
    .captures_iter(body)
    .map(|c| (c[1].to_string(), c[2].trim_matches('"').to_string()))
    .collect();
    let secrets = Regex::new(r#"\{\s*name\s*=\s*"([A-Za-z_][A-Za-z0-9_]*)"\s*,\s*valueFrom\s*="#)
        .unwrap()
        .captures_iter(body)
        .map(|c| c[1].to_string())
        .collect();
    (env, secrets)
}

#[test]
fn terraform_task_declares_the_binary_ports_and_health_check() {
    let containers = tf_containers();
    let app = &containers[APP_SERVICE];
    assert_eq!(
        tf_container_ports(app),
        app_port_set(),
        "the app container's portMappings are the binary's ports"
    );
    let hc = tf_health_check(app);
    assert_liveness_check("deploy/ecs.tf app container", &hc, &app_health_ports());
    for url in Regex::new(r"https?://([^:/\s]+):")
        .unwrap()
        .captures_iter(&hc)
    {
        assert_eq!(
            &url[1], "localhost",
            "health checks run inside the container: {hc}"
        );
    }
}

#[test]
fn terraform_ai_inference_container_matches_the_sidecar() {
    let containers = tf_containers();
    let ai = &containers[AI_SERVICE];
    let (ai_env, ai_secrets) = tf_environment(ai);
    let (app_env, _) = tf_environment(&containers[APP_SERVICE]);
    // Secrets are set, with values only ECS knows.
    let mut env = ai_env.clone();
    env.extend(
        ai_secrets
            .iter()
            .map(|s| (s.clone(), "<secret>".to_string())),
    );

    let port: u16 = sidecar_value(&env, "port")
        .expect("the sidecar's port")
        .parse()
        .expect("a port number");
    assert_eq!(
        tf_container_ports(ai),
        BTreeSet::from([port]),
        "the ai-inference container maps the sidecar's port"
    );
    let hc = tf_health_check(ai);
    assert_liveness_check(
        "deploy/ecs.tf ai-inference container",
        &hc,
        &BTreeSet::from([port]),
    );
    assert_sidecar_serves_the_probes();
    assert_eq!(
        sidecar_value(&env, "bind_addr").as_deref(),
        Some("0.0.0.0"),
        "the sidecar binds every interface in the task"
    );

    // It submits ai.anomaly to the app's ingestion port on the task's shared localhost.
    let ingest = sidecar_value(&env, "ingest_url").expect("an ingest URL");
    let (host, p, path) = parse_http_url(&ingest);
    assert!(
        host == "localhost" || host == "127.0.0.1",
        "CJ_AI_INGEST_URL {ingest}: the app is on the task's localhost"
    );
    assert_eq!(
        p,
        defaults().ports.ingestion,
        "CJ_AI_INGEST_URL {ingest}: the ingestion port"
    );
    assert_eq!(
        path, "/",
        "CJ_AI_INGEST_URL is a base URL (the sidecar appends the API path)"
    );

    // Its database and credentials come from Secrets Manager, not from defaults.
    assert_eq!(
        sidecar_value(&env, "database_url").as_deref(),
        Some("<secret>"),
        "the ai-inference container gets its database URL from a secret"
    );
    assert!(
        sidecar_value(&env, "ingest_token").as_deref() == Some("<secret>")
            || sidecar_value(&env, "jwt_secret").as_deref() == Some("<secret>"),
        "the ai-inference container needs an ingest token or the JWT secret, from Secrets Manager"
    );

    // Settings it shares with the platform are the platform's (same brokers, topics, token claims).
    for field in [
        "kafka_brokers",
        "topic_prefix",
        "jwt_issuer",
        "jwt_audience",
    ] {
        let vars = sidecar_settings()
            .into_iter()
            .find(|s| s.field == field)
            .unwrap()
            .vars;
        let first_set = |e: &BTreeMap<String, String>| vars.iter().find_map(|v| e.get(v).cloned());
        assert_eq!(
            first_set(&ai_env),
            first_set(&app_env),
            "ai-inference and app disagree on {vars:?}"
        );
    }
}

/// The build contexts of the compose services that build an image, relative to the repository
/// root ("." for the root itself).
fn compose_build_contexts() -> BTreeMap<String, String> {
    let compose_dir = root().join(FULLSTACK).parent().unwrap().to_path_buf();
    let repo = root().canonicalize().unwrap();
    all_services()
        .into_iter()
        .filter(|(_, svc)| !svc["build"].is_null())
        .map(|(name, svc)| {
            let ctx = scalar(&svc["build"])
                .or_else(|| scalar(&svc["build"]["context"]))
                .unwrap_or_else(|| ".".into());
            let dir = compose_dir
                .join(&ctx)
                .canonicalize()
                .unwrap_or_else(|e| panic!("service {name}: build context {ctx}: {e}"));
            let rel = dir
                .strip_prefix(&repo)
                .unwrap_or_else(|_| {
                    panic!("service {name}: build context {ctx} is outside the repository")
                })
                .to_string_lossy()
                .into_owned();
            (name, if rel.is_empty() { ".".into() } else { rel })
        })
        .collect()
}

fn normalise_context(ctx: &str) -> String {
    let c = ctx.trim().trim_start_matches("./").trim_end_matches('/');
    if c.is_empty() {
        ".".into()
    } else {
        c.to_string()
    }
}

#[test]
fn every_image_compose_builds_is_built_by_ci_and_make_docker_build() {
    let contexts: BTreeSet<String> = compose_build_contexts().into_values().collect();
    for ctx in &contexts {
        assert!(
            root().join(ctx).join("Dockerfile").is_file(),
            "build context {ctx} has no Dockerfile"
        );
    }

    // CI: one build-and-push step per image, unconditional, tagged into its ECR repository.
    let wf = yaml(".github/workflows/ci.yaml");
    let steps: Vec<Value> = entries(&wf["jobs"], "jobs")
        .iter()
        .flat_map(|(_, j)| j["steps"].as_sequence().cloned().unwrap_or_default())
        .filter(|s| scalar(&s["uses"]).is_some_and(|u| u.starts_with("docker/build-push-action")))
        .collect();
    let ci_contexts: BTreeSet<String> = steps
        .iter()
        .map(|s| normalise_context(&scalar(&s["with"]["context"]).unwrap_or_else(|| ".".into())))
        .collect();
    assert_eq!(
        ci_contexts, contexts,
        "images CI builds vs images compose builds"
    );
    let repo_re = Regex::new(r#"/([a-z0-9-]+):\$\{\{\s*github\.sha\s*\}\}"#).unwrap();
    let mut pushed = BTreeSet::new();
    for s in &steps {
        assert!(
            s["if"].is_null(),
            "image build step {:?} is conditional",
            s["name"]
        );
        assert_eq!(
            s["with"]["push"],
            Value::Bool(true),
            "image build step {:?} pushes",
            s["name"]
        );
        let tags = scalar(&s["with"]["tags"]).unwrap_or_default();
        let c = repo_re
            .captures(&tags)
            .unwrap_or_else(|| panic!("step {:?}: tag with the commit SHA: {tags}", s["name"]));
        pushed.insert(c[1].to_string());
    }
    let ecr: BTreeSet<String> = terraform_files()
        .iter()
        .flat_map(|(_, t)| {
            Regex::new(r#"resource\s+"aws_ecr_repository"\s+"[^"]+"\s*\{\s*name\s*=\s*"\$\{local\.name\}/([a-z0-9-]+)""#)
                .unwrap()
                .captures_iter(t)
                .map(|c| c[1].to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(pushed, ecr, "CI pushes one image to each ECR repository");

    // make docker-build: a `$(DOCKER) build ... <context>` line per image.
    let makefile = read("Makefile");
    let recipe: Vec<&str> = makefile
        .lines()
        .skip_while(|l| !l.starts_with("docker-build:"))
        .skip(1)
        .take_while(|l| l.starts_with('\t'))
        .collect();
    assert!(!recipe.is_empty(), "Makefile: no docker-build recipe");
    for ctx in &contexts {
        assert!(
            recipe.iter().any(|l| l.contains("$(DOCKER) build")
                && l.split_whitespace()
                    .last()
                    .map(normalise_context)
                    .as_deref()
                    == Some(ctx.as_str())),
            "make docker-build does not build the image of context {ctx}: {recipe:?}"
        );
    }
}

#[test]
fn ci_workflow_parses_and_runs_the_make_targets() {
    let wf = yaml(".github/workflows/ci.yaml");
    let jobs = entries(&wf["jobs"], "jobs");
    let runs: String = jobs
        .iter()
        .flat_map(|(_, j)| j["steps"].as_sequence().cloned().unwrap_or_default())
        .filter_map(|s| scalar(&s["run"]))
        .collect::<Vec<_>>()
        .join("\n");
    for cmd in [
        "make lint",
        "make test",
        "terraform fmt",
        "terraform validate",
        "terraform plan",
        "terraform apply",
    ] {
        assert!(runs.contains(cmd), "the CI workflow never runs '{cmd}'");
    }
}

// --- EMQX (compose and ECS) against the local Mosquitto and the binary ----------------------------

/// A setting of the local Mosquitto template (the reference for EMQX's limits).
fn mosquitto_setting(name: &str) -> String {
    read("scripts/mosquitto/mosquitto.conf.tmpl")
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("the Mosquitto template sets {name}"))
        .trim()
        .to_string()
}

/// EMQX byte sizes: `256KB`, `1MB`, `1GB` or plain bytes.
fn emqx_bytes(v: &str) -> usize {
    let v = v.trim();
    for (suffix, mul) in [
        ("KB", 1024),
        ("MB", 1024 * 1024),
        ("GB", 1024 * 1024 * 1024),
    ] {
        if let Some(n) = v.strip_suffix(suffix) {
            return n.parse::<usize>().unwrap() * mul;
        }
    }
    v.parse().unwrap()
}

/// Runs a broker entrypoint script (its final `exec` left out) with `sh`, as the container would,
/// the files it writes moved to a temp dir; returns (bootstrap CSV, ACL).
fn run_emqx_entrypoint(
    what: &str,
    lines: &[String],
    env: &BTreeMap<String, String>,
    user: &str,
) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("bootstrap.csv");
    let acl = dir.path().join("acl.conf");
    let script: Vec<&str> = lines
        .iter()
        .map(String::as_str)
        .filter(|l| !l.trim_start().starts_with("exec "))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("exec /usr/bin/docker-entrypoint.sh")),
        "{what}: the entrypoint ends by starting EMQX"
    );
    let out = std::process::Command::new("sh")
        .args(["-ec", &script.join("\n")])
        .env_clear()
        .envs(env)
        .env("MQTT_USERNAME", user)
        .env("MQTT_PASSWORD", "pw")
        .env("EMQX_AUTHENTICATION__1__BOOTSTRAP_FILE", &csv)
        .env("EMQX_AUTHORIZATION__SOURCES__1__PATH", &acl)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{what}: entrypoint script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        std::fs::read_to_string(csv).unwrap(),
        std::fs::read_to_string(acl).unwrap_or_else(|_| panic!("{what}: no ACL written")),
    )
}

/// What EMQX must be told, in compose and in ECS alike: the platform's user alone reads the
/// shared subscription, devices only their own topics, and the queue and packet limits match the
/// local Mosquitto's and sit below what the platform's client reads.
fn check_emqx(what: &str, env: &BTreeMap<String, String>, script: &[String], user: &str) {
    let get = |k: &str| {
        env.get(k)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("{what}: {k} is not set"))
    };
    let defaults = defaults();
    let mqtt = defaults.mqtt.as_ref().unwrap();

    let packet = emqx_bytes(get("EMQX_MQTT__MAX_PACKET_SIZE"));
    assert_eq!(
        packet.to_string(),
        mosquitto_setting("max_packet_size"),
        "{what}: EMQX's packet limit is Mosquitto's"
    );
    assert!(
        packet < mqtt.max_packet_bytes && packet > mqtt.max_payload_bytes,
        "{what}: the broker's packet limit ({packet}) is above the body limit ({}) and below what the platform reads ({})",
        mqtt.max_payload_bytes,
        mqtt.max_packet_bytes
    );
    let mqueue = get("EMQX_MQTT__MAX_MQUEUE_LEN");
    assert_eq!(
        mqueue,
        mosquitto_setting("max_queued_messages"),
        "{what}: EMQX queues as many messages per session as Mosquitto"
    );
    assert_eq!(
        get("EMQX_MQTT__MAX_INFLIGHT"),
        mosquitto_setting("max_inflight_messages"),
        "{what}: the platform's in-flight window"
    );
    assert_eq!(
        get("EMQX_MQTT__MQUEUE_STORE_QOS0"),
        "false",
        "{what}: QoS 0 takes no queue space"
    );
    assert!(
        get("EMQX_FORCE_SHUTDOWN__MAX_MAILBOX_SIZE")
            .parse::<u64>()
            .unwrap()
            >= mqueue.parse::<u64>().unwrap(),
        "{what}: the session process is not shut down before its queue is full"
    );
    assert!(
        emqx_bytes(get("EMQX_FORCE_SHUTDOWN__MAX_HEAP_SIZE")) >= 256 * 1024 * 1024,
        "{what}: the session process may hold its queue"
    );
    assert_eq!(get("EMQX_OVERLOAD_PROTECTION__ENABLE"), "true", "{what}");

    assert_eq!(get("EMQX_AUTHORIZATION__NO_MATCH"), "deny", "{what}");
    assert_eq!(
        get("EMQX_AUTHORIZATION__SOURCES__1__TYPE"),
        "file",
        "{what}"
    );
    assert_eq!(
        get("EMQX_AUTHORIZATION__SOURCES__1__ENABLE"),
        "true",
        "{what}"
    );
    assert!(
        get("EMQX_AUTHORIZATION__SOURCES__1__PATH").starts_with('/'),
        "{what}"
    );

    let (csv, acl) = run_emqx_entrypoint(what, script, env, user);
    assert_eq!(
        csv,
        format!("user_id,password,is_superuser\n{user},pw,false\n"),
        "{what}: the platform's user is bootstrapped, not as a superuser"
    );
    // The platform's subscription without its `$share/<group>/` (EMQX authorizes the real topic).
    let shared = mqtt.topic.strip_prefix("$share/").unwrap();
    let real = shared.split_once('/').unwrap().1;
    let rules: Vec<&str> = acl.lines().collect();
    assert_eq!(
        rules,
        vec![
            // A username that is not one topic level would widen the `${username}` rules.
            r##"{deny, {username, {re, "[/+#]"}}, all, ["#"]}."##,
            format!(r#"{{allow, {{username, "{user}"}}, subscribe, ["{real}"]}}."#).as_str(),
            format!(r#"{{allow, {{username, "{user}"}}, publish, ["devices/+/errors"]}}."#)
                .as_str(),
            r#"{allow, all, publish, ["devices/${username}/events"]}."#,
            r#"{allow, all, subscribe, ["devices/${username}/errors"]}."#,
            "{deny, all}.",
        ],
        "{what}: the ACL"
    );
}

#[test]
fn emqx_in_compose_authorizes_devices_and_queues_like_the_local_mosquitto() {
    let all = all_services();
    let (name, emqx) = service_with_image(&all, "emqx/emqx");
    let env: BTreeMap<String, String> = environment(emqx)
        .into_iter()
        .map(|(k, v)| (k, interpolate(&v)))
        .collect();
    let entry: Vec<String> = emqx["entrypoint"]
        .as_sequence()
        .unwrap_or_else(|| panic!("{name}: an entrypoint list"))
        .iter()
        .filter_map(scalar)
        .collect();
    assert_eq!(
        &entry[..2],
        ["/bin/sh", "-ec"],
        "{name}: a shell entrypoint"
    );
    let script: Vec<String> = interpolate(&entry[2]).lines().map(str::to_string).collect();
    let app_env: HashMap<String, String> = environment(&all[APP_SERVICE])
        .into_iter()
        .map(|(k, v)| (k, interpolate(&v)))
        .collect();
    let user = Config::from_map(&app_env).unwrap().mqtt.unwrap().username;
    check_emqx(&format!("{FULLSTACK} {name}"), &env, &script, &user);
}

/// Undoes HCL string escapes (`\"`, `\\`, `\n`, `$${`).
fn hcl_unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some(o) => out.push(o),
                None => {}
            }
        } else {
            out.push(c);
        }
    }
    out.replace("$${", "${")
}

#[test]
fn emqx_in_ecs_authorizes_devices_and_queues_like_the_local_mosquitto() {
    let containers = tf_containers();
    let body = &containers["mqtt-broker"];
    let (env, _) = tf_environment(body);
    let command = Regex::new(r#"(?s)command\s*=\s*\[join\("\\n",\s*\[(.*?)\]\)\]"#)
        .unwrap()
        .captures(body)
        .expect("mqtt-broker: command = [join(\"\\n\", [...])]")[1]
        .to_string();
    let script: Vec<String> = Regex::new(r#""((?:[^"\\]|\\.)*)""#)
        .unwrap()
        .captures_iter(&command)
        .map(|c| hcl_unescape(&c[1]))
        .collect();
    let vars = read("deploy/variables.tf");
    let user = Regex::new(r#"(?s)variable "mqtt_username" \{.*?default\s*=\s*"([^"]+)""#)
        .unwrap()
        .captures(&vars)
        .expect("variable mqtt_username has a default")[1]
        .to_string();
    assert_eq!(
        env.get("MQTT_USERNAME").map(String::as_str),
        Some("var.mqtt_username")
    );
    let env: BTreeMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("EMQX_"))
        .collect();
    check_emqx("deploy/ecs.tf mqtt-broker", &env, &script, &user);
}

/// The app's per-client limits are the gateway's (Traefik's rateLimit on every router), and the
/// app trusts the X-Forwarded-For of the gateway only: in compose the compose network (no API
/// port of the app is published in gateway mode), in ECS the task's localhost.
#[test]
fn the_apps_rate_limit_is_the_gateways_and_it_trusts_only_the_gateway() {
    let http = traefik_http();
    let limits: BTreeSet<(u64, u64)> = routers(&http)
        .iter()
        .flat_map(|r| r.middlewares.clone())
        .map(|m| middleware(&http, &m)["rateLimit"].clone())
        .filter(|rl| !rl.is_null())
        .map(|rl| {
            (
                rl["average"].as_u64().unwrap(),
                rl["burst"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(limits.len(), 1, "one gateway rate: {limits:?}");
    let (average, burst) = *limits.iter().next().unwrap();
    let compose = environment(&all_services()[APP_SERVICE]);
    let (ecs, _) = tf_environment(&tf_containers()[APP_SERVICE]);
    for (what, env) in [("compose", &compose), ("ECS", &ecs)] {
        for (var, want) in [
            ("CJ_INGESTION_RATE_LIMIT", average),
            ("CJ_API_RATE_LIMIT", average),
            ("CJ_INGESTION_RATE_BURST", burst),
            ("CJ_API_RATE_BURST", burst),
        ] {
            let got = env.get(var).map(|v| v.trim_matches('"').to_string());
            assert_eq!(got, Some(want.to_string()), "{what}: {var}");
        }
        let mut map = HashMap::new();
        map.insert(
            "CJ_TRUSTED_PROXIES".to_string(),
            env["CJ_TRUSTED_PROXIES"].trim_matches('"').to_string(),
        );
        let cfg = Config::from_map(&map).unwrap();
        let trusted = &cfg.api_limit.trusted_proxies;
        assert!(!trusted.is_empty(), "{what}");
        // Never the whole internet, and never a public address.
        for n in trusted {
            assert!(
                n.addr().is_loopback()
                    || matches!(n.addr(), std::net::IpAddr::V4(a) if a.is_private()),
                "{what} trusts {n}"
            );
        }
    }
    // That only Traefik reaches the API ports is in_gateway_mode_no_api_port_of_the_app_is_published.
}
