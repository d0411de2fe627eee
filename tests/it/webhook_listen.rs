//! `cornjacket webhook listen` as a subprocess, and the platform's signer, each checked against
//! the Standard Webhooks reference implementation (the `standardwebhooks` crate) instead of our own
//! verifier. Neither needs the database or a broker.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue};
use cornjacket::infra::webhook_signature::{self, Secret};
use serde_json::{Value, json};
use standardwebhooks::Webhook;

use crate::common::{cornjacket, free_port, wall_clock};

/// The specification's example secret (24 bytes), and two more (32 bytes).
const OLD: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const NEW: &str = "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const OTHER: &str = "whsec_ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

/// A running `cornjacket webhook listen`, with what it printed so far.
struct Listen {
    child: Child,
    addr: String,
    stdout: Arc<Mutex<Pipe>>,
    stderr: Arc<Mutex<Pipe>>,
}

/// A failed assertion must not leave a listener running.
impl Drop for Listen {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a child wrote to one of its pipes, and whether the pipe has closed.
#[derive(Default)]
struct Pipe {
    text: String,
    closed: bool,
}

/// Collects what a child writes to one of its pipes. The reader thread may still be draining the
/// pipe after the child has exited, so "exited" alone does not mean "everything was read".
fn collect(pipe: impl Read + Send + 'static) -> Arc<Mutex<Pipe>> {
    let text = Arc::new(Mutex::new(Pipe::default()));
    let sink = text.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            let mut t = sink.lock().unwrap_or_else(|e| e.into_inner());
            t.text.push_str(&line);
            t.text.push('\n');
        }
        sink.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
    });
    text
}

impl Listen {
    /// Starts the listener on a free loopback port with these arguments after the address and
    /// this environment (nothing else of the test's), and waits until it has bound.
    fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut child = cornjacket()
            .args(["webhook", "listen", &addr])
            .args(args)
            .env_clear()
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cornjacket webhook listen");
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        let mut l = Self {
            child,
            addr,
            stdout,
            stderr: stderr.clone(),
        };
        // The banner comes after the bind.
        l.wait_for(&stderr, "Ctrl-C stops");
        l
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Waits (up to 10 s) until `text` holds `needle`; returns all of it.
    fn wait_for(&mut self, text: &Arc<Mutex<Pipe>>, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (t, closed) = {
                let p = text.lock().unwrap();
                (p.text.clone(), p.closed)
            };
            if t.contains(needle) {
                return t;
            }
            let exited = self.child.try_wait().unwrap();
            assert!(
                !(exited.is_some() && closed) && Instant::now() < deadline,
                "expected {needle:?}; listener {exited:?}; stdout:\n{}\nstderr:\n{}",
                self.stdout.lock().unwrap().text,
                self.stderr.lock().unwrap().text
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn printed(&mut self, needle: &str) -> String {
        let out = self.stdout.clone();
        self.wait_for(&out, needle)
    }

    fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {}", self.child.id());
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "listener did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn headers(id: &str, ts: i64, signature: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("webhook-id", HeaderValue::from_str(id).unwrap());
    h.insert("webhook-timestamp", HeaderValue::from(ts));
    h.insert(
        "webhook-signature",
        HeaderValue::from_str(signature).unwrap(),
    );
    h
}

/// The headers the reference implementation makes for `body`, signed with each of `secrets`.
fn signed_by(secrets: &[&str], id: &str, ts: i64, body: &[u8]) -> HeaderMap {
    let signatures: Vec<String> = secrets
        .iter()
        .map(|s| Webhook::new(s).unwrap().sign(id, ts, body).unwrap())
        .collect();
    headers(id, ts, &signatures.join(" "))
}

fn now() -> i64 {
    wall_clock().timestamp()
}

fn envelope(id: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "event_id": id, "event_type": "system.alert", "aggregate_id": "host-1",
        "payload": {"level": "error", "message": "disk almost full"}
    }))
    .unwrap()
}

async fn post(url: &str, headers: HeaderMap, body: Vec<u8>) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(url)
        .headers(headers)
        .body(body)
        .send()
        .await
        .expect("listener answers");
    (r.status().as_u16(), r.text().await.unwrap())
}

fn error_of(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("JSON error: {body}"));
    v["error"].as_str().expect("an error string").to_string()
}

#[tokio::test]
async fn a_call_signed_by_the_reference_implementation_is_verified_and_printed() {
    let mut l = Listen::start(&["--secret", NEW], &[]);
    let body = envelope("019-verified");
    let (status, text) = post(
        &l.url("/hook"),
        signed_by(&[NEW], "msg_verified", now(), &body),
        body,
    )
    .await;
    assert_eq!(status, 204, "{text}");
    let out = l.printed("webhook-id=msg_verified");
    assert!(
        out.contains(" POST /hook webhook-id=msg_verified verified\n"),
        "{out}"
    );
    assert!(out.contains("  \"event_type\": \"system.alert\","), "{out}");
}

