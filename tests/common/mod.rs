//! Shared test helpers: a fake ClinicalTrials.gov that speaks the API v2 `/studies` format with
//! paging, fresh databases, and configurations pointing at the fakes.
#![allow(dead_code)] // each test crate uses a different part of this module

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Value, json};
use tempfile::TempDir;
use trialmatch::config::Config;
use trialmatch::db::Store;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate, matchers};

#[path = "../../examples/fake_upstream/studies.rs"]
mod studies;
pub use studies::studies_for;

/// A fake `/studies` endpoint: serves `studies_for(term, n)` where n comes from `counts`
/// (default `default_count`), paged by `pageSize` with `pageToken`s like the real API.
#[derive(Clone)]
pub struct FakeStudies {
    pub counts: Arc<HashMap<String, usize>>,
    /// Overall status of a term's first study, replacing the generated one.
    pub first_status: Arc<HashMap<String, String>>,
    pub default_count: usize,
    /// Added to every response, like a real upstream's latency.
    pub latency: std::time::Duration,
}

impl FakeStudies {
    pub fn new(default_count: usize) -> Self {
        Self {
            counts: Arc::new(HashMap::new()),
            first_status: Arc::new(HashMap::new()),
            default_count,
            latency: std::time::Duration::ZERO,
        }
    }

    pub fn with_latency(mut self, latency: std::time::Duration) -> Self {
        self.latency = latency;
        self
    }

    pub fn with_first_status(mut self, term: &str, status: &str) -> Self {
        Arc::make_mut(&mut self.first_status).insert(term.to_owned(), status.to_owned());
        self
    }

    pub fn with_count(mut self, term: &str, count: usize) -> Self {
        Arc::make_mut(&mut self.counts).insert(term.to_owned(), count);
        self
    }
}

impl Respond for FakeStudies {
    fn respond(&self, request: &Request) -> ResponseTemplate {
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
        let mut all = studies_for(term, count);
        if let (Some(status), Some(first)) = (self.first_status.get(term), all.first_mut()) {
            first["protocolSection"]["statusModule"]["overallStatus"] = json!(status);
        }
        let page: Vec<Value> = all.iter().skip(offset).take(page_size).cloned().collect();
        let mut body = json!({ "studies": page });
        if offset == 0 && query.get("countTotal").map(String::as_str) == Some("true") {
            body["totalCount"] = json!(count);
        }
        if offset + page_size < count {
            body["nextPageToken"] = json!(format!("tok-{}", offset + page_size));
        }
        ResponseTemplate::new(200)
            .set_body_json(body)
            .set_delay(self.latency)
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

/// A fresh, empty database for one test: an SQLite file in its own directory, or a Postgres
/// database of its own (created from `TEST_DATABASE_URL`, dropped when the guard drops).
pub struct TestDb {
    pub url: String,
    _dir: Option<TempDir>,
    postgres: Option<(String, String)>, // (admin URL, database name)
}

pub fn sqlite_db() -> TestDb {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("test.db").display());
    TestDb {
        url,
        _dir: Some(dir),
        postgres: None,
    }
}

/// The admin URL for Postgres tests, or `None` (and a note on stderr) when they are skipped.
pub fn postgres_admin_url(test: &str) -> Option<String> {
    match std::env::var("TEST_DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            let line = format!(
                "SKIPPED postgres::{test}: TEST_DATABASE_URL is not set, so the Postgres tests do not run"
            );
            // Written to the process's stderr past the test harness's capture, so the skip shows
            // in every run, not only when a test fails.
            use std::io::Write as _;
            match std::fs::OpenOptions::new()
                .append(true)
                .open("/proc/self/fd/2")
            {
                Ok(mut stderr) => {
                    let _ = writeln!(stderr, "{line}");
                }
                Err(_) => eprintln!("{line}"),
            }
            None
        }
    }
}

/// A new Postgres database; `None` when Postgres tests are skipped.
pub async fn postgres_db(test: &str) -> Option<TestDb> {
    let admin = postgres_admin_url(test)?;
    let name = format!(
        "trialmatch_test_{}",
        ulid::Ulid::new().to_string().to_lowercase()
    );
    let pool = sqlx::PgPool::connect(&admin)
        .await
        .expect("TEST_DATABASE_URL reachable");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&pool)
        .await
        .expect("create test database");
    pool.close().await;
    let mut url = url::Url::parse(&admin).expect("TEST_DATABASE_URL is a URL");
    url.set_path(&name);
    Some(TestDb {
        url: url.to_string(),
        _dir: None,
        postgres: Some((admin, name)),
    })
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((admin, name)) = self.postgres.take() else {
            return;
        };
        // Drop runs outside any runtime we may block; use a thread with its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let pool = sqlx::PgPool::connect(&admin).await.ok()?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&pool)
                .await
                .ok()?;
                pool.close().await;
                Some(())
            })
        })
        .join();
    }
}

