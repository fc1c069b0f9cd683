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
    policy: FailurePolicy,
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
            policy: FailurePolicy {
                job_backoff: Backoff {
                    base: Duration::from_millis(worker.retry_base_ms),
                    max: Duration::from_millis(worker.retry_max_ms),
                },
                max_defer_age: worker.max_defer_age(),
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
        let meta = RunMeta {
            attempt,
            max_attempts,
            deferred_since,
        };
        self.run_claimed(&task.job_id, meta, mutation)
            .instrument(span)
            .await
    }

    async fn run_claimed(
        &self,
        job_id: &str,
        meta: RunMeta,
        mutation: String,
    ) -> Result<RunOutcome, DbError> {
        let attempt = meta.attempt;
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
        let failure = Failure {
            kind,
            error,
            retry_after,
        };
        let (kind, error, next, outcome) = match decide(
            &self.policy,
            failure,
            &meta,
            Utc::now(),
            rand::random::<f64>(),
        ) {
            Decision::Defer { at, reason } => {
                if !self
                    .store
                    .record_deferral(job_id, attempt, &reason, at, &state)
                    .await?
                {
                    return Ok(RunOutcome::Skipped);
                }
                tracing::warn!(error = %reason, retry_at = %at, "job deferred without using an attempt");
                return Ok(RunOutcome::Deferred);
            }
            Decision::Record { kind, error, next } => {
                let outcome = match next {
                    AfterFailure::Retry { .. } => RunOutcome::Retrying,
                    AfterFailure::Failed => RunOutcome::Failed,
                    AfterFailure::Dead => RunOutcome::Dead,
                };
                (kind, error, next, outcome)
            }
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

/// How failed runs are retried and how long deferral may last.
#[derive(Debug, Clone, Copy)]
pub struct FailurePolicy {
    pub job_backoff: Backoff,
    pub max_defer_age: Duration,
}

/// A failed run, classified.
#[derive(Debug, Clone)]
pub struct Failure {
    pub kind: FailureKind,
    pub error: String,
    pub retry_after: Option<Duration>,
}

/// Where the job stood when the run failed.
#[derive(Debug, Clone, Copy)]
pub struct RunMeta {
    pub attempt: i64,
    pub max_attempts: i64,
    pub deferred_since: Option<chrono::DateTime<Utc>>,
}

/// What happens after a failed run.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Back to the queue at `at` without using an attempt (a circuit breaker is open).
    Defer {
        at: chrono::DateTime<Utc>,
        reason: String,
    },
    /// Record the failure as `kind` and go on as `next`.
    Record {
        kind: FailureKind,
        error: String,
        next: AfterFailure,
    },
}

/// Decides what follows a failed run. Pure: `now` and `jitter` (in `[0, 1]`) come from the caller.
pub fn decide(
    policy: &FailurePolicy,
    failure: Failure,
    run: &RunMeta,
    now: chrono::DateTime<Utc>,
    jitter: f64,
) -> Decision {
    let Failure {
        kind,
        error,
        retry_after,
    } = failure;
    let after =
        |delay: Duration| now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
    match kind {
        FailureKind::Deferred => match run.deferred_since {
            Some(since) if (now - since).to_std().unwrap_or_default() > policy.max_defer_age => {
                Decision::Record {
                    kind: FailureKind::Permanent,
                    error: format!(
                        "deferred since {} (longer than the {:.1} h allowed): {error}",
                        since.format("%Y-%m-%d %H:%M:%S UTC"),
                        policy.max_defer_age.as_secs_f64() / 3600.0
                    ),
                    next: AfterFailure::Failed,
                }
            }
            // Come back when the service may take calls again, never sooner than a second, so no
            // path loops without a delay.
            _ => Decision::Defer {
                at: after(
                    retry_after.unwrap_or_default().max(MIN_DEFER_DELAY)
                        + MIN_DEFER_DELAY.mul_f64(jitter.clamp(0.0, 1.0)),
                ),
                reason: error,
            },
        },
        FailureKind::Permanent => Decision::Record {
            kind,
            error,
            next: AfterFailure::Failed,
        },
        FailureKind::Retryable if run.attempt < run.max_attempts => {
            let delay = match retry_after {
                Some(theirs) => theirs.min(policy.job_backoff.max),
                None => policy.job_backoff.delay(run.attempt as u32, jitter),
            };
            Decision::Record {
                kind,
                error,
                next: AfterFailure::Retry { at: after(delay) },
            }
        }
        FailureKind::Retryable => Decision::Record {
            kind,
            error,
            next: AfterFailure::Dead,
        },
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
                .batch_size(fetch_batch_size(app.concurrency));
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
                .batch_size(fetch_batch_size(app.concurrency));
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

/// Deliveries fetched per poll: twice the concurrency, so a freed slot starts the next job at once
/// instead of at the next poll (fetching exactly `concurrency` made jobs run in waves: 0.61 of the
/// C/L limit at C = 64 against 0.75 with this, N = 500, L = 100 ms). Fetched-but-unstarted
/// deliveries go back to the queue on shutdown, or after a crash once the heartbeat is missed.
fn fetch_batch_size(concurrency: usize) -> usize {
    (2 * concurrency).clamp(1, 200)
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

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    const POLICY: FailurePolicy = FailurePolicy {
        job_backoff: Backoff {
            base: Duration::from_secs(5),
            max: Duration::from_secs(600),
        },
        max_defer_age: Duration::from_secs(24 * 3600),
    };

    fn now() -> chrono::DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 4, 2, 0, 0).unwrap()
    }

    fn failure(kind: FailureKind, retry_after: Option<Duration>) -> Failure {
        Failure {
            kind,
            error: "boom".into(),
            retry_after,
        }
    }

    fn run(attempt: i64, deferred_since: Option<chrono::DateTime<Utc>>) -> RunMeta {
        RunMeta {
            attempt,
            max_attempts: 3,
            deferred_since,
        }
    }

    #[test]
    fn retryable_failures_back_off_then_die_on_the_last_attempt() {
        let first = decide(
            &POLICY,
            failure(FailureKind::Retryable, None),
            &run(1, None),
            now(),
            1.0,
        );
        assert_eq!(
            first,
            Decision::Record {
                kind: FailureKind::Retryable,
                error: "boom".into(),
                next: AfterFailure::Retry {
                    at: now() + chrono::Duration::seconds(5)
                }
            }
        );
        let second = decide(
            &POLICY,
            failure(FailureKind::Retryable, None),
            &run(2, None),
            now(),
            1.0,
        );
        assert!(
            matches!(second, Decision::Record { next: AfterFailure::Retry { at }, .. } if at == now() + chrono::Duration::seconds(10))
        );
        let told = decide(
            &POLICY,
            failure(FailureKind::Retryable, Some(Duration::from_secs(42))),
            &run(1, None),
            now(),
            0.0,
        );
        assert!(
            matches!(told, Decision::Record { next: AfterFailure::Retry { at }, .. } if at == now() + chrono::Duration::seconds(42)),
            "Retry-After wins"
        );
        let last = decide(
            &POLICY,
            failure(FailureKind::Retryable, None),
            &run(3, None),
            now(),
            1.0,
        );
        assert!(matches!(
            last,
            Decision::Record {
                next: AfterFailure::Dead,
                ..
            }
        ));
        let permanent = decide(
            &POLICY,
            failure(FailureKind::Permanent, None),
            &run(1, None),
            now(),
            1.0,
        );
        assert!(matches!(
            permanent,
            Decision::Record {
                next: AfterFailure::Failed,
                ..
            }
        ));
    }

    #[test]
    fn deferral_waits_for_the_breaker_and_never_less_than_a_second() {
        let open_for = Some(Duration::from_secs(30));
        let d = decide(
            &POLICY,
            failure(FailureKind::Deferred, open_for),
            &run(3, None),
            now(),
            0.0,
        );
        assert_eq!(
            d,
            Decision::Defer {
                at: now() + chrono::Duration::seconds(30),
                reason: "boom".into()
            }
        );
        let d = decide(
            &POLICY,
            failure(FailureKind::Deferred, Some(Duration::ZERO)),
            &run(1, None),
            now(),
            0.0,
        );
        assert_eq!(
            d,
            Decision::Defer {
                at: now() + chrono::Duration::seconds(1),
                reason: "boom".into()
            }
        );
        // Even on the last attempt a deferral uses none.
        assert!(matches!(
            decide(
                &POLICY,
                failure(FailureKind::Deferred, open_for),
                &run(3, None),
                now(),
                1.0
            ),
            Decision::Defer { .. }
        ));
    }

    #[test]
    fn a_job_deferred_too_long_fails_with_the_reason() {
        let since = now() - chrono::Duration::hours(25);
        let d = decide(
            &POLICY,
            failure(FailureKind::Deferred, None),
            &run(1, Some(since)),
            now(),
            0.0,
        );
        match d {
            Decision::Record {
                kind: FailureKind::Permanent,
                error,
                next: AfterFailure::Failed,
            } => {
                assert!(
                    error.contains("deferred since 2026-12-03 01:00:00 UTC")
                        && error.contains("24.0 h")
                        && error.ends_with("boom"),
                    "{error}"
                );
            }
            other => panic!("{other:?}"),
        }
        let recent = now() - chrono::Duration::hours(23);
        assert!(matches!(
            decide(
                &POLICY,
                failure(FailureKind::Deferred, None),
                &run(1, Some(recent)),
                now(),
                0.0
            ),
            Decision::Defer { .. }
        ));
    }
}