#[tokio::test]
async fn unsigned_tampered_stale_or_wrongly_keyed_calls_are_refused() {
    let mut l = Listen::start(&["--secret", NEW], &[]);
    let url = l.url("/any/path");
    let body = envelope("019-refused");

    let (status, text) = post(&url, HeaderMap::new(), body.clone()).await;
    assert_eq!(status, 400, "{text}");
    assert!(error_of(&text).contains("webhook-id"), "{text}");

    let mut tampered = body.clone();
    tampered.extend_from_slice(b" ");
    let signed = signed_by(&[NEW], "msg_tampered", now(), &body);
    let (status, text) = post(&url, signed, tampered).await;
    assert_eq!(status, 401, "{text}");
    assert!(error_of(&text).contains("signature"), "{text}");

    let signed = signed_by(&[OLD], "msg_wrong_key", now(), &body);
    let (status, text) = post(&url, signed, body.clone()).await;
    assert_eq!(status, 401, "{text}");

    let signed = signed_by(&[NEW], "msg_stale", now() - 600, &body);
    let (status, text) = post(&url, signed, body.clone()).await;
    assert_eq!(status, 401, "{text}");
    assert!(error_of(&text).contains("old"), "{text}");

    let out = l.printed("webhook-id=msg_stale");
    for id in ["msg_tampered", "msg_wrong_key", "msg_stale"] {
        assert!(
            out.contains(&format!("webhook-id={id} NOT verified: ")),
            "{id}: {out}"
        );
    }
    assert!(!out.contains(" verified\n"), "{out}");
}

#[tokio::test]
async fn a_call_signed_with_the_old_and_the_new_secret_verifies_with_either() {
    let given_new = Listen::start(&["--secret", NEW], &[]);
    // The environment is the other way to pass it.
    let given_old = Listen::start(&[], &[("CJ_WEBHOOK_SECRET", OLD)]);
    let body = envelope("019-rotation");
    for l in [&given_new, &given_old] {
        let signed = signed_by(&[OLD, NEW], "msg_both", now(), &body);
        assert_eq!(
            signed["webhook-signature"]
                .to_str()
                .unwrap()
                .split(' ')
                .count(),
            2
        );
        let (status, text) = post(&l.url("/hook"), signed, body.clone()).await;
        assert_eq!(status, 204, "{}: {text}", l.addr);
    }
    let signed = signed_by(&[NEW], "msg_new_only", now(), &body);
    let (status, _) = post(&given_old.url("/hook"), signed, body.clone()).await;
    assert_eq!(status, 401, "one secret is not the other");
}

#[tokio::test]
async fn a_listener_given_several_secrets_accepts_any_of_them() {
    let by_flags = Listen::start(&["--secret", OLD, "--secret", NEW], &[]);
    let by_env = Listen::start(&[], &[("CJ_WEBHOOK_SECRET", &format!("{OLD},{NEW}"))]);
    let body = envelope("019-several");
    for l in [&by_flags, &by_env] {
        for (secret, want) in [(OLD, 204), (NEW, 204), (OTHER, 401)] {
            let signed = signed_by(&[secret], "msg_several", now(), &body);
            let (status, text) = post(&l.url("/"), signed, body.clone()).await;
            assert_eq!(status, want, "{} signed with {secret}: {text}", l.addr);
        }
    }
}

#[tokio::test]
async fn it_stops_cleanly_on_sigterm_and_sigint() {
    for sig in ["-TERM", "-INT"] {
        let mut l = Listen::start(&["--secret", NEW], &[]);
        let body = envelope("019-stop");
        let signed = signed_by(&[NEW], "msg_stop", now(), &body);
        assert_eq!(post(&l.url("/hook"), signed, body).await.0, 204);
        l.signal(sig);
        let status = l.wait_exit();
        assert!(status.success(), "{sig}: {status:?}");
        let err = l.stderr.clone();
        l.wait_for(&err, "webhook listen: stopped");
    }
}

#[test]
fn a_malformed_or_missing_secret_stops_it_before_it_listens() {
    for args in [
        vec!["--secret", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
        vec!["--secret", "whsec_c2hvcnQ="],
        vec![],
    ] {
        let out = cornjacket()
            .args(["webhook", "listen", "127.0.0.1:0"])
            .args(&args)
            .env_clear()
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("--secret"), "{args:?}: {stderr}");
    }
}

/// Our signer, checked by the reference verifier: alone, beside another signature, and never
/// for another body or key.
#[test]
fn the_reference_implementation_verifies_what_the_platform_signs() {
    let (old, new) = (
        OLD.parse::<Secret>().unwrap(),
        NEW.parse::<Secret>().unwrap(),
    );
    let body = envelope("019-reference");
    let ts = now();
    let ours = |s: &Secret| webhook_signature::sign(s.key(), "msg_ref", ts, &body);
    let single = headers("msg_ref", ts, &ours(&new));
    let both = headers("msg_ref", ts, &format!("{} {}", ours(&old), ours(&new)));

    Webhook::new(NEW).unwrap().verify(&body, &single).unwrap();
    for secret in [OLD, NEW] {
        Webhook::new(secret).unwrap().verify(&body, &both).unwrap();
    }
    assert!(Webhook::new(OTHER).unwrap().verify(&body, &both).is_err());
    assert!(Webhook::new(OLD).unwrap().verify(&body, &single).is_err());
    let mut tampered = body.clone();
    tampered.push(b' ');
    assert!(Webhook::new(NEW).unwrap().verify(&tampered, &both).is_err());
}

/// Byte for byte the same signatures as the reference signer, and our verifier accepts its own.
#[test]
fn the_platform_signs_as_the_reference_implementation_does() {
    let now = wall_clock();
    for (i, secret) in [OLD, NEW, OTHER].into_iter().enumerate() {
        let key = secret.parse::<Secret>().unwrap();
        let id = format!("msg_{i}");
        let ts = now.timestamp() - i as i64;
        let body = format!("{{\"n\": {i}, \"text\": \"é ✓\"}}").into_bytes();
        let reference = Webhook::new(secret).unwrap().sign(&id, ts, &body).unwrap();
        assert_eq!(
            webhook_signature::sign(key.key(), &id, ts, &body),
            reference
        );
        let h = headers(&id, ts, &reference);
        assert_eq!(webhook_signature::verify(&[key], &h, &body, now), Ok(()));
    }
}
