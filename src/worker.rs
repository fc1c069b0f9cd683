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
use crate::resilience::ServiceGuard;
use crate::summarize::{OfflineSummarizer, Summarizer};

/// How often finished queue rows are deleted while a worker runs.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Shortest wait before a deferred job is tried again.
const MIN_DEFER_DELAY: Duration = Duration::from_secs(1);

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
    max_defer_age: Duration,
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
    /// Back to the queue without using an attempt: a service's circuit breaker is open.
    Deferred,
    /// The delivery was outdated; nothing ran.
    Skipped,
}

/// A claimed run of a job.
struct ClaimedRun<'a> {
    job_id: &'a str,
    attempt: i64,
    max_attempts: i64,
    deferred_since: Option<chrono::DateTime<Utc>>,
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
            Arc::new(ServiceGuard::new(crate::ctgov::SERVICE, ctgov.guard())),
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
                    let guard = Arc::new(ServiceGuard::new(
                        crate::anthropic::SERVICE,
                        anthropic.guard(),
                    ));
                    (
                        Arc::new(AnthropicSummarizer::new(http, guard, key.clone(), settings)),
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
            max_defer_age: worker.max_defer_age(),
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
        let (mutation, attempt, max_attempts, deferred_since) = match self
            .store
            .claim(task, &self.worker_name)
            .await?
        {
            Claim::Run {
                mutation,
                attempt,
                max_attempts,
                deferred_since,
            } => (mutation, attempt, max_attempts, deferred_since),
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
        let run = ClaimedRun {
            job_id: &task.job_id,
            attempt,
            max_attempts,
            deferred_since,
        };
        self.run_claimed(run, mutation).instrument(span).await
    }

    async fn run_claimed(
        &self,
        run: ClaimedRun<'_>,
        mutation: String,
    ) -> Result<RunOutcome, DbError> {
        let ClaimedRun {
            job_id,
            attempt,
            max_attempts,
            deferred_since,
        } = run;
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
        let now = Utc::now();
        let (kind, error) = match (kind, deferred_since) {
            (FailureKind::Deferred, Some(since))
                if (now - since).to_std().unwrap_or_default() > self.max_defer_age =>
            {
                (
                    FailureKind::Permanent,
                    format!(
                        "deferred since {since} (longer than the {} h allowed): {error}",
                        self.max_defer_age.as_secs() / 3600
                    ),
                )
            }
            (kind, _) => (kind, error),
        };
        if kind == FailureKind::Deferred {
            // Not an attempt: the service refused the call. Come back when it may take calls again,
            // never sooner than a second, so no path loops without a delay.
            let wait = retry_after.unwrap_or_default().max(MIN_DEFER_DELAY)
                + MIN_DEFER_DELAY.mul_f64(rand::random::<f64>());
            let at = now + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::MAX);
            if !self
                .store
                .record_deferral(job_id, attempt, &error, at, &state)
                .await?
            {
                return Ok(RunOutcome::Skipped);
            }
            tracing::warn!(%error, retry_at = %at, "job deferred without using an attempt");
            return Ok(RunOutcome::Deferred);
        }
        let (next, outcome) = match kind {
            FailureKind::Permanent | FailureKind::Deferred => {
                (AfterFailure::Failed, RunOutcome::Failed)
            }
            FailureKind::Retryable if attempt < max_attempts => {
                let delay = self.job_backoff.next_delay(attempt as u32, retry_after);
                let at = now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
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

/// When a draining worker stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// When every job has finished.
    UntilFinished,
    /// Also when the only jobs left wait on an open circuit breaker (`work --drain`, `run`):
    /// an outage must not keep a batch run waiting forever.
    UntilOnlyDeferredLeft,
}

/// Completes when no job of `batch_id` (or of any batch) is left to run, as `drain` says.
pub async fn until_drained(store: Store, batch_id: Option<String>, poll: Duration, drain: Drain) {
    loop {
        match store.backlog(batch_id.as_deref()).await {
            Ok(backlog) if backlog.unfinished == 0 => return,
            Ok(backlog)
                if drain == Drain::UntilOnlyDeferredLeft
                    && backlog.unfinished == backlog.deferred =>
            {
                return;
            }
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
