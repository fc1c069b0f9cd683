//! The two nodes of a mutation job and the flow that chains them:
//! [`QueryTrialsNode`] (ClinicalTrials.gov → typed trials) then [`SummarizeTrialsNode`] (trials → markdown).

use std::sync::Arc;

use crate::ctgov::{CtgovClient, SearchResult, Trial};
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

    fn prep(&self, state: &JobState) -> String {
        state.mutation.clone()
    }

    async fn exec(&self, mutation: &String, log: &mut ExecLog) -> Result<SearchResult, NodeError> {
        Ok(self.client.search(mutation, &mut log.raw_pages).await?)
    }

    fn post(&self, state: &mut JobState, _prep: String, found: SearchResult) -> Action {
        state.fingerprint = Some(fingerprint(&found.trials));
        state.trials = found.trials;
        state.total_count = found.total_count;
        Action::Continue
    }
}

/// Writes the summary of the trials found.
pub struct SummarizeTrialsNode {
    pub summarizer: Arc<dyn Summarizer>,
}

/// What the summarizer needs, copied out of the state.
pub struct SummarizePrep {
    mutation: String,
    trials: Vec<Trial>,
    total_count: Option<u64>,
}

impl Node for SummarizeTrialsNode {
    type Prep = SummarizePrep;
    type Output = Summary;

    fn name(&self) -> &'static str {
        "summarize_trials"
    }

    fn prep(&self, state: &JobState) -> SummarizePrep {
        SummarizePrep {
            mutation: state.mutation.clone(),
            trials: state.trials.clone(),
            total_count: state.total_count,
        }
    }

    async fn exec(&self, prep: &SummarizePrep, _log: &mut ExecLog) -> Result<Summary, NodeError> {
        if prep.trials.is_empty() {
            // Nothing to summarise: no model call, the same text for every summarizer.
            return Ok(Summary {
                markdown: no_trials_markdown(&prep.mutation),
                summarizer: self.summarizer.name().to_owned(),
                model: None,
                input_tokens: None,
                output_tokens: None,
                stop_reason: None,
            });
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
