//! The Claude summarizer against a fake Anthropic Messages API: request shape, response parsing,
//! reuse of unchanged summaries, each error class, and the API key kept out of logs and storage.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use common::*;
use serde_json::json;
use trialmatch::config::{Config, SummarizerKind};
use trialmatch::db::{JobRow, Store};
use trialmatch::worker::Drain;
use wiremock::{Mock, MockServer, Respond, ResponseTemplate, matchers};

const KEY: &str = "sk-ant-test-0123456789-secret";
const MODEL: &str = "claude-test-model";

/// A Messages API success with `texts` as text blocks.
fn message(texts: &[&str], stop_reason: &str) -> ResponseTemplate {
    let content: Vec<_> = texts
        .iter()
        .map(|t| json!({ "type": "text", "text": t }))
        .collect();
    ResponseTemplate::new(200).set_body_json(json!({
        "id": "msg_test", "type": "message", "role": "assistant", "model": MODEL,
        "content": content, "stop_reason": stop_reason, "stop_sequence": null,
        "usage": { "input_tokens": 1500, "output_tokens": 400,
                   "cache_creation_input_tokens": 0, "cache_read_input_tokens": 1200 }
    }))
}

fn claude_config(db: &TestDb, ctgov: &MockServer, claude: &MockServer) -> Config {
    let mut config = test_config(&db.url, &ctgov.uri());
    config.anthropic.base_url = claude.uri();
    config.anthropic.model = MODEL.into();
    config.anthropic.api_key = Some(KEY.into());
    config.anthropic.backoff_base_ms = 1;
    config.anthropic.backoff_max_ms = 20;
    config.anthropic.max_request_attempts = 2;
    config.worker.max_attempts = 2;
    config
}

async fn run_claude_batch(config: &Config, store: &Store, mutations: &[&str]) -> Vec<JobRow> {
    run_batch(config, store, mutations, Drain::UntilFinished).await
}

#[tokio::test]
async fn a_key_selects_claude_and_the_request_has_the_messages_api_shape() {
    captured_logs();
    let ctgov = fake_ctgov(FakeStudies::new(3)).await;
    let claude = MockServer::start().await;
    Mock::given(matchers::method("POST"))
        .and(matchers::path("/v1/messages"))
        .and(matchers::header("x-api-key", KEY))
        .and(matchers::header("anthropic-version", "2023-06-01"))
        .and(matchers::header("content-type", "application/json"))
        .and(matchers::body_partial_json(json!({
            "model": MODEL,
            "max_tokens": 2048,
            "system": [{ "type": "text", "cache_control": { "type": "ephemeral" } }],
        })))
        .respond_with(message(
            &[
                "## Overview\n",
                "Three trials: [NCT1](https://clinicaltrials.gov/study/NCT1).",
            ],
            "max_tokens",
        ))
        .expect(1)
        .mount(&claude)
        .await;
    let db = sqlite_db();
    let store = connect(&db).await;
    let config = claude_config(&db, &ctgov, &claude);
    assert_eq!(config.summarizer, None);
    assert_eq!(
        config.effective_summarizer(),
        SummarizerKind::Anthropic,
        "a key selects Claude"
    );

    let rows = run_claude_batch(&config, &store, &["BRAF V600E"]).await;
    assert_eq!(rows[0].state, "succeeded", "{rows:?}");
    assert_eq!(
        rows[0].summary_stop_reason.as_deref(),
        Some("max_tokens"),
        "a cut summary is flagged"
    );
    assert_eq!(
        trialmatch::report::summary_note(&rows[0]),
        "cut (max_tokens)"
    );

    let summary = store.latest_summary("BRAF V600E").await.unwrap().unwrap();
    assert_eq!(
        summary.body,
        "## Overview\nThree trials: [NCT1](https://clinicaltrials.gov/study/NCT1)."
    );
    assert_eq!(
        (summary.summarizer.as_str(), summary.model.as_deref()),
        ("anthropic", Some(MODEL))
    );
    let tokens = scalar_i64(
        &store,
        "SELECT input_tokens + output_tokens + cache_read_tokens FROM tm_summaries",
    )
    .await;
    assert_eq!(tokens, 1500 + 400 + 1200);

    let requests = claude.received_requests().await.unwrap();
    let body: serde_json::Value = serde_json::from_slice(&requests[0].body).unwrap();
    let user = body["messages"][0]["content"].as_str().unwrap();
    assert!(
        user.starts_with("Mutation: BRAF V600E\nTrials found on ClinicalTrials.gov: 3.\n"),
        "{user}"
    );
    assert_eq!(
        user.matches("\n- NCT").count(),
        3,
        "every trial listed: {user}"
    );
}

