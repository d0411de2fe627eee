//! Device identities at the MQTT broker (`cornjacket devices add|list|remove|rotate`).
//!
//! Each device is a broker user whose username is its device id, with a role of its own that
//! allows exactly two things: publish to `devices/<id>/events` and subscribe to
//! `devices/<id>/errors`. Everything else is denied by the broker's default (set by
//! `scripts/mosquitto/dynsec-setup.sh`), so a device cannot publish as another device, read
//! another device's reports, or join the platform's shared subscription.
//!
//! Locally this drives Mosquitto's dynamic-security plugin through its control topic
//! (`$CONTROL/dynamic-security/v1`), logged in as the plugin's admin: users change on the running
//! broker, without a restart. Mosquitto 2.0's plugin has no `%u` substitution in ACLs, hence a
//! role per device. (Compose and ECS run EMQX, whose users are managed through its own API or
//! dashboard; its ACL file expresses the same rules with `${username}`.)

use std::time::Duration;

use rand::Rng;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::config::MqttConfig;

const CONTROL: &str = "$CONTROL/dynamic-security/v1";
const RESPONSE: &str = "$CONTROL/dynamic-security/v1/response";

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "'{0}' is not a device id: 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"
    )]
    InvalidId(String),
    #[error("'{0}' is reserved for the platform or the broker's admin")]
    Reserved(String),
    #[error("device '{0}' already exists")]
    Exists(String),
    #[error("no device '{0}'")]
    NotFound(String),
    #[error("the broker refused {command}: {error}")]
    Refused { command: String, error: String },
    #[error("MQTT broker: {0}")]
    Broker(String),
}

/// The role that carries a device's ACLs.
pub fn role_of(device: &str) -> String {
    format!("device-{device}")
}

/// What a device id may be: it becomes a topic level and a username, so no `/`, `+`, `#`.
pub fn check_id(id: &str) -> Result<(), DeviceError> {
    let ok = (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && id.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(DeviceError::InvalidId(id.to_string()))
    }
}

