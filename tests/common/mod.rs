//! Shared test helpers: a fake ClinicalTrials.gov that speaks the API v2 `/studies` format with
//! paging, fresh databases, and configurations pointing at the fakes.
#![allow(dead_code)] // each test crate uses a different part of this module

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};
use tempfile::TempDir;
use trialmatch::config::Config;
use trialmatch::db::Store;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate, matchers};

/// A study in the shape the real API returns for our `fields` projection.
pub fn study(nct_id: &str, title: &str, status: &str, phases: &[&str]) -> Value {
    json!({
        "protocolSection": {
            "identificationModule": { "nctId": nct_id, "briefTitle": title },
            "statusModule": {
                "overallStatus": status,
                "startDateStruct": { "date": "2025-03-01" },
                "completionDateStruct": { "date": "2028-12" }
            },
            "sponsorCollaboratorsModule": { "leadSponsor": { "name": "Test Oncology Group" } },
            "descriptionModule": { "briefSummary": format!("Summary of {title}.") },
            "conditionsModule": { "conditions": ["Melanoma", "Non-small Cell Lung Cancer"] },
            "designModule": { "studyType": "INTERVENTIONAL", "phases": phases, "enrollmentInfo": { "count": 40 } },
            "armsInterventionsModule": { "interventions": [{ "name": "Drug A" }, { "name": "Placebo" }] },
            "eligibilityModule": { "minimumAge": "18 Years" }
        }
    })
}

/// Deterministic studies for a term: `count` of them, ids derived from the term.
pub fn studies_for(term: &str, count: usize) -> Vec<Value> {
    let tag: u32 = term
        .bytes()
        .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32))
        % 100_000;
    let statuses = [
        "RECRUITING",
        "ACTIVE_NOT_RECRUITING",
        "COMPLETED",
        "NOT_YET_RECRUITING",
    ];
    let phases: [&[&str]; 5] = [
        &["PHASE1"],
        &["PHASE2"],
        &["PHASE1", "PHASE2"],
        &["PHASE3"],
        &[],
    ];
    (0..count)
        .map(|i| {
            study(
                &format!("NCT{:05}{:03}", tag, i),
                &format!("Trial {i} of {term}"),
                statuses[i % statuses.len()],
                phases[i % phases.len()],
            )
        })
        .collect()
}

/// A fake `/studies` endpoint: serves `studies_for(term, n)` where n comes from `counts`
/// (default `default_count`), paged by `pageSize` with `pageToken`s like the real API.
#[derive(Clone)]
pub struct FakeStudies {
    pub counts: Arc<HashMap<String, usize>>,
    pub default_count: usize,
    pub requests: Arc<AtomicUsize>,
}

impl FakeStudies {
    pub fn new(default_count: usize) -> Self {
        Self {
            counts: Arc::new(HashMap::new()),
            default_count,
            requests: Arc::default(),
        }
    }

    pub fn with_count(mut self, term: &str, count: usize) -> Self {
        Arc::make_mut(&mut self.counts).insert(term.to_owned(), count);
        self
    }
}

impl Respond for FakeStudies {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let query: HashMap<String, String> = request.url.query_pairs().into_owned().collect();
        let Some(term) = query.get("query.term") else {
            return ResponseTemplate::new(400).set_body_string("query.term is required");
        };
        let page_size: usize = query
            .get("pageSize")
            .and_then(|s| s.parse().ok())
            .unwrap_or(10);
        let offset: usize = match query.get("pageToken") {
            Some(token) => match token.strip_prefix("tok-").and_then(|s| s.parse().ok()) {
                Some(offset) => offset,
                None => return ResponseTemplate::new(400).set_body_string("invalid pageToken"),
            },
            None => 0,
        };
        let count = self.counts.get(term).copied().unwrap_or(self.default_count);
        let all = studies_for(term, count);
        let page: Vec<Value> = all.iter().skip(offset).take(page_size).cloned().collect();
        let mut body = json!({ "studies": page });
        if offset == 0 && query.get("countTotal").map(String::as_str) == Some("true") {
            body["totalCount"] = json!(count);
        }
        if offset + page_size < count {
            body["nextPageToken"] = json!(format!("tok-{}", offset + page_size));
        }
        ResponseTemplate::new(200).set_body_json(body)
    }
}

/// Starts a fake ClinicalTrials.gov serving `fake` on `GET /api/v2/studies`.
pub async fn fake_ctgov(fake: FakeStudies) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(matchers::method("GET"))
        .and(matchers::path("/api/v2/studies"))
        .respond_with(fake)
        .mount(&server)
        .await;
    server
}

/// A fresh SQLite database in its own directory (removed when the guard drops).
pub struct TestDb {
    pub url: String,
    pub dir: TempDir,
}

pub fn sqlite_db() -> TestDb {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("test.db").display());
    TestDb { url, dir }
}

/// A configuration for tests: fast polling and retries, upstream at `ctgov_uri`.
pub fn test_config(db_url: &str, ctgov_uri: &str) -> Config {
    let mut config = Config::default();
    config.database_url = db_url.to_owned();
    config.ctgov.base_url = format!("{ctgov_uri}/api/v2");
    config.ctgov.backoff_base_ms = 1;
    config.ctgov.backoff_max_ms = 20;
    config.ctgov.request_timeout_ms = 2_000;
    config.worker.poll_interval_ms = 20;
    config.worker.retry_base_ms = 1;
    config.worker.retry_max_ms = 10;
    config.worker.max_attempts = 3;
    config.worker.concurrency = 4;
    config
}

pub async fn connect(db: &TestDb) -> Store {
    Store::connect(&db.url).await.expect("test database opens")
}

/// Runs one SQL scalar query against the test database, for assertions.
pub async fn scalar_i64(store: &Store, sql: &'static str) -> i64 {
    match store {
        Store::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.expect(sql),
        Store::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.expect(sql),
    }
}
