//! Our own storage: connecting, migrating (ours and apalis's), and every query on our `tm_*` tables.
//!
//! One [`Store`] serves SQLite (the embedded default) and Postgres (the scale-out path). Queries are
//! written once in SQL both accept (`$N` parameters, timestamps bound from Rust, `ON CONFLICT`,
//! `RETURNING`) and run on either pool through [`with_pool!`] and [`write_tx!`].

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::config::redact_url;
use crate::ctgov::Trial;
use crate::flow::JobState;
use crate::http::FailureKind;
use crate::queue::{MutationTask, QueueConnection};
use crate::summarize::{Summarizer, Summary, TokenUsage};

/// Our migration history lives apart from apalis's `_sqlx_migrations`: each migrator refuses the
/// other's versions when they share a table.
const MIGRATIONS_TABLE: &str = "_trialmatch_migrations";

/// What went wrong talking to the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("could not open the database {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error(
        "could not migrate the database: {0} (is it a trialmatch database of a newer version?)"
    )]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("could not set up the apalis queue tables: {0}")]
    QueueSetup(String),
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
}

/// A job's state in `tm_jobs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStateName {
    Queued,
    Running,
    Retrying,
    Succeeded,
    Failed,
    Dead,
}

impl JobStateName {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Retrying => "retrying",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Dead => "dead",
        }
    }
}

/// The connection pool of one backend.
#[derive(Debug, Clone)]
pub enum Store {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to whichever pool the store has; the body compiles once per backend.
macro_rules! with_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match $store {
            Store::Sqlite($pool) => $body,
            Store::Postgres($pool) => $body,
        }
    };
}

/// Runs `$body` in a write transaction bound to `$tx`, committing when it returns `Ok`.
/// SQLite's is `BEGIN IMMEDIATE`: a read-then-write transaction started as a reader fails with
/// SQLITE_BUSY_SNAPSHOT when another writer got in first.
macro_rules! write_tx {
    ($store:expr, $tx:ident => $body:expr) => {
        match $store {
            Store::Sqlite(pool) => {
                let mut $tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                let out = $body;
                $tx.commit().await?;
                Ok(out)
            }
            Store::Postgres(pool) => {
                let mut $tx = pool.begin().await?;
                let out = $body;
                $tx.commit().await?;
                Ok(out)
            }
        }
    };
}

/// A batch to enqueue: already validated mutations.
#[derive(Debug, Clone)]
pub struct NewBatch {
    /// Optional idempotency key: a second enqueue with the same name returns the first batch.
    pub name: Option<String>,
    pub mutations: Vec<String>,
    pub max_attempts: u32,
}

/// The result of an enqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnqueuedBatch {
    pub batch_id: String,
    pub job_count: i64,
    /// True when a batch of that name existed: nothing new was enqueued.
    pub already_existed: bool,
}

/// The outcome of claiming a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Run the job; this is attempt number `attempt`.
    Run {
        mutation: String,
        attempt: i64,
        max_attempts: i64,
        /// When an open circuit breaker first deferred the job, if it is being deferred.
        deferred_since: Option<DateTime<Utc>>,
    },
    /// The delivery is outdated or the job is finished: acknowledge it and do nothing.
    Stale,
    /// Every attempt was used by runs that never finished (the worker died each time); now dead.
    Exhausted,
}

/// What happens to a job after a failed run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Back to the queue, to run at `at`.
    Retry { at: DateTime<Utc> },
    /// A permanent error: never retried.
    Failed,
    /// Its last attempt failed.
    Dead,
}

/// One row of `tm_jobs`, for status reports.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobRow {
    pub id: String,
    pub batch_id: String,
    pub position: i64,
    pub mutation: String,
    pub state: String,
    pub attempts: i64,
    pub max_attempts: i64,
    pub last_error: Option<String>,
    pub trials_found: Option<i64>,
    pub total_count: Option<i64>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The job's summary's `stop_reason` (`max_tokens`: cut short).
    pub summary_stop_reason: Option<String>,
    /// The job whose summary this job reused, when the trials had not changed.
    pub summary_reused_from: Option<String>,
    /// Why the job waits, when an open circuit breaker deferred it.
    pub deferred_reason: Option<String>,
}

/// Unfinished jobs, and how many of them only wait on an open circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    pub unfinished: i64,
    pub deferred: i64,
}