/// A password for a device: 24 characters from 62, about 143 bits.
pub fn generate_password() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..24)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A session with the broker's dynamic-security plugin.
pub struct Admin {
    client: AsyncClient,
    responses: tokio::sync::mpsc::UnboundedReceiver<Value>,
    reserved: Vec<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Admin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Admin {
    /// Logs in as `CJ_MQTT_ADMIN_USERNAME` and subscribes to the plugin's responses.
    pub async fn connect(cfg: &MqttConfig) -> Result<Self, DeviceError> {
        let id = format!("cornjacket-devices-{}", Uuid::now_v7().simple());
        let mut opts = MqttOptions::new(id, cfg.host.clone(), cfg.port);
        opts.set_keep_alive(Duration::from_secs(15))
            .set_max_packet_size(cfg.max_packet_bytes, cfg.max_packet_bytes)
            .set_credentials(cfg.admin_username.clone(), cfg.admin_password_exposed());
        let (client, mut events) = AsyncClient::new(opts, 16);
        client
            .subscribe(RESPONSE, QoS::AtLeastOnce)
            .await
            .map_err(|e| DeviceError::Broker(e.to_string()))?;
        let (ready_tx, ready) = tokio::sync::oneshot::channel::<Result<(), String>>();
        let (tx, responses) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        let granted = ack
                            .return_codes
                            .iter()
                            .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_)));
                        if let Some(t) = ready_tx.take() {
                            let _ = t.send(if granted {
                                Ok(())
                            } else {
                                Err(format!(
                                    "{RESPONSE} refused: the user is not the dynamic-security admin"
                                ))
                            });
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic == RESPONSE => {
                        if let Ok(v) = serde_json::from_slice::<Value>(&p.payload) {
                            let _ = tx.send(v);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if let Some(t) = ready_tx.take() {
                            let msg = match e {
                                rumqttc::ConnectionError::ConnectionRefused(code) => format!(
                                    "the broker refused CJ_MQTT_ADMIN_USERNAME ({code:?}); locally \
                                     `scripts/infra.sh up mosquitto` sets up its dynamic-security admin"
                                ),
                                e => e.to_string(),
                            };
                            let _ = t.send(Err(msg));
                        }
                        return;
                    }
                }
            }
        });
        match tokio::time::timeout(Duration::from_secs(10), ready).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(DeviceError::Broker(e)),
            Ok(Err(_)) | Err(_) => {
                return Err(DeviceError::Broker(format!(
                    "no answer from {}:{}",
                    cfg.host, cfg.port
                )));
            }
        }
        Ok(Self {
            client,
            responses,
            reserved: vec![cfg.username.clone(), cfg.admin_username.clone()],
            task,
        })
    }

    /// Sends commands in one request and returns the plugin's response to each, in order.
    async fn run(&mut self, commands: Vec<Value>) -> Result<Vec<Value>, DeviceError> {
        let n = commands.len();
        let body = json!({ "commands": commands }).to_string();
        self.client
            .publish(CONTROL, QoS::AtLeastOnce, false, body)
            .await
            .map_err(|e| DeviceError::Broker(e.to_string()))?;
        let answer = tokio::time::timeout(Duration::from_secs(10), self.responses.recv())
            .await
            .map_err(|_| DeviceError::Broker("no answer from the dynamic-security plugin".into()))?
            .ok_or_else(|| DeviceError::Broker("connection to the broker lost".into()))?;
        let responses = answer["responses"].as_array().cloned().unwrap_or_default();
        if responses.len() != n {
            return Err(DeviceError::Broker(format!("unexpected answer: {answer}")));
        }
        Ok(responses)
    }

    /// Runs commands that must all succeed.
    async fn run_ok(&mut self, commands: Vec<Value>) -> Result<Vec<Value>, DeviceError> {
        let responses = self.run(commands).await?;
        for r in &responses {
            if let Some(error) = r["error"].as_str() {
                return Err(DeviceError::Refused {
                    command: r["command"].as_str().unwrap_or("?").to_string(),
                    error: error.to_string(),
                });
            }
        }
        Ok(responses)
    }

    fn check(&self, id: &str) -> Result<(), DeviceError> {
        check_id(id)?;
        if self.reserved.iter().any(|r| r == id) {
            return Err(DeviceError::Reserved(id.to_string()));
        }
        Ok(())
    }

    async fn exists(&mut self, id: &str) -> Result<bool, DeviceError> {
        let r = self
            .run(vec![json!({"command": "getClient", "username": id})])
            .await?;
        Ok(r[0].get("error").is_none())
    }

    /// Creates the device's role and user.
    pub async fn add(&mut self, id: &str, password: &str) -> Result<(), DeviceError> {
        self.check(id)?;
        if self.exists(id).await? {
            return Err(DeviceError::Exists(id.to_string()));
        }
        let role = role_of(id);
        // A role left over from an interrupted `add` is replaced.
        self.run(vec![json!({"command": "deleteRole", "rolename": role})])
            .await?;
        self.run_ok(vec![
            json!({
                "command": "createRole",
                "rolename": role,
                "acls": [
                    {"acltype": "publishClientSend", "topic": format!("devices/{id}/events"), "allow": true},
                    {"acltype": "subscribeLiteral", "topic": format!("devices/{id}/errors"), "allow": true},
                    {"acltype": "publishClientReceive", "topic": format!("devices/{id}/errors"), "allow": true},
                ],
            }),
            json!({
                "command": "createClient",
                "username": id,
                "password": password,
                "roles": [{"rolename": role}],
            }),
        ])
        .await?;
        Ok(())
    }

    /// Device ids (users that hold their own device role), sorted.
    pub async fn list(&mut self) -> Result<Vec<String>, DeviceError> {
        let r = self
            .run_ok(vec![json!({"command": "listClients", "verbose": true})])
            .await?;
        let mut ids: Vec<String> = r[0]["data"]["clients"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| {
                let name = c["username"].as_str()?;
                let role = role_of(name);
                c["roles"]
                    .as_array()?
                    .iter()
                    .any(|r| r["rolename"] == role.as_str())
                    .then(|| name.to_string())
            })
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Deletes the device's user (the broker disconnects it) and its role.
    pub async fn remove(&mut self, id: &str) -> Result<(), DeviceError> {
        self.check(id)?;
        if !self.list().await?.iter().any(|d| d == id) {
            return Err(DeviceError::NotFound(id.to_string()));
        }
        self.run_ok(vec![
            json!({"command": "deleteClient", "username": id}),
            json!({"command": "deleteRole", "rolename": role_of(id)}),
        ])
        .await?;
        Ok(())
    }

    /// Replaces the device's password.
    pub async fn rotate(&mut self, id: &str, password: &str) -> Result<(), DeviceError> {
        self.check(id)?;
        if !self.list().await?.iter().any(|d| d == id) {
            return Err(DeviceError::NotFound(id.to_string()));
        }
        self.run_ok(vec![
            json!({"command": "setClientPassword", "username": id, "password": password}),
        ])
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_are_single_topic_levels() {
        for ok in ["dev-1", "a", "sensor_7.kitchen", &"x".repeat(128)] {
            assert!(check_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/b", "+", "#", "-x", "a b", &"x".repeat(129), "é"] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn generated_passwords_differ_and_are_long() {
        let (a, b) = (generate_password(), generate_password());
        assert_eq!(a.len(), 24);
        assert_ne!(a, b);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
    }
}
