//! The fault matrix of the resilient HTTP layer, each class against a local fake upstream:
//! what happens to the job, how many requests were made, and what was recorded.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trialmatch::db::Store;
use trialmatch::worker::Drain;
use wiremock::{Mock, MockServer, ResponseTemplate, matchers};

/// An upstream answering `first` for the first `times` requests, then real studies.
async fn flaky_upstream(first: ResponseTemplate, times: u64) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(matchers::path("/api/v2/studies"))
        .respond_with(first)
        .up_to_n_times(times)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(matchers::path("/api/v2/studies"))
        .respond_with(FakeStudies::new(2))
        .mount(&server)
        .await;
    server
}

async fn query_metrics(store: &Store) -> Vec<(i64, String, Option<i64>, f64)> {
    let sql = "SELECT attempt, outcome, http_status, duration_ms FROM tm_node_metrics WHERE node = 'query_trials' ORDER BY id";
    match store {
        Store::Sqlite(pool) => sqlx::query_as(sql).fetch_all(pool).await.unwrap(),
        Store::Postgres(pool) => sqlx::query_as(sql).fetch_all(pool).await.unwrap(),
    }
}

async fn started_gap(store: &Store) -> chrono::Duration {
    let sql = "SELECT started_at FROM tm_node_metrics WHERE node = 'query_trials' ORDER BY id";
    let Store::Sqlite(pool) = store else {
        unreachable!()
    };
    let times: Vec<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar(sql).fetch_all(pool).await.unwrap();
    times[1] - times[0]
}

#[tokio::test]
async fn a_429_with_retry_after_is_honoured_then_the_call_succeeds() {
    let limited = ResponseTemplate::new(429)
        .insert_header("Retry-After", "1")
        .set_body_string("slow down");
    let server = flaky_upstream(limited, 1).await;
    let db = sqlite_db();
    let store = connect(&db).await;
    let mut config = test_config(&db.url, &server.uri());
    config.ctgov.backoff_max_ms = 5_000; // the cap on Retry-After
    let rows = run_batch(&config, &store, &["BRAF V600E"], Drain::UntilFinished).await;
    assert_eq!((rows[0].state.as_str(), rows[0].attempts), ("succeeded", 1));
    let metrics = query_metrics(&store).await;
    assert_eq!(
        metrics
            .iter()
            .map(|m| (m.0, m.1.as_str(), m.2))
            .collect::<Vec<_>>(),
        [(1, "retryable", Some(429)), (2, "ok", None)]
    );
    assert!(
        started_gap(&store).await >= chrono::Duration::seconds(1),
        "waited as the server asked"
    );
}

#[tokio::test]
async fn a_read_timeout_is_retried() {
    let slow = ResponseTemplate::new(200)
        .set_body_json(serde_json::json!({"studies": []}))
        .set_delay(Duration::from_secs(3));
    let server = flaky_upstream(slow, 1).await;
    let db = sqlite_db();
    let store = connect(&db).await;
    let mut config = test_config(&db.url, &server.uri());
    config.ctgov.request_timeout_ms = 300;
    let rows = run_batch(&config, &store, &["BRAF V600E"], Drain::UntilFinished).await;
    assert_eq!(
        (rows[0].state.as_str(), rows[0].trials_found),
        ("succeeded", Some(2))
    );
    let metrics = query_metrics(&store).await;
    assert_eq!(metrics[0].1, "retryable");
    let error = scalar_text(
        &store,
        "SELECT error FROM tm_node_metrics ORDER BY id LIMIT 1",
    )
    .await;
    assert!(error.contains("timed out"), "{error}");
}

/// A server that sends headers promising 5,000 bytes, then 100, then hangs up.
async fn hang_up_mid_body() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5000\r\n\r\n";
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(&[b' '; 100]).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    format!("http://{address}")
}

