//! Authentication (SPEC §11): the JWT matrix for both the ForwardAuth endpoint and `app` mode.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::*;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cornjacket::services::Service;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use uuid::Uuid;

const SECRET: &str = "test-secret-that-is-long-enough-0123456789";
const ISSUER: &str = "cornjacket-test";
const AUDIENCE: &str = "cornjacket-api";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims(scope: &str) -> Value {
    json!({"sub": "device-42", "scope": scope, "exp": now() + 600, "nbf": now() - 10,
           "iss": ISSUER, "aud": AUDIENCE})
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
}

fn hs(claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        claims,
    )
}

/// An unsigned token with `alg: none`.
fn alg_none(claims: &Value) -> String {
    let head = URL_SAFE_NO_PAD.encode(json!({"alg": "none", "typ": "JWT"}).to_string());
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{head}.{body}.")
}

fn auth_env(e: &mut HashMap<String, String>) {
    e.insert("CJ_AUTH_MODE".into(), "app".into());
    e.insert("CJ_JWT_SECRET".into(), SECRET.into());
    e.insert("CJ_JWT_ISSUER".into(), ISSUER.into());
    e.insert("CJ_JWT_AUDIENCE".into(), AUDIENCE.into());
}

/// The cases every verifier must get right: (name, Authorization header, expected status).
fn matrix() -> Vec<(&'static str, Option<String>, u16)> {
    let mut expired = claims("ingest:write query:read");
    expired["exp"] = json!(now() - 120);
    let mut early = claims("ingest:write query:read");
    early["nbf"] = json!(now() + 120);
    let mut wrong_iss = claims("ingest:write query:read");
    wrong_iss["iss"] = json!("someone-else");
    let mut wrong_aud = claims("ingest:write query:read");
    wrong_aud["aud"] = json!("other-api");
    // RFC 7519 §4.1.3: `aud` may be an array; one of them must be ours.
    let mut aud_array = claims("ingest:write query:read");
    aud_array["aud"] = json!(["other-api", AUDIENCE]);
    let mut wrong_aud_array = claims("ingest:write query:read");
    wrong_aud_array["aud"] = json!(["other-api", "another"]);
    let wrong_key = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(b"a-different-secret-also-32-chars-long!!"),
        &claims("ingest:write"),
    );
    vec![
        (
            "valid",
            Some(format!("Bearer {}", hs(&claims("ingest:write query:read")))),
            200,
        ),
        ("missing", None, 401),
        ("not bearer", Some("Basic dXNlcjpwYXNz".into()), 401),
        ("malformed", Some("Bearer not.a.jwt".into()), 401),
        ("expired", Some(format!("Bearer {}", hs(&expired))), 401),
        ("not yet valid", Some(format!("Bearer {}", hs(&early))), 401),
        ("wrong key", Some(format!("Bearer {wrong_key}")), 401),
        (
            "wrong issuer",
            Some(format!("Bearer {}", hs(&wrong_iss))),
            401,
        ),
        (
            "wrong audience",
            Some(format!("Bearer {}", hs(&wrong_aud))),
            401,
        ),
        (
            "audience array",
            Some(format!("Bearer {}", hs(&aud_array))),
            200,
        ),
        (
            "wrong audience array",
            Some(format!("Bearer {}", hs(&wrong_aud_array))),
            401,
        ),
        (
            "alg none",
            Some(format!("Bearer {}", alg_none(&claims("ingest:write")))),
            401,
        ),
        (
            "wrong scope",
            Some(format!("Bearer {}", hs(&claims("query:read")))),
            403,
        ),
    ]
}

