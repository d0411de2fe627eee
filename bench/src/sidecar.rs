//! The ai-inference sidecar, for anomaly-to-webhook.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::cli::Args;
use crate::cpu::SIDECAR_PID;
use crate::http;

/// The ai-inference sidecar as `scripts/ai.sh run` starts it, configured for the run: the
/// platform's database, broker and topic prefix, a consumer group and a port of its own.
pub struct Sidecar {
    pub child: tokio::process::Child,
    pub port: u16,
    pub log: PathBuf,
    pub group: String,
}

impl Sidecar {
    pub fn start(
        a: &Args,
        python: &std::path::Path,
        dir: &std::path::Path,
        run: &str,
    ) -> anyhow::Result<Self> {
        let db_url = a
            .database_url
            .as_deref()
            .context("anomaly-to-webhook needs --database-url")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let group = if a.topic_prefix.is_empty() {
            format!("cjbench-{run}-ai-inference")
        } else {
            format!("{}ai-inference", a.topic_prefix)
        };
        let log = std::env::temp_dir().join(format!("cjbench-ai-{run}.log"));
        let out = std::fs::File::create(&log)?;
        let token = a
            .ai_token
            .clone()
            .filter(|t| !t.is_empty())
            .or_else(|| http::AUTHORIZATION.get().cloned());
        let mut cmd = tokio::process::Command::new(python);
        cmd.args(["-m", "ai_inference"])
            // Not the repository: the sidecar reads a .env in its working directory.
            .current_dir(std::env::temp_dir())
            .env("PYTHONPATH", dir)
            .env("CJ_AI_DATABASE_URL", db_url)
            .env("CJ_KAFKA_BROKERS", &a.kafka_brokers)
            .env("CJ_KAFKA_TOPIC_PREFIX", &a.topic_prefix)
            .env("CJ_AI_CONSUMER_GROUP", &group)
            .env("CJ_AI_SESSION_TIMEOUT_MS", "6000")
            .env("CJ_AI_PORT", port.to_string())
            .env("CJ_AI_INGEST_URL", &a.ingest_url)
            .env("CJ_LOG_FORMAT", "text")
            .env("CJ_LOG_LEVEL", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true);
        if let Some(t) = token {
            cmd.env("CJ_AI_INGEST_TOKEN", t);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting the sidecar ({})", python.display()))?;
        SIDECAR_PID.store(child.id().unwrap_or(0), Ordering::Relaxed);
        Ok(Self {
            child,
            port,
            log,
            group,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join(" / ")
    }

    /// Waits until `/health` answers 200 (migrated, consumer in its group, database answering).
    pub async fn wait_healthy(
        &mut self,
        client: &reqwest::Client,
        max: Duration,
    ) -> anyhow::Result<()> {
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the sidecar exited ({status}); {}: {}",
                    self.log.display(),
                    self.log_tail()
                );
            }
            if let Ok(r) = client.get(self.url("/health")).send().await
                && r.status() == 200
            {
                return Ok(());
            }
            if t0.elapsed() > max {
                bail!(
                    "the sidecar was not healthy within {max:?}; {}: {}",
                    self.log.display(),
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// SIGTERM (it commits and exits), SIGKILL after 10 s.
    pub async fn stop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = tokio::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
            if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
                .await
                .is_err()
            {
                let _ = self.child.kill().await;
            }
        }
        SIDECAR_PID.store(0, Ordering::Relaxed);
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        SIDECAR_PID.store(0, Ordering::Relaxed);
    }
}
