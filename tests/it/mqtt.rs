//! MQTT device ingestion (SPEC §12) against the real Mosquitto.

use crate::common::mosquitto;

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use cornjacket::services::Service;
use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use uuid::Uuid;

const USER: &str = "cornjacket";
const PASS: &str = "cornjacket";

/// MQTT settings for one test: its own topic root and share group, so parallel tests never see
/// each other's messages.
fn mqtt_env(env: &mut HashMap<String, String>, port: u16, root: &str, client_id: &str) {
    env.insert("CJ_MQTT_URL".into(), format!("mqtt://127.0.0.1:{port}"));
    env.insert(
        "CJ_MQTT_TOPIC".into(),
        format!("$share/{root}g/{root}/devices/+/events"),
    );
    env.insert("CJ_MQTT_CLIENT_ID".into(), client_id.into());
}

fn client(port: u16, creds: Option<(&str, &str)>) -> (AsyncClient, rumqttc::EventLoop) {
    let mut o = MqttOptions::new(unique("dev-"), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    // Room for the oversized messages some tests send (rumqttc's default is 10 KiB).
    o.set_max_packet_size(1 << 20, 1 << 20);
    if let Some((u, p)) = creds {
        o.set_credentials(u, p);
    }
    AsyncClient::new(o, 1000)
}

/// Publishes at QoS 1 and waits for every PUBACK.
async fn publish_all(port: u16, msgs: Vec<(String, Vec<u8>)>) {
    let (c, mut ev) = client(port, Some((USER, PASS)));
    let n = msgs.len();
    let sender = tokio::spawn(async move {
        for (t, m) in msgs {
            c.publish(t, QoS::AtLeastOnce, false, m).await.unwrap();
        }
        c
    });
    let mut acked = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked < n {
        assert!(Instant::now() < deadline, "publishes not acknowledged");
        match tokio::time::timeout(Duration::from_secs(5), ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("publisher connection failed: {e}"),
            Err(_) => {}
        }
    }
    let _ = sender.await;
}

async fn store_rows(pool: &sqlx::PgPool) -> Vec<(Uuid, String, Value)> {
    sqlx::query_as("SELECT event_id, aggregate_id, metadata FROM ingestion.event_store")
        .fetch_all(pool)
        .await
        .unwrap_or_default()
}

#[tokio::test]
async fn a_device_publish_becomes_an_event_and_a_projection() {
    let root = unique("m");
    let app = TestApp::spawn_with(
        &[Service::Ingestion, Service::Eventhandler, Service::Query],
        |e| mqtt_env(e, mqtt_port(), &root, &unique("cj-")),
    )
    .await;
    app.wait_ready().await;
    let health = app.url(Service::Ingestion, "/health");
    eventually(Duration::from_secs(20), || async {
        let v: Value = app.http.get(&health).send().await.ok()?.json().await.ok()?;
        (v["checks"]["mqtt"]["connected"] == true).then_some(())
    })
    .await;
    let id = Uuid::now_v7();
    let body = json!({"event_type": "sensor.reading", "payload": {"value": 42.0, "unit": "c"}, "event_id": id});
    publish_all(
        mqtt_port(),
        vec![(
            format!("{root}/devices/dev-9/events"),
            body.to_string().into_bytes(),
        )],
    )
    .await;
    let pool = app.pool().await;
    let rows = eventually(Duration::from_secs(20), || async {
        let r = store_rows(&pool).await;
        (!r.is_empty()).then_some(r)
    })
    .await;
    assert_eq!(rows[0].0, id);
    assert_eq!(rows[0].1, "dev-9", "aggregate_id is the device id");
    assert_eq!(rows[0].2["source"], "mqtt");
    let p = eventually(Duration::from_secs(45), || async {
        let r = app
            .http
            .get(app.url(
                Service::Query,
                "/api/v1/query/projections/sensor_state/dev-9",
            ))
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())?;
        r.json::<Value>().await.ok()
    })
    .await;
    assert_eq!(p["state"]["value"], 42.0);
}

