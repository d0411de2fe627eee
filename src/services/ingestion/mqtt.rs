//! MQTT device ingestion (SPEC §12): a persistent session on a shared subscription at QoS 1,
//! with manual acknowledgements sent only after the event's outbox row is committed — so a crash
//! before the ack means the broker hands the message over again, and nothing it delivered is lost.
//!
//! Acks go out in the order the messages arrived (MQTT 3.1.1 §4.6). Commits go through the same
//! group-commit writer as HTTP, chained per device: a device has one commit in flight at a time,
//! and the messages it sends meanwhile ride its next commit together, in arrival order. So a
//! device that pipelines its publishes gets them committed in the order it sent them even when
//! a commit fails and is retried (nothing later of that device can overtake the retry), while
//! many devices — and a pipelining device's backlog — still share commits.
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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::{FuturesOrdered, FuturesUnordered};
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
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

/// A device's commit; resolves to the device once its messages have their answers.
type Chain = futures::future::BoxFuture<'static, String>;

/// One poll of the client's event loop, owning the loop and handing it back with the event.
/// The loop's `poll` must never be cancelled: dropped between taking an ack off its request
/// queue and writing it, it loses the ack, and the broker keeps that message in flight for the
/// platform's session — after `inflight` such losses the broker sends nothing more. So the poll
/// is a future of its own that the subscriber's `select!` resumes, never drops.
type Polled = futures::future::BoxFuture<'static, (EventLoop, Result<Event, ConnectionError>)>;

fn poll_once(mut events: EventLoop) -> Polled {
    Box::pin(async move {
        let ev = events.poll().await;
        (events, ev)
    })
}

/// A validated message waiting for its device's next commit.
struct Queued {
    topic: String,
    envelope: envelope::Envelope,
    body: Value,
    done: tokio::sync::oneshot::Sender<Handled>,
}

