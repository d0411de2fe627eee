//! The event handler's sink (SPEC §7, ADR-0014): an envelope becomes the projection write of
//! its registered handler; a batch is applied as one upsert per projection row. The delivery
//! guarantees (retries, DLQ, blocking on an outage, commits) are the shared consume loop's.

use std::collections::HashMap;

use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use sqlx::PgPool;

use super::handlers::{self, Entry, ProjectionWrite};
use super::store;
use crate::envelope::Envelope;
use crate::infra::consume::{DeadLetter, Poison, Sink};
use crate::infra::dlq;

pub struct Projections {
    pub pool: PgPool,
    group: String,
    registry: HashMap<&'static str, Entry>,
}

impl Projections {
    pub fn new(pool: PgPool, group: &str) -> Self {
        Self {
            pool,
            group: group.to_string(),
            registry: handlers::registry(),
        }
    }
}

impl Sink for Projections {
    type Item = ProjectionWrite;

    fn decode(&self, m: &OwnedMessage) -> Result<Option<ProjectionWrite>, Poison> {
        let bytes = m
            .payload()
            .ok_or_else(|| Poison::Undecodable("empty message".into()))?;
        let env = Envelope::decode(bytes).map_err(Poison::Undecodable)?;
        match self.registry.get(env.event_type.as_str()) {
            None => Ok(None),
            Some(entry) => (entry.handler)(&env)
                .map(Some)
                .map_err(|e| Poison::Refused(format!("{}: {e}", env.event_type))),
        }
    }

    async fn apply(
        &self,
        writes: &[ProjectionWrite],
        letters: &[DeadLetter],
    ) -> Result<(), sqlx::Error> {
        if writes.is_empty() && letters.is_empty() {
            return Ok(());
        }
        let writes = handlers::newest_per_row(writes.to_vec());
        let mut tx = self.pool.begin().await?;
        store::upsert(&mut tx, &writes).await?;
        dlq::insert(&mut tx, "eventhandler.dlq", letters).await?;
        tx.commit().await?;
        metrics::counter!("cj_projection_updates_total", "consumer" => self.group.clone())
            .increment(writes.len() as u64);
        Ok(())
    }
}
