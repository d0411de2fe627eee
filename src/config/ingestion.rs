//! Ingestion: the HTTP door's limits and group commit, and MQTT device ingestion.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use super::ConfigError;
use super::bus::{ENVELOPE_OVERHEAD, KafkaConfig};
use super::vars::Vars;

#[derive(Debug, Clone)]
pub struct IngestionConfig {
    /// `CJ_INGESTION_MAX_BODY_BYTES`: the largest single-event body (default 64 KiB).
    pub max_body_bytes: usize,
    /// `CJ_INGESTION_MAX_BATCH_BODY_BYTES`: the largest batch body (default 16 MiB).
    pub max_batch_body_bytes: usize,
    /// `CJ_INGESTION_MAX_BATCH_EVENTS`: events per batch request (default 1000).
    pub max_batch_events: usize,
    /// `CJ_INGESTION_STRICT_TYPES`: refuse event types outside the catalogue.
    pub strict_types: bool,
    /// `CJ_INGESTION_RATE_LIMIT`: requests per second per client; 0 disables the limit.
    pub rate_limit_per_sec: u32,
    /// `CJ_INGESTION_RATE_BURST`: bucket size of the per-client limit.
    pub rate_limit_burst: u32,
    /// `CJ_INGESTION_COMMIT_MAX_ROWS`: rows per group commit.
    pub commit_max_rows: usize,
    /// `CJ_INGESTION_COMMIT_CONCURRENCY`: group commits in flight at once.
    pub commit_concurrency: usize,
    /// `CJ_INGESTION_REQUEST_TIMEOUT`: the longest a client waits for its commit before a 503.
    pub request_timeout: Duration,
    /// `CJ_DEVICE_INACTIVITY_TIMEOUT`: a device that sent no reading for this long is
    /// `device.inactive` (10m; 0 or `off`: only devices given their own period through the API).
    pub inactivity_timeout: Duration,
    /// `CJ_DEVICE_ACTIVITY_INTERVAL`: how often the platform looks for devices that went quiet
    /// or came back (1s; positive).
    pub activity_interval: Duration,
}

impl IngestionConfig {
    /// `kafka`: an event admitted through the door must fit through the bus.
    pub(super) fn parse(v: &Vars, kafka: &KafkaConfig) -> Result<Self, ConfigError> {
        let ingestion = IngestionConfig {
            max_body_bytes: v.ranged(
                "CJ_INGESTION_MAX_BODY_BYTES",
                64 * 1024,
                256,
                64 * 1024 * 1024,
            )?,
            max_batch_body_bytes: v.ranged(
                "CJ_INGESTION_MAX_BATCH_BODY_BYTES",
                16 * 1024 * 1024,
                1024,
                1024 * 1024 * 1024,
            )?,
            max_batch_events: v.ranged("CJ_INGESTION_MAX_BATCH_EVENTS", 1000, 1, 100_000)?,
            strict_types: v.bool("CJ_INGESTION_STRICT_TYPES", false)?,
            rate_limit_per_sec: v.ranged("CJ_INGESTION_RATE_LIMIT", 0, 0, 10_000_000)?,
            rate_limit_burst: v.ranged("CJ_INGESTION_RATE_BURST", 0, 0, 10_000_000)?,
            commit_max_rows: v.ranged("CJ_INGESTION_COMMIT_MAX_ROWS", 1000, 1, 100_000)?,
            commit_concurrency: v.ranged("CJ_INGESTION_COMMIT_CONCURRENCY", 4, 1, 64)?,
            request_timeout: v.duration("CJ_INGESTION_REQUEST_TIMEOUT", Duration::from_secs(10))?,
            inactivity_timeout: match v.raw(&["CJ_DEVICE_INACTIVITY_TIMEOUT"]) {
                Some((_, off)) if off.trim().eq_ignore_ascii_case("off") => Duration::ZERO,
                _ => v.duration("CJ_DEVICE_INACTIVITY_TIMEOUT", Duration::from_secs(600))?,
            },
            activity_interval: v
                .positive_duration("CJ_DEVICE_ACTIVITY_INTERVAL", Duration::from_secs(1))?,
        };

        // An event admitted through the door must fit through the bus, or it would be accepted
        // and then never published (it would be quarantined, but the client was told 202).
        if ingestion.max_body_bytes + ENVELOPE_OVERHEAD > kafka.message_max_bytes {
            return Err(Vars::err(
                "CJ_INGESTION_MAX_BODY_BYTES",
                &ingestion.max_body_bytes.to_string(),
                &format!(
                    "at most CJ_KAFKA_MESSAGE_MAX_BYTES ({}) minus {ENVELOPE_OVERHEAD} bytes of \
                     envelope, so that every admitted event fits in a bus message; lower it or \
                     raise CJ_KAFKA_MESSAGE_MAX_BYTES (and the broker's limit)",
                    kafka.message_max_bytes
                ),
            ));
        }
        Ok(ingestion)
    }
}

/// The largest packet MQTT allows (a remaining length of 268,435,455 bytes).
const MQTT_MAX_PACKET: usize = 268_435_455;

