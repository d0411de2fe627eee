//! MQTT device ingestion (SPEC §12): a persistent session on a shared subscription at QoS 1,
//! with manual acknowledgements sent only after the event's outbox row is committed — so a crash
//! before the ack means the broker hands the message over again, and nothing it delivered is lost.
//!
//! Acks go out in the order the messages arrived (MQTT 3.1.1 §4.6); commits run concurrently
//! through the same group-commit writer as HTTP, so a burst of device messages shares commits.
//!
//! An ack goes out only on the connection its message came on. A packet id names a message only
//! within its session: after a reconnect that found no session (`session_present = false`) the
//! broker numbers new messages from scratch, and an old ack would acknowledge one of them before
//! it is committed. When the session did survive, the broker hands the unacknowledged messages
//! over again on the new connection, and those copies are acknowledged once they are committed
//! (a repeat is a no-op for a device that sends `event_id`).
//!
//! No single message can stop ingestion: the client reads packets up to
//! `CJ_MQTT_MAX_PACKET_BYTES`, set above the broker's own limit, and a payload over the HTTP body
//! limit is acknowledged, counted and reported to the device instead of being stored.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::writer::{Outcome, Pending, WriteError, Writer};
use crate::config::MqttConfig;
use crate::envelope::{self, Clock, FieldError, Rules, Source, Submission};

/// What `/health` shows of the subscriber.
#[derive(Default)]
pub struct MqttState {
    /// Connected and subscribed: ready to receive device messages.
    pub connected: AtomicBool,
    pub last_error: std::sync::Mutex<Option<String>>,
}

/// How a message ended.
enum Handled {
    Accepted,
    Rejected,
    /// Shut down before it could be committed: not acknowledged, the broker redelivers it.
    Abandoned,
}

/// A message being committed; resolves to the message, the connection it came on, and how it
/// ended.
type InFlight = futures::future::BoxFuture<'static, (Publish, u64, Handled)>;

pub struct Subscriber {
    pub cfg: MqttConfig,
    pub writer: Writer,
    pub clock: Arc<dyn Clock>,
    pub rules: Rules,
    pub state: Arc<MqttState>,
}

