//! Claude through the Anthropic Messages API: the prompt (built by pure functions from the trials),
//! the wire types, and [`AnthropicSummarizer`].
//!
//! The system prompt is stable and marked for prompt caching; the user message lists the trials in
//! a deterministic order (phase, status, NCT id), bounded in count and characters, and says when
//! the list was cut. The API key is sent in `x-api-key` and nowhere else: it is scrubbed from any
//! error text and never logged or stored.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use url::Url;

use crate::config::expose;
use crate::ctgov::Trial;
use crate::flow::NodeError;
use crate::http::{self, UpstreamError};
use crate::resilience::ServiceGuard;
use crate::summarize::{PhaseGroup, Summarizer, Summary, SummaryInput, TokenUsage, status_label};

/// Name used in errors, logs and metrics.
pub const SERVICE: &str = "anthropic";
/// The API version we speak.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";
/// Bump when the prompt changes: summaries are reused only under the same version.
pub const PROMPT_VERSION: &str = "claude-1";

/// What to produce. Stable text, so the API can cache it across calls.
pub const SYSTEM_PROMPT: &str = "You summarise clinical trials from ClinicalTrials.gov for one genetic \
mutation, for oncologists and for patients. Write markdown with these sections: \
\"## Overview\" (how many trials, what kinds of treatment, where they stand), \
\"## Trials by phase and status\" (grouped by phase, most advanced first; within a phase, recruiting first), \
\"## Notable patterns\" (drug classes, combinations, conditions, sponsors that recur), and \
\"## Practical notes\" (for clinicians and for patients: which trials are recruiting, age limits, what to ask). \
Tie every claim about a trial to its NCT id, written as a link [NCTxxxxxxxx](https://clinicaltrials.gov/study/NCTxxxxxxxx). \
Use only the trials given; never invent a trial, a result or an eligibility rule. \
If the list was cut, say so. Be concise: no preamble, no closing remarks.";

/// Limits on what is sent to the model.
#[derive(Debug, Clone, Copy)]
pub struct PromptLimits {
    pub max_trials: usize,
    pub max_chars: usize,
}

/// The user message and what it left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserPrompt {
    pub text: String,
    pub trials_included: usize,
}

/// A short hash of everything that shapes the model's answer apart from the trials.
pub fn prompt_hash(model: &str, max_tokens: u32) -> String {
    let mut hasher = Sha256::new();
    hasher.update(format!("{PROMPT_VERSION}\n{model}\n{max_tokens}\n{SYSTEM_PROMPT}").as_bytes());
    format!("{:x}", hasher.finalize())[..16].to_owned()
}

/// The trials in prompt order: phase (most advanced first), then status, then NCT id.
pub fn prompt_order(trials: &[Trial]) -> Vec<&Trial> {
    let mut ordered: Vec<&Trial> = trials.iter().collect();
    ordered.sort_by(|a, b| {
        PhaseGroup::of(b)
            .advancement()
            .cmp(&PhaseGroup::of(a).advancement())
            .then_with(|| status_rank(a).cmp(&status_rank(b)))
            .then_with(|| a.nct_id.cmp(&b.nct_id))
    });
    ordered
}

fn status_rank(trial: &Trial) -> u8 {
    match trial.overall_status.as_deref() {
        Some("RECRUITING") => 0,
        Some("NOT_YET_RECRUITING") => 1,
        Some("ENROLLING_BY_INVITATION") => 2,
        Some("ACTIVE_NOT_RECRUITING") => 3,
        Some("COMPLETED") => 4,
        _ => 5,
    }
}