#[tokio::test]
async fn unchanged_trials_make_no_second_call_and_a_changed_status_makes_one() {
    captured_logs();
    let claude = MockServer::start().await;
    Mock::given(matchers::path("/v1/messages"))
        .respond_with(message(&["## Overview\nfresh"], "end_turn"))
        .mount(&claude)
        .await;
    let db = sqlite_db();
    let store = connect(&db).await;
    let mutations: Vec<String> = (0..10).map(|i| format!("GENE{i} V600E")).collect();
    let mutations: Vec<&str> = mutations.iter().map(String::as_str).collect();

    let ctgov = fake_ctgov(FakeStudies::new(4)).await;
    let config = claude_config(&db, &ctgov, &claude);
    run_claude_batch(&config, &store, &mutations).await;
    let first_calls = claude.received_requests().await.unwrap().len();
    let rows = run_claude_batch(&config, &store, &mutations).await;
    let second_calls = claude.received_requests().await.unwrap().len() - first_calls;
    assert_eq!(
        (first_calls, second_calls),
        (10, 0),
        "a nightly run where nothing changed calls no model"
    );
    assert!(
        rows.iter()
            .all(|r| trialmatch::report::summary_note(r) == "reused"),
        "{rows:?}"
    );
    let reused_tokens = scalar_i64(&store, "SELECT COUNT(*) FROM tm_summaries WHERE reused_from_job IS NOT NULL AND input_tokens IS NULL").await;
    assert_eq!(
        reused_tokens, 10,
        "reused summaries record no tokens of their own"
    );
    let input = scalar_i64(&store, "SELECT SUM(input_tokens) FROM tm_summaries").await;
    let output = scalar_i64(&store, "SELECT SUM(output_tokens) FROM tm_summaries").await;
    let cached = scalar_i64(&store, "SELECT SUM(cache_read_tokens) FROM tm_summaries").await;
    assert_eq!(
        (input, output, cached),
        (10 * 1500, 10 * 400, 10 * 1200),
        "tokens of the first run only"
    );
    eprintln!(
        "10-mutation batch run twice: {first_calls} then {second_calls} model calls; \
         tokens {input} in, {output} out, {cached} cache-read"
    );

    // One trial of one mutation changes status overnight.
    let changed =
        fake_ctgov(FakeStudies::new(4).with_first_status("GENE3 V600E", "TERMINATED")).await;
    let config = claude_config(&db, &changed, &claude);
    run_claude_batch(&config, &store, &mutations).await;
    assert_eq!(
        claude.received_requests().await.unwrap().len() - first_calls,
        1
    );

    // --force-summarize calls the model for every mutation again.
    let mut forced = config.clone();
    forced.force_summarize = true;
    run_claude_batch(&forced, &store, &mutations[..2]).await;
    assert_eq!(
        claude.received_requests().await.unwrap().len() - first_calls,
        3
    );
}