/// A job waiting on an open circuit breaker.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeferredJob {
    pub mutation: String,
    pub reason: Option<String>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub deferred_since: Option<DateTime<Utc>>,
}

/// One stored summary.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SummaryRow {
    pub job_id: String,
    pub mutation: String,
    pub summarizer: String,
    pub model: Option<String>,
    pub body: String,
    pub trial_count: i64,
    pub fingerprint: String,
    pub stop_reason: Option<String>,
    pub reused_from_job: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// Whether the URL names a Postgres database.
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

impl Store {
    /// Opens the database (creating an SQLite file if needed), applies our migrations and apalis's,
    /// and applies the apalis workarounds described in [`crate::queue`].
    pub async fn connect(url: &str) -> Result<Self, DbError> {
        let connect_err = |source| DbError::Connect {
            url: redact_url(url),
            source,
        };
        if is_postgres_url(url) {
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(30))
                .connect(url)
                .await
                .map_err(connect_err)?;
            apalis_postgres::PostgresStorage::setup(&pool)
                .await
                .map_err(|e| DbError::QueueSetup(e.to_string()))?;
            let store = Store::Postgres(pool);
            store.migrate().await?;
            Ok(store)
        } else {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(connect_err)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(30))
                .foreign_keys(true);
            // apalis's setup sets `synchronous = OFF` on the connection it runs on: give it its own.
            let setup_pool = SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(options.clone())
                .await
                .map_err(connect_err)?;
            apalis_sqlite::SqliteStorage::setup(&setup_pool)
                .await
                .map_err(|e| DbError::QueueSetup(e.to_string()))?;
            // Every start: a later apalis migration might create it again.
            sqlx::query("DROP INDEX IF EXISTS LIdx")
                .execute(&setup_pool)
                .await?;
            setup_pool.close().await;
            let pool = SqlitePoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(60))
                .connect_with(options)
                .await
                .map_err(connect_err)?;
            let store = Store::Sqlite(pool);
            store.migrate().await?;
            Ok(store)
        }
    }

    async fn migrate(&self) -> Result<(), DbError> {
        match self {
            Store::Sqlite(pool) => {
                let mut migrator: Migrator = sqlx::migrate!("./migrations/sqlite");
                migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
                migrator.run(pool).await?;
            }
            Store::Postgres(pool) => {
                let mut migrator: Migrator = sqlx::migrate!("./migrations/postgres");
                migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
                migrator.run(pool).await?;
            }
        }
        Ok(())
    }

    pub fn backend_name(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }

    pub async fn close(&self) {
        with_pool!(self, pool => pool.close().await)
    }

    /// Enqueues a batch in one transaction: the batch, one job per mutation and their queue rows,
    /// or nothing. A named batch that exists already is returned as it is.
    pub async fn enqueue_batch(&self, batch: &NewBatch) -> Result<EnqueuedBatch, DbError> {
        let now = Utc::now();
        let batch_id = ulid::Ulid::new().to_string();
        let max_attempts = i64::from(batch.max_attempts);
        write_tx!(self, tx => {
            let existing: Option<(String, i64)> = match &batch.name {
                Some(name) => sqlx::query_as("SELECT id, mutation_count FROM tm_batches WHERE name = $1")
                    .bind(name)
                    .fetch_optional(&mut *tx)
                    .await?,
                None => None,
            };
            if let Some((batch_id, job_count)) = existing {
                EnqueuedBatch { batch_id, job_count, already_existed: true }
            } else {
                sqlx::query("INSERT INTO tm_batches (id, name, created_at, mutation_count) VALUES ($1, $2, $3, $4)")
                    .bind(&batch_id)
                    .bind(&batch.name)
                    .bind(now)
                    .bind(batch.mutations.len() as i64)
                    .execute(&mut *tx)
                    .await?;
                for (position, mutation) in batch.mutations.iter().enumerate() {
                    let job_id = ulid::Ulid::new().to_string();
                    sqlx::query(
                        "INSERT INTO tm_jobs (id, batch_id, position, mutation, state, max_attempts, delivery, created_at)
                         VALUES ($1, $2, $3, $4, 'queued', $5, 1, $6)",
                    )
                    .bind(&job_id)
                    .bind(&batch_id)
                    .bind(position as i64)
                    .bind(mutation)
                    .bind(max_attempts)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                    let task = MutationTask { job_id, delivery: 1 };
                    tx.push_delivery(&task, queue_attempts(max_attempts), now).await?;
                }
                EnqueuedBatch { batch_id: batch_id.clone(), job_count: batch.mutations.len() as i64, already_existed: false }
            }
        })
    }

    /// Claims a delivery for a run: marks the job running and counts the attempt.
    ///
    /// A delivery of a job in `running` state is accepted: apalis only hands a running task out
    /// again when the worker that held it stopped sending heartbeats.
    pub async fn claim(&self, task: &MutationTask, worker: &str) -> Result<Claim, DbError> {
        let now = Utc::now();
        // The common case is one statement (SQLite serialises writers: round trips are the cost).
        type Claimed = (String, i64, i64, Option<DateTime<Utc>>);
        let claimed: Option<Claimed> = with_pool!(self, pool => sqlx::query_as(
            "UPDATE tm_jobs SET state = 'running', attempts = attempts + 1, started_at = $3, worker = $4,
                    next_attempt_at = NULL
             WHERE id = $1 AND delivery = $2 AND state IN ('queued', 'retrying', 'running')
               AND attempts < max_attempts
             RETURNING mutation, attempts, max_attempts, deferred_since",
        )
        .bind(&task.job_id)
        .bind(task.delivery)
        .bind(now)
        .bind(worker)
        .fetch_optional(pool)
        .await?);
        if let Some((mutation, attempt, max_attempts, deferred_since)) = claimed {
            return Ok(Claim::Run {
                mutation,
                attempt,
                max_attempts,
                deferred_since,
            });
        }
        // Outdated delivery, finished job, or every attempt used up by runs that never ended.
        write_tx!(self, tx => {
            type Row = (String, String, i64, i64, i64, Option<DateTime<Utc>>);
            let row: Option<Row> = sqlx::query_as(
                "SELECT mutation, state, attempts, max_attempts, delivery, deferred_since FROM tm_jobs WHERE id = $1",
            )
            .bind(&task.job_id)
            .fetch_optional(&mut *tx)
            .await?;
            match row {
                Some((mutation, state, attempts, max_attempts, delivery, deferred_since))
                    if delivery == task.delivery && matches!(state.as_str(), "queued" | "retrying" | "running") =>
                {
                    if attempts >= max_attempts {
                        let error = format!("the worker running it stopped during each of its {attempts} attempts");
                        sqlx::query(
                            "UPDATE tm_jobs SET state = 'dead', last_error = $2, finished_at = $3 WHERE id = $1",
                        )
                        .bind(&task.job_id)
                        .bind(&error)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                        tx.insert_job_error(&task.job_id, attempts, now, FailureKind::Permanent, &error).await?;
                        Claim::Exhausted
                    } else {
                        sqlx::query(
                            "UPDATE tm_jobs SET state = 'running', attempts = attempts + 1, started_at = $2,
                                    worker = $3, next_attempt_at = NULL
                             WHERE id = $1",
                        )
                        .bind(&task.job_id)
                        .bind(now)
                        .bind(worker)
                        .execute(&mut *tx)
                        .await?;
                        Claim::Run { mutation, attempt: attempts + 1, max_attempts, deferred_since }
                    }
                }
                _ => Claim::Stale,
            }
        })
    }

    /// Stores a successful run's results in one transaction. Returns false (and writes nothing)
    /// when the run is no longer the job's current attempt.
    pub async fn record_success(
        &self,
        job_id: &str,
        attempt: i64,
        state: &JobState,
    ) -> Result<bool, DbError> {
        let now = Utc::now();
        let summary = state.summary.as_ref();
        write_tx!(self, tx => {
            let updated = sqlx::query(
                "UPDATE tm_jobs SET state = 'succeeded', finished_at = $3, trials_found = $4, total_count = $5,
                        last_error = NULL, deferred_since = NULL, deferred_reason = NULL
                 WHERE id = $1 AND attempts = $2 AND state = 'running'",
            )
            .bind(job_id)
            .bind(attempt)
            .bind(now)
            .bind(state.trials.len() as i64)
            .bind(state.total_count.map(|n| n as i64))
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated == 0 {
                false
            } else {
                tx.insert_run_records(job_id, attempt, state).await?;
                tx.insert_trials(job_id, &state.trials, now).await?;
                if let Some(summary) = summary {
                    sqlx::query(
                        "INSERT INTO tm_summaries (job_id, mutation, summarizer, model, body, trial_count, fingerprint,
                             input_tokens, output_tokens, stop_reason, created_at, prompt_version,
                             cache_creation_tokens, cache_read_tokens, reused_from_job)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
                    )
                    .bind(job_id)
                    .bind(&state.mutation)
                    .bind(&summary.summarizer)
                    .bind(&summary.model)
                    .bind(&summary.markdown)
                    .bind(state.trials.len() as i64)
                    .bind(state.fingerprint.as_deref().unwrap_or_default())
                    .bind(summary.usage.input)
                    .bind(summary.usage.output)
                    .bind(&summary.stop_reason)
                    .bind(now)
                    .bind(&summary.prompt_version)
                    .bind(summary.usage.cache_creation)
                    .bind(summary.usage.cache_read)
                    .bind(&summary.reused_from_job)
                    .execute(&mut *tx)
                    .await?;
                }
                true
            }
        })
    }

    /// Stores a failed run: the error (appended, never overwritten), what the run fetched and
    /// measured, and the job's next step; a retry is re-pushed to the queue in the same transaction.
    /// Returns false (and writes nothing) when the run is no longer the job's current attempt.
    pub async fn record_failure(
        &self,
        job_id: &str,
        attempt: i64,
        kind: FailureKind,
        error: &str,
        state: &JobState,
        next: AfterFailure,
    ) -> Result<bool, DbError> {
        let now = Utc::now();
        let (next_state, next_at, finished_at) = match next {
            AfterFailure::Retry { at } => (JobStateName::Retrying, Some(at), None),
            AfterFailure::Failed => (JobStateName::Failed, None, Some(now)),
            AfterFailure::Dead => (JobStateName::Dead, None, Some(now)),
        };
        write_tx!(self, tx => {
            let row: Option<(i64, i64)> = sqlx::query_as(
                "UPDATE tm_jobs SET state = $3, last_error = $4, next_attempt_at = $5, finished_at = $6,
                        delivery = delivery + (CASE WHEN $3 = 'retrying' THEN 1 ELSE 0 END),
                        deferred_since = NULL, deferred_reason = NULL
                 WHERE id = $1 AND attempts = $2 AND state = 'running'
                 RETURNING delivery, max_attempts",
            )
            .bind(job_id)
            .bind(attempt)
            .bind(next_state.as_str())
            .bind(error)
            .bind(next_at)
            .bind(finished_at)
            .fetch_optional(&mut *tx)
            .await?;
            match row {
                None => false,
                Some((delivery, max_attempts)) => {
                    tx.insert_job_error(job_id, attempt, now, kind, error).await?;
                    tx.insert_run_records(job_id, attempt, state).await?;
                    if let Some(at) = next_at {
                        let task = MutationTask { job_id: job_id.to_owned(), delivery };
                        tx.push_delivery(&task, queue_attempts(max_attempts), at).await?;
                    }
                    true
                }
            }
        })
    }

    /// Puts a job back in the queue because its service refuses calls (open circuit breaker),
    /// giving back the attempt this run used. Returns false when the run is no longer current.
    pub async fn record_deferral(
        &self,
        job_id: &str,
        attempt: i64,
        reason: &str,
        at: DateTime<Utc>,
        state: &JobState,
    ) -> Result<bool, DbError> {
        let now = Utc::now();
        write_tx!(self, tx => {
            let row: Option<(i64, i64)> = sqlx::query_as(
                "UPDATE tm_jobs SET state = 'retrying', attempts = attempts - 1, next_attempt_at = $4,
                        deferred_since = COALESCE(deferred_since, $5), deferred_reason = $3,
                        delivery = delivery + 1
                 WHERE id = $1 AND attempts = $2 AND state = 'running'
                 RETURNING delivery, max_attempts",
            )
            .bind(job_id)
            .bind(attempt)
            .bind(reason)
            .bind(at)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            match row {
                None => false,
                Some((delivery, max_attempts)) => {
                    tx.insert_run_records(job_id, attempt, state).await?;
                    let task = MutationTask { job_id: job_id.to_owned(), delivery };
                    tx.push_delivery(&task, queue_attempts(max_attempts), at).await?;
                    true
                }
            }
        })
    }

    /// Jobs not yet finished (queued, running or waiting to retry) and, of those, the ones waiting
    /// only because a circuit breaker deferred them; in one batch or in all.
    pub async fn backlog(&self, batch_id: Option<&str>) -> Result<Backlog, DbError> {
        let (unfinished, deferred): (i64, i64) = with_pool!(self, pool => sqlx::query_as(
            "SELECT COUNT(*),
                    COALESCE(SUM(CASE WHEN state = 'retrying' AND deferred_reason IS NOT NULL THEN 1 ELSE 0 END), 0)
             FROM tm_jobs WHERE state IN ('queued', 'running', 'retrying')
               AND ($1 IS NULL OR batch_id = $1)",
        )
        .bind(batch_id)
        .fetch_one(pool)
        .await?);
        Ok(Backlog {
            unfinished,
            deferred,
        })
    }

    /// The jobs waiting on an open circuit breaker: mutation, reason, next try.
    pub async fn deferred_jobs(&self, batch_id: Option<&str>) -> Result<Vec<DeferredJob>, DbError> {
        let rows = with_pool!(self, pool => sqlx::query_as::<_, DeferredJob>(
            "SELECT mutation, deferred_reason AS reason, next_attempt_at, deferred_since
             FROM tm_jobs WHERE state = 'retrying' AND deferred_reason IS NOT NULL
               AND ($1 IS NULL OR batch_id = $1)
             ORDER BY batch_id, position",
        )
        .bind(batch_id)
        .fetch_all(pool)
        .await?);
        Ok(rows)
    }

    /// How many jobs of a batch are in each state: `(state, count)`.
    pub async fn batch_state_counts(&self, batch_id: &str) -> Result<Vec<(String, i64)>, DbError> {
        let rows = with_pool!(self, pool => sqlx::query_as(
            "SELECT state, COUNT(*) FROM tm_jobs WHERE batch_id = $1 GROUP BY state",
        )
        .bind(batch_id)
        .fetch_all(pool)
        .await?);
        Ok(rows)
    }

    /// The most recently created batch.
    pub async fn latest_batch_id(&self) -> Result<Option<String>, DbError> {
        // ULIDs sort by creation time.
        let id: Option<String> = with_pool!(self, pool => sqlx::query_scalar(
            "SELECT id FROM tm_batches ORDER BY id DESC LIMIT 1",
        )
        .fetch_optional(pool)
        .await?);
        Ok(id)
    }

    /// Whether a batch with this id exists.
    pub async fn batch_exists(&self, batch_id: &str) -> Result<bool, DbError> {
        let found: Option<String> = with_pool!(self, pool => sqlx::query_scalar(
            "SELECT id FROM tm_batches WHERE id = $1",
        )
        .bind(batch_id)
        .fetch_optional(pool)
        .await?);
        Ok(found.is_some())
    }

    /// The jobs of a batch, in the order the mutations were given.
    pub async fn batch_jobs(&self, batch_id: &str) -> Result<Vec<JobRow>, DbError> {
        let rows = with_pool!(self, pool => sqlx::query_as::<_, JobRow>(
            "SELECT j.id, j.batch_id, j.position, j.mutation, j.state, j.attempts, j.max_attempts, j.last_error,
                    j.trials_found, j.total_count, j.created_at, j.started_at, j.finished_at, j.next_attempt_at,
                    s.stop_reason AS summary_stop_reason, s.reused_from_job AS summary_reused_from,
                    j.deferred_reason
             FROM tm_jobs j LEFT JOIN tm_summaries s ON s.job_id = j.id
             WHERE j.batch_id = $1 ORDER BY j.position",
        )
        .bind(batch_id)
        .fetch_all(pool)
        .await?);
        Ok(rows)
    }

    /// The newest summary of a mutation (compared without regard to case).
    pub async fn latest_summary(&self, mutation: &str) -> Result<Option<SummaryRow>, DbError> {
        let row = with_pool!(self, pool => sqlx::query_as::<_, SummaryRow>(
            "SELECT job_id, mutation, summarizer, model, body, trial_count, fingerprint, stop_reason,
                    reused_from_job, created_at
             FROM tm_summaries WHERE lower(mutation) = lower($1)
             ORDER BY created_at DESC, id DESC LIMIT 1",
        )
        .bind(mutation)
        .fetch_optional(pool)
        .await?);
        Ok(row)
    }

    /// The newest summary of `mutation` made by this summarizer, model and prompt version, if its
    /// trial fingerprint is `fingerprint`: it can be reused instead of summarizing again.
    pub async fn reusable_summary(
        &self,
        mutation: &str,
        summarizer: &dyn Summarizer,
        fingerprint: &str,
    ) -> Result<Option<Summary>, DbError> {
        type Row = (String, String, String, Option<String>, Option<String>);
        let model = summarizer.model();
        let newest: Option<Row> = with_pool!(self, pool => sqlx::query_as(
            "SELECT COALESCE(reused_from_job, job_id), body, fingerprint, model, stop_reason
             FROM tm_summaries
             WHERE lower(mutation) = lower($1) AND summarizer = $2 AND prompt_version = $3
               AND (model = $4 OR (model IS NULL AND $4 IS NULL))
             ORDER BY created_at DESC, id DESC LIMIT 1",
        )
        .bind(mutation)
        .bind(summarizer.name())
        .bind(summarizer.prompt_version())
        .bind(model)
        .fetch_optional(pool)
        .await?);
        Ok(newest
            .filter(|(_, _, stored, _, _)| stored == fingerprint)
            .map(|(source_job, body, _, model, stop_reason)| Summary {
                markdown: body,
                summarizer: summarizer.name().to_owned(),
                model,
                prompt_version: summarizer.prompt_version().to_owned(),
                usage: TokenUsage::default(),
                stop_reason,
                reused_from_job: Some(source_job),
            }))
    }

    /// The summary a job stored.
    pub async fn job_summary(&self, job_id: &str) -> Result<Option<SummaryRow>, DbError> {
        let row = with_pool!(self, pool => sqlx::query_as::<_, SummaryRow>(
            "SELECT job_id, mutation, summarizer, model, body, trial_count, fingerprint, stop_reason,
                    reused_from_job, created_at
             FROM tm_summaries WHERE job_id = $1",
        )
        .bind(job_id)
        .fetch_optional(pool)
        .await?);
        Ok(row)
    }

    /// Deletes finished queue rows; our tables hold every result, and on SQLite a long history
    /// slows apalis down.
    pub async fn sweep_queue(&self) -> Result<u64, DbError> {
        let swept = with_pool!(self, pool => {
            let mut conn = pool.acquire().await?;
            conn.sweep_finished().await?
        });
        Ok(swept)
    }
}