/// One compact line (plus a summary line) per trial.
fn trial_entry(trial: &Trial) -> String {
    let mut line = format!(
        "- {} | {} | {}",
        trial.nct_id,
        PhaseGroup::of(trial).title(),
        status_label(trial.overall_status.as_deref())
    );
    let mut field = |name: &str, value: String| {
        if !value.is_empty() {
            let _ = write!(line, " | {name}: {value}");
        }
    };
    field("Title", trial.brief_title.clone().unwrap_or_default());
    field("Phases", trial.phases.join("/"));
    field("Conditions", trial.conditions.join(", "));
    field("Interventions", trial.interventions.join(", "));
    field("Sponsor", trial.lead_sponsor.clone().unwrap_or_default());
    field(
        "Enrollment",
        trial.enrollment.map(|n| n.to_string()).unwrap_or_default(),
    );
    field("Start", trial.start_date.clone().unwrap_or_default());
    field(
        "Completion",
        trial.completion_date.clone().unwrap_or_default(),
    );
    let ages = match (&trial.minimum_age, &trial.maximum_age) {
        (None, None) => String::new(),
        (min, max) => format!(
            "{}–{}",
            min.as_deref().unwrap_or("any"),
            max.as_deref().unwrap_or("any")
        ),
    };
    field("Ages", ages);
    if let Some(summary) = &trial.brief_summary {
        let _ = write!(line, "\n  Summary: {}", http::excerpt(summary, 400));
    }
    line.push('\n');
    line
}

/// The user message: the mutation, the counts, and as many trials as the limits allow.
pub fn user_prompt(input: &SummaryInput<'_>, limits: PromptLimits) -> UserPrompt {
    let ordered = prompt_order(input.trials);
    let mut entries = String::new();
    let mut included = 0;
    for trial in ordered.iter().take(limits.max_trials) {
        let entry = trial_entry(trial);
        if included > 0 && entries.len() + entry.len() > limits.max_chars {
            break;
        }
        entries.push_str(&entry);
        included += 1;
    }
    let found = input.trials.len();
    let mut text = format!("Mutation: {}\n", input.mutation);
    match input.total_count {
        Some(total) if total > found as u64 => {
            let _ = writeln!(
                text,
                "ClinicalTrials.gov reports {total} trials; the {found} most relevant were retrieved."
            );
        }
        _ => {
            let _ = writeln!(text, "Trials found on ClinicalTrials.gov: {found}.");
        }
    }
    if included < found {
        let _ = writeln!(
            text,
            "Note: the list below was cut to {included} of the {found} retrieved trials to fit the prompt limit; say so in the overview."
        );
    }
    let _ = write!(text, "\nTrials (phase, status, NCT id order):\n{entries}");
    UserPrompt {
        text,
        trials_included: included,
    }
}

/// The request body of `POST /v1/messages`.
#[derive(Debug, Serialize)]
pub struct MessagesRequest<'a> {
    pub model: &'a str,
    pub max_tokens: u32,
    pub temperature: f32,
    pub system: Vec<SystemBlock<'a>>,
    pub messages: Vec<Message<'a>>,
}

#[derive(Debug, Serialize)]
pub struct SystemBlock<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub text: &'a str,
    pub cache_control: CacheControl,
}

#[derive(Debug, Serialize)]
pub struct CacheControl {
    #[serde(rename = "type")]
    pub kind: &'static str,
}

#[derive(Debug, Serialize)]
pub struct Message<'a> {
    pub role: &'static str,
    pub content: &'a str,
}

/// The parts of a Messages API response we use.
#[derive(Debug, Deserialize)]
pub struct MessagesResponse {
    pub content: Vec<ContentBlock>,
    pub stop_reason: Option<String>,
    #[serde(default)]
    pub usage: Usage,
}

#[derive(Debug, Deserialize)]
pub struct ContentBlock {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Usage {
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub cache_creation_input_tokens: Option<i64>,
    pub cache_read_input_tokens: Option<i64>,
}

impl MessagesResponse {
    /// All text blocks, joined in order.
    pub fn text(&self) -> String {
        self.content
            .iter()
            .filter(|block| block.kind == "text")
            .filter_map(|block| block.text.as_deref())
            .collect::<Vec<_>>()
            .join("")
    }
}

/// Settings of the Claude summarizer.
#[derive(Debug, Clone)]
pub struct AnthropicSettings {
    pub base_url: Url,
    pub model: String,
    pub max_tokens: u32,
    pub temperature: f32,
    pub limits: PromptLimits,
    pub max_retry_after: Duration,
}

/// Summaries by Claude.
pub struct AnthropicSummarizer {
    http: reqwest::Client,
    guard: Arc<ServiceGuard>,
    api_key: SecretString,
    settings: AnthropicSettings,
    prompt_version: String,
}

impl AnthropicSummarizer {
    pub fn new(
        http: reqwest::Client,
        guard: Arc<ServiceGuard>,
        api_key: SecretString,
        settings: AnthropicSettings,
    ) -> Self {
        let prompt_version = format!(
            "{PROMPT_VERSION}:{}",
            prompt_hash(&settings.model, settings.max_tokens)
        );
        Self {
            http,
            guard,
            api_key,
            settings,
            prompt_version,
        }
    }