/// A device with a commit in flight, and what it sent since.
#[derive(Default)]
struct Device {
    waiting: Vec<Queued>,
}

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
        let (client, events) = AsyncClient::new(opts, 65_536);
        let mut poll = poll_once(events);
        let this = Arc::new(self);
        let mut pending: FuturesOrdered<InFlight> = FuturesOrdered::new();
        // Devices with a commit in flight (see the module comment), and those commits.
        let mut devices: HashMap<String, Device> = HashMap::new();
        let mut chains: FuturesUnordered<Chain> = FuturesUnordered::new();
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
                Some(device) = chains.next(), if !chains.is_empty() => {
                    let next = devices.get_mut(&device).map(|d| std::mem::take(&mut d.waiting)).unwrap_or_default();
                    if next.is_empty() {
                        devices.remove(&device);
                    } else {
                        let chain = this.start(device, next, &client, &shutdown).await;
                        chains.push(chain);
                    }
                }
                (events, ev) = &mut poll => {
                    poll = poll_once(events);
                    match ev {
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
                        let on = connection;
                        match this.prepare(&p, &client) {
                            Err(handled) => pending.push_back(Box::pin(async move { (p, on, handled) })),
                            Ok((envelope, body)) => {
                                let (done, answer) = tokio::sync::oneshot::channel();
                                let device = envelope.aggregate_id.clone();
                                let queued = Queued { topic: p.topic.clone(), envelope, body, done };
                                pending.push_back(Box::pin(async move {
                                    // A dropped sender is a message shut down before its commit.
                                    (p, on, answer.await.unwrap_or(Handled::Abandoned))
                                }));
                                // Handed to the writer here, in the loop, so that the outbox
                                // receives messages in arrival order; a device already
                                // committing queues it for its next commit.
                                match devices.get_mut(&device) {
                                    Some(d) => d.waiting.push(queued),
                                    None => {
                                        devices.insert(device.clone(), Device::default());
                                        let chain = this.start(device, vec![queued], &client, &shutdown).await;
                                        chains.push(chain);
                                    }
                                }
                            }
                        }
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
                    }
                }
            }
        }

        // Drain: acknowledge what was committed; the rest stays with the broker. A device's
        // messages not yet handed to the writer are dropped unacknowledged.
        // The event loop keeps running meanwhile, so the acks go out as they are queued (new
        // messages that arrive are left unacknowledged, for the broker to hand over again).
        devices.clear();
        let drain = async {
            while !pending.is_empty() || !chains.is_empty() {
                tokio::select! {
                    Some((publish, on, handled)) = pending.next(), if !pending.is_empty() => {
                        this.finish(&client, &publish, on == connection, handled);
                    }
                    Some(_) = chains.next(), if !chains.is_empty() => {}
                    (events, ev) = &mut poll => {
                        poll = poll_once(events);
                        if ev.is_err() {
                            connection += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                let (events, ev) = (&mut poll).await;
                if ev.is_err() {
                    break;
                }
                poll = poll_once(events);
            }
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
            let details = json!([FieldError {
                field: String::new(),
                message: format!("{} bytes; the limit is {limit} bytes", p.payload.len()),
            }]);
            report(
                client,
                &p.topic,
                "payload_too_large",
                "message too large",
                details,
            );
            return Err(Handled::Rejected);
        }
        let checked = serde_json::from_slice::<Value>(&p.payload)
            .map_err(|e| {
                (
                    "invalid JSON".to_string(),
                    json!([FieldError {
                        field: String::new(),
                        message: e.to_string(),
                    }]),
                )
            })
            .and_then(|body| {
                let sub = Submission {
                    source: Source::Mqtt,
                    subject: None,
                    traceparent: Some(crate::envelope::trace::new_trace()),
                    aggregate_id: Some(device.clone()),
                    // A device never speaks for the inference sidecar.
                    ai_allowed: false,
                };
                envelope::validate_request(&body, &sub, self.rules, self.clock.now())
                    .map(|env| (env, body))
                    .map_err(|errs: Vec<FieldError>| ("validation failed".to_string(), json!(errs)))
            });
        checked.map_err(|(error, details)| {
            metrics::counter!("cj_ingest_rejected_total", "reason" => "invalid_mqtt").increment(1);
            tracing::warn!(device = %device, error = %error, details = %details, "MQTT message rejected.");
            let code = crate::infra::http::code_of(axum::http::StatusCode::BAD_REQUEST, &details);
            report(client, &p.topic, code, &error, details);
            Handled::Rejected
        })
    }

    /// Hands a device's queued messages to the writer as one job (so they commit together, in
    /// order) and returns the future that waits for their commit.
    async fn start(
        self: &Arc<Self>,
        device: String,
        batch: Vec<Queued>,
        client: &AsyncClient,
        shutdown: &CancellationToken,
    ) -> Chain {
        let ticket = self.writer.send(pendings(&batch)).await;
        let this = self.clone();
        let client = client.clone();
        let stop = shutdown.clone();
        Box::pin(async move {
            this.commit(batch, ticket, &client, &stop).await;
            device
        })
    }

    /// Waits for a device's commit (the first attempt was sent with `ticket`) and answers each
    /// message. Database outages are waited out and the same messages retried, in order, while
    /// the device's later messages wait behind them (they stay unacknowledged meanwhile, which
    /// also stops the broker from sending more than `inflight`).
    async fn commit(
        &self,
        mut batch: Vec<Queued>,
        ticket: Result<super::writer::Ticket, WriteError>,
        client: &AsyncClient,
        shutdown: &CancellationToken,
    ) {
        let mut backoff = Duration::from_millis(100);
        let mut attempt = Some(ticket);
        loop {
            let result = match attempt.take() {
                Some(Ok(ticket)) => ticket.wait().await,
                Some(Err(e)) => Err(e),
                None => self.writer.submit(pendings(&batch)).await,
            };
            match result {
                Ok(outcomes) => {
                    let mut retry = Vec::new();
                    for (q, outcome) in batch.into_iter().zip(outcomes) {
                        match outcome {
                            Outcome::Accepted(_) => {
                                metrics::counter!("cj_events_accepted_total", "source" => "mqtt")
                                    .increment(1);
                                let _ = q.done.send(Handled::Accepted);
                            }
                            Outcome::Conflict(c) => {
                                metrics::counter!("cj_ingest_rejected_total", "reason" => "conflict")
                                    .increment(1);
                                tracing::warn!(device = %q.envelope.aggregate_id, error = %c, "MQTT message refused.");
                                report(
                                    client,
                                    &q.topic,
                                    "idempotency_conflict",
                                    &c.to_string(),
                                    json!([]),
                                );
                                let _ = q.done.send(Handled::Rejected);
                            }
                            Outcome::Unavailable => retry.push(q),
                        }
                    }
                    if retry.is_empty() {
                        return;
                    }
                    batch = retry;
                }
                Err(WriteError::Unavailable) => {}
                Err(e) => {
                    let device = batch.first().map(|q| q.envelope.aggregate_id.as_str());
                    tracing::error!(device = ?device, error = %e, "MQTT messages could not be stored; retrying.");
                }
            }
            // On shutdown the messages are dropped unanswered: not acknowledged, redelivered.
            if shutdown
                .run_until_cancelled(tokio::time::sleep(backoff))
                .await
                .is_none()
            {
                return;
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

fn pendings(batch: &[Queued]) -> Vec<Pending> {
    batch
        .iter()
        .map(|q| Pending::new(q.envelope.clone(), &q.body, None))
        .collect()
}

/// Tells the device why its message was refused, on `…/{device}/errors` (the topic with its last
/// segment replaced). Best effort: a full client queue drops the report, never the ack.
fn report(client: &AsyncClient, topic: &str, code: &str, error: &str, details: Value) {
    let Some((base, _)) = topic.rsplit_once('/') else {
        return;
    };
    // The same shape and codes as an HTTP answer to the same refusal.
    let body = json!({ "error": error, "code": code, "details": details }).to_string();
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
