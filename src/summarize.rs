//! Summaries of one mutation's trials: the [`Summarizer`] trait, the deterministic offline
//! summarizer (the default: it needs no network and no key) and the trial-set fingerprint.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use futures::future::BoxFuture;
use sha2::{Digest, Sha256};

use crate::ctgov::Trial;
use crate::flow::NodeError;

/// What a summarizer is given.
#[derive(Debug, Clone, Copy)]
pub struct SummaryInput<'a> {
    pub mutation: &'a str,
    /// In rank order.
    pub trials: &'a [Trial],
    /// What ClinicalTrials.gov reported in total, when it said.
    pub total_count: Option<u64>,
}

/// Tokens a model call used, as the API reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub input: Option<i64>,
    pub output: Option<i64>,
    pub cache_creation: Option<i64>,
    pub cache_read: Option<i64>,
}

/// A finished summary and how it was made.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub markdown: String,
    pub summarizer: String,
    pub model: Option<String>,
    /// Which prompt (or offline format) made it; a summary is reused only under the same version.
    pub prompt_version: String,
    pub usage: TokenUsage,
    /// The model's `stop_reason`; `max_tokens` means the text was cut.
    pub stop_reason: Option<String>,
    /// Set when the summary of an earlier job was reused because the trials had not changed.
    pub reused_from_job: Option<String>,
}

impl Summary {
    /// A summary made by `summarizer` without a model call.
    pub fn without_call(markdown: String, summarizer: &dyn Summarizer) -> Self {
        Self {
            markdown,
            summarizer: summarizer.name().to_owned(),
            model: summarizer.model().map(str::to_owned),
            prompt_version: summarizer.prompt_version().to_owned(),
            usage: TokenUsage::default(),
            stop_reason: None,
            reused_from_job: None,
        }
    }

    /// Whether the model stopped at `max_tokens`, leaving the text cut short.
    pub fn was_cut(&self) -> bool {
        self.stop_reason.as_deref() == Some("max_tokens")
    }
}

/// Turns a mutation's trials into markdown. Implementations do their I/O in `summarize` only.
pub trait Summarizer: Send + Sync {
    /// Stored with each summary, e.g. `offline` or `anthropic`.
    fn name(&self) -> &'static str;
    /// The model, for summarizers that call one.
    fn model(&self) -> Option<&str> {
        None
    }
    /// Changes whenever the output for the same trials would change (prompt, format).
    fn prompt_version(&self) -> &str;
    fn summarize<'a>(
        &'a self,
        input: SummaryInput<'a>,
    ) -> BoxFuture<'a, Result<Summary, NodeError>>;
}

/// Version of the offline format: bump it when `offline_markdown` changes its output.
pub const OFFLINE_FORMAT_VERSION: &str = "offline-1";

/// The built-in summarizer: deterministic markdown from the trial fields.
#[derive(Debug, Clone, Copy, Default)]
pub struct OfflineSummarizer;

impl Summarizer for OfflineSummarizer {
    fn name(&self) -> &'static str {
        "offline"
    }

    fn prompt_version(&self) -> &str {
        OFFLINE_FORMAT_VERSION
    }

    fn summarize<'a>(
        &'a self,
        input: SummaryInput<'a>,
    ) -> BoxFuture<'a, Result<Summary, NodeError>> {
        Box::pin(async move { Ok(Summary::without_call(offline_markdown(&input), self)) })
    }
}

/// The phase groups, in the order they are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PhaseGroup {
    EarlyPhase1,
    Phase1,
    Phase2,
    Phase3,
    Phase4,
    NotApplicable,
    Unknown,
}

impl PhaseGroup {
    /// A trial goes under its most advanced phase (a Phase 1/2 trial is listed under Phase 2).
    pub fn of(trial: &Trial) -> Self {
        trial
            .phases
            .iter()
            .filter_map(|p| Self::parse(p))
            .max_by_key(|g| g.advancement())
            .unwrap_or(Self::Unknown)
    }

    fn parse(phase: &str) -> Option<Self> {
        Some(match phase {
            "EARLY_PHASE1" => Self::EarlyPhase1,
            "PHASE1" => Self::Phase1,
            "PHASE2" => Self::Phase2,
            "PHASE3" => Self::Phase3,
            "PHASE4" => Self::Phase4,
            "NA" => Self::NotApplicable,
            _ => return None,
        })
    }

    /// How advanced: unknown lowest, then N/A (below every real phase, so it only wins alone).
    pub fn advancement(self) -> u8 {
        match self {
            Self::Unknown => 0,
            Self::NotApplicable => 1,
            Self::EarlyPhase1 => 2,
            Self::Phase1 => 3,
            Self::Phase2 => 4,
            Self::Phase3 => 5,
            Self::Phase4 => 6,
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Self::EarlyPhase1 => "Early Phase 1",
            Self::Phase1 => "Phase 1",
            Self::Phase2 => "Phase 2",
            Self::Phase3 => "Phase 3",
            Self::Phase4 => "Phase 4",
            Self::NotApplicable => "Phase N/A",
            Self::Unknown => "Phase unknown",
        }
    }
}

