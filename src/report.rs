//! What people read: the per-mutation status table of a batch and its counts. Pure formatting.

use chrono::{DateTime, Utc};
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};

use crate::db::JobRow;
use crate::http::excerpt;

/// How many jobs of a batch are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub queued: usize,
    pub running: usize,
    pub retrying: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub dead: usize,
}

impl Counts {
    pub fn of(rows: &[JobRow]) -> Self {
        Self::from_state_counts(rows.iter().map(|row| (row.state.as_str(), 1)))
    }

    /// From `(state, how many)` pairs, as a `GROUP BY state` query returns them.
    pub fn from_state_counts<'a>(pairs: impl IntoIterator<Item = (&'a str, i64)>) -> Self {
        let mut counts = Counts::default();
        for (state, n) in pairs {
            let n = usize::try_from(n).unwrap_or(0);
            match state {
                "queued" => counts.queued += n,
                "running" => counts.running += n,
                "retrying" => counts.retrying += n,
                "succeeded" => counts.succeeded += n,
                "failed" => counts.failed += n,
                _ => counts.dead += n,
            }
        }
        counts
    }

    pub fn total(&self) -> usize {
        self.queued + self.running + self.retrying + self.succeeded + self.failed + self.dead
    }

    pub fn finished(&self) -> usize {
        self.succeeded + self.failed + self.dead
    }

    pub fn all_succeeded(&self) -> bool {
        self.total() > 0 && self.succeeded == self.total()
    }

    /// `3 jobs: 2 succeeded, 1 failed`.
    pub fn line(&self) -> String {
        let parts: Vec<String> = [
            (self.succeeded, "succeeded"),
            (self.failed, "failed"),
            (self.dead, "dead"),
            (self.running, "running"),
            (self.retrying, "waiting to retry"),
            (self.queued, "queued"),
        ]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
        let total = self.total();
        format!(
            "{total} job{}: {}",
            if total == 1 { "" } else { "s" },
            parts.join(", ")
        )
    }
}

/// `1.234 s` or `2 min 5 s`.
pub fn format_elapsed(start: Option<DateTime<Utc>>, end: Option<DateTime<Utc>>) -> String {
    match (start, end) {
        (Some(start), Some(end)) => {
            let ms = (end - start).num_milliseconds().max(0);
            if ms < 60_000 {
                format!("{:.2} s", ms as f64 / 1_000.0)
            } else {
                format!("{} min {} s", ms / 60_000, (ms % 60_000) / 1_000)
            }
        }
        _ => "–".to_owned(),
    }
}

/// The state shown to people: a job put back by an open circuit breaker reads `deferred`.
pub fn display_state(row: &JobRow) -> &str {
    match (row.state.as_str(), &row.deferred_reason) {
        ("retrying", Some(_)) => "deferred",
        (state, _) => state,
    }
}

/// How a job's summary came about: `new`, `reused` (trials unchanged), `cut` (the model hit
/// `max_tokens`), or `–` when there is none.
pub fn summary_note(row: &JobRow) -> &'static str {
    match (
        &row.summary_reused_from,
        row.summary_stop_reason.as_deref(),
        row.state.as_str(),
    ) {
        (Some(_), _, _) => "reused",
        (None, Some("max_tokens"), _) => "cut (max_tokens)",
        (None, _, "succeeded") => "new",
        _ => "–",
    }
}

/// The per-mutation table: mutation, trials found, state, attempts, time, last error.
pub fn status_table(rows: &[JobRow]) -> String {
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header([
            "mutation",
            "trials",
            "state",
            "attempts",
            "time",
            "summary",
            "last error",
        ]);
    for row in rows {
        let trials = match (row.trials_found, row.total_count) {
            (Some(found), Some(total)) if total > found => format!("{found} of {total}"),
            (Some(found), _) => found.to_string(),
            (None, _) => "–".to_owned(),
        };
        table.add_row([
            row.mutation.clone(),
            trials,
            display_state(row).to_owned(),
            format!("{}/{}", row.attempts, row.max_attempts),
            format_elapsed(row.started_at, row.finished_at),
            summary_note(row).to_owned(),
            // Why it waits, else why it last failed.
            row.deferred_reason
                .as_deref()
                .or(row.last_error.as_deref())
                .map(|e| excerpt(e, 120))
                .unwrap_or_default(),
        ]);
    }
    table.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(mutation: &str, state: &str) -> JobRow {
        let t = Utc::now();
        JobRow {
            id: "j".into(),
            batch_id: "b".into(),
            position: 0,
            mutation: mutation.into(),
            state: state.into(),
            attempts: 1,
            max_attempts: 5,
            last_error: (state == "failed").then(|| "clinicaltrials.gov: HTTP 400".into()),
            trials_found: (state == "succeeded").then_some(12),
            total_count: Some(40),
            created_at: t,
            started_at: Some(t),
            finished_at: Some(t + chrono::Duration::milliseconds(1_500)),
            next_attempt_at: None,
            summary_stop_reason: None,
            summary_reused_from: None,
            deferred_reason: None,
        }
    }

    #[test]
    fn counts_and_their_line() {
        let rows = [
            row("A", "succeeded"),
            row("B", "failed"),
            row("C", "succeeded"),
        ];
        let counts = Counts::of(&rows);
        assert_eq!((counts.succeeded, counts.failed, counts.total()), (2, 1, 3));
        assert!(!counts.all_succeeded());
        assert_eq!(counts.line(), "3 jobs: 2 succeeded, 1 failed");
        assert!(
            !Counts::default().all_succeeded(),
            "an empty batch is not a success"
        );
    }

    #[test]
    fn table_shows_each_mutation() {
        let table = status_table(&[row("BRAF V600E", "succeeded"), row("KRAS G12C", "failed")]);
        assert!(
            table.contains("BRAF V600E") && table.contains("12 of 40") && table.contains("1.50 s"),
            "{table}"
        );
        assert!(table.contains("HTTP 400"), "{table}");
        let mut cut = row("EGFR L858R", "succeeded");
        cut.summary_stop_reason = Some("max_tokens".into());
        assert_eq!(summary_note(&cut), "cut (max_tokens)");
        cut.summary_reused_from = Some("01J".into());
        assert_eq!(summary_note(&cut), "reused");
        assert_eq!(summary_note(&row("KRAS G12C", "failed")), "–");
        let mut waiting = row("NRAS Q61K", "retrying");
        assert_eq!(display_state(&waiting), "retrying");
        waiting.deferred_reason = Some("breaker open".into());
        assert_eq!(display_state(&waiting), "deferred");
        let table = status_table(&[waiting]);
        assert!(
            table.contains("breaker open") && table.contains("deferred"),
            "{table}"
        );
    }
}