/// MQTT device ingestion (SPEC §12).
#[derive(Debug, Clone)]
pub struct MqttConfig {
    /// From `CJ_MQTT_URL` (`mqtt://host:port`; `off` disables MQTT ingestion).
    pub host: String,
    pub port: u16,
    /// `CJ_MQTT_USERNAME` (development default `cornjacket`).
    pub username: String,
    /// `CJ_MQTT_PASSWORD` (development default `cornjacket`).
    pub password: SecretString,
    /// `CJ_MQTT_ADMIN_USERNAME`: the broker's dynamic-security admin, used only by
    /// `cornjacket devices` (development default `cornjacket-admin`).
    pub admin_username: String,
    /// `CJ_MQTT_ADMIN_PASSWORD` (development default `cornjacket-admin`).
    pub admin_password: SecretString,
    /// `CJ_MQTT_TOPIC`: the subscription; its `+` segment is the device id.
    pub topic: String,
    /// `CJ_MQTT_CLIENT_ID`: stable per instance, so the persistent session survives restarts.
    pub client_id: String,
    /// `CJ_MQTT_INFLIGHT`: the client's own window of unacknowledged QoS 1 publishes (its error
    /// reports to devices). How many device messages the broker hands over unacknowledged is the
    /// broker's setting (Mosquitto `max_inflight_messages`, EMQX `mqtt.max_inflight`).
    pub inflight: u16,
    /// `CJ_MQTT_MAX_PACKET_BYTES`: the largest packet the client reads. It must be above the
    /// broker's own limit (Mosquitto `max_packet_size`, EMQX `mqtt.max_packet_size`): a packet
    /// the client cannot read drops the connection, and the broker hands it over again on every
    /// reconnect. Default: 1 MiB, or 64 KiB over `CJ_INGESTION_MAX_BODY_BYTES` if that is more.
    pub max_packet_bytes: usize,
    /// The largest payload taken in: `CJ_INGESTION_MAX_BODY_BYTES`, the HTTP body limit. A
    /// larger message is acknowledged, counted and reported to the device, never stored.
    pub max_payload_bytes: usize,
    /// `CJ_MQTT_QOS0_BACKLOG`: QoS 0 messages being committed at once; one arriving beyond it is
    /// dropped and counted (QoS 0 is at most once, and the broker does not wait for it). QoS 1
    /// messages are never dropped: the broker's in-flight window bounds them.
    pub qos0_backlog: usize,
}

impl MqttConfig {
    pub fn password_exposed(&self) -> String {
        self.password.expose_secret().to_string()
    }

    pub fn admin_password_exposed(&self) -> String {
        self.admin_password.expose_secret().to_string()
    }
}

impl MqttConfig {
    /// `None` when `CJ_MQTT_URL=off`. `host_name` names the default client id (read by the
    /// caller: parsing does no I/O).
    pub(super) fn parse(
        v: &Vars,
        ingestion: &IngestionConfig,
        ingestion_port: u16,
        host_name: &str,
    ) -> Result<Option<Self>, ConfigError> {
        let mqtt = match v.raw(&["CJ_MQTT_URL"]) {
            Some((_, u))
                if matches!(u.to_ascii_lowercase().as_str(), "off" | "none" | "disabled") =>
            {
                None
            }
            other => {
                let (var, url) =
                    other.unwrap_or_else(|| ("CJ_MQTT_URL".into(), "mqtt://localhost:1883".into()));
                let expected = "mqtt://host:port, or off";
                let rest = url
                    .strip_prefix("mqtt://")
                    .or_else(|| url.strip_prefix("tcp://"))
                    .ok_or_else(|| Vars::err(&var, &url, expected))?;
                let (host, port) = match rest.trim_end_matches('/').rsplit_once(':') {
                    Some((h, p)) => (
                        h.to_string(),
                        p.parse::<u16>()
                            .map_err(|_| Vars::err(&var, &url, expected))?,
                    ),
                    None => (rest.trim_end_matches('/').to_string(), 1883),
                };
                if host.is_empty() {
                    return Err(Vars::err(&var, &url, expected));
                }
                let topic = v.string("CJ_MQTT_TOPIC", "$share/cornjacket/devices/+/events");
                if topic.split('/').filter(|s| *s == "+").count() != 1 || topic.contains('#') {
                    return Err(Vars::err(
                        "CJ_MQTT_TOPIC",
                        &topic,
                        "a filter with exactly one '+' (the device id) and no '#', e.g. $share/cornjacket/devices/+/events",
                    ));
                }
                Some(MqttConfig {
                    host,
                    port,
                    username: v.string("CJ_MQTT_USERNAME", "cornjacket"),
                    password: SecretString::from(v.string("CJ_MQTT_PASSWORD", "cornjacket")),
                    admin_username: v.string("CJ_MQTT_ADMIN_USERNAME", "cornjacket-admin"),
                    admin_password: SecretString::from(
                        v.string("CJ_MQTT_ADMIN_PASSWORD", "cornjacket-admin"),
                    ),
                    topic,
                    client_id: v.string(
                        "CJ_MQTT_CLIENT_ID",
                        &format!("cornjacket-{host_name}-{ingestion_port}"),
                    ),
                    inflight: v.ranged("CJ_MQTT_INFLIGHT", 1000, 1, 65_535)?,
                    max_packet_bytes: {
                        let least = ingestion.max_body_bytes + 1024;
                        let default = (1024 * 1024).max(ingestion.max_body_bytes + 64 * 1024);
                        let n =
                            v.ranged("CJ_MQTT_MAX_PACKET_BYTES", default, 1024, MQTT_MAX_PACKET)?;
                        if n < least {
                            return Err(Vars::err(
                                "CJ_MQTT_MAX_PACKET_BYTES",
                                &n.to_string(),
                                &format!(
                                    "at least CJ_INGESTION_MAX_BODY_BYTES plus 1 KiB ({least}), \
                                     and above the broker's packet limit"
                                ),
                            ));
                        }
                        n
                    },
                    max_payload_bytes: ingestion.max_body_bytes,
                    qos0_backlog: v.ranged("CJ_MQTT_QOS0_BACKLOG", 1000, 1, 1_000_000)?,
                })
            }
        };
        Ok(mqtt)
    }
}