/// apalis's own attempt limit: one more than ours, so apalis never kills a task our claim logic
/// would still run (it spends an attempt each time it returns a dead worker's task to the queue).
fn queue_attempts(max_attempts: i64) -> i64 {
    max_attempts + 1
}

fn json_list(items: &[String]) -> String {
    serde_json::to_string(items).expect("a list of strings always serialises")
}

/// Writes shared by several transactions, implemented once per backend connection by macro.
trait RunRecords {
    /// Appends one row to `tm_job_errors`.
    fn insert_job_error(
        &mut self,
        job_id: &str,
        attempt: i64,
        at: DateTime<Utc>,
        kind: FailureKind,
        error: &str,
    ) -> impl std::future::Future<Output = Result<(), sqlx::Error>> + Send;

    /// Upserts the trials a job found and links them to the job in rank order: a few multi-row
    /// statements, not two per trial (per-statement overhead dominated the cost of storing a job).
    fn insert_trials(
        &mut self,
        job_id: &str,
        trials: &[Trial],
        now: DateTime<Utc>,
    ) -> impl std::future::Future<Output = Result<(), sqlx::Error>> + Send;

    /// Inserts what every run leaves, success or not: raw response pages and node metrics.
    fn insert_run_records(
        &mut self,
        job_id: &str,
        attempt: i64,
        state: &JobState,
    ) -> impl std::future::Future<Output = Result<(), sqlx::Error>> + Send;
}

