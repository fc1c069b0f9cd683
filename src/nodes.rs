//! The two nodes of a mutation job and the flow that chains them:
//! [`QueryTrialsNode`] (ClinicalTrials.gov → typed trials) then [`SummarizeTrialsNode`] (trials → markdown).

use std::sync::Arc;

use crate::ctgov::{CtgovClient, SearchResult, Trial};
use crate::db::Store;
use crate::flow::{Action, ExecLog, JobState, Node, NodeError, NodeRetry, run_node};
use crate::summarize::{Summarizer, Summary, SummaryInput, fingerprint, no_trials_markdown};

/// Finds the trials that mention the mutation.
pub struct QueryTrialsNode {
    pub client: CtgovClient,
}

impl Node for QueryTrialsNode {
    type Prep = String;
    type Output = SearchResult;

    fn name(&self) -> &'static str {
        "query_trials"
    }

    async fn prep(&self, state: &JobState) -> Result<String, NodeError> {
        Ok(state.mutation.clone())
    }

    async fn exec(&self, mutation: &String, log: &mut ExecLog) -> Result<SearchResult, NodeError> {
        Ok(self.client.search(mutation, &mut log.raw_pages).await?)
    }

    fn post(&self, state: &mut JobState, _prep: String, found: SearchResult) -> Action {
        state.fingerprint = Some(fingerprint(&found.trials, found.total_count));
        state.trials = found.trials;
        state.total_count = found.total_count;
        Action::Continue
    }
}

/// Writes the summary of the trials found, or reuses the last one when the trials have not changed.
pub struct SummarizeTrialsNode {
    pub summarizer: Arc<dyn Summarizer>,
    /// Where earlier summaries are looked up; `None` always summarizes (`--force-summarize`).
    pub reuse_from: Option<Store>,
}

/// What the summarizer needs, copied out of the state, and an earlier summary to reuse if any.
pub struct SummarizePrep {
    mutation: String,
    trials: Vec<Trial>,
    total_count: Option<u64>,
    reusable: Option<Summary>,
}

impl Node for SummarizeTrialsNode {
    type Prep = SummarizePrep;
    type Output = Summary;

    fn name(&self) -> &'static str {
        "summarize_trials"
    }

    async fn prep(&self, state: &JobState) -> Result<SummarizePrep, NodeError> {
        let reusable = match (&self.reuse_from, &state.fingerprint) {
            (Some(store), Some(fingerprint)) if !state.trials.is_empty() => store
                .reusable_summary(&state.mutation, self.summarizer.as_ref(), fingerprint)
                .await
                .map_err(|e| {
                    NodeError::retryable(format!("looking up an earlier summary failed: {e}"))
                })?,
            _ => None,
        };
        Ok(SummarizePrep {
            mutation: state.mutation.clone(),
            trials: state.trials.clone(),
            total_count: state.total_count,
            reusable,
        })
    }

    async fn exec(&self, prep: &SummarizePrep, _log: &mut ExecLog) -> Result<Summary, NodeError> {
        if let Some(summary) = &prep.reusable {
            tracing::info!(
                reused_from_job = summary.reused_from_job.as_deref(),
                "trials unchanged: summary reused"
            );
            return Ok(summary.clone());
        }
        if prep.trials.is_empty() {
            // Nothing to summarise: no model call, the same text for every summarizer.
            return Ok(Summary::without_call(
                no_trials_markdown(&prep.mutation),
                self.summarizer.as_ref(),
            ));
        }
        let input = SummaryInput {
            mutation: &prep.mutation,
            trials: &prep.trials,
            total_count: prep.total_count,
        };
        self.summarizer.summarize(input).await
    }

    fn post(&self, state: &mut JobState, _prep: SummarizePrep, summary: Summary) -> Action {
        state.summary = Some(summary);
        Action::Finish
    }
}

/// The flow of one mutation job.
pub struct MutationFlow {
    pub query: QueryTrialsNode,
    pub summarize: SummarizeTrialsNode,
    pub query_retry: NodeRetry,
    pub summarize_retry: NodeRetry,
}

/// Which node a flow failed in, and why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{node}: {error}")]
pub struct FlowError {
    pub node: &'static str,
    pub error: NodeError,
}

impl MutationFlow {
    /// Runs the nodes in order until one finishes the flow. The state keeps everything gathered,
    /// also when an error is returned.
    pub async fn run(&self, state: &mut JobState) -> Result<(), FlowError> {
        let wrap = |node: &'static str| move |error| FlowError { node, error };
        if run_node(&self.query, state, self.query_retry)
            .await
            .map_err(wrap(self.query.name()))?
            == Action::Finish
        {
            return Ok(());
        }
        run_node(&self.summarize, state, self.summarize_retry)
            .await
            .map_err(wrap(self.summarize.name()))?;
        Ok(())
    }
}
