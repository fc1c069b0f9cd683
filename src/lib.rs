//! trialmatch: a durable batch worker that matches genetic mutations to clinical trials.
//!
//! Map of the crate:
//! - [`config`]: layered configuration (defaults < file < environment < flags) and its validation.
//! - [`input`]: reading and checking the mutations a user gives.
//! - [`db`]: our tables on SQLite or Postgres, migrations, and every query on them.
//! - [`queue`]: the apalis queue, its delivery payload and the workarounds for apalis's rough edges.
//! - [`http`]: pooled clients, failure classification, `Retry-After` and backoff.
//! - [`resilience`]: per-service in-flight bound, rate limit and circuit breaker.
//! - [`ctgov`]: the ClinicalTrials.gov API v2 model, parser and paging client.
//! - [`anthropic`]: the Claude summarizer: prompt building, Messages API types and client.
//! - [`summarize`]: the `Summarizer` trait, the offline summarizer and trial-set fingerprints.
//! - [`flow`]: the PocketFlow-style node engine (prep / exec / post, retries, metrics).
//! - [`nodes`]: QueryTrialsNode, SummarizeTrialsNode and the flow that chains them.
//! - [`worker`]: running jobs from the queue to a known end state; graceful shutdown.
//! - [`report`]: status tables and summaries for people.
//! - [`cli`]: the command line.

pub mod anthropic;
pub mod cli;
pub mod config;
pub mod ctgov;
pub mod db;
pub mod flow;
pub mod http;
pub mod input;
pub mod nodes;
pub mod queue;
pub mod report;
pub mod resilience;
pub mod summarize;
pub mod worker;