impl Subscriber {
    pub async fn run(self, shutdown: CancellationToken) {
        let (host, port) = (self.cfg.host.clone(), self.cfg.port);
        let mut opts = MqttOptions::new(self.cfg.client_id.clone(), host, port);
        opts.set_clean_session(false)
            .set_manual_acks(true)
            .set_keep_alive(Duration::from_secs(15))
            .set_inflight(self.cfg.inflight)
            .set_max_packet_size(self.cfg.max_packet_bytes, self.cfg.max_packet_bytes)
            .set_credentials(self.cfg.username.clone(), self.cfg.password_exposed());
        let (client, mut events) = AsyncClient::new(opts, 65_536);
        let this = Arc::new(self);
        let mut pending: FuturesOrdered<InFlight> = FuturesOrdered::new();
        let mut backoff = Duration::from_millis(200);
        // Which connection is current: bumped when one is lost, before anything else can queue
        // an ack (rumqttc sends queued requests on the next connection).
        let mut connection: u64 = 0;
        // QoS 0 messages among `pending`, and when a dropped one was last logged.
        let mut qos0_pending = 0usize;
        let mut qos0_logged: Option<std::time::Instant> = None;

        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some((publish, on, handled)) = pending.next(), if !pending.is_empty() => {
                    if publish.qos == QoS::AtMostOnce {
                        qos0_pending -= 1;
                    }
                    this.finish(&client, &publish, on == connection, handled);
                }
                ev = events.poll() => match ev {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        backoff = Duration::from_millis(200);
                        tracing::info!(session_present = ack.session_present, "MQTT connected; subscribing.");
                        // Idempotent; covers a broker that lost the persistent session. Readiness
                        // waits for the SUBACK: until then a device's message may find no
                        // subscriber in the share group.
                        if let Err(e) = client.try_subscribe(this.cfg.topic.clone(), QoS::AtLeastOnce) {
                            tracing::warn!(error = %e, "MQTT subscribe request failed.");
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        let granted = ack.return_codes.iter().all(|c| {
                            matches!(c, rumqttc::SubscribeReasonCode::Success(_))
                        });
                        if granted {
                            this.state.connected.store(true, Ordering::Relaxed);
                            *this.state.last_error.lock().expect("mqtt state lock") = None;
                            tracing::info!(topic = %this.cfg.topic, "MQTT subscribed.");
                        } else {
                            let msg = format!("subscription to {} refused: {:?}", this.cfg.topic, ack.return_codes);
                            tracing::error!(error = %msg, "MQTT subscription refused; check the broker's ACLs.");
                            *this.state.last_error.lock().expect("mqtt state lock") = Some(msg);
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if p.qos == QoS::AtMostOnce {
                            if qos0_pending >= this.cfg.qos0_backlog {
                                metrics::counter!("cj_mqtt_messages_total", "outcome" => "dropped_qos0").increment(1);
                                if qos0_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                                    qos0_logged = Some(std::time::Instant::now());
                                    tracing::warn!(backlog = qos0_pending, topic = %p.topic, "QoS 0 backlog full; dropping QoS 0 messages (QoS 1 is never dropped).");
                                }
                                continue;
                            }
                            qos0_pending += 1;
                        }
                        // Validated and handed to the writer here, one message after the other,
                        // so the outbox receives them in arrival order; only the waiting for
                        // their commits runs concurrently.
                        let first = match this.prepare(&p, &client) {
                            Ok((env, body)) => {
                                let ticket = this.writer.send(vec![Pending::new(env.clone(), &body, None)]).await;
                                Ok((env, body, ticket))
                            }
                            Err(handled) => Err(handled),
                        };
                        let this = this.clone();
                        let stop = shutdown.clone();
                        let reporter = client.clone();
                        let on = connection;
                        pending.push_back(Box::pin(async move {
                            let handled = match first {
                                Ok((env, body, ticket)) => {
                                    this.commit(&p, env, body, ticket, &reporter, &stop).await
                                }
                                Err(handled) => handled,
                            };
                            (p, on, handled)
                        }));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        connection += 1;
                        this.state.connected.store(false, Ordering::Relaxed);
                        *this.state.last_error.lock().expect("mqtt state lock") = Some(e.to_string());
                        metrics::counter!("cj_mqtt_disconnects_total").increment(1);
                        if let rumqttc::ConnectionError::MqttState(rumqttc::StateError::Deserialization(
                            rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(n),
                        )) = &e
                        {
                            // The broker will hand the same packet over again on reconnect.
                            tracing::error!(packet_bytes = n, limit = this.cfg.max_packet_bytes,
                                "MQTT packet over CJ_MQTT_MAX_PACKET_BYTES; set it above the broker's packet limit (Mosquitto max_packet_size, EMQX mqtt.max_packet_size).");
                        }
                        tracing::warn!(error = %e, retry_in = ?backoff, "MQTT connection lost; reconnecting.");
                        if shutdown.run_until_cancelled(tokio::time::sleep(backoff)).await.is_none() {
                            break;
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                },
            }
        }

        // Drain: acknowledge what was committed; the rest stays with the broker.
        let drain = async {
            while let Some((publish, on, handled)) = pending.next().await {
                this.finish(&client, &publish, on == connection, handled);
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while events.poll().await.is_ok() {}
        })
        .await;
        this.state.connected.store(false, Ordering::Relaxed);
    }

    /// Acknowledges a message that ended (when it came on the current connection: see the module
    /// comment) and counts it.
    fn finish(&self, client: &AsyncClient, publish: &Publish, current: bool, handled: Handled) {
        if matches!(handled, Handled::Abandoned) {
            return;
        }
        if !current {
            // Committed or refused all the same; a surviving session hands it over again.
            tracing::debug!(
                pkid = publish.pkid,
                "Not acknowledging a message of a lost connection."
            );
        } else if let Err(e) = client.try_ack(publish) {
            tracing::warn!(error = %e, "Could not queue an MQTT ack; the broker will redeliver.");
        }
        let outcome = match handled {
            Handled::Accepted => "accepted",
            _ => "rejected",
        };
        metrics::counter!("cj_mqtt_messages_total", "outcome" => outcome).increment(1);
    }

    /// Validates one message into an envelope (and the body the device sent); a refusal is
    /// reported to the device.
    fn prepare(
        &self,
        p: &Publish,
        client: &AsyncClient,
    ) -> Result<(envelope::Envelope, Value), Handled> {
        let device = match device_of(&self.cfg.topic, &p.topic) {
            Some(d) => d,
            None => {
                tracing::warn!(topic = %p.topic, "MQTT message on an unexpected topic; dropped.");
                return Err(Handled::Rejected);
            }
        };
        if p.payload.len() > self.cfg.max_payload_bytes {
            let limit = self.cfg.max_payload_bytes;
            metrics::counter!("cj_ingest_rejected_total", "reason" => "too_large_mqtt")
                .increment(1);
            tracing::warn!(device = %device, bytes = p.payload.len(), limit, "MQTT message over the body limit; rejected.");
            let details = json!([{
                "field": "",
                "message": format!("{} bytes; the limit is {limit} bytes", p.payload.len()),
            }]);
            report(client, &p.topic, "message too large", details);
            return Err(Handled::Rejected);
        }
        let checked = serde_json::from_slice::<Value>(&p.payload)
            .map_err(|e| {
                (
                    "invalid JSON".to_string(),
                    json!([{"field": "", "message": e.to_string()}]),
                )
            })
            .and_then(|body| {
                let sub = Submission {
                    source: Source::Mqtt,
                    subject: None,
                    traceparent: Some(super::api::new_traceparent()),
                    aggregate_id: Some(device.clone()),
                };
                envelope::validate_request(&body, &sub, self.rules, self.clock.now())
                    .map(|env| (env, body))
                    .map_err(|errs: Vec<FieldError>| ("validation failed".to_string(), json!(errs)))
            });
        checked.map_err(|(error, details)| {
            metrics::counter!("cj_ingest_rejected_total", "reason" => "invalid_mqtt").increment(1);
            tracing::warn!(device = %device, error = %error, details = %details, "MQTT message rejected.");
            report(client, &p.topic, &error, details);
            Handled::Rejected
        })
    }

