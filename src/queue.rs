//! The durable queue, on apalis 1.0 (apalis-sqlite / apalis-postgres).
//!
//! apalis carries *deliveries*: a [`MutationTask`] names one of our `tm_jobs` rows and the delivery
//! number it was pushed with. Our `tm_jobs` row is the source of truth for a job's state and attempts;
//! a delivery whose number no longer matches the row is stale and is acknowledged without work.
//! That lets us re-push a failed job with a delay (apalis itself refetches failures at once) and
//! insert queue rows in the same transaction as our own rows.
//!
//! Workarounds for apalis, each covered by a test (see `../shared/notes/apalis-1.0.md`):
//! - `LIdx` is dropped after every `setup()`: SQLite plans the ack query on it, and acks slow down as
//!   finished history grows (29 jobs/s with 100k finished rows).
//! - finished queue rows are deleted by [`sweep_finished`] once our tables hold the result.
//! - `max_attempts` is explicit on every queue row, never apalis's default of 25.

use std::future::Future;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, SqliteConnection};

/// The permanent queue name (apalis's default would be the Rust type path, which moves with the code).
pub const QUEUE_NAME: &str = "trialmatch.mutation";

/// What apalis carries: which job, and which delivery of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MutationTask {
    pub job_id: String,
    pub delivery: i64,
}

/// Writes a queue row on the same connection (and so in the same transaction) as our own rows.
pub trait QueueConnection {
    fn push_delivery(
        &mut self,
        task: &MutationTask,
        max_attempts: i64,
        run_at: DateTime<Utc>,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// Deletes finished queue rows of our queue; returns how many.
    fn sweep_finished(&mut self) -> impl Future<Output = Result<u64, sqlx::Error>> + Send;
}

fn encode(task: &MutationTask) -> Vec<u8> {
    serde_json::to_vec(task).expect("a struct of strings and integers always serialises")
}

impl QueueConnection for SqliteConnection {
    async fn push_delivery(
        &mut self,
        task: &MutationTask,
        max_attempts: i64,
        run_at: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        // The same row apalis-sqlite's own `push` writes (queries/task/sink.sql), with named columns.
        sqlx::query(
            "INSERT INTO Jobs (job, id, job_type, status, attempts, max_attempts, run_at, priority, metadata)
             VALUES ($1, $2, $3, 'Pending', 0, $4, $5, 0, '{}')",
        )
        .bind(encode(task))
        .bind(ulid::Ulid::new().to_string())
        .bind(QUEUE_NAME)
        .bind(max_attempts)
        // apalis-sqlite keeps whole seconds, so a job may run up to a second early; every delay
        // that matters for correctness (deferral) is at least a second.
        .bind(run_at.timestamp())
        .execute(self)
        .await?;
        Ok(())
    }

    async fn sweep_finished(&mut self) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(
            "DELETE FROM Jobs WHERE job_type = $1
               AND (status IN ('Done', 'Killed') OR (status = 'Failed' AND attempts >= max_attempts))",
        )
        .bind(QUEUE_NAME)
        .execute(self)
        .await?;
        Ok(done.rows_affected())
    }
}

impl QueueConnection for PgConnection {
    async fn push_delivery(
        &mut self,
        task: &MutationTask,
        max_attempts: i64,
        run_at: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at, priority)
             VALUES ($1, $2, $3, 'Pending', 0, $4, $5, 0)",
        )
        .bind(ulid::Ulid::new().to_string())
        .bind(QUEUE_NAME)
        .bind(encode(task))
        .bind(max_attempts as i32)
        .bind(run_at)
        .execute(self)
        .await?;
        Ok(())
    }

    async fn sweep_finished(&mut self) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(
            "DELETE FROM apalis.jobs WHERE job_type = $1
               AND (status IN ('Done', 'Killed') OR (status = 'Failed' AND attempts >= max_attempts))",
        )
        .bind(QUEUE_NAME)
        .execute(self)
        .await?;
        Ok(done.rows_affected())
    }
}