#[tokio::test]
async fn a_connection_closed_mid_body_is_retried_and_bounded() {
    let uri = hang_up_mid_body().await;
    let db = sqlite_db();
    let store = connect(&db).await;
    let mut config = test_config(&db.url, &uri);
    config.ctgov.max_request_attempts = 2;
    config.worker.max_attempts = 2;
    let rows = run_batch(&config, &store, &["BRAF V600E"], Drain::UntilFinished).await;
    assert_eq!(
        (rows[0].state.as_str(), rows[0].attempts),
        ("dead", 2),
        "{rows:?}"
    );
    assert!(
        rows[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("reading the response body"),
        "{rows:?}"
    );
    assert_eq!(
        query_metrics(&store).await.len(),
        4,
        "2 requests in each of 2 runs"
    );
}

#[tokio::test]
async fn truncated_json_is_a_permanent_error() {
    let truncated = ResponseTemplate::new(200).set_body_string(
        r#"{"studies":[{"protocolSection":{"identificationModule":{"nctId":"NCT0"#,
    );
    let server = flaky_upstream(truncated, 10).await;
    let db = sqlite_db();
    let store = connect(&db).await;
    let config = test_config(&db.url, &server.uri());
    let rows = run_batch(&config, &store, &["BRAF V600E"], Drain::UntilFinished).await;
    assert_eq!((rows[0].state.as_str(), rows[0].attempts), ("failed", 1));
    assert!(
        rows[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("unexpected response body"),
        "{rows:?}"
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
}

async fn scalar_text(store: &Store, sql: &'static str) -> String {
    match store {
        Store::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
        Store::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
    }
}

/// Breaker: 3 consecutive 503s open it; while open, jobs are deferred without using attempts and
/// no request is made; after the cool-down one probe succeeds, the breaker closes, all jobs finish.
#[tokio::test]
async fn the_breaker_opens_defers_without_burning_attempts_and_closes_after_a_probe() {
    let server = flaky_upstream(ResponseTemplate::new(503).set_body_string("down"), 3).await;
    let db = sqlite_db();
    let store = connect(&db).await;
    let mut config = test_config(&db.url, &server.uri());
    config.ctgov.max_request_attempts = 1;
    config.ctgov.breaker_failure_threshold = 3;
    config.ctgov.breaker_cooldown_ms = 1_500;
    config.worker.concurrency = 1;
    config.worker.max_attempts = 2;
    let mutations = ["A1B", "C2D", "E3F", "G4H"];
    let rows = run_batch(&config, &store, &mutations, Drain::UntilFinished).await;

    assert!(rows.iter().all(|r| r.state == "succeeded"), "{rows:?}");
    let attempts: i64 = rows.iter().map(|r| r.attempts).sum();
    assert_eq!(
        attempts,
        3 * 2 + 1,
        "three jobs failed once and succeeded; deferrals used no attempt: {rows:?}"
    );
    assert_eq!(
        server.received_requests().await.unwrap().len(),
        3 + 4,
        "no request while the breaker was open"
    );
    let deferred = scalar_i64(
        &store,
        "SELECT COUNT(*) FROM tm_node_metrics WHERE outcome = 'deferred'",
    )
    .await;
    assert!(deferred >= 1, "deferrals are recorded");
    assert_eq!(
        scalar_i64(
            &store,
            "SELECT COUNT(*) FROM tm_jobs WHERE deferred_reason IS NOT NULL"
        )
        .await,
        0,
        "cleared on success"
    );
}

/// An outage that outlasts the run: `run` exits non-zero, says which jobs wait and why, and no job
/// spent its attempts on the outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_stops_when_only_deferred_jobs_are_left_and_says_why() {
    let server = MockServer::start().await;
    Mock::given(matchers::path("/api/v2/studies"))
        .respond_with(ResponseTemplate::new(503).set_body_string("down"))
        .mount(&server)
        .await;
    let db = sqlite_db();
    let output = worker_process(&db.url, &server.uri(), &["run", "A1B", "C2D", "E3F"])
        .env("TRIALMATCH_CTGOV__MAX_REQUEST_ATTEMPTS", "1")
        .env("TRIALMATCH_CTGOV__BREAKER_FAILURE_THRESHOLD", "2")
        .env("TRIALMATCH_CTGOV__BREAKER_COOLDOWN_MS", "600000")
        .env("TRIALMATCH_WORKER__RETRY_BASE_MS", "1")
        .env("TRIALMATCH_WORKER__RETRY_MAX_MS", "10")
        .env("TRIALMATCH_WORKER__CONCURRENCY", "1")
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), output)
        .await
        .expect("run returns")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("3 job(s) wait because an upstream service refuses calls"),
        "{stderr}"
    );
    assert!(
        stderr.contains("A1B: query_trials: clinicaltrials.gov: circuit breaker open"),
        "{stderr}"
    );
    let store = connect(&db).await;
    let rows = store
        .batch_jobs(&store.latest_batch_id().await.unwrap().unwrap())
        .await
        .unwrap();
    assert!(
        rows.iter()
            .all(|r| trialmatch::report::display_state(r) == "deferred" && r.attempts <= 1),
        "{rows:?}"
    );
    assert_eq!(
        server.received_requests().await.unwrap().len(),
        2,
        "the breaker stopped the calls"
    );
}
