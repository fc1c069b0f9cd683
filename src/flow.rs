//! A small PocketFlow-style engine: a [`Node`] has `prep` (read what it needs from the shared
//! [`JobState`]), `exec` (the I/O, the only part that is retried) and `post` (write its results into
//! the state and choose the next step). [`run_node`] drives one node with retries and records a
//! latency metric for every exec attempt. The state is persisted by the worker in one transaction
//! once the flow ends, so a crash never leaves half a result.

use std::future::Future;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::ctgov::{RawPage, Trial};
use crate::http::{Backoff, FailureKind, UpstreamError};
use crate::summarize::Summary;

/// A node failure, classified so the runner and the worker know whether to retry.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct NodeError {
    pub kind: FailureKind,
    pub message: String,
    /// How long the upstream asked us to wait.
    pub retry_after: Option<Duration>,
    /// The upstream service and HTTP status, when the failure was an upstream's.
    pub service: Option<&'static str>,
    pub status: Option<u16>,
}

impl NodeError {
    fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            retry_after: None,
            service: None,
            status: None,
        }
    }
    pub fn retryable(message: impl Into<String>) -> Self {
        Self::new(FailureKind::Retryable, message)
    }
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::new(FailureKind::Permanent, message)
    }
    pub fn is_retryable(&self) -> bool {
        self.kind == FailureKind::Retryable
    }
}

impl From<UpstreamError> for NodeError {
    fn from(e: UpstreamError) -> Self {
        Self {
            kind: e.kind,
            retry_after: e.retry_after,
            message: e.to_string(),
            service: Some(e.service),
            status: e.status,
        }
    }
}

/// What a node's `post` asks for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Go on to the next node of the flow.
    Continue,
    /// The flow is finished.
    Finish,
}

/// One exec attempt of one node.
#[derive(Debug, Clone)]
pub struct NodeMetric {
    pub node: &'static str,
    pub attempt: u32,
    pub started_at: DateTime<Utc>,
    pub duration: Duration,
    pub outcome: &'static str,
    pub http_status: Option<u16>,
    pub error: Option<String>,
}

/// The shared store of one job run: inputs, what the nodes found, and what they measured.
#[derive(Debug, Clone, Default)]
pub struct JobState {
    pub mutation: String,
    pub trials: Vec<Trial>,
    pub total_count: Option<u64>,
    /// Every ClinicalTrials.gov response received, including those of failed attempts.
    pub raw_pages: Vec<RawPage>,
    pub summary: Option<Summary>,
    pub fingerprint: Option<String>,
    pub metrics: Vec<NodeMetric>,
}

impl JobState {
    pub fn new(mutation: impl Into<String>) -> Self {
        Self {
            mutation: mutation.into(),
            ..Self::default()
        }
    }
}

/// What an exec attempt may record besides its result (kept even when the attempt fails).
#[derive(Debug, Default)]
pub struct ExecLog {
    pub raw_pages: Vec<RawPage>,
}

/// One step of a flow.
pub trait Node: Send + Sync {
    /// Input of `exec`, read from the state by `prep`.
    type Prep: Send + Sync;
    /// Result of `exec`, written to the state by `post`.
    type Output: Send;

    fn name(&self) -> &'static str;

    /// Reads what `exec` needs: from the state, or from storage (not retried).
    fn prep(&self, state: &JobState) -> impl Future<Output = Result<Self::Prep, NodeError>> + Send;

    /// The I/O. Called again on a retryable error, with the same `prep`.
    fn exec(
        &self,
        prep: &Self::Prep,
        log: &mut ExecLog,
    ) -> impl Future<Output = Result<Self::Output, NodeError>> + Send;

    fn post(&self, state: &mut JobState, prep: Self::Prep, output: Self::Output) -> Action;
}

/// How often, and how patiently, a node's exec is retried within one job run.
#[derive(Debug, Clone, Copy)]
pub struct NodeRetry {
    pub max_attempts: u32,
    pub backoff: Backoff,
}