/// Runs one job with Claude answering with `responses` in turn (the last one repeats).
async fn one_job_against_claude(
    responses: Vec<ResponseTemplate>,
) -> (TestDb, Store, JobRow, usize) {
    struct InTurn(Mutex<Vec<ResponseTemplate>>);
    impl Respond for InTurn {
        fn respond(&self, _: &wiremock::Request) -> ResponseTemplate {
            let mut queue = self.0.lock().unwrap();
            if queue.len() > 1 {
                queue.remove(0)
            } else {
                queue[0].clone()
            }
        }
    }
    let ctgov = fake_ctgov(FakeStudies::new(2)).await;
    let claude = MockServer::start().await;
    Mock::given(matchers::path("/v1/messages"))
        .respond_with(InTurn(Mutex::new(responses)))
        .mount(&claude)
        .await;
    let db = sqlite_db();
    let store = connect(&db).await;
    let config = claude_config(&db, &ctgov, &claude);
    let row = run_claude_batch(&config, &store, &["BRAF V600E"])
        .await
        .remove(0);
    let calls = claude.received_requests().await.unwrap().len();
    (db, store, row, calls)
}

#[tokio::test]
async fn overloaded_529_is_retried() {
    captured_logs();
    let overloaded = ResponseTemplate::new(529).set_body_json(
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    );
    let (_db, _store, row, calls) =
        one_job_against_claude(vec![overloaded, message(&["ok"], "end_turn")]).await;
    assert_eq!((row.state.as_str(), calls), ("succeeded", 2));
}

#[tokio::test]
async fn permanent_errors_fail_the_job_without_retrying() {
    captured_logs();
    let cases = [
        (ResponseTemplate::new(400).set_body_string(r#"{"type":"error","error":{"type":"invalid_request_error","message":"bad"}}"#), "HTTP 400"),
        (ResponseTemplate::new(403).set_body_string(r#"{"type":"error","error":{"type":"permission_error","message":"no"}}"#), "HTTP 403"),
        (ResponseTemplate::new(429).set_body_string(r#"{"type":"error","error":{"type":"rate_limit_error","message":"You have reached your spend limit"}}"#), "spend or usage limit"),
        (ResponseTemplate::new(200).set_body_string("not json"), "unexpected response body"),
    ];
    for (response, reason) in cases {
        let (_db, _store, row, calls) = one_job_against_claude(vec![response]).await;
        assert_eq!(
            (row.state.as_str(), calls),
            ("failed", 1),
            "{reason}: {row:?}"
        );
        assert!(
            row.last_error.as_deref().unwrap().contains(reason),
            "{reason}: {row:?}"
        );
    }
}

#[tokio::test]
async fn a_server_that_keeps_failing_makes_the_job_dead() {
    captured_logs();
    let (_db, _store, row, calls) = one_job_against_claude(vec![ResponseTemplate::new(500)]).await;
    // 2 calls in each of the job's 2 runs.
    assert_eq!(
        (row.state.as_str(), row.attempts, calls),
        ("dead", 2, 4),
        "{row:?}"
    );
}

/// Every log line of this test binary, at every level. A global subscriber, installed by whichever
/// test runs first: a thread-local one misses events whose callsites other threads saw first.
fn captured_logs() -> &'static Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Captured::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("no other global subscriber");
        logs
    })
}

/// A `Write` into a shared buffer, to capture log output.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);
impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_api_key_never_reaches_logs_errors_or_the_database() {
    let logs = captured_logs();

    // A 401 whose body echoes the key: the error we store must not.
    let echo = ResponseTemplate::new(401).set_body_string(format!(
        r#"{{"type":"error","error":{{"type":"authentication_error","message":"invalid x-api-key: {KEY}"}}}}"#
    ));
    let (db, store, row, calls) = one_job_against_claude(vec![echo]).await;
    assert_eq!(
        (row.state.as_str(), calls),
        ("failed", 1),
        "401 is not retried"
    );
    let error = row.last_error.unwrap();
    assert!(
        error.contains("HTTP 401") && error.contains("check the API key"),
        "{error}"
    );
    assert!(!error.contains(KEY), "{error}");
    store.close().await;

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("HTTP 401"), "the failure was logged: {logs}");
    assert!(!logs.contains(KEY), "key in logs");
    let dir = std::path::Path::new(db.url.trim_start_matches("sqlite://"))
        .parent()
        .unwrap()
        .to_owned();
    for entry in std::fs::read_dir(dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(
            !bytes.windows(KEY.len()).any(|w| w == KEY.as_bytes()),
            "key stored in the database files"
        );
    }
}
