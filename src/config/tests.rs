//! Parsing tested on its own (STYLE §10), from maps rather than the process environment.

use super::*;

fn with(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let map = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Config::from_map(&map)
}

#[test]
fn defaults_are_valid() {
    let c = with(&[]).unwrap();
    assert_eq!(c.ports.ingestion, 8080);
    assert_eq!(c.ports.eventhandler_health, 8084);
    assert_eq!(c.kafka.brokers, "localhost:9092");
    assert_eq!(c.outbox.worker_count, 4);
    assert_eq!(c.outbox.batch_size, 100);
    assert_eq!(c.outbox.max_retries, 5);
    assert_eq!(c.outbox.poll_interval, Duration::from_secs(5));
    assert_eq!(c.kafka.retention, Duration::from_secs(86_400));
    assert_eq!(c.database_url(Service::Ingestion), DEFAULT_DATABASE_URL);
    assert_eq!(c.kafka.topics.sensor, "sensor-events");
    let m = c.mqtt.unwrap();
    assert_eq!((m.host.as_str(), m.port), ("localhost", 1883));
    assert_eq!(m.topic, "$share/cornjacket/devices/+/events");
    assert_eq!(m.username, "cornjacket");
    assert_eq!(m.max_packet_bytes, 1024 * 1024);
    assert_eq!(m.max_payload_bytes, c.ingestion.max_body_bytes);
    assert_eq!(m.qos0_backlog, 1000);
    assert!(with(&[("CJ_MQTT_URL", "off")]).unwrap().mqtt.is_none());
    let a = &c.actions;
    assert_eq!(a.consumer_group, "action-orchestrator");
    assert_eq!(a.rate_limit, Some((10, Duration::from_secs(60))));
    assert_eq!(
        a.retry_delays,
        [1, 2, 4, 8, 16].map(Duration::from_secs).to_vec()
    );
    assert_eq!(a.webhook_timeout, Duration::from_secs(30));
    assert_eq!(a.dedup_window, Duration::from_secs(300));
    assert_eq!(a.breaker_threshold, 5);
    assert_eq!(a.breaker_cooldown, Duration::from_secs(300));
    assert_eq!(c.tsdb.consumer_group, "tsdb-writer");
    assert_eq!(c.tsdb.topics, ["sensor-events"]);
    assert_eq!(c.retention.events, Duration::from_secs(7 * 86_400));
    assert_eq!(c.retention.interval, Duration::from_secs(3600));
    assert_eq!(c.retention.max_clock_skew, Duration::from_secs(60));
    let limited = with(&[("CJ_ACTIONS_RATE_LIMIT", "3/2s")]).unwrap();
    assert_eq!(
        limited.actions.rate_limit,
        Some((3, Duration::from_secs(2)))
    );
    let unlimited = with(&[("CJ_ACTIONS_RATE_LIMIT", "0")]).unwrap();
    assert_eq!(unlimited.actions.rate_limit, None);
}

