//! Per-device MQTT identities (`cornjacket devices …`) and the broker's ACL, against a Mosquitto
//! of the test's own configured exactly as `scripts/infra.sh` configures the shared one. Every
//! refusal is shown with a real client.

use crate::common::mosquitto;

use std::process::Command;
use std::time::Duration;

use crate::common::*;
use cornjacket::services::Service;
use mosquitto::Mosquitto;
use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Packet, QoS, SubscribeReasonCode};
use serde_json::{Value, json};
use uuid::Uuid;

/// Runs `cornjacket devices …` against the broker; returns whether it succeeded and its stdout
/// (stderr appended).
fn devices(broker: &Mosquitto, args: &[&str]) -> (bool, String) {
    let out = cornjacket()
        .arg("devices")
        .args(args)
        .env_clear()
        .env("CJ_MQTT_URL", broker.url())
        .env("CJ_MQTT_ADMIN_USERNAME", mosquitto::ADMIN_USER)
        .env("CJ_MQTT_ADMIN_PASSWORD", mosquitto::ADMIN_PASS)
        .env("CJ_LOG_LEVEL", "warn")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn devices_ok(broker: &Mosquitto, args: &[&str]) -> String {
    let (ok, text) = devices(broker, args);
    assert!(ok, "devices {args:?}: {text}");
    text
}

fn password_in(text: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix("password: "))
        .unwrap_or_else(|| panic!("a generated password in {text}"))
        .trim()
        .to_string()
}

fn options(port: u16, user: &str, pass: &str) -> MqttOptions {
    let mut o = MqttOptions::new(unique("c-"), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5))
        .set_credentials(user, pass);
    o
}

/// Connects; Ok(client, eventloop) once the broker accepted, Err with the refusal otherwise.
async fn connect(
    port: u16,
    user: &str,
    pass: &str,
) -> Result<(AsyncClient, rumqttc::EventLoop), ConnectionError> {
    let (c, mut ev) = AsyncClient::new(options(port, user, pass), 100);
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("broker answered");
    r.map(|_| (c, ev))
}

fn refused(r: Result<(AsyncClient, rumqttc::EventLoop), ConnectionError>) -> bool {
    matches!(r, Err(ConnectionError::ConnectionRefused(_)))
}

/// Subscribes and returns whether the broker granted it; the event loop then forwards the
/// messages received.
async fn subscribe(
    c: &AsyncClient,
    mut ev: rumqttc::EventLoop,
    topic: &str,
) -> (bool, tokio::sync::mpsc::UnboundedReceiver<Value>) {
    c.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    let granted = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::SubAck(a)) = ev.poll().await.unwrap() {
                return a
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_)));
            }
        }
    })
    .await
    .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(e) = ev.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = e {
                let _ = tx.send(serde_json::from_slice(&p.payload).unwrap_or(Value::Null));
            }
        }
    });
    (granted, rx)
}

/// Publishes at QoS 1 with mosquitto_pub over MQTT 5, which reports the PUBACK's reason (on
/// stderr: it exits 0 either way); true when the broker accepted it.
fn publish_v5(port: u16, user: &str, pass: &str, topic: &str, body: &str) -> (bool, String) {
    let out = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-V",
            "mqttv5",
            "-q",
            "1",
        ])
        .args(["-u", user, "-P", pass, "-t", topic, "-m", body])
        .output()
        .expect("mosquitto_pub (make infra-up installs mosquitto-clients)");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success() && !err.contains("failed"), err)
}

fn reading(id: Uuid) -> String {
    json!({"event_type": "sensor.reading", "event_id": id, "payload": {"value": 1, "unit": "c"}})
        .to_string()
}

async fn stored(pool: &sqlx::PgPool) -> Vec<(Uuid, String)> {
    sqlx::query_as("SELECT event_id, aggregate_id FROM ingestion.event_store")
        .fetch_all(pool)
        .await
        .unwrap_or_default()
}