    /// Waits for a message's commit (the first attempt was sent with `ticket`). Database
    /// outages are waited out (the message stays unacknowledged meanwhile, which also stops the
    /// broker from sending more than `inflight`).
    async fn commit(
        &self,
        p: &Publish,
        env: envelope::Envelope,
        body: Value,
        ticket: Result<super::writer::Ticket, WriteError>,
        client: &AsyncClient,
        shutdown: &CancellationToken,
    ) -> Handled {
        let device = env.aggregate_id.clone();
        let mut backoff = Duration::from_millis(100);
        let mut attempt = Some(ticket);
        loop {
            let result = match attempt.take() {
                Some(Ok(ticket)) => ticket.wait().await,
                Some(Err(e)) => Err(e),
                None => {
                    self.writer
                        .submit(vec![Pending::new(env.clone(), &body, None)])
                        .await
                }
            };
            match result {
                Ok(o) if matches!(o.first(), Some(Outcome::Conflict(_))) => {
                    let Some(Outcome::Conflict(c)) = o.into_iter().next() else {
                        unreachable!()
                    };
                    metrics::counter!("cj_ingest_rejected_total", "reason" => "conflict")
                        .increment(1);
                    tracing::warn!(device = %device, error = %c, "MQTT message refused.");
                    report(client, &p.topic, &c.to_string(), json!([]));
                    return Handled::Rejected;
                }
                Ok(o) if matches!(o.first(), Some(Outcome::Accepted(_))) => {
                    metrics::counter!("cj_events_accepted_total", "source" => "mqtt").increment(1);
                    return Handled::Accepted;
                }
                other => {
                    let e = other.err().unwrap_or(WriteError::Unavailable);
                    if !matches!(e, WriteError::Unavailable) {
                        tracing::error!(device = %device, error = %e, "MQTT message could not be stored; retrying.");
                    }
                    if shutdown
                        .run_until_cancelled(tokio::time::sleep(backoff))
                        .await
                        .is_none()
                    {
                        return Handled::Abandoned;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Tells the device why its message was refused, on `…/{device}/errors` (the topic with its last
/// segment replaced). Best effort: a full client queue drops the report, never the ack.
fn report(client: &AsyncClient, topic: &str, error: &str, details: Value) {
    let Some((base, _)) = topic.rsplit_once('/') else {
        return;
    };
    let body = json!({ "error": error, "details": details }).to_string();
    if let Err(e) = client.try_publish(format!("{base}/errors"), QoS::AtLeastOnce, false, body) {
        tracing::debug!(error = %e, "Could not queue an error report to the device.");
    }
}

/// The device id of a topic matched against the subscription filter (the `+` segment).
pub fn device_of(filter: &str, topic: &str) -> Option<String> {
    let filter = match filter.strip_prefix("$share/") {
        Some(rest) => rest.split_once('/')?.1,
        None => filter,
    };
    let f: Vec<&str> = filter.split('/').collect();
    let t: Vec<&str> = topic.split('/').collect();
    if f.len() != t.len() {
        return None;
    }
    let mut device = None;
    for (fs, ts) in f.iter().zip(&t) {
        match *fs {
            "+" if !ts.is_empty() => device = device.or(Some(ts.to_string())),
            "+" => return None,
            s if s == *ts => {}
            _ => return None,
        }
    }
    device
}

#[cfg(test)]
mod tests {
    use super::device_of;

    #[test]
    fn device_id_comes_from_the_wildcard_segment() {
        let f = "$share/cornjacket/devices/+/events";
        assert_eq!(
            device_of(f, "devices/dev-1/events").as_deref(),
            Some("dev-1")
        );
        assert_eq!(
            device_of("t1/devices/+/events", "t1/devices/x/events").as_deref(),
            Some("x")
        );
        assert_eq!(device_of(f, "devices/dev-1/other"), None);
        assert_eq!(device_of(f, "devices//events"), None);
        assert_eq!(device_of(f, "devices/a/b/events"), None);
    }
}