#[test]
fn each_malformed_variable_names_itself_and_the_expected_form() {
    let cases: &[(&str, &str, &str)] = &[
        ("CJ_LOG_FORMAT", "xml", "json or text"),
        ("CJ_LOG_LEVEL", "loud[", "tracing filter"),
        ("CJ_INGESTION_PORT", "80800", "TCP port"),
        ("CJ_QUERY_PORT", "abc", "TCP port"),
        ("CJ_ACTIONS_PORT", "-1", "TCP port"),
        ("CJ_ACTIONS_HEALTH_PORT", "x", "TCP port"),
        ("CJ_EVENTHANDLER_HEALTH_PORT", "1.5", "TCP port"),
        ("CJ_INGESTION_DATABASE_URL", "mysql://x", "postgres://"),
        ("INGESTION_DATABASE_URL", "not a url", "postgres://"),
        ("CJ_EVENTHANDLER_DATABASE_URL", "http://x", "postgres://"),
        ("CJ_QUERY_DATABASE_URL", "postgres://", "postgres://"),
        ("CJ_DATABASE_URL", "nope", "postgres://"),
        ("CJ_KAFKA_BROKERS", "localhost", "host:port"),
        ("CJ_REDPANDA_BROKERS", "a:b", "host:port"),
        ("CJ_KAFKA_PARTITIONS", "0", "from 1 to 1024"),
        ("CJ_KAFKA_RETENTION", "forever", "duration"),
        ("CJ_KAFKA_TOPIC_PREFIX", "a b", "letters"),
        ("CJ_KAFKA_FETCH_WAIT_MAX_MS", "0", "integer from 1"),
        ("CJ_OUTBOX_WORKER_COUNT", "0", "from 1 to 16"),
        ("CJ_OUTBOX_BATCH_SIZE", "ten", "integer"),
        ("CJ_OUTBOX_MAX_RETRIES", "-3", "integer"),
        ("CJ_OUTBOX_POLL_INTERVAL", "5", "duration"),
        ("CJ_OUTBOX_POLL_INTERVAL", "0s", "positive duration"),
        ("CJ_OUTBOX_ENABLED", "maybe", "true or false"),
        ("CJ_INGESTION_STRICT_TYPES", "sometimes", "true or false"),
        ("CJ_INGESTION_MAX_BODY_BYTES", "10", "integer from 256"),
        ("CJ_INGESTION_RATE_LIMIT", "fast", "integer"),
        ("CJ_EVENTHANDLER_RETRY_DELAYS", "1s,soon", "durations"),
        ("CJ_EVENTHANDLER_TOPICS", ",,", "comma-separated"),
        ("CJ_BIND_ADDR", "localhost", "IP address"),
        ("CJ_DB_MAX_CONNECTIONS", "0", "integer"),
        ("CJ_SHUTDOWN_TIMEOUT", "soon", "duration"),
        ("CJ_MQTT_URL", "http://broker", "mqtt://host:port"),
        ("CJ_MQTT_URL", "mqtt://broker:99999", "mqtt://host:port"),
        ("CJ_MQTT_TOPIC", "devices/#", "exactly one '+'"),
        ("CJ_MQTT_INFLIGHT", "0", "integer from 1"),
        (
            "CJ_MQTT_MAX_PACKET_BYTES",
            "2048",
            "at least CJ_INGESTION_MAX_BODY_BYTES",
        ),
        ("CJ_MQTT_QOS0_BACKLOG", "0", "integer from 1"),
        ("CJ_AUTH_MODE", "maybe", "gateway, app or off"),
        ("CJ_JWT_SECRET", "short", "at least 32 characters"),
        ("CJ_TSDB_DATABASE_URL", "mysql://x", "postgres://"),
        ("ACTIONS_DATABASE_URL", "nope", "postgres://"),
        ("CJ_TSDB_RETRY_DELAYS", "x", "durations"),
        ("CJ_ACTIONS_RETRY_DELAYS", "1s,,", "durations"),
        ("CJ_ACTIONS_RATE_LIMIT", "10", "N/period"),
        ("CJ_ACTIONS_RATE_LIMIT", "10/0s", "N/period"),
        ("CJ_ACTIONS_WEBHOOK_TIMEOUT", "0s", "positive duration"),
        ("CJ_ACTIONS_BREAKER_THRESHOLD", "0", "integer from 1"),
        ("CJ_ACTIONS_BREAKER_COOLDOWN", "later", "duration"),
        ("CJ_ACTIONS_WORKERS", "0", "integer from 1"),
        ("CJ_ACTIONS_ALLOW_PRIVATE_TARGETS", "sure", "true or false"),
        ("CJ_ACTIONS_STALL_AFTER", "0s", "positive duration"),
        ("CJ_ACTIONS_PROXY", "socks5://10.0.0.1:1080", "proxy URL"),
        ("CJ_ACTIONS_PROXY", "http://", "proxy URL"),
        ("CJ_API_RATE_LIMIT", "lots", "integer"),
        ("CJ_TRUSTED_PROXIES", "10.0.0.0/8,traefik", "CIDR networks"),
        ("CJ_TRUSTED_PROXIES", "10.0.0.0/33", "CIDR networks"),
        ("CJ_RETENTION_EVENTS", "0s", "positive duration"),
        ("CJ_RETENTION_INTERVAL", "hourly", "duration"),
        ("CJ_RETENTION_ENABLED", "perhaps", "true or false"),
        ("CJ_RETENTION_MAX_CLOCK_SKEW", "0s", "positive duration"),
        ("CJ_RETENTION_MAX_CLOCK_SKEW", "a bit", "duration"),
    ];
    for (var, value, expected) in cases {
        let err = with(&[(var, value)]).expect_err(var);
        assert_eq!(&err.var, var, "{var}");
        let msg = err.to_string();
        assert!(msg.contains(var), "{msg}");
        assert!(
            msg.contains(expected),
            "{var}: '{msg}' should mention '{expected}'"
        );
    }
}