/// Runs one node: prep, exec with retries (recording every attempt), post.
pub async fn run_node<N: Node>(
    node: &N,
    state: &mut JobState,
    retry: NodeRetry,
) -> Result<Action, NodeError> {
    let prep = node.prep(state).await?;
    let mut attempt = 1;
    loop {
        let started_at = Utc::now();
        let clock = Instant::now();
        let mut log = ExecLog::default();
        let result = node.exec(&prep, &mut log).await;
        state.raw_pages.append(&mut log.raw_pages);
        state.metrics.push(NodeMetric {
            node: node.name(),
            attempt,
            started_at,
            duration: clock.elapsed(),
            outcome: match &result {
                Ok(_) => "ok",
                Err(e) => e.kind.as_str(),
            },
            http_status: result.as_ref().err().and_then(|e| e.status),
            error: result.as_ref().err().map(|e| e.message.clone()),
        });
        match result {
            Ok(output) => return Ok(node.post(state, prep, output)),
            Err(e) if e.is_retryable() && attempt < retry.max_attempts => {
                let delay = retry.backoff.next_delay(attempt, e.retry_after);
                tracing::warn!(
                    node = node.name(),
                    service = e.service,
                    attempt,
                    status = e.status,
                    delay_ms = delay.as_millis() as u64,
                    error = %e,
                    "call failed; retrying after the delay"
                );
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Fails `failures` times with `kind`, then succeeds.
    struct Flaky {
        failures: u32,
        kind: FailureKind,
        calls: AtomicU32,
    }

    impl Node for Flaky {
        type Prep = String;
        type Output = u32;
        fn name(&self) -> &'static str {
            "flaky"
        }
        async fn prep(&self, state: &JobState) -> Result<String, NodeError> {
            Ok(state.mutation.clone())
        }
        async fn exec(&self, _prep: &String, _log: &mut ExecLog) -> Result<u32, NodeError> {
            let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            if call <= self.failures {
                Err(NodeError::new(self.kind, format!("failure {call}")))
            } else {
                Ok(call)
            }
        }
        fn post(&self, state: &mut JobState, prep: String, output: u32) -> Action {
            state.mutation = format!("{prep}:{output}");
            Action::Finish
        }
    }

    fn retry(max_attempts: u32) -> NodeRetry {
        NodeRetry {
            max_attempts,
            backoff: Backoff {
                base: Duration::from_millis(10),
                max: Duration::from_millis(40),
            },
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retryable_failures_are_retried_and_every_attempt_recorded() {
        let node = Flaky {
            failures: 2,
            kind: FailureKind::Retryable,
            calls: AtomicU32::new(0),
        };
        let mut state = JobState::new("m");
        let action = run_node(&node, &mut state, retry(3)).await.unwrap();
        assert_eq!(action, Action::Finish);
        assert_eq!(state.mutation, "m:3", "post saw the third call's output");
        let outcomes: Vec<_> = state
            .metrics
            .iter()
            .map(|m| (m.attempt, m.outcome))
            .collect();
        assert_eq!(outcomes, [(1, "retryable"), (2, "retryable"), (3, "ok")]);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_are_bounded() {
        let node = Flaky {
            failures: 10,
            kind: FailureKind::Retryable,
            calls: AtomicU32::new(0),
        };
        let mut state = JobState::new("m");
        let err = run_node(&node, &mut state, retry(3)).await.unwrap_err();
        assert_eq!(err.message, "failure 3");
        assert_eq!(node.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_failures_are_not_retried() {
        let node = Flaky {
            failures: 1,
            kind: FailureKind::Permanent,
            calls: AtomicU32::new(0),
        };
        let mut state = JobState::new("m");
        let err = run_node(&node, &mut state, retry(5)).await.unwrap_err();
        assert_eq!(err.kind, FailureKind::Permanent);
        assert_eq!(node.calls.load(Ordering::SeqCst), 1);
        assert_eq!(state.metrics.len(), 1);
    }
}
