//! The worker: takes deliveries from the queue with bounded concurrency, runs the flow for each job,
//! and records how it ended. Every run ends in a known state: succeeded, back to the queue with a
//! delay, failed (a permanent error) or dead (its last attempt failed).
//!
//! Panics and timeouts inside a run are caught here and count as a failed attempt, so apalis never
//! sees them (a panic under apalis's own `catch_panic` leaves the task `Running` for good).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apalis::prelude::{BoxDynError, Data, WorkerBuilder, WorkerBuilderExt};
use apalis_core::backend::ext::BackendExt;
use chrono::Utc;
use futures::FutureExt;
use tracing::Instrument;

use crate::anthropic::{AnthropicSettings, AnthropicSummarizer, PromptLimits};
use crate::config::{Config, SummarizerKind};
use crate::ctgov::{CtgovClient, CtgovSettings};
use crate::db::{AfterFailure, Claim, DbError, Store};
use crate::flow::{JobState, NodeRetry};
use crate::http::{self, Backoff, ClientSettings, FailureKind};
use crate::nodes::{MutationFlow, QueryTrialsNode, SummarizeTrialsNode};
use crate::queue::{MutationTask, QUEUE_NAME};
use crate::summarize::{OfflineSummarizer, Summarizer};

/// How often finished queue rows are deleted while a worker runs.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// A worker that presumes another dead after this many missed heartbeats.
const MISSED_HEARTBEATS: usize = 3;

