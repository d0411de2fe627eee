//! The ai-inference sidecar as a child process of a test.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cornjacket::services::Service;

use super::{TestApp, eventually, free_port};

/// The sidecar as `make run` starts it (scripts/ai.sh run), configured for this test.
pub struct Sidecar {
    child: Child,
    pub port: u16,
}

impl Sidecar {
    /// Starts it against `brokers` with the test's database, topics and group
    /// (`{prefix}ai-inference`).
    pub fn start(app: &TestApp, brokers: &str) -> Self {
        let root = env!("CARGO_MANIFEST_DIR");
        let python = format!("{root}/.infra/venv-ai/bin/python");
        assert!(
            std::path::Path::new(&python).exists(),
            "{python} is missing: scripts/test.sh creates it (scripts/ai.sh venv)"
        );
        let port = free_port();
        let log = std::fs::File::create(std::env::temp_dir().join(format!("{}ai.log", app.prefix)))
            .unwrap();
        let child = Command::new(python)
            .args(["-m", "ai_inference"])
            .current_dir(std::env::temp_dir())
            .env("PYTHONPATH", format!("{root}/ai-inference"))
            .env("CJ_AI_DATABASE_URL", &app.db.url)
            .env("CJ_KAFKA_BROKERS", brokers)
            .env("CJ_KAFKA_TOPIC_PREFIX", &app.prefix)
            .env(
                "CJ_AI_CONSUMER_GROUP",
                format!("{}ai-inference", app.prefix),
            )
            .env("CJ_AI_SESSION_TIMEOUT_MS", "6000")
            .env("CJ_AI_PORT", port.to_string())
            .env(
                "CJ_AI_INGEST_URL",
                format!("http://{}", app.addrs[&Service::Ingestion]),
            )
            .env(
                "CJ_JWT_SECRET",
                "chain-test-secret-of-at-least-32-characters",
            )
            .env("CJ_LOG_FORMAT", "text")
            .env("CJ_LOG_LEVEL", "warning")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start the sidecar");
        Self { child, port }
    }

    pub async fn wait_healthy(&self, http: &reqwest::Client) {
        let url = format!("http://127.0.0.1:{}/health", self.port);
        eventually(Duration::from_secs(60), || async {
            let r = http.get(&url).send().await.ok()?;
            (r.status() == 200).then_some(())
        })
        .await;
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sidecar {
    /// Whether the process is still running (a crash ends it).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}