#[tokio::test]
async fn a_device_publishes_as_itself_and_every_other_use_is_refused_by_the_broker() {
    let broker = Mosquitto::start();
    // The platform on the production topic: the broker is the test's own.
    let app = TestApp::spawn_with(&[Service::Ingestion], |e| {
        e.insert("CJ_MQTT_URL".into(), broker.url());
        e.insert("CJ_MQTT_CLIENT_ID".into(), unique("cj-"));
    })
    .await;
    app.wait_ready().await;
    let health = app.url(Service::Ingestion, "/health");
    eventually(Duration::from_secs(30), || async {
        let v: Value = app.http.get(&health).send().await.ok()?.json().await.ok()?;
        (v["checks"]["mqtt"]["connected"] == true).then_some(())
    })
    .await;

    let a = unique("dev-a-");
    let b = unique("dev-b-");
    let pass_a = password_in(&devices_ok(&broker, &["add", &a]));
    devices_ok(&broker, &["add", &b, "--password", "b-secret-1"]);
    let (ok, text) = devices(&broker, &["add", &a]);
    assert!(!ok && text.contains("already exists"), "{text}");
    let (ok, text) = devices(&broker, &["add", "x/+"]);
    assert!(!ok && text.contains("not a device id"), "{text}");
    let listed = devices_ok(&broker, &["list"]);
    let mut want = vec![a.clone(), b.clone()];
    want.sort();
    assert_eq!(listed.lines().collect::<Vec<_>>(), want);

    // Wrong password, and the platform's or another device's name with a device's password.
    assert!(refused(connect(broker.port, &a, "wrong").await));
    assert!(refused(connect(broker.port, &b, &pass_a).await));

    // The device reads its own reports, and only its own.
    let (ca, eva) = connect(broker.port, &a, &pass_a).await.unwrap();
    let (granted, mut own_errors) = subscribe(&ca, eva, &format!("devices/{a}/errors")).await;
    assert!(granted, "a device reads its own errors");
    let (cx, evx) = connect(broker.port, &a, &pass_a).await.unwrap();
    let (granted, _) = subscribe(&cx, evx, &format!("devices/{b}/errors")).await;
    assert!(!granted, "another device's errors are refused");
    let (cx, evx) = connect(broker.port, &a, &pass_a).await.unwrap();
    let (granted, _) = subscribe(&cx, evx, "$share/cornjacket/devices/+/events").await;
    assert!(
        !granted,
        "only the platform's user joins the shared subscription"
    );
    let (cx, evx) = connect(broker.port, &a, &pass_a).await.unwrap();
    let (granted, _) = subscribe(&cx, evx, "devices/+/events").await;
    assert!(!granted, "a device does not read other devices' events");

    // Its own events go through; another device's topic is refused at the broker.
    let own = Uuid::now_v7();
    let (ok, err) = publish_v5(
        broker.port,
        &a,
        &pass_a,
        &format!("devices/{a}/events"),
        &reading(own),
    );
    assert!(ok, "{err}");
    let forged = Uuid::now_v7();
    let (ok, err) = publish_v5(
        broker.port,
        &a,
        &pass_a,
        &format!("devices/{b}/events"),
        &reading(forged),
    );
    assert!(!ok && err.contains("Not authorized"), "refused: {err}");
    let (ok, err) = publish_v5(
        broker.port,
        &a,
        &pass_a,
        &format!("devices/{a}/errors"),
        "{}",
    );
    assert!(
        !ok && err.contains("Not authorized"),
        "a device cannot forge reports: {err}"
    );
    // A report to the device for its invalid message reaches it.
    let (ok, err) = publish_v5(
        broker.port,
        &a,
        &pass_a,
        &format!("devices/{a}/events"),
        "{bad",
    );
    assert!(ok, "{err}");
    let report = tokio::time::timeout(Duration::from_secs(10), own_errors.recv())
        .await
        .expect("an error report")
        .unwrap();
    assert_eq!(report["error"], "invalid JSON");

    let pool = app.pool().await;
    eventually(Duration::from_secs(20), || async {
        (!stored(&pool).await.is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        stored(&pool).await,
        vec![(own, a.clone())],
        "the forged message never arrived"
    );

    // Rotate: the old password stops working, the new one works.
    let pass_a2 = password_in(&devices_ok(&broker, &["rotate", &a]));
    assert_ne!(pass_a, pass_a2);
    assert!(refused(connect(broker.port, &a, &pass_a).await));
    assert!(connect(broker.port, &a, &pass_a2).await.is_ok());

    // Remove: the device can no longer connect, and a connected one is disconnected.
    let (cb, mut evb) = connect(broker.port, &b, "b-secret-1").await.unwrap();
    devices_ok(&broker, &["remove", &b]);
    let dropped = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if evb.poll().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(dropped.is_ok(), "the removed device was disconnected");
    drop(cb);
    assert!(refused(connect(broker.port, &b, "b-secret-1").await));
    let (ok, text) = devices(&broker, &["remove", &b]);
    assert!(!ok && text.contains("no device"), "{text}");
    assert_eq!(devices_ok(&broker, &["list"]).trim(), a);
}

#[tokio::test]
async fn the_platform_role_alone_is_enough_for_the_platform() {
    // The roles dynsec-setup.sh creates: a user with only `platform` (as in production, without
    // the development role) can join the shared subscription and report to devices, and nothing
    // else.
    let broker = Mosquitto::start();
    let ctrl = |args: &[&str]| {
        let out = Command::new("mosquitto_ctrl")
            .args(["-h", "127.0.0.1", "-p", &broker.port.to_string()])
            .args([
                "-u",
                mosquitto::ADMIN_USER,
                "-P",
                mosquitto::ADMIN_PASS,
                "dynsec",
            ])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(!text.contains("Error"), "{args:?}: {text}");
    };
    ctrl(&["createClient", "platform-only", "-p", "pw"]);
    ctrl(&["addClientRole", "platform-only", "platform"]);
    let (c, ev) = connect(broker.port, "platform-only", "pw").await.unwrap();
    let (granted, _) = subscribe(&c, ev, "$share/cornjacket/devices/+/events").await;
    assert!(granted);
    let (c, ev) = connect(broker.port, "platform-only", "pw").await.unwrap();
    let (granted, _) = subscribe(&c, ev, "#").await;
    assert!(!granted);
    let (ok, err) = publish_v5(
        broker.port,
        "platform-only",
        "pw",
        "devices/d1/errors",
        "{}",
    );
    assert!(ok, "{err}");
    let (ok, err) = publish_v5(
        broker.port,
        "platform-only",
        "pw",
        "devices/d1/events",
        "{}",
    );
    assert!(!ok && err.contains("Not authorized"), "{err}");
}