/// Generates `sqlite` and `postgres` test modules running the same async test bodies.
/// Each body is `async fn name(db: TestDb)`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    let db = $crate::common::sqlite_db();
                    super::$name(db).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    let Some(db) = $crate::common::postgres_db(stringify!($name)).await else {
                        return;
                    };
                    super::$name(db).await;
                }
            )*
        }
    };
}

/// Rows in apalis's queue table.
pub async fn queue_rows(store: &Store) -> i64 {
    let sql = match store {
        Store::Sqlite(_) => "SELECT COUNT(*) FROM Jobs",
        Store::Postgres(_) => "SELECT COUNT(*) FROM apalis.jobs",
    };
    scalar_i64(store, sql).await
}

/// A configuration for tests: fast polling and retries, upstream at `ctgov_uri`.
pub fn test_config(db_url: &str, ctgov_uri: &str) -> Config {
    let mut config = Config {
        database_url: db_url.to_owned(),
        ..Config::default()
    };
    config.ctgov.base_url = format!("{ctgov_uri}/api/v2");
    config.ctgov.backoff_base_ms = 1;
    config.ctgov.backoff_max_ms = 20;
    config.ctgov.request_timeout_ms = 2_000;
    config.worker.poll_interval_ms = 20;
    config.worker.retry_base_ms = 1;
    config.worker.retry_max_ms = 10;
    config.worker.max_attempts = 3;
    config.worker.concurrency = 4;
    // No rate limit and no breaker unless a test is about them.
    config.ctgov.rate_limit_per_minute = 0;
    config.ctgov.breaker_failure_threshold = 1_000;
    config.anthropic.rate_limit_per_minute = 0;
    config.anthropic.breaker_failure_threshold = 1_000;
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

/// The real `trialmatch` binary as a child process, configured only through the environment:
/// database `db_url`, upstream `ctgov_uri`, fast polling, quiet logs. Killed if dropped.
pub fn worker_process(db_url: &str, ctgov_uri: &str, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_trialmatch"));
    cmd.args(args)
        .env_clear()
        .env("TRIALMATCH_DATABASE_URL", db_url)
        .env("TRIALMATCH_CTGOV__BASE_URL", format!("{ctgov_uri}/api/v2"))
        .env("TRIALMATCH_WORKER__POLL_INTERVAL_MS", "20")
        .env("TRIALMATCH_CTGOV__RATE_LIMIT_PER_MINUTE", "0")
        .env("TRIALMATCH_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Runs a worker until the queue drains (or, with `Drain::UntilOnlyDeferredLeft`, until only
/// deferred jobs are left), failing the test if that takes unreasonably long.
pub async fn drain_with(
    app: std::sync::Arc<trialmatch::worker::App>,
    drain: trialmatch::worker::Drain,
) {
    use trialmatch::worker;
    let poll = std::time::Duration::from_millis(20);
    let stop = worker::until_drained(app.store.clone(), None, poll, drain);
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        worker::run_worker(app, stop),
    )
    .await
    .expect("the queue drains")
    .expect("the worker runs");
}

/// Enqueues `mutations` as one batch (`config.worker.max_attempts` each), works until it is done
/// as `drain` says, and returns the batch's rows.
pub async fn run_batch(
    config: &Config,
    store: &Store,
    mutations: &[&str],
    drain: trialmatch::worker::Drain,
) -> Vec<trialmatch::db::JobRow> {
    let batch = trialmatch::db::NewBatch {
        name: None,
        mutations: mutations.iter().map(|m| m.to_string()).collect(),
        max_attempts: config.worker.max_attempts,
    };
    let enqueued = store.enqueue_batch(&batch).await.unwrap();
    let app = trialmatch::worker::App::new(config, store.clone()).unwrap();
    drain_with(std::sync::Arc::new(app), drain).await;
    store.batch_jobs(&enqueued.batch_id).await.unwrap()
}