/// Rows per multi-row statement: 16 binds a trial stays far below SQLite's and Postgres's limits.
const ROWS_PER_STATEMENT: usize = 500;

macro_rules! impl_run_records {
    ($conn:ty, $db:ty) => {
        impl RunRecords for $conn {
            async fn insert_trials(&mut self, job_id: &str, trials: &[Trial], now: DateTime<Utc>) -> Result<(), sqlx::Error> {
                for (chunk_index, chunk) in trials.chunks(ROWS_PER_STATEMENT).enumerate() {
                    let mut upsert = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO tm_trials (nct_id, brief_title, overall_status, phases, conditions, interventions,
                             lead_sponsor, enrollment, start_date, completion_date, brief_summary, minimum_age, maximum_age,
                             raw_json, first_seen_at, updated_at) ",
                    );
                    upsert.push_values(chunk, |mut row, trial| {
                        row.push_bind(&trial.nct_id)
                            .push_bind(&trial.brief_title)
                            .push_bind(&trial.overall_status)
                            .push_bind(json_list(&trial.phases))
                            .push_bind(json_list(&trial.conditions))
                            .push_bind(json_list(&trial.interventions))
                            .push_bind(&trial.lead_sponsor)
                            .push_bind(trial.enrollment)
                            .push_bind(&trial.start_date)
                            .push_bind(&trial.completion_date)
                            .push_bind(&trial.brief_summary)
                            .push_bind(&trial.minimum_age)
                            .push_bind(&trial.maximum_age)
                            .push_bind(&trial.raw_json)
                            .push_bind(now)
                            .push_bind(now);
                    });
                    upsert.push(
                        " ON CONFLICT (nct_id) DO UPDATE SET
                             brief_title = excluded.brief_title, overall_status = excluded.overall_status,
                             phases = excluded.phases, conditions = excluded.conditions,
                             interventions = excluded.interventions, lead_sponsor = excluded.lead_sponsor,
                             enrollment = excluded.enrollment, start_date = excluded.start_date,
                             completion_date = excluded.completion_date, brief_summary = excluded.brief_summary,
                             minimum_age = excluded.minimum_age, maximum_age = excluded.maximum_age,
                             raw_json = excluded.raw_json, updated_at = excluded.updated_at",
                    );
                    upsert.build().execute(&mut *self).await?;

                    let first_rank = (chunk_index * ROWS_PER_STATEMENT) as i64 + 1;
                    let mut links = sqlx::QueryBuilder::<$db>::new("INSERT INTO tm_job_trials (job_id, rank, nct_id) ");
                    links.push_values(chunk.iter().enumerate(), |mut row, (i, trial)| {
                        row.push_bind(job_id).push_bind(first_rank + i as i64).push_bind(&trial.nct_id);
                    });
                    links.build().execute(&mut *self).await?;
                }
                Ok(())
            }

            async fn insert_job_error(
                &mut self,
                job_id: &str,
                attempt: i64,
                at: DateTime<Utc>,
                kind: FailureKind,
                error: &str,
            ) -> Result<(), sqlx::Error> {
                sqlx::query("INSERT INTO tm_job_errors (job_id, attempt, at, kind, error) VALUES ($1, $2, $3, $4, $5)")
                    .bind(job_id)
                    .bind(attempt)
                    .bind(at)
                    .bind(kind.as_str())
                    .bind(error)
                    .execute(&mut *self)
                    .await?;
                Ok(())
            }

            async fn insert_run_records(&mut self, job_id: &str, attempt: i64, state: &JobState) -> Result<(), sqlx::Error> {
                for page in &state.raw_pages {
                    sqlx::query(
                        "INSERT INTO tm_ctgov_pages (job_id, attempt, page_number, request_url, http_status, body, fetched_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    )
                    .bind(job_id)
                    .bind(attempt)
                    .bind(i64::from(page.page_number))
                    .bind(&page.request_url)
                    .bind(i64::from(page.http_status))
                    .bind(&page.body)
                    .bind(page.fetched_at)
                    .execute(&mut *self)
                    .await?;
                }
                for metric in &state.metrics {
                    sqlx::query(
                        "INSERT INTO tm_node_metrics (job_id, job_attempt, node, attempt, started_at, duration_ms, outcome,
                             error, http_status)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    )
                    .bind(job_id)
                    .bind(attempt)
                    .bind(metric.node)
                    .bind(i64::from(metric.attempt))
                    .bind(metric.started_at)
                    .bind(metric.duration.as_secs_f64() * 1_000.0)
                    .bind(metric.outcome)
                    .bind(&metric.error)
                    .bind(metric.http_status.map(i64::from))
                    .execute(&mut *self)
                    .await?;
                }
                Ok(())
            }
        }
    };
}
impl_run_records!(sqlx::SqliteConnection, sqlx::Sqlite);
impl_run_records!(sqlx::PgConnection, sqlx::Postgres);