#[tokio::test]
async fn forward_auth_endpoint_matrix() {
    let app = TestApp::spawn_with(&[Service::Ingestion], auth_env).await;
    let url = app.url(Service::Ingestion, "/internal/auth/verify");
    for (name, header, want) in matrix() {
        let mut r = app
            .http
            .get(&url)
            .header("x-forwarded-method", "POST")
            .header("x-forwarded-uri", "/api/v1/ingest?x=1");
        if let Some(h) = &header {
            r = r.header("authorization", h);
        }
        let resp = r.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), want, "{name}");
        match want {
            200 => {
                assert_eq!(resp.headers()["x-auth-subject"], "device-42");
                assert_eq!(resp.headers()["x-auth-scopes"], "ingest:write query:read");
            }
            401 => assert!(resp.headers().contains_key("www-authenticate"), "{name}"),
            _ => {}
        }
    }
    // Scope follows the forwarded path and method.
    let query_only = format!("Bearer {}", hs(&claims("query:read")));
    let check = |method: &'static str, uri: &'static str| {
        app.http
            .get(&url)
            .header("authorization", &query_only)
            .header("x-forwarded-method", method)
            .header("x-forwarded-uri", uri)
            .send()
    };
    assert_eq!(
        check("GET", "/api/v1/query/events").await.unwrap().status(),
        200
    );
    assert_eq!(
        check("GET", "/api/v1/projections/sensor_state")
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(check("POST", "/api/v1/events").await.unwrap().status(), 403);
    assert_eq!(
        check("GET", "/api/v1/actions/rules")
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        check("GET", "/internal/auth/verify")
            .await
            .unwrap()
            .status(),
        403
    );
}

#[tokio::test]
async fn app_mode_matrix_and_subject_in_metadata() {
    let app = TestApp::spawn_with(&[Service::Ingestion, Service::Query], auth_env).await;
    app.wait_ready().await;
    let body = json!({"event_type": "sensor.reading", "aggregate_id": "a1", "payload": {"value": 1, "unit": "c"}});
    for (name, header, want) in matrix() {
        let mut r = app
            .http
            .post(app.url(Service::Ingestion, "/api/v1/ingest"))
            .json(&body);
        if let Some(h) = &header {
            r = r.header("authorization", h);
        }
        let resp = r.send().await.unwrap();
        let want = if want == 200 { 202 } else { want };
        assert_eq!(resp.status().as_u16(), want, "{name}");
        if want != 202 {
            let v: Value = resp.json().await.unwrap();
            assert!(v["error"].is_string(), "{name}: JSON error body");
        }
    }
    // The same token opens the query API only with query:read.
    let ingest_only = format!("Bearer {}", hs(&claims("ingest:write")));
    let q = app.url(Service::Query, "/api/v1/query/events");
    let r = app
        .http
        .get(&q)
        .header("authorization", &ingest_only)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = app.http.get(&q).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let reader = format!("Bearer {}", hs(&claims("query:read")));
    let r = app
        .http
        .get(&q)
        .header("authorization", &reader)
        .send()
        .await
        .unwrap();
    assert_ne!(r.status(), 401);
    assert_ne!(r.status(), 403);
    // Health, the probes and metrics stay open.
    for (svc, path) in [
        (Service::Ingestion, "/health"),
        (Service::Ingestion, "/livez"),
        (Service::Ingestion, "/readyz"),
        (Service::Ingestion, "/metrics"),
        (Service::Query, "/health"),
        (Service::Query, "/livez"),
        (Service::Query, "/readyz"),
    ] {
        let r = app.http.get(app.url(svc, path)).send().await.unwrap();
        assert!(r.status() == 200, "{path} open: {}", r.status());
    }
    // The subject lands in metadata.subject.
    let pool = app.pool().await;
    let subject = stored_subject(&pool).await;
    assert_eq!(subject, json!("device-42"));
}