#[test]
fn database_url_errors_never_print_the_password() {
    let err = with(&[("CJ_INGESTION_DATABASE_URL", "mysql://u:hunter2@h/db")]).unwrap_err();
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

#[test]
fn database_and_http_timeouts_have_defaults_and_are_checked_against_each_other() {
    let c = with(&[]).unwrap();
    let t = c.db_timeouts;
    assert_eq!(t.statement, Duration::from_secs(30));
    assert_eq!(t.idle_in_transaction, Duration::from_secs(60));
    assert_eq!(t.response, Some(Duration::from_secs(35)));
    assert_eq!(t.keepalive, Duration::from_secs(10));
    assert_eq!(c.http.header_timeout, Duration::from_secs(10));
    assert_eq!(c.http.body_timeout, Duration::from_secs(60));
    assert_eq!(c.http.idle_timeout, Duration::from_secs(120));
    assert_eq!(c.http.max_connections, 1024);
    let short = with(&[("CJ_DB_STATEMENT_TIMEOUT", "2s")]).unwrap();
    assert_eq!(short.db_timeouts.response, Some(Duration::from_secs(7)));
    let off = with(&[("CJ_DB_RESPONSE_TIMEOUT", "off")]).unwrap();
    assert_eq!(off.db_timeouts.response, None);

    let cases: &[(&str, &str, &str)] = &[
        ("CJ_DB_STATEMENT_TIMEOUT", "0s", "positive"),
        ("CJ_DB_STATEMENT_TIMEOUT", "soon", "duration"),
        (
            "CJ_DB_IDLE_IN_TRANSACTION_TIMEOUT",
            "10s",
            "longer than CJ_KAFKA_MESSAGE_TIMEOUT (10s)",
        ),
        (
            "CJ_DB_RESPONSE_TIMEOUT",
            "30s",
            "longer than CJ_DB_STATEMENT_TIMEOUT",
        ),
        ("CJ_DB_RESPONSE_TIMEOUT", "never", "duration"),
        ("CJ_DB_TCP_KEEPALIVE", "500ms", "at least 1s"),
        ("CJ_HTTP_HEADER_TIMEOUT", "0s", "positive"),
        ("CJ_HTTP_BODY_TIMEOUT", "slow", "duration"),
        ("CJ_HTTP_IDLE_TIMEOUT", "0s", "positive"),
        ("CJ_HTTP_MAX_CONNECTIONS", "0", "integer from 1"),
    ];
    for (var, value, expected) in cases {
        let err = with(&[(var, value)]).expect_err(var);
        assert_eq!(&err.var, var);
        let msg = err.to_string();
        assert!(
            msg.contains(expected),
            "{var}: '{msg}' should mention '{expected}'"
        );
    }
}

#[test]
fn seed_unprefixed_database_variables_are_accepted_and_prefixed_ones_win() {
    let c = with(&[("EVENTHANDLER_DATABASE_URL", "postgres://a:b@h:1/eh")]).unwrap();
    assert_eq!(
        c.database_url(Service::Eventhandler),
        "postgres://a:b@h:1/eh"
    );
    assert_eq!(c.database_url(Service::Ingestion), DEFAULT_DATABASE_URL);
    let c = with(&[
        ("INGESTION_DATABASE_URL", "postgres://a:b@h:1/seed"),
        ("CJ_INGESTION_DATABASE_URL", "postgres://a:b@h:1/cj"),
    ])
    .unwrap();
    assert_eq!(c.database_url(Service::Ingestion), "postgres://a:b@h:1/cj");
}

#[test]
fn a_common_database_url_is_the_default_of_every_service() {
    let c = with(&[("CJ_DATABASE_URL", "postgres://a:b@h:1/all")]).unwrap();
    assert_eq!(c.database_url(Service::Query), "postgres://a:b@h:1/all");
    assert_eq!(
        c.database_url(Service::Eventhandler),
        "postgres://a:b@h:1/all"
    );
}

#[test]
fn redpanda_alias_and_topic_prefix() {
    let c = with(&[
        ("CJ_REDPANDA_BROKERS", "rp:9092"),
        ("CJ_KAFKA_TOPIC_PREFIX", "t1."),
    ])
    .unwrap();
    assert_eq!(c.kafka.brokers, "rp:9092");
    assert_eq!(c.kafka.topics.user, "t1.user-actions");
    assert_eq!(c.eventhandler.topics.len(), 3);
    assert!(c.eventhandler.topics.iter().all(|t| t.starts_with("t1.")));
}

#[test]
fn known_variables_come_from_the_parser() {
    let vars = Config::known_variables();
    for v in [
        "CJ_INGESTION_PORT",
        "INGESTION_DATABASE_URL",
        "CJ_MQTT_TOPIC",
        "CJ_REDPANDA_BROKERS",
    ] {
        assert!(vars.iter().any(|x| x == v), "{v} in {vars:?}");
    }
}

#[test]
fn redaction_hides_only_the_password() {
    assert_eq!(
        redact_url("postgres://u:pw@h:5432/db"),
        "postgres://u:***@h:5432/db"
    );
    assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
}

#[test]
fn rust_log_is_honoured_when_cj_log_level_is_unset() {
    assert_eq!(with(&[]).unwrap().log_level, "info");
    assert_eq!(
        with(&[("RUST_LOG", "cornjacket=debug,warn")])
            .unwrap()
            .log_level,
        "cornjacket=debug,warn"
    );
    let both = with(&[("RUST_LOG", "trace"), ("CJ_LOG_LEVEL", "error")]).unwrap();
    assert_eq!(both.log_level, "error", "the platform's own variable wins");
    let e = with(&[("RUST_LOG", "cornjacket=[")]).unwrap_err();
    assert_eq!(e.var, "RUST_LOG");
}

#[test]
fn file_variables_carry_secrets_and_are_refused_beside_the_value() {
    let read = |path: &str| match path {
        "/run/secrets/jwt" => Ok("0123456789abcdef0123456789abcdef\n".to_string()),
        "/run/secrets/db" => Ok("postgres://u:p@db:5432/x\r\n".to_string()),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "No such file",
        )),
    };
    let map = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let c = Config::from_map_with_files(
        &map(&[
            ("CJ_JWT_SECRET_FILE", "/run/secrets/jwt"),
            ("CJ_DATABASE_URL_FILE", "/run/secrets/db"),
        ]),
        read,
    )
    .unwrap();
    assert_eq!(
        c.auth.jwt_secret.as_ref().unwrap().expose_secret(),
        "0123456789abcdef0123456789abcdef",
        "one trailing newline dropped"
    );
    assert_eq!(c.database_url(Service::Query), "postgres://u:p@db:5432/x");
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);

    let e = Config::from_map_with_files(
        &map(&[
            ("CJ_JWT_SECRET_FILE", "/run/secrets/jwt"),
            ("CJ_JWT_SECRET", "0123456789abcdef0123456789abcdef-x"),
        ]),
        read,
    )
    .unwrap_err();
    assert_eq!(e.var, "CJ_JWT_SECRET_FILE");
    assert!(e.expected.contains("CJ_JWT_SECRET is set too"), "{e}");
    let e =
        Config::from_map_with_files(&map(&[("CJ_JWT_SECRET_FILE", "/nope")]), read).unwrap_err();
    assert_eq!(
        (e.var.as_str(), e.value.as_str()),
        ("CJ_JWT_SECRET_FILE", "/nope")
    );
    assert!(e.expected.contains("No such file"), "{e}");
    // A variable that is itself a path keeps meaning a path.
    let c =
        Config::from_map_with_files(&map(&[("CJ_JWT_PUBLIC_KEY_FILE", "/etc/cj/key.pem")]), read)
            .unwrap();
    assert_eq!(
        c.auth.public_key_file.as_deref(),
        Some(std::path::Path::new("/etc/cj/key.pem"))
    );
}

#[test]
fn unknown_platform_variables_are_warned_about_with_the_nearest_name() {
    let c = with(&[
        ("CJ_ACTIONS_RATE_LIMT", "5/1m"),
        ("CJ_COMPLETELY_DIFFERENT_THING", "1"),
        ("CJ_AI_SCORE_THRESHOLD", "4"),
        ("CJ_TEST_DATABASE_URL", "x"),
        ("CJ_WEBHOOK_SECRET", "whsec_x"),
        ("HOME", "/root"),
        ("CJ_ACTIONS_RATE_LIMIT", "0"),
    ])
    .unwrap();
    assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
    assert!(
        c.warnings[0].starts_with("CJ_ACTIONS_RATE_LIMT is not a variable")
            && c.warnings[0].ends_with("did you mean CJ_ACTIONS_RATE_LIMIT?"),
        "{:?}",
        c.warnings
    );
    assert!(
        c.warnings[1].starts_with("CJ_COMPLETELY_DIFFERENT_THING")
            && !c.warnings[1].contains("did you mean"),
        "{:?}",
        c.warnings
    );
}