    fn messages_url(&self) -> Url {
        let mut url = self.settings.base_url.clone();
        url.path_segments_mut()
            .expect("validated http(s) URL")
            .pop_if_empty()
            .extend(["v1", "messages"]);
        url
    }

    /// Removes the key from text that may end up in logs or the database.
    fn scrub(&self, text: String) -> String {
        let key = expose(&self.api_key);
        if key.is_empty() {
            text
        } else {
            text.replace(key, "***")
        }
    }

    async fn call(&self, input: SummaryInput<'_>) -> Result<Summary, UpstreamError> {
        let prompt = user_prompt(&input, self.settings.limits);
        let request = MessagesRequest {
            model: &self.settings.model,
            max_tokens: self.settings.max_tokens,
            temperature: self.settings.temperature,
            system: vec![SystemBlock {
                kind: "text",
                text: SYSTEM_PROMPT,
                cache_control: CacheControl { kind: "ephemeral" },
            }],
            messages: vec![Message {
                role: "user",
                content: &prompt.text,
            }],
        };
        let request = self
            .http
            .post(self.messages_url())
            .header("x-api-key", expose(&self.api_key))
            .header("anthropic-version", ANTHROPIC_VERSION)
            .json(&request);
        let response = http::send_and_read(SERVICE, request, self.settings.max_retry_after).await?;
        response.check_status(SERVICE)?;
        let body = response.body;
        let parsed: MessagesResponse = serde_json::from_str(&body).map_err(|e| {
            UpstreamError::permanent(
                SERVICE,
                format!(
                    "unexpected response body ({e}): {}",
                    http::excerpt(&body, 120)
                ),
            )
        })?;
        let markdown = parsed.text();
        if markdown.trim().is_empty() {
            return Err(UpstreamError::permanent(
                SERVICE,
                "the response had no text",
            ));
        }
        Ok(Summary {
            markdown,
            summarizer: self.name().to_owned(),
            model: Some(self.settings.model.clone()),
            prompt_version: self.prompt_version.clone(),
            usage: TokenUsage {
                input: parsed.usage.input_tokens,
                output: parsed.usage.output_tokens,
                cache_creation: parsed.usage.cache_creation_input_tokens,
                cache_read: parsed.usage.cache_read_input_tokens,
            },
            stop_reason: parsed.stop_reason,
            reused_from_job: None,
        })
    }
}

impl Summarizer for AnthropicSummarizer {
    fn name(&self) -> &'static str {
        "anthropic"
    }

    fn model(&self) -> Option<&str> {
        Some(&self.settings.model)
    }

    fn prompt_version(&self) -> &str {
        &self.prompt_version
    }