fn openssl(args: &[&str], dir: &Path) {
    let ok = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[tokio::test]
async fn public_key_modes_refuse_algorithm_confusion() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(&["genrsa", "-out", "rsa.pem", "2048"], d);
    openssl(
        &["rsa", "-in", "rsa.pem", "-pubout", "-out", "rsa.pub.pem"],
        d,
    );
    openssl(
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "ec.pem",
        ],
        d,
    );
    openssl(
        &[
            "pkcs8", "-topk8", "-nocrypt", "-in", "ec.pem", "-out", "ec8.pem",
        ],
        d,
    );
    openssl(&["ec", "-in", "ec.pem", "-pubout", "-out", "ec.pub.pem"], d);
    let rsa_priv = std::fs::read(d.join("rsa.pem")).unwrap();
    let ec_priv = std::fs::read(d.join("ec8.pem")).unwrap();
    let c = claims("ingest:write");

    for (pub_file, good) in [
        (
            "rsa.pub.pem",
            sign(
                Algorithm::RS256,
                &EncodingKey::from_rsa_pem(&rsa_priv).unwrap(),
                &c,
            ),
        ),
        (
            "ec.pub.pem",
            sign(
                Algorithm::ES256,
                &EncodingKey::from_ec_pem(&ec_priv).unwrap(),
                &c,
            ),
        ),
    ] {
        let key_path = d.join(pub_file);
        let app = TestApp::spawn_with(&[Service::Ingestion], |e| {
            e.insert("CJ_AUTH_MODE".into(), "app".into());
            e.insert(
                "CJ_JWT_PUBLIC_KEY_FILE".into(),
                key_path.display().to_string(),
            );
            e.insert("CJ_JWT_ISSUER".into(), ISSUER.into());
            e.insert("CJ_JWT_AUDIENCE".into(), AUDIENCE.into());
        })
        .await;
        let url = app.url(Service::Ingestion, "/internal/auth/verify");
        let send = |token: String| {
            app.http
                .get(&url)
                .header("authorization", format!("Bearer {token}"))
                .header("x-forwarded-method", "POST")
                .header("x-forwarded-uri", "/api/v1/ingest")
                .send()
        };
        assert_eq!(send(good).await.unwrap().status(), 200, "{pub_file}: valid");
        let pem = std::fs::read(&key_path).unwrap();
        // Algorithm confusion: HS256 "signed" with the public key's bytes as the HMAC secret.
        let confused = sign(Algorithm::HS256, &EncodingKey::from_secret(&pem), &c);
        assert_eq!(
            send(confused).await.unwrap().status(),
            401,
            "{pub_file}: HS256 signed with the public key"
        );
        assert_eq!(
            send(hs(&c)).await.unwrap().status(),
            401,
            "{pub_file}: HS256 token"
        );
        assert_eq!(
            send(alg_none(&c)).await.unwrap().status(),
            401,
            "{pub_file}: alg none"
        );
    }
}

#[tokio::test]
async fn gateway_mode_still_verifies_the_token_and_ignores_a_forged_subject() {
    let app = TestApp::spawn_with(&[Service::Ingestion], |e| {
        auth_env(e);
        e.insert("CJ_AUTH_MODE".into(), "gateway".into());
    })
    .await;
    app.wait_ready().await;
    let send = |auth: Option<String>| {
        let mut r = app
            .http
            .post(app.url(Service::Ingestion, "/api/v1/ingest"))
            // What a caller inside the network could send straight to the port.
            .header("x-auth-subject", "gw-user")
            .json(&json!({"event_type": "a.b", "aggregate_id": "g", "payload": {}}));
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.send()
    };
    // Defence in depth: past the gateway or not, no token, no access.
    assert_eq!(send(None).await.unwrap().status(), 401);
    let wrong_key = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(b"a-different-secret-also-32-chars-long!!"),
        &claims("ingest:write"),
    );
    assert_eq!(
        send(Some(format!("Bearer {wrong_key}")))
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        send(Some(format!("Bearer {}", hs(&claims("query:read")))))
            .await
            .unwrap()
            .status(),
        403
    );
    let r = send(Some(format!("Bearer {}", hs(&claims("ingest:write")))))
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let pool = app.pool().await;
    let subject = stored_subject(&pool).await;
    assert_eq!(
        subject,
        json!("device-42"),
        "the token's subject, not the header's"
    );
}