#[tokio::test]
async fn anonymous_and_wrong_password_connections_are_refused() {
    for creds in [None, Some((USER, "wrong-password"))] {
        let (_c, mut ev) = client(mqtt_port(), creds);
        let r = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(a))) => return Ok(a),
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
        })
        .await
        .expect("broker answered");
        match r {
            Err(ConnectionError::ConnectionRefused(code)) => {
                let code = format!("{code:?}");
                assert!(
                    code.contains("NotAuthorized") || code.contains("BadUserNamePassword"),
                    "{code}"
                )
            }
            other => panic!("{creds:?} should be refused, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn an_invalid_message_is_reported_to_the_device_and_not_redelivered() {
    let root = unique("m");
    let client_id = unique("cj-");
    let db = TestDb::new().await;
    let prefix = topic_prefix();
    let mut env = test_env(&db.url, &prefix);
    mqtt_env(&mut env, mqtt_port(), &root, &client_id);
    let same_db = || TestDb {
        name: db.name.clone(),
        url: db.url.clone(),
    };
    let mut app = TestApp::start(
        same_db(),
        prefix.clone(),
        env.clone(),
        &[Service::Ingestion],
    )
    .await;
    app.wait_ready().await;

    // Listen on the device's error topic.
    let (listener, mut lev) = client(mqtt_port(), Some((USER, PASS)));
    listener
        .subscribe(format!("{root}/devices/bad-1/errors"), QoS::AtLeastOnce)
        .await
        .unwrap();
    let (tx, mut errors) = tokio::sync::mpsc::unbounded_channel::<Value>();
    tokio::spawn(async move {
        while let Ok(ev) = lev.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = ev {
                let _ = tx.send(serde_json::from_slice(&p.payload).unwrap_or(Value::Null));
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let health = app.url(Service::Ingestion, "/health");
    eventually(Duration::from_secs(20), || async {
        let v: Value = app.http.get(&health).send().await.ok()?.json().await.ok()?;
        (v["checks"]["mqtt"]["connected"] == true).then_some(())
    })
    .await;
    let topic = format!("{root}/devices/bad-1/events");
    publish_all(
        mqtt_port(),
        vec![
            (topic.clone(), b"{not json".to_vec()),
            (
                topic.clone(),
                json!({"event_type": "sensor.reading", "payload": {"value": "x"}})
                    .to_string()
                    .into_bytes(),
            ),
        ],
    )
    .await;
    let first = tokio::time::timeout(Duration::from_secs(10), errors.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first["error"], "invalid JSON");
    let second = tokio::time::timeout(Duration::from_secs(10), errors.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second["error"], "validation failed");
    let fields: HashSet<String> = second["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["field"].as_str().unwrap().to_string())
        .collect();
    assert!(
        fields.contains("payload.value") && fields.contains("payload.unit"),
        "{second}"
    );

    // Restart the subscriber on the same persistent session: nothing is handed over again.
    assert!(app.stop().await);
    let app2 = TestApp::start(same_db(), prefix, env, &[Service::Ingestion]).await;
    app2.wait_ready().await;
    let again = tokio::time::timeout(Duration::from_secs(3), errors.recv()).await;
    assert!(
        again.is_err(),
        "the rejected messages were acknowledged, not redelivered: {again:?}"
    );
    let pool = app2.pool().await;
    let n: i64 = sqlx::query_scalar("SELECT (SELECT count(*) FROM ingestion.outbox) + (SELECT count(*) FROM ingestion.event_store)")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 0, "nothing reached the outbox");
}

#[tokio::test]
async fn two_instances_share_the_subscription_and_ingest_each_message_once() {
    let root = unique("m");
    let prefix = topic_prefix();
    let (db_a, db_b) = (TestDb::new().await, TestDb::new().await);
    let mut env_a = test_env(&db_a.url, &prefix);
    let mut env_b = test_env(&db_b.url, &prefix);
    mqtt_env(&mut env_a, mqtt_port(), &root, &unique("cj-a-"));
    mqtt_env(&mut env_b, mqtt_port(), &root, &unique("cj-b-"));
    // Separate databases make each instance's share visible: their union must be every message,
    // their intersection empty.
    let a = TestApp::start(db_a, prefix.clone(), env_a, &[Service::Ingestion]).await;
    let b = TestApp::start(db_b, prefix.clone(), env_b, &[Service::Ingestion]).await;
    for app in [&a, &b] {
        app.wait_ready().await;
        let health = app.url(Service::Ingestion, "/health");
        eventually(Duration::from_secs(20), || async {
            let v: Value = app.http.get(&health).send().await.ok()?.json().await.ok()?;
            (v["checks"]["mqtt"]["connected"] == true).then_some(())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ids: Vec<Uuid> = (0..200).map(|_| Uuid::now_v7()).collect();
    let msgs = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let body = json!({"event_type": "sensor.reading", "event_id": id,
                              "payload": {"value": i, "unit": "c"}});
            (
                format!("{root}/devices/d{}/events", i % 10),
                body.to_string().into_bytes(),
            )
        })
        .collect();
    publish_all(mqtt_port(), msgs).await;
    let (pa, pb) = (a.pool().await, b.pool().await);
    let (sa, sb) = eventually(Duration::from_secs(30), || async {
        let count = |p: &sqlx::PgPool| {
            let p = p.clone();
            async move {
                sqlx::query_scalar::<_, Uuid>(
                    "SELECT event_id FROM ingestion.outbox UNION ALL SELECT event_id FROM ingestion.event_store",
                )
                .fetch_all(&p)
                .await
                .unwrap_or_default()
            }
        };
        let (x, y) = (count(&pa).await, count(&pb).await);
        (x.len() + y.len() >= 200).then_some((x, y))
    })
    .await;
    let set_a: HashSet<Uuid> = sa.iter().copied().collect();
    let set_b: HashSet<Uuid> = sb.iter().copied().collect();
    assert!(
        !set_a.is_empty() && !set_b.is_empty(),
        "both instances received some: {} / {}",
        set_a.len(),
        set_b.len()
    );
    assert!(set_a.is_disjoint(&set_b), "no message went to both");
    let all: HashSet<Uuid> = set_a.union(&set_b).copied().collect();
    assert_eq!(all, ids.into_iter().collect::<HashSet<_>>());
}

#[tokio::test]
async fn the_subscriber_reconnects_after_a_broker_restart() {
    let mut broker = mosquitto::Mosquitto::start();
    let root = unique("m");
    let app = TestApp::spawn_with(&[Service::Ingestion], |e| {
        mqtt_env(e, broker.port, &root, &unique("cj-"))
    })
    .await;
    app.wait_ready().await;
    let health = app.url(Service::Ingestion, "/health");
    let mqtt_connected = |want: bool| {
        let (app, health) = (&app, health.clone());
        async move {
            eventually(Duration::from_secs(30), || async {
                let r = app.http.get(&health).send().await.ok()?;
                let status = r.status();
                let v: Value = r.json().await.ok()?;
                (v["checks"]["mqtt"]["connected"] == want).then_some((status, v))
            })
            .await
        }
    };
    mqtt_connected(true).await;
    let broker_port = broker.port;
    // Device-chosen ids: a message the broker redelivers after its restart (committed, but the
    // ack was lost with the broker) is then a no-op, as devices are told to rely on.
    let (id1, id2) = (Uuid::now_v7(), Uuid::now_v7());
    let send = |n: i32, id: Uuid| {
        let topic = format!("{root}/devices/r1/events");
        let body = json!({"event_type": "sensor.reading", "event_id": id,
                          "payload": {"value": n, "unit": "c"}});
        publish_all(broker_port, vec![(topic, body.to_string().into_bytes())])
    };
    send(1, id1).await;
    broker.stop();
    let (status, v) = mqtt_connected(false).await;
    assert_eq!(
        status, 200,
        "MQTT down alone is degraded, not unhealthy: {v}"
    );
    assert_eq!(v["status"], "degraded");
    broker.restart();
    mqtt_connected(true).await;
    send(2, id2).await;
    let pool = app.pool().await;
    let ids = eventually(Duration::from_secs(30), || async {
        let ids: HashSet<Uuid> = store_rows(&pool).await.into_iter().map(|r| r.0).collect();
        (ids.len() >= 2).then_some(ids)
    })
    .await;
    assert_eq!(ids, HashSet::from([id1, id2]));
}

#[tokio::test]
async fn a_crash_before_the_ack_means_redelivery_and_no_loss() {
    // The database is cut so the message is received but cannot commit (and is not acked); the
    // process is then killed, the database restored, and a new process with the same session
    // gets the message again.
    let db = TestDb::new().await;
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let prefix = topic_prefix();
    let root = unique("m");
    let client_id = unique("cj-");
    let port = free_port();
    let mut env = test_env(&with_host(&db.url, &proxy.addr.to_string()), &prefix);
    mqtt_env(&mut env, mqtt_port(), &root, &client_id);
    env.insert("CJ_INGESTION_PORT".into(), port.to_string());
    env.insert("CJ_DB_ACQUIRE_TIMEOUT".into(), "1s".into());
    let spawn = |env: &HashMap<String, String>| {
        cornjacket()
            .args(["serve", "--services", "ingestion"])
            .env_clear()
            .envs(env)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let http = reqwest::Client::new();
    let health = format!("http://127.0.0.1:{port}/health");
    let connected = || async {
        eventually(Duration::from_secs(30), || async {
            let v: Value = http.get(&health).send().await.ok()?.json().await.ok()?;
            (v["checks"]["mqtt"]["connected"] == true && v["checks"].get("outbox").is_some())
                .then_some(())
        })
        .await
    };
    let mut first = spawn(&env);
    connected().await;
    proxy.cut();
    let id = Uuid::now_v7();
    let body = json!({"event_type": "sensor.reading", "event_id": id, "payload": {"value": 1, "unit": "c"}});
    publish_all(
        mqtt_port(),
        vec![(
            format!("{root}/devices/k1/events"),
            body.to_string().into_bytes(),
        )],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await; // received, commit failing, no ack
    let _ = Command::new("kill")
        .args(["-KILL", &first.id().to_string()])
        .status();
    // Never block this runtime: it also drives the database proxy the platform talks through.
    let _ = tokio::task::spawn_blocking(move || first.wait()).await;
    proxy.restore();
    let mut second = spawn(&env);
    let pool = db.pool().await;
    eventually(Duration::from_secs(30), || async {
        let rows = store_rows(&pool).await;
        rows.iter().any(|r| r.0 == id).then_some(())
    })
    .await;
    let _ = Command::new("kill")
        .args(["-TERM", &second.id().to_string()])
        .status();
    let status = tokio::task::spawn_blocking(move || second.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "SIGTERM drained and exited 0: {status:?}");
}

/// Subscribes to a topic as the development user and forwards each message's JSON body.
async fn listen(port: u16, topic: &str) -> tokio::sync::mpsc::UnboundedReceiver<Value> {
    let (listener, mut lev) = client(port, Some((USER, PASS)));
    listener.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _keep = listener;
        let mut subscribed_tx = Some(subscribed_tx);
        while let Ok(ev) = lev.poll().await {
            match ev {
                Event::Incoming(Packet::SubAck(_)) => {
                    if let Some(t) = subscribed_tx.take() {
                        let _ = t.send(());
                    }
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let _ = tx.send(serde_json::from_slice(&p.payload).unwrap_or(Value::Null));
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), subscribed)
        .await
        .expect("listener subscribed")
        .unwrap();
    rx
}

async fn wait_mqtt_connected(app: &TestApp) {
    let health = app.url(Service::Ingestion, "/health");
    eventually(Duration::from_secs(30), || async {
        let v: Value = app.http.get(&health).send().await.ok()?.json().await.ok()?;
        (v["checks"]["mqtt"]["connected"] == true).then_some(())
    })
    .await;
}

fn reading(id: Uuid, pad: usize) -> Vec<u8> {
    json!({"event_type": "sensor.reading", "event_id": id,
           "payload": {"value": 1, "unit": "c", "pad": "x".repeat(pad)}})
    .to_string()
    .into_bytes()
}

#[test]
fn the_client_reads_packets_larger_than_the_brokers_limit() {
    let cfg = cornjacket::config::Config::from_map(&HashMap::new()).unwrap();
    let mqtt = cfg.mqtt.unwrap();
    let broker = mosquitto::template_max_packet_size();
    assert!(
        mqtt.max_packet_bytes > broker,
        "CJ_MQTT_MAX_PACKET_BYTES ({}) above Mosquitto's max_packet_size ({broker})",
        mqtt.max_packet_bytes
    );
    assert!(
        mqtt.max_payload_bytes < broker,
        "the body limit is below the broker's, so an oversized message reaches the platform"
    );
}

#[tokio::test]
async fn an_oversized_message_is_acknowledged_reported_and_the_next_one_taken_in() {
    let broker = mosquitto::Mosquitto::start();
    let root = unique("m");
    let app = TestApp::spawn_with(&[Service::Ingestion], |e| {
        mqtt_env(e, broker.port, &root, &unique("cj-"))
    })
    .await;
    app.wait_ready().await;
    wait_mqtt_connected(&app).await;
    let mut errors = listen(broker.port, &format!("{root}/devices/big-1/errors")).await;
    let limit = app.config.ingestion.max_body_bytes;
    let topic = format!("{root}/devices/big-1/events");
    let (big, small) = (Uuid::now_v7(), Uuid::now_v7());
    // Over the body limit, under the broker's: the broker hands it over, the platform refuses it.
    publish_all(
        broker.port,
        vec![
            (topic.clone(), reading(big, limit + 1000)),
            (topic.clone(), reading(small, 0)),
        ],
    )
    .await;
    let report = tokio::time::timeout(Duration::from_secs(10), errors.recv())
        .await
        .expect("an error report")
        .unwrap();
    assert_eq!(report["error"], "message too large", "{report}");
    let detail = report["details"][0]["message"].as_str().unwrap();
    assert!(
        detail.contains(&format!("the limit is {limit} bytes")),
        "{detail}"
    );

    // Over the broker's own limit: refused by the broker (connection closed, no PUBACK).
    let (c, mut ev) = client(broker.port, Some((USER, PASS)));
    let huge = reading(Uuid::now_v7(), mosquitto::template_max_packet_size());
    c.publish(topic.clone(), QoS::AtLeastOnce, false, huge)
        .await
        .unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return false,
                Ok(_) => {}
                Err(_) => return true,
            }
        }
    })
    .await
    .unwrap();
    assert!(
        refused,
        "the broker closed the connection instead of acknowledging"
    );
    drop((c, ev));
    let after = Uuid::now_v7();
    publish_all(broker.port, vec![(topic.clone(), reading(after, 0))]).await;

    let pool = app.pool().await;
    let ids = eventually(Duration::from_secs(20), || async {
        let ids: HashSet<Uuid> = store_rows(&pool).await.into_iter().map(|r| r.0).collect();
        (ids.len() >= 2).then_some(ids)
    })
    .await;
    assert_eq!(ids, HashSet::from([small, after]));
    let m = scrape(&app, Service::Ingestion).await;
    assert_eq!(
        metric(
            &m,
            "cj_ingest_rejected_total",
            &[("reason", "too_large_mqtt")]
        ),
        1.0
    );
    assert_eq!(
        metric(&m, "cj_mqtt_disconnects_total", &[]),
        0.0,
        "no reconnect loop"
    );
}

#[tokio::test]
async fn after_a_session_loss_no_ack_of_the_old_connection_is_sent_on_the_new_one() {
    let mut broker = mosquitto::Mosquitto::start_with("log_type all");
    let db = TestDb::new().await;
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let prefix = topic_prefix();
    let root = unique("m");
    let client_id = unique("cj-");
    let mut env = test_env(&with_host(&db.url, &proxy.addr.to_string()), &prefix);
    mqtt_env(&mut env, broker.port, &root, &client_id);
    env.insert("CJ_DB_ACQUIRE_TIMEOUT".into(), "1s".into());
    let app = TestApp::start(db, prefix, env, &[Service::Ingestion]).await;
    app.wait_ready().await;
    wait_mqtt_connected(&app).await;
    let topic = format!("{root}/devices/s1/events");
    let delivered = |log: &str| {
        log.lines()
            .filter(|l| {
                l.contains(&format!("Sending PUBLISH to {client_id} ")) && l.contains(&topic)
            })
            .count()
    };

    // A arrives on the first connection; its commit waits for the database.
    proxy.cut();
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    publish_all(broker.port, vec![(topic.clone(), reading(a, 0))]).await;
    eventually(Duration::from_secs(10), || async {
        (delivered(&broker.log()) == 1).then_some(())
    })
    .await;

    // The broker comes back without the session: the packet ids start again on the new one.
    broker.stop_and_lose_sessions();
    let before = broker.log().len();
    broker.restart();
    eventually(Duration::from_secs(30), || async {
        let log = broker.log();
        log[before..]
            .contains("New client connected from 127.0.0.1")
            .then_some(())?;
        log[before..]
            .contains(&format!("as {client_id} "))
            .then_some(())
    })
    .await;
    wait_mqtt_connected(&app).await;
    publish_all(broker.port, vec![(topic.clone(), reading(b, 0))]).await;
    eventually(Duration::from_secs(10), || async {
        (delivered(&broker.log()[before..]) == 1).then_some(())
    })
    .await;

    proxy.restore();
    let pool = app.pool().await;
    eventually(Duration::from_secs(30), || async {
        let ids: HashSet<Uuid> = store_rows(&pool).await.into_iter().map(|r| r.0).collect();
        (ids.contains(&a) && ids.contains(&b)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let log = broker.log();
    let acks: Vec<&str> = log[before..]
        .lines()
        .filter(|l| l.contains(&format!("Received PUBACK from {client_id} ")))
        .collect();
    assert_eq!(
        acks.len(),
        1,
        "only B, which came on the new connection, is acknowledged there: {acks:#?}"
    );
}

#[tokio::test]
async fn the_qos0_backlog_is_bounded_and_qos1_is_never_dropped() {
    let db = TestDb::new().await;
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let prefix = topic_prefix();
    let root = unique("m");
    let mut env = test_env(&with_host(&db.url, &proxy.addr.to_string()), &prefix);
    mqtt_env(&mut env, mqtt_port(), &root, &unique("cj-"));
    env.insert("CJ_DB_ACQUIRE_TIMEOUT".into(), "1s".into());
    env.insert("CJ_MQTT_QOS0_BACKLOG".into(), "5".into());
    let app = TestApp::start(db, prefix, env, &[Service::Ingestion]).await;
    app.wait_ready().await;
    wait_mqtt_connected(&app).await;

    proxy.cut();
    let topic = format!("{root}/devices/q0/events");
    let qos0: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
    let qos1: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
    let (c, mut ev) = client(mqtt_port(), Some((USER, PASS)));
    for id in &qos0 {
        c.publish(topic.clone(), QoS::AtMostOnce, false, reading(*id, 0))
            .await
            .unwrap();
    }
    tokio::spawn(async move { while ev.poll().await.is_ok() {} });
    // Then QoS 1, past the full QoS 0 backlog.
    publish_all(
        mqtt_port(),
        qos1.iter()
            .map(|id| (topic.clone(), reading(*id, 0)))
            .collect(),
    )
    .await;
    eventually(Duration::from_secs(20), || async {
        let m = scrape(&app, Service::Ingestion).await;
        (metric(&m, "cj_mqtt_messages_total", &[("outcome", "dropped_qos0")]) == 15.0).then_some(())
    })
    .await;
    drop(c);

    proxy.restore();
    let pool = app.pool().await;
    let ids = eventually(Duration::from_secs(30), || async {
        let ids: HashSet<Uuid> = store_rows(&pool).await.into_iter().map(|r| r.0).collect();
        (ids.len() >= 10).then_some(ids)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ids: HashSet<Uuid> = ids
        .union(&store_rows(&pool).await.into_iter().map(|r| r.0).collect())
        .copied()
        .collect();
    assert!(
        qos1.iter().all(|id| ids.contains(id)),
        "every QoS 1 message"
    );
    assert_eq!(
        qos0.iter().filter(|id| ids.contains(id)).count(),
        5,
        "QoS 0 up to the backlog"
    );
    assert_eq!(ids.len(), 10);
}

/// Publishes `n` messages at QoS 1, one after the other (each waits for its PUBACK); returns
/// their ids.
async fn publish_acked(port: u16, topic: &str, n: usize) -> Vec<Uuid> {
    let (c, mut ev) = client(port, Some((USER, PASS)));
    let mut acked = Vec::new();
    for _ in 0..n {
        let id = Uuid::now_v7();
        c.publish(topic, QoS::AtLeastOnce, false, reading(id, 0))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => return,
                    Ok(_) => {}
                    Err(e) => panic!("publisher connection failed: {e}"),
                }
            }
        })
        .await
        .expect("PUBACK");
        acked.push(id);
    }
    acked
}

/// The limit README states is the one the template sets.
fn queue_limit() -> usize {
    let t = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("scripts/mosquitto/mosquitto.conf.tmpl"),
    )
    .unwrap();
    t.lines()
        .find_map(|l| l.strip_prefix("max_queued_messages "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn readme_states_the_queue_limit_in_force() {
    let limit = queue_limit();
    assert!(limit >= 1_000_000, "far above Mosquitto's default of 1000");
    let readme =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .unwrap();
    let stated = format!("max_queued_messages {limit}");
    assert!(readme.contains(&stated), "README states `{stated}`");
}

#[tokio::test]
async fn messages_queued_for_the_platform_while_it_is_away_are_all_taken_in() {
    let broker = mosquitto::Mosquitto::start();
    let db = TestDb::new().await;
    let prefix = topic_prefix();
    let root = unique("m");
    let mut env = test_env(&db.url, &prefix);
    mqtt_env(&mut env, broker.port, &root, &unique("cj-"));
    let same_db = || TestDb {
        name: db.name.clone(),
        url: db.url.clone(),
    };
    // The platform's persistent session and its subscription exist; then the platform is away.
    let mut app = TestApp::start(
        same_db(),
        prefix.clone(),
        env.clone(),
        &[Service::Ingestion],
    )
    .await;
    app.wait_ready().await;
    wait_mqtt_connected(&app).await;
    assert!(app.stop().await);

    // More than Mosquitto's default queue (1000) and the in-flight window together, past which it would
    // drop the rest after the PUBACK.
    let topic = format!("{root}/devices/away/events");
    let acked = publish_acked(broker.port, &topic, 2500).await;

    let app = TestApp::start(same_db(), prefix, env, &[Service::Ingestion]).await;
    app.wait_ready().await;
    let pool = app.pool().await;
    let want: HashSet<Uuid> = acked.iter().copied().collect();
    let got = eventually(Duration::from_secs(60), || async {
        let ids: HashSet<Uuid> = sqlx::query_scalar::<_, Uuid>(
            "SELECT event_id FROM ingestion.outbox UNION ALL SELECT event_id FROM ingestion.event_store",
        )
        .fetch_all(&pool)
        .await
        .unwrap_or_default()
        .into_iter()
        .collect();
        want.is_subset(&ids).then_some(ids)
    })
    .await;
    assert_eq!(got, want);
}