/// Could not start a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("could not build the HTTP client for {service}: {source}")]
    HttpClient {
        service: &'static str,
        source: reqwest::Error,
    },
    #[error("invalid URL in {field}: {reason}")]
    Url { field: &'static str, reason: String },
    #[error("the queue worker stopped with an error: {0}")]
    Queue(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Everything a job run needs, shared by all runs of one process.
pub struct App {
    pub store: Store,
    pub flow: MutationFlow,
    pub worker_name: String,
    job_timeout: Duration,
    job_backoff: Backoff,
    concurrency: usize,
    poll_interval: Duration,
    heartbeat: Duration,
}

/// How one delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    Succeeded,
    Retrying,
    Failed,
    Dead,
    /// The delivery was outdated; nothing ran.
    Skipped,
}

impl App {
    /// Builds the clients and the flow from the configuration.
    pub fn new(config: &Config, store: Store) -> Result<Self, WorkerError> {
        let ctgov = &config.ctgov;
        let ctgov_backoff = Backoff {
            base: Duration::from_millis(ctgov.backoff_base_ms),
            max: Duration::from_millis(ctgov.backoff_max_ms),
        };
        let client = CtgovClient::new(
            service_client(
                crate::ctgov::SERVICE,
                ClientSettings {
                    connect_timeout: Duration::from_millis(ctgov.connect_timeout_ms),
                    request_timeout: Duration::from_millis(ctgov.request_timeout_ms),
                    pool_idle_timeout: Duration::from_millis(ctgov.pool_idle_timeout_ms),
                    pool_max_idle_per_host: ctgov.pool_max_idle_per_host,
                },
            )?,
            CtgovSettings {
                base_url: parse_url("ctgov.base_url", &ctgov.base_url)?,
                page_size: ctgov.page_size,
                max_trials: ctgov.max_trials,
                max_retry_after: ctgov_backoff.max,
            },
        );
        let anthropic = &config.anthropic;
        let anthropic_backoff = Backoff {
            base: Duration::from_millis(anthropic.backoff_base_ms),
            max: Duration::from_millis(anthropic.backoff_max_ms),
        };
        let (summarizer, summarize_retry): (Arc<dyn Summarizer>, NodeRetry) =
            match (config.effective_summarizer(), &anthropic.api_key) {
                (SummarizerKind::Anthropic, Some(key)) => {
                    let http = service_client(
                        crate::anthropic::SERVICE,
                        ClientSettings {
                            connect_timeout: Duration::from_millis(anthropic.connect_timeout_ms),
                            request_timeout: Duration::from_millis(anthropic.request_timeout_ms),
                            pool_idle_timeout: Duration::from_millis(
                                anthropic.pool_idle_timeout_ms,
                            ),
                            pool_max_idle_per_host: anthropic.pool_max_idle_per_host,
                        },
                    )?;
                    let settings = AnthropicSettings {
                        base_url: parse_url("anthropic.base_url", &anthropic.base_url)?,
                        model: anthropic.model.clone(),
                        max_tokens: anthropic.max_tokens,
                        temperature: anthropic.temperature,
                        limits: PromptLimits {
                            max_trials: anthropic.max_prompt_trials,
                            max_chars: anthropic.max_prompt_chars,
                        },
                        max_retry_after: anthropic_backoff.max,
                    };
                    let retry = NodeRetry {
                        max_attempts: anthropic.max_request_attempts,
                        backoff: anthropic_backoff,
                    };
                    (
                        Arc::new(AnthropicSummarizer::new(http, key.clone(), settings)),
                        retry,
                    )
                }
                // `Config::validate` refuses `anthropic` without a key.
                _ => (
                    Arc::new(OfflineSummarizer),
                    NodeRetry {
                        max_attempts: 1,
                        backoff: ctgov_backoff,
                    },
                ),
            };
        let worker = &config.worker;
        Ok(Self {
            flow: MutationFlow {
                query: QueryTrialsNode { client },
                summarize: SummarizeTrialsNode {
                    summarizer,
                    reuse_from: (!config.force_summarize).then(|| store.clone()),
                },
                query_retry: NodeRetry {
                    max_attempts: ctgov.max_request_attempts,
                    backoff: ctgov_backoff,
                },
                summarize_retry,
            },
            store,
            worker_name: format!("trialmatch-{}-{}", std::process::id(), ulid::Ulid::new()),
            job_timeout: worker.job_timeout(),
            job_backoff: Backoff {
                base: Duration::from_millis(worker.retry_base_ms),
                max: Duration::from_millis(worker.retry_max_ms),
            },
            concurrency: worker.concurrency,
            poll_interval: worker.poll_interval(),
            heartbeat: worker.heartbeat(),
        })
    }

    /// Uses `summarizer` instead of the configured one (tests, embedding).
    pub fn with_summarizer(mut self, summarizer: Arc<dyn Summarizer>) -> Self {
        self.flow.summarize.summarizer = summarizer;
        self
    }

    /// Runs one delivery to its end. Only database errors escape; they leave the delivery to apalis,
    /// which hands it out again.
    pub async fn process(&self, task: &MutationTask) -> Result<RunOutcome, DbError> {
        let (mutation, attempt, max_attempts) = match self
            .store
            .claim(task, &self.worker_name)
            .await?
        {
            Claim::Run {
                mutation,
                attempt,
                max_attempts,
            } => (mutation, attempt, max_attempts),
            Claim::Stale => {
                tracing::debug!(job_id = %task.job_id, delivery = task.delivery, "outdated delivery skipped");
                return Ok(RunOutcome::Skipped);
            }
            Claim::Exhausted => {
                tracing::error!(job_id = %task.job_id, "job dead: its worker stopped during every attempt");
                return Ok(RunOutcome::Dead);
            }
        };
        let span = tracing::info_span!("job", job_id = %task.job_id, mutation = %mutation, attempt, max_attempts);
        self.run_claimed(&task.job_id, mutation, attempt, max_attempts)
            .instrument(span)
            .await
    }

    async fn run_claimed(
        &self,
        job_id: &str,
        mutation: String,
        attempt: i64,
        max_attempts: i64,
    ) -> Result<RunOutcome, DbError> {
        let clock = Instant::now();
        let mut state = JobState::new(mutation);
        let run = AssertUnwindSafe(tokio::time::timeout(
            self.job_timeout,
            self.flow.run(&mut state),
        ))
        .catch_unwind()
        .await;
        let failure = match run {
            Ok(Ok(Ok(()))) => None,
            Ok(Ok(Err(e))) => Some((e.error.kind, e.to_string(), e.error.retry_after)),
            Ok(Err(_)) => Some((
                FailureKind::Retryable,
                format!(
                    "the run took longer than the job timeout of {} s",
                    self.job_timeout.as_secs_f64()
                ),
                None,
            )),
            Err(panic) => Some((
                FailureKind::Retryable,
                format!("the run panicked: {}", panic_message(&panic)),
                None,
            )),
        };
        let Some((kind, error, retry_after)) = failure else {
            let stored = self.store.record_success(job_id, attempt, &state).await?;
            if !stored {
                tracing::warn!("result not stored: another run of this job took over");
                return Ok(RunOutcome::Skipped);
            }
            tracing::info!(
                trials = state.trials.len(),
                elapsed_ms = clock.elapsed().as_millis() as u64,
                "job succeeded"
            );
            return Ok(RunOutcome::Succeeded);
        };
        let (next, outcome) = match kind {
            FailureKind::Permanent => (AfterFailure::Failed, RunOutcome::Failed),
            FailureKind::Retryable if attempt < max_attempts => {
                let delay = self.job_backoff.next_delay(attempt as u32, retry_after);
                let at =
                    Utc::now() + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
                (AfterFailure::Retry { at }, RunOutcome::Retrying)
            }
            FailureKind::Retryable => (AfterFailure::Dead, RunOutcome::Dead),
        };
        if !self
            .store
            .record_failure(job_id, attempt, kind, &error, &state, next)
            .await?
        {
            return Ok(RunOutcome::Skipped);
        }
        match next {
            AfterFailure::Retry { at } => {
                tracing::warn!(%error, retry_at = %at, "attempt failed; job returns to the queue")
            }
            AfterFailure::Failed => tracing::error!(%error, "job failed (permanent error)"),
            AfterFailure::Dead => tracing::error!(%error, "job dead: its last attempt failed"),
        }
        Ok(outcome)
    }
}

fn service_client(
    service: &'static str,
    settings: ClientSettings,
) -> Result<reqwest::Client, WorkerError> {
    http::build_client(&settings).map_err(|source| WorkerError::HttpClient { service, source })
}

fn parse_url(field: &'static str, value: &str) -> Result<url::Url, WorkerError> {
    url::Url::parse(value).map_err(|e| WorkerError::Url {
        field,
        reason: e.to_string(),
    })
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}

async fn handle(task: MutationTask, app: Data<Arc<App>>) -> Result<(), BoxDynError> {
    app.process(&task)
        .await
        .map(|_| ())
        .map_err(|e| Box::new(e) as BoxDynError)
}

/// Runs the worker until `stop` completes, then stops taking jobs and lets in-flight ones finish;
/// fetched-but-unstarted deliveries go back to the queue.
pub async fn run_worker<S>(app: Arc<App>, stop: S) -> Result<(), WorkerError>
where
    S: Future<Output = ()> + Send + 'static,
{
    let sweeper = tokio::spawn(sweep_periodically(app.store.clone()));
    let stop = async move {
        stop.await;
        Ok::<(), std::io::Error>(())
    };
    let name = app.worker_name.clone();
    let result = match app.store.clone() {
        Store::Sqlite(pool) => {
            let config = apalis_sqlite::Config::default()
                .queue(QUEUE_NAME)
                .heartbeat_interval(app.heartbeat)
                .missed_heartbeats(MISSED_HEARTBEATS)
                .batch_size(app.concurrency.clamp(1, 100));
            let backend = apalis_sqlite::SqliteStorage::<MutationTask>::new(&pool)
                .with_config(config)
                .poll_with_interval(app.poll_interval);
            WorkerBuilder::new(name)
                .backend(backend)
                .data(app.clone())
                .concurrency(app.concurrency)
                .build(handle)
                .run_until(stop)
                .await
        }
        Store::Postgres(pool) => {
            let config = apalis_postgres::Config::default()
                .queue(QUEUE_NAME)
                .heartbeat_interval(app.heartbeat)
                .missed_heartbeats(MISSED_HEARTBEATS)
                .batch_size(app.concurrency.clamp(1, 100));
            let backend = apalis_postgres::PostgresStorage::<MutationTask>::new(&pool)
                .with_config(config)
                .poll_with_interval(app.poll_interval);
            WorkerBuilder::new(name)
                .backend(backend)
                .data(app.clone())
                .concurrency(app.concurrency)
                .build(handle)
                .run_until(stop)
                .await
        }
    };
    sweeper.abort();
    app.store.sweep_queue().await?;
    result.map_err(|e| WorkerError::Queue(e.to_string()))
}

async fn sweep_periodically(store: Store) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    loop {
        tick.tick().await;
        if let Err(e) = store.sweep_queue().await {
            tracing::warn!(error = %e, "could not delete finished queue rows");
        }
    }
}

/// Completes when no job of `batch_id` (or of any batch) is left to run.
pub async fn until_drained(store: Store, batch_id: Option<String>, poll: Duration) {
    loop {
        match store.unfinished_jobs(batch_id.as_deref()).await {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not count unfinished jobs"),
        }
        tokio::time::sleep(poll).await;
    }
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
    tracing::info!("shutdown requested: finishing the jobs in flight, taking no new ones");
}