/// `RECRUITING` → `Recruiting`, `ACTIVE_NOT_RECRUITING` → `Active, not recruiting`.
pub fn status_label(status: Option<&str>) -> String {
    match status {
        None | Some("") => "Status unknown".to_owned(),
        Some("ACTIVE_NOT_RECRUITING") => "Active, not recruiting".to_owned(),
        Some("ENROLLING_BY_INVITATION") => "Enrolling by invitation".to_owned(),
        Some(other) => {
            let lower = other.replace('_', " ").to_lowercase();
            let mut chars = lower.chars();
            chars
                .next()
                .map(|c| c.to_uppercase().chain(chars).collect())
                .unwrap_or_default()
        }
    }
}

/// Escapes the characters that would change markdown structure inside inline text.
pub fn escape_markdown(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' | '`' | '*' | '_' | '[' | ']' | '<' | '>' | '#' | '|' => {
                out.push('\\');
                out.push(c);
            }
            '\n' | '\r' | '\t' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// The text stored when no trials match; shared by every summarizer.
pub fn no_trials_markdown(mutation: &str) -> String {
    format!(
        "# Clinical trials for {}\n\nNo trials found on ClinicalTrials.gov for this mutation.\n",
        escape_markdown(mutation)
    )
}

/// The offline summary: a headline count, status counts, then trials grouped by phase.
pub fn offline_markdown(input: &SummaryInput<'_>) -> String {
    if input.trials.is_empty() {
        return no_trials_markdown(input.mutation);
    }
    let mut md = String::with_capacity(256 + input.trials.len() * 320);
    let n = input.trials.len();
    let _ = writeln!(
        md,
        "# Clinical trials for {}\n",
        escape_markdown(input.mutation)
    );
    let plural = if n == 1 { "trial" } else { "trials" };
    match input.total_count {
        Some(total) if total > n as u64 => {
            let _ = writeln!(
                md,
                "**{n} {plural} shown** of {total} found on ClinicalTrials.gov.\n"
            );
        }
        _ => {
            let _ = writeln!(md, "**{n} {plural} found** on ClinicalTrials.gov.\n");
        }
    }

    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    for trial in input.trials {
        *statuses
            .entry(status_label(trial.overall_status.as_deref()))
            .or_default() += 1;
    }
    let mut statuses: Vec<_> = statuses.into_iter().collect();
    statuses.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let line: Vec<String> = statuses
        .iter()
        .map(|(label, count)| format!("{label}: {count}"))
        .collect();
    let _ = writeln!(md, "Status: {}\n", line.join(" · "));

    let mut groups: BTreeMap<PhaseGroup, Vec<&Trial>> = BTreeMap::new();
    for trial in input.trials {
        groups.entry(PhaseGroup::of(trial)).or_default().push(trial);
    }
    for (group, trials) in groups {
        let _ = writeln!(md, "## {} ({})\n", group.title(), trials.len());
        for trial in trials {
            write_trial(&mut md, trial);
        }
        md.push('\n');
    }
    md
}

fn write_trial(md: &mut String, trial: &Trial) {
    let title = trial
        .brief_title
        .as_deref()
        .map(escape_markdown)
        .unwrap_or_else(|| "(untitled)".to_owned());
    let _ = writeln!(
        md,
        "- [{id}](https://clinicaltrials.gov/study/{id}) — {title}",
        id = escape_markdown(&trial.nct_id),
    );
    let mut details = vec![status_label(trial.overall_status.as_deref())];
    if trial.phases.len() > 1 {
        let phases: Vec<&str> = trial
            .phases
            .iter()
            .filter_map(|p| PhaseGroup::parse(p))
            .map(|g| g.title())
            .collect();
        details.push(phases.join(" / "));
    }
    let _ = writeln!(md, "  - {}", details.join(" · "));
    let list = |items: &[String]| {
        items
            .iter()
            .map(|s| escape_markdown(s))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !trial.conditions.is_empty() {
        let _ = writeln!(md, "  - Conditions: {}", list(&trial.conditions));
    }
    if !trial.interventions.is_empty() {
        let _ = writeln!(md, "  - Interventions: {}", list(&trial.interventions));
    }
    if let Some(sponsor) = &trial.lead_sponsor {
        let _ = writeln!(md, "  - Sponsor: {}", escape_markdown(sponsor));
    }
}

/// A content fingerprint of a trial set: SHA-256 over the summarised fields and the reported total,
/// independent of the trials' order. Equal fingerprints mean a summary can be reused.
pub fn fingerprint(trials: &[Trial], total_count: Option<u64>) -> String {
    let mut lines: Vec<String> = trials
        .iter()
        .map(|t| {
            // serde_json gives an unambiguous encoding of each field list.
            serde_json::json!([
                t.nct_id,
                t.brief_title,
                t.overall_status,
                t.phases,
                t.study_type,
                t.conditions,
                t.interventions,
                t.lead_sponsor,
                t.enrollment,
                t.start_date,
                t.completion_date,
                t.brief_summary,
                t.minimum_age,
                t.maximum_age
            ])
            .to_string()
        })
        .collect();
    lines.sort_unstable();
    let mut hasher = Sha256::new();
    hasher.update(format!("total={total_count:?}\n").as_bytes());
    for line in &lines {
        hasher.update(line.as_bytes());
        hasher.update(b"\n");
    }
    format!("{:x}", hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn trial(id: &str, status: &str, phases: &[&str]) -> Trial {
        Trial {
            nct_id: id.to_owned(),
            brief_title: Some(format!("Study {id}")),
            overall_status: Some(status.to_owned()),
            phases: phases.iter().map(|s| s.to_string()).collect(),
            study_type: Some("INTERVENTIONAL".into()),
            conditions: vec!["Melanoma".into()],
            interventions: vec!["Drug A".into(), "Drug B".into()],
            lead_sponsor: Some("Sponsor Inc".into()),
            enrollment: Some(10),
            start_date: None,
            completion_date: None,
            brief_summary: None,
            minimum_age: None,
            maximum_age: None,
            raw_json: "{}".into(),
        }
    }

    #[test]
    fn groups_by_most_advanced_phase_in_a_fixed_order() {
        let trials = vec![
            trial("NCT3", "COMPLETED", &["PHASE3"]),
            trial("NCT12", "RECRUITING", &["PHASE1", "PHASE2"]),
            trial("NCTX", "RECRUITING", &[]),
            trial("NCTNA", "ACTIVE_NOT_RECRUITING", &["NA"]),
            trial("NCTE", "RECRUITING", &["EARLY_PHASE1"]),
        ];
        let md = offline_markdown(&SummaryInput {
            mutation: "BRAF V600E",
            trials: &trials,
            total_count: Some(5),
        });
        let order: Vec<usize> = [
            "## Early Phase 1 (1)",
            "## Phase 2 (1)",
            "## Phase 3 (1)",
            "## Phase N/A (1)",
            "## Phase unknown (1)",
        ]
        .iter()
        .map(|h| md.find(h).unwrap_or_else(|| panic!("{h} missing in\n{md}")))
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{md}");
        assert!(
            md.starts_with("# Clinical trials for BRAF V600E\n\n**5 trials found**"),
            "{md}"
        );
        assert!(
            md.contains("Status: Recruiting: 3 · Active, not recruiting: 1 · Completed: 1"),
            "{md}"
        );
        assert!(md.contains("- [NCT12](https://clinicaltrials.gov/study/NCT12) — Study NCT12\n  - Recruiting · Phase 1 / Phase 2\n  - Conditions: Melanoma\n  - Interventions: Drug A, Drug B\n  - Sponsor: Sponsor Inc\n"), "{md}");
    }

    #[test]
    fn says_when_the_list_is_cut_and_when_nothing_matched() {
        let trials = vec![trial("NCT1", "RECRUITING", &["PHASE2"])];
        let md = offline_markdown(&SummaryInput {
            mutation: "KRAS G12C",
            trials: &trials,
            total_count: Some(340),
        });
        assert!(md.contains("**1 trial shown** of 340 found"), "{md}");
        let md = offline_markdown(&SummaryInput {
            mutation: "XYZ1 Q1*",
            trials: &[],
            total_count: Some(0),
        });
        assert_eq!(
            md,
            "# Clinical trials for XYZ1 Q1\\*\n\nNo trials found on ClinicalTrials.gov for this mutation.\n"
        );
    }

    #[test]
    fn output_is_deterministic_and_escaped() {
        let mut t = trial("NCT1", "RECRUITING", &["PHASE2"]);
        t.brief_title = Some("A [bad] *title*\nwith newline".into());
        let input = SummaryInput {
            mutation: "M",
            trials: std::slice::from_ref(&t),
            total_count: None,
        };
        let md = offline_markdown(&input);
        assert_eq!(md, offline_markdown(&input));
        assert!(md.contains("A \\[bad\\] \\*title\\* with newline"), "{md}");
    }

    #[test]
    fn fingerprint_ignores_order_but_sees_changes() {
        let a = trial("NCT1", "RECRUITING", &["PHASE2"]);
        let b = trial("NCT2", "COMPLETED", &["PHASE3"]);
        assert_eq!(
            fingerprint(&[a.clone(), b.clone()], Some(2)),
            fingerprint(&[b.clone(), a.clone()], Some(2))
        );
        assert_ne!(
            fingerprint(&[a.clone(), b.clone()], Some(2)),
            fingerprint(&[a.clone(), b.clone()], Some(3)),
            "a new total changes the headline"
        );
        let mut changed = b.clone();
        changed.overall_status = Some("TERMINATED".into());
        assert_ne!(
            fingerprint(&[a.clone(), b], None),
            fingerprint(&[a, changed], None)
        );
    }

    #[test]
    fn status_labels_read_well() {
        assert_eq!(
            status_label(Some("NOT_YET_RECRUITING")),
            "Not yet recruiting"
        );
        assert_eq!(
            status_label(Some("ACTIVE_NOT_RECRUITING")),
            "Active, not recruiting"
        );
        assert_eq!(status_label(None), "Status unknown");
    }
}