    fn summarize<'a>(
        &'a self,
        input: SummaryInput<'a>,
    ) -> BoxFuture<'a, Result<Summary, NodeError>> {
        Box::pin(async move {
            self.guard.run(self.call(input)).await.map_err(|mut e| {
                e.message = self.scrub(e.message);
                NodeError::from(e)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trial(id: &str, status: &str, phases: &[&str]) -> Trial {
        Trial {
            nct_id: id.into(),
            brief_title: Some(format!("Study {id}")),
            overall_status: Some(status.into()),
            phases: phases.iter().map(|p| p.to_string()).collect(),
            study_type: None,
            conditions: vec!["Melanoma".into()],
            interventions: vec!["Drug A".into()],
            lead_sponsor: Some("Sponsor".into()),
            enrollment: Some(30),
            start_date: Some("2024-01".into()),
            completion_date: None,
            brief_summary: Some("Short summary.".into()),
            minimum_age: Some("18 Years".into()),
            maximum_age: None,
            raw_json: "{}".into(),
        }
    }

    const WIDE: PromptLimits = PromptLimits {
        max_trials: 100,
        max_chars: 100_000,
    };

    #[test]
    fn trials_are_listed_by_phase_then_status_then_id() {
        let trials = vec![
            trial("NCT3", "COMPLETED", &["PHASE2"]),
            trial("NCT1", "RECRUITING", &["PHASE1"]),
            trial("NCT2", "RECRUITING", &["PHASE2"]),
            trial("NCT4", "RECRUITING", &["PHASE3"]),
            trial("NCT0", "RECRUITING", &["PHASE2"]),
        ];
        let order: Vec<&str> = prompt_order(&trials)
            .iter()
            .map(|t| t.nct_id.as_str())
            .collect();
        assert_eq!(order, ["NCT4", "NCT0", "NCT2", "NCT3", "NCT1"]);
        let mut shuffled = trials.clone();
        shuffled.reverse();
        let input = |t| SummaryInput {
            mutation: "BRAF V600E",
            trials: t,
            total_count: Some(5),
        };
        let a = user_prompt(&input(&trials), WIDE);
        let b = user_prompt(&input(&shuffled), WIDE);
        assert_eq!(a, b, "the prompt does not depend on the API's order");
        assert!(
            a.text
                .starts_with("Mutation: BRAF V600E\nTrials found on ClinicalTrials.gov: 5.\n"),
            "{}",
            a.text
        );
        assert!(a.text.contains("- NCT4 | Phase 3 | Recruiting | Title: Study NCT4 | Phases: PHASE3 | Conditions: Melanoma | Interventions: Drug A | Sponsor: Sponsor | Enrollment: 30 | Start: 2024-01 | Ages: 18 Years–any\n  Summary: Short summary.\n"), "{}", a.text);
    }

    #[test]
    fn the_prompt_is_bounded_and_says_when_it_was_cut() {
        let trials: Vec<Trial> = (0..10)
            .map(|i| trial(&format!("NCT{i:02}"), "RECRUITING", &["PHASE2"]))
            .collect();
        let input = SummaryInput {
            mutation: "KRAS G12C",
            trials: &trials,
            total_count: Some(200),
        };
        let by_count = user_prompt(
            &input,
            PromptLimits {
                max_trials: 4,
                max_chars: 100_000,
            },
        );
        assert_eq!(by_count.trials_included, 4);
        assert!(
            by_count
                .text
                .contains("cut to 4 of the 10 retrieved trials"),
            "{}",
            by_count.text
        );
        assert!(
            by_count
                .text
                .contains("reports 200 trials; the 10 most relevant were retrieved"),
            "{}",
            by_count.text
        );
        let by_chars = user_prompt(
            &input,
            PromptLimits {
                max_trials: 100,
                max_chars: 600,
            },
        );
        assert!(
            by_chars.trials_included >= 1 && by_chars.trials_included < 10,
            "{}",
            by_chars.trials_included
        );
        let whole = user_prompt(&input, WIDE);
        assert_eq!(whole.trials_included, 10);
        assert!(!whole.text.contains("was cut"));
    }

    #[test]
    fn responses_join_text_blocks_and_keep_usage() {
        let body = r##"{"id":"msg_1","type":"message","role":"assistant","model":"m",
            "content":[{"type":"text","text":"# Part one\n"},{"type":"tool_use","id":"x","name":"n","input":{}},{"type":"text","text":"Part two"}],
            "stop_reason":"max_tokens","stop_sequence":null,
            "usage":{"input_tokens":1200,"output_tokens":2048,"cache_creation_input_tokens":900,"cache_read_input_tokens":0}}"##;
        let parsed: MessagesResponse = serde_json::from_str(body).unwrap();
        assert_eq!(parsed.text(), "# Part one\nPart two");
        assert_eq!(parsed.stop_reason.as_deref(), Some("max_tokens"));
        assert_eq!(
            (parsed.usage.input_tokens, parsed.usage.output_tokens),
            (Some(1200), Some(2048))
        );
        assert_eq!(parsed.usage.cache_creation_input_tokens, Some(900));
    }

    #[test]
    fn the_prompt_hash_follows_what_shapes_the_answer() {
        assert_eq!(prompt_hash("m", 100), prompt_hash("m", 100));
        assert_ne!(prompt_hash("m", 100), prompt_hash("m", 200));
        assert_ne!(prompt_hash("m", 100), prompt_hash("n", 100));
    }
}