#[tokio::test]
async fn app_mode_without_a_key_refuses_to_start_and_names_the_variable() {
    let out = cornjacket()
        .args(["serve", "--services", "query"])
        .env_clear()
        .env("CJ_QUERY_PORT", free_port().to_string())
        .env("CJ_AUTH_MODE", "app")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CJ_JWT_SECRET"), "{err}");
}

#[tokio::test]
async fn the_token_command_mints_a_token_the_platform_accepts() {
    let out = cornjacket()
        .args([
            "token",
            "--sub",
            "cli-user",
            "--scopes",
            "ingest:write,query:read",
            "--ttl",
            "10m",
        ])
        .env_clear()
        .env("CJ_JWT_SECRET", SECRET)
        .env("CJ_JWT_ISSUER", ISSUER)
        .env("CJ_JWT_AUDIENCE", AUDIENCE)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let app = TestApp::spawn_with(&[Service::Ingestion], auth_env).await;
    let r = app
        .http
        .get(app.url(Service::Ingestion, "/internal/auth/verify"))
        .header("authorization", format!("Bearer {token}"))
        .header("x-forwarded-method", "GET")
        .header("x-forwarded-uri", "/api/v1/query/events")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-auth-subject"], "cli-user");
    let bad = cornjacket()
        .args(["token", "--sub", "x", "--scopes", "root"])
        .env_clear()
        .env("CJ_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

/// `ai.*` events are what the sidecar derives: only a token with `ingest:ai` may submit them,
/// singly or in a batch (where the others of the batch are still taken); `ingest:write` alone,
/// the scope every client has, cannot forge an anomaly.
#[tokio::test]
async fn ai_events_need_the_ingest_ai_scope() {
    let app = TestApp::spawn_with(&[Service::Ingestion], auth_env).await;
    app.wait_ready().await;
    let anomaly = json!({"event_type": "ai.anomaly", "aggregate_id": "dev-ai",
        "payload": {"device_id": "dev-ai", "key": "value", "value": 99.0, "score": 9.0,
                    "threshold": 4.0, "source_event_id": Uuid::now_v7(), "model": "m@1"}});
    let reading = json!({"event_type": "sensor.reading", "aggregate_id": "dev-ai",
        "payload": {"value": 1.0, "unit": "c"}});
    let post = |token: String, path: &'static str, body: Value| {
        app.http
            .post(app.url(Service::Ingestion, path))
            .bearer_auth(token)
            .json(&body)
            .send()
    };
    let client = hs(&claims("ingest:write"));
    let sidecar = hs(&claims("ingest:write ingest:ai"));
    let r = post(client.clone(), "/api/v1/ingest", anomaly.clone())
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], "validation_failed");
    assert_eq!(v["details"][0]["field"], "event_type");
    assert!(
        v["details"][0]["message"]
            .as_str()
            .unwrap()
            .contains("ingest:ai"),
        "{v}"
    );
    let r = post(sidecar.clone(), "/api/v1/ingest", anomaly.clone())
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let stored: Value = r.json().await.unwrap();
    // In a batch the anomaly is refused and the reading taken.
    let r = post(
        client,
        "/api/v1/ingest/batch",
        json!({"events": [anomaly.clone(), reading]}),
    )
    .await
    .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["results"][0]["status"], "rejected", "{v}");
    assert_eq!(v["results"][1]["status"], "accepted", "{v}");
    // What the sidecar submitted is marked as coming from AI.
    let pool = app.pool().await;
    let source: String = eventually(Duration::from_secs(20), || async {
        sqlx::query_scalar(
            "SELECT metadata->>'source' FROM ingestion.event_store WHERE event_id = $1::text::uuid",
        )
        .bind(stored["event_id"].as_str().unwrap())
        .fetch_optional(&pool)
        .await
        .ok()?
    })
    .await;
    assert_eq!(source, "ai");
}
