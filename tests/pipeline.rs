//! The whole flow: enqueue → queue → worker → fake ClinicalTrials.gov → summary → stored, driven by
//! draining the queue (no sleeps), and the failure paths that must end in a known state. The shared
//! tests run on SQLite and on Postgres (`on_both_backends!`); the last one is about SQLite alone.

mod common;

use std::sync::Arc;

use common::*;
use futures::future::BoxFuture;
use trialmatch::config::Config;
use trialmatch::db::{JobRow, NewBatch, Store};
use trialmatch::flow::NodeError;
use trialmatch::queue::{MutationTask, QueueConnection};
use trialmatch::summarize::{Summarizer, Summary, SummaryInput};
use trialmatch::worker::{self, App, RunOutcome};
use wiremock::{Mock, MockServer, ResponseTemplate, matchers};

on_both_backends!(
    enqueued_mutations_end_with_stored_trials_and_summaries,
    pages_are_followed_until_max_trials,
    a_malformed_body_fails_the_job_at_once_with_the_reason_stored,
    a_transient_server_error_is_retried_within_the_run,
    an_upstream_that_never_recovers_makes_the_job_dead_after_its_attempts,
    a_bad_request_is_not_retried,
    a_panicking_run_is_retried_and_ends_dead_never_stuck_running,
    outdated_and_repeated_deliveries_do_no_work,
    a_job_whose_worker_died_mid_run_is_run_again,
    a_named_batch_is_enqueued_once,
    a_batch_is_enqueued_whole_or_not_at_all,
    more_trials_than_one_statement_holds_are_stored_in_rank_order,
    a_job_whose_worker_dies_on_every_attempt_ends_dead,
);

fn batch(mutations: &[&str]) -> NewBatch {
    NewBatch {
        name: None,
        mutations: mutations.iter().map(|s| s.to_string()).collect(),
        max_attempts: 3,
    }
}

/// Works until no job is left.
async fn drain(app: Arc<App>) {
    drain_with(app, worker::Drain::UntilFinished).await;
}

/// Enqueues one job ("BRAF V600E") and returns its id.
async fn enqueue_one(store: &Store) -> String {
    let enqueued = store.enqueue_batch(&batch(&["BRAF V600E"])).await.unwrap();
    store
        .batch_jobs(&enqueued.batch_id)
        .await
        .unwrap()
        .remove(0)
        .id
}

/// Runs one job ("BRAF V600E") to its end against an upstream that always gives `response`;
/// returns the store, the job's row and the upstream (to count its requests).
async fn run_one_job_against(
    db: &TestDb,
    response: ResponseTemplate,
    configure: impl FnOnce(&mut Config),
) -> (Store, JobRow, MockServer) {
    let server = MockServer::start().await;
    Mock::given(matchers::path("/api/v2/studies"))
        .respond_with(response)
        .mount(&server)
        .await;
    let store = connect(db).await;
    let mut config = test_config(&db.url, &server.uri());
    configure(&mut config);
    let enqueued = store.enqueue_batch(&batch(&["BRAF V600E"])).await.unwrap();
    drain(Arc::new(App::new(&config, store.clone()).unwrap())).await;
    let row = store
        .batch_jobs(&enqueued.batch_id)
        .await
        .unwrap()
        .remove(0);
    (store, row, server)
}

async fn enqueued_mutations_end_with_stored_trials_and_summaries(db: TestDb) {
    let server = fake_ctgov(FakeStudies::new(3).with_count("KRAS G12C", 0)).await;
    let store = connect(&db).await;
    let config = test_config(&db.url, &server.uri());
    let enqueued = store
        .enqueue_batch(&batch(&["BRAF V600E", "EGFR L858R", "KRAS G12C"]))
        .await
        .unwrap();
    assert_eq!(enqueued.job_count, 3);

    drain(Arc::new(App::new(&config, store.clone()).unwrap())).await;

    let rows = store.batch_jobs(&enqueued.batch_id).await.unwrap();
    assert!(
        rows.iter()
            .all(|r| r.state == "succeeded" && r.attempts == 1),
        "{rows:?}"
    );
    assert_eq!(
        store.batch_state_counts(&enqueued.batch_id).await.unwrap(),
        [("succeeded".to_owned(), 3)]
    );
    assert_eq!(
        rows.iter()
            .map(|r| r.trials_found.unwrap())
            .collect::<Vec<_>>(),
        [3, 3, 0]
    );

    let braf = store
        .latest_summary("braf v600e")
        .await
        .unwrap()
        .expect("summary stored");
    assert_eq!(braf.summarizer, "offline");
    assert!(
        braf.body.starts_with("# Clinical trials for BRAF V600E"),
        "{}",
        braf.body
    );
    for study in studies_for("BRAF V600E", 3) {
        let id = study["protocolSection"]["identificationModule"]["nctId"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            braf.body
                .contains(&format!("(https://clinicaltrials.gov/study/{id})")),
            "{id} in {}",
            braf.body
        );
    }
    let kras = store.latest_summary("KRAS G12C").await.unwrap().unwrap();
    assert!(kras.body.contains("No trials found"), "{}", kras.body);

    assert_eq!(
        scalar_i64(&store, "SELECT COUNT(*) FROM tm_trials").await,
        6
    );
    assert_eq!(
        scalar_i64(&store, "SELECT COUNT(*) FROM tm_job_trials").await,
        6
    );
    assert_eq!(
        scalar_i64(
            &store,
            "SELECT COUNT(*) FROM tm_ctgov_pages WHERE http_status = 200"
        )
        .await,
        3
    );
    assert_eq!(
        scalar_i64(&store, "SELECT COUNT(*) FROM tm_summaries").await,
        3
    );
    assert_eq!(
        scalar_i64(
            &store,
            "SELECT COUNT(*) FROM tm_node_metrics WHERE outcome = 'ok'"
        )
        .await,
        6,
        "two nodes per job"
    );
    assert_eq!(queue_rows(&store).await, 0, "finished queue rows are swept");
    assert_eq!(server.received_requests().await.unwrap().len(), 3);
}

async fn pages_are_followed_until_max_trials(db: TestDb) {
    let fake = FakeStudies::new(0)
        .with_count("BRAF V600E", 23)
        .with_count("EGFR L858R", 7);
    let server = fake_ctgov(fake).await;
    let store = connect(&db).await;
    let mut config = test_config(&db.url, &server.uri());
    config.ctgov.page_size = 5;
    config.ctgov.max_trials = 12;
    let enqueued = store
        .enqueue_batch(&batch(&["BRAF V600E", "EGFR L858R"]))
        .await
        .unwrap();
    drain(Arc::new(App::new(&config, store.clone()).unwrap())).await;

    let rows = store.batch_jobs(&enqueued.batch_id).await.unwrap();
    assert_eq!(rows[0].trials_found, Some(12), "cut at max_trials");
    assert_eq!(
        rows[0].total_count,
        Some(23),
        "totalCount of the first page kept"
    );
    assert_eq!(
        rows[1].trials_found,
        Some(7),
        "stops at the last page (no nextPageToken)"
    );
    // 12 of 23 need pages 1-3; 7 need pages 1-2.
    assert_eq!(server.received_requests().await.unwrap().len(), 5);
    let ranks = scalar_i64(&store, "SELECT MAX(rank) FROM tm_job_trials").await;
    assert_eq!(ranks, 12);
}

async fn more_trials_than_one_statement_holds_are_stored_in_rank_order(db: TestDb) {
    let server = fake_ctgov(FakeStudies::new(1_200)).await;
    let store = connect(&db).await;
    let mut config = test_config(&db.url, &server.uri());
    config.ctgov.page_size = 1_000;
    config.ctgov.max_trials = 1_100;
    store.enqueue_batch(&batch(&["BRAF V600E"])).await.unwrap();
    drain(Arc::new(App::new(&config, store.clone()).unwrap())).await;
    assert_eq!(
        scalar_i64(&store, "SELECT COUNT(*) FROM tm_trials").await,
        1_100
    );
    assert_eq!(
        scalar_i64(
            &store,
            "SELECT COUNT(DISTINCT rank) FROM tm_job_trials WHERE rank BETWEEN 1 AND 1100"
        )
        .await,
        1_100
    );
    // Rank follows the API's order across statement chunks: study i is NCT…{i:03}.
    let last = match &store {
        Store::Sqlite(pool) => {
            sqlx::query_scalar::<_, String>("SELECT nct_id FROM tm_job_trials WHERE rank = 1100")
                .fetch_one(pool)
                .await
        }
        Store::Postgres(pool) => {
            sqlx::query_scalar::<_, String>("SELECT nct_id FROM tm_job_trials WHERE rank = 1100")
                .fetch_one(pool)
                .await
        }
    }
    .unwrap();
    let expected =
        studies_for("BRAF V600E", 1_100)[1_099]["protocolSection"]["identificationModule"]["nctId"]
            .clone();
    assert_eq!(serde_json::Value::String(last), expected);
}

async fn a_malformed_body_fails_the_job_at_once_with_the_reason_stored(db: TestDb) {
    let body = ResponseTemplate::new(200).set_body_string("<html>maintenance</html>");
    let (store, row, server) = run_one_job_against(&db, body, |_| {}).await;
    assert_eq!(
        server.received_requests().await.unwrap().len(),
        1,
        "not retried"
    );
    assert_eq!((row.state.as_str(), row.attempts), ("failed", 1));
    let error = row.last_error.as_deref().unwrap();
    assert!(
        error.contains("unexpected response body") && error.contains("<html>maintenance"),
        "{error}"
    );
    assert_eq!(
        scalar_i64(&store, "SELECT COUNT(*) FROM tm_ctgov_pages").await,
        1,
        "the bad page is kept for replay"
    );
    assert_eq!(
        scalar_i64(
            &store,
            "SELECT COUNT(*) FROM tm_job_errors WHERE kind = 'permanent'"
        )
        .await,
        1
    );
    assert_eq!(
        scalar_i64(&store, "SELECT COUNT(*) FROM tm_summaries").await,
        0,
        "no partial result"
    );
}

async fn a_transient_server_error_is_retried_within_the_run(db: TestDb) {
    let server = MockServer::start().await;
    Mock::given(matchers::path("/api/v2/studies"))
        .respond_with(ResponseTemplate::new(500).set_body_string("oops"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(matchers::path("/api/v2/studies"))
        .respond_with(FakeStudies::new(2))
        .mount(&server)
        .await;
    let store = connect(&db).await;
    let config = test_config(&db.url, &server.uri());
    let enqueued = store.enqueue_batch(&batch(&["BRAF V600E"])).await.unwrap();
    drain(Arc::new(App::new(&config, store.clone()).unwrap())).await;

    let row = &store.batch_jobs(&enqueued.batch_id).await.unwrap()[0];
    assert_eq!(
        (row.state.as_str(), row.attempts, row.trials_found),
        ("succeeded", 1, Some(2))
    );
    let outcomes = scalar_i64(
        &store,
        "SELECT COUNT(*) FROM tm_node_metrics WHERE node = 'query_trials'",
    )
    .await;
    assert_eq!(outcomes, 2, "both request attempts recorded");
    assert_eq!(
        scalar_i64(
            &store,
            "SELECT COUNT(*) FROM tm_ctgov_pages WHERE http_status = 500"
        )
        .await,
        1
    );
}

async fn an_upstream_that_never_recovers_makes_the_job_dead_after_its_attempts(db: TestDb) {
    let unavailable = ResponseTemplate::new(503).set_body_string("unavailable");
    let (store, row, server) = run_one_job_against(&db, unavailable, |config| {
        config.ctgov.max_request_attempts = 2;
    })
    .await;
    assert_eq!((row.state.as_str(), row.attempts), ("dead", 3), "{row:?}");
    assert!(
        row.last_error.as_deref().unwrap().contains("HTTP 503"),
        "{row:?}"
    );
    assert_eq!(
        scalar_i64(&store, "SELECT COUNT(*) FROM tm_job_errors").await,
        3,
        "every failed attempt kept"
    );
    assert_eq!(
        server.received_requests().await.unwrap().len(),
        6,
        "2 requests in each of 3 runs, then no more"
    );
}

async fn a_bad_request_is_not_retried(db: TestDb) {
    let refused = ResponseTemplate::new(400).set_body_string("invalid value for query.term");
    let (_store, row, server) = run_one_job_against(&db, refused, |_| {}).await;
    assert_eq!(
        server.received_requests().await.unwrap().len(),
        1,
        "not retried"
    );
    assert_eq!(row.state, "failed");
    assert!(
        row.last_error.as_deref().unwrap().contains("HTTP 400"),
        "{row:?}"
    );
}

struct PanickingSummarizer;

impl Summarizer for PanickingSummarizer {
    fn name(&self) -> &'static str {
        "panicking"
    }
    fn prompt_version(&self) -> &str {
        "test"
    }
    fn summarize<'a>(
        &'a self,
        _input: SummaryInput<'a>,
    ) -> BoxFuture<'a, Result<Summary, NodeError>> {
        Box::pin(async { panic!("summarizer bug") })
    }
}

async fn a_panicking_run_is_retried_and_ends_dead_never_stuck_running(db: TestDb) {
    let server = fake_ctgov(FakeStudies::new(2)).await;
    let store = connect(&db).await;
    let config = test_config(&db.url, &server.uri());
    let enqueued = store.enqueue_batch(&batch(&["BRAF V600E"])).await.unwrap();
    let app = App::new(&config, store.clone())
        .unwrap()
        .with_summarizer(Arc::new(PanickingSummarizer));
    drain(Arc::new(app)).await;
    let row = &store.batch_jobs(&enqueued.batch_id).await.unwrap()[0];
    assert_eq!((row.state.as_str(), row.attempts), ("dead", 3), "{row:?}");
    assert!(
        row.last_error
            .as_deref()
            .unwrap()
            .contains("panicked: summarizer bug"),
        "{row:?}"
    );
}

async fn outdated_and_repeated_deliveries_do_no_work(db: TestDb) {
    let server = fake_ctgov(FakeStudies::new(1)).await;
    let store = connect(&db).await;
    let config = test_config(&db.url, &server.uri());
    let job_id = enqueue_one(&store).await;
    let app = App::new(&config, store.clone()).unwrap();

    let outdated = MutationTask {
        job_id: job_id.clone(),
        delivery: 0,
    };
    assert_eq!(app.process(&outdated).await.unwrap(), RunOutcome::Skipped);
    let current = MutationTask {
        job_id: job_id.clone(),
        delivery: 1,
    };
    assert_eq!(app.process(&current).await.unwrap(), RunOutcome::Succeeded);
    assert_eq!(
        app.process(&current).await.unwrap(),
        RunOutcome::Skipped,
        "a finished job is not run again"
    );
    assert_eq!(
        scalar_i64(&store, "SELECT COUNT(*) FROM tm_summaries").await,
        1
    );
}

async fn a_job_whose_worker_died_mid_run_is_run_again(db: TestDb) {
    let server = fake_ctgov(FakeStudies::new(1)).await;
    let store = connect(&db).await;
    let config = test_config(&db.url, &server.uri());
    let job_id = enqueue_one(&store).await;
    let task = MutationTask {
        job_id: job_id.clone(),
        delivery: 1,
    };
    // A worker claims the job and dies before recording anything.
    let dead = App::new(&config, store.clone()).unwrap();
    assert!(matches!(
        store.claim(&task, &dead.worker_name).await.unwrap(),
        trialmatch::db::Claim::Run { attempt: 1, .. }
    ));
    // apalis hands the same delivery out again once the dead worker's heartbeat is missed.
    let app = App::new(&config, store.clone()).unwrap();
    assert_eq!(app.process(&task).await.unwrap(), RunOutcome::Succeeded);
    let row = &store
        .batch_jobs(&store.latest_batch_id().await.unwrap().unwrap())
        .await
        .unwrap()[0];
    assert_eq!((row.state.as_str(), row.attempts), ("succeeded", 2));
}

async fn a_job_whose_worker_dies_on_every_attempt_ends_dead(db: TestDb) {
    let store = connect(&db).await;
    let job_id = enqueue_one(&store).await;
    let task = MutationTask {
        job_id,
        delivery: 1,
    };
    // Three workers in turn claim the same delivery (apalis re-hands it after each one dies).
    for attempt in 1..=3 {
        let claim = store.claim(&task, "doomed").await.unwrap();
        assert!(
            matches!(claim, trialmatch::db::Claim::Run { attempt: a, .. } if a == attempt),
            "{claim:?}"
        );
    }
    assert_eq!(
        store.claim(&task, "doomed").await.unwrap(),
        trialmatch::db::Claim::Exhausted
    );
    let row = &store
        .batch_jobs(&store.latest_batch_id().await.unwrap().unwrap())
        .await
        .unwrap()[0];
    assert_eq!((row.state.as_str(), row.attempts), ("dead", 3));
    assert!(
        row.last_error
            .as_deref()
            .unwrap()
            .contains("stopped during each of its 3 attempts"),
        "{row:?}"
    );
    assert_eq!(
        store.claim(&task, "late").await.unwrap(),
        trialmatch::db::Claim::Stale,
        "a dead job never runs again"
    );
}

async fn a_batch_is_enqueued_whole_or_not_at_all(db: TestDb) {
    let store = connect(&db).await;
    // Make the third job insert fail inside the enqueue transaction.
    match &store {
        Store::Sqlite(pool) => {
            sqlx::query(
                "CREATE TRIGGER fail_third BEFORE INSERT ON tm_jobs WHEN NEW.position = 2
                 BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
            )
            .execute(pool)
            .await
            .unwrap();
        }
        Store::Postgres(pool) => {
            sqlx::raw_sql(
                "CREATE FUNCTION fail_third() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN IF NEW.position = 2 THEN RAISE EXCEPTION 'injected failure'; END IF; RETURN NEW; END $$;
                 CREATE TRIGGER fail_third BEFORE INSERT ON tm_jobs FOR EACH ROW EXECUTE FUNCTION fail_third();",
            )
            .execute(pool)
            .await
            .unwrap();
        }
    }
    let err = store
        .enqueue_batch(&batch(&["A1B", "C2D", "E3F", "G4H"]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("injected failure"), "{err}");
    for table in [
        "SELECT COUNT(*) FROM tm_batches",
        "SELECT COUNT(*) FROM tm_jobs",
    ] {
        assert_eq!(scalar_i64(&store, table).await, 0, "{table}");
    }
    assert_eq!(queue_rows(&store).await, 0, "no queue rows");
}

async fn a_named_batch_is_enqueued_once(db: TestDb) {
    let store = connect(&db).await;
    let mut named = batch(&["BRAF V600E", "KRAS G12C"]);
    named.name = Some("nightly-2026-12-04".into());
    let first = store.enqueue_batch(&named).await.unwrap();
    let second = store.enqueue_batch(&named).await.unwrap();
    assert!(!first.already_existed && second.already_existed);
    assert_eq!(first.batch_id, second.batch_id);
    assert_eq!(scalar_i64(&store, "SELECT COUNT(*) FROM tm_jobs").await, 2);
    assert_eq!(queue_rows(&store).await, 2);
}

/// apalis's SQLite ack query (`queries/task/ack.sql` in apalis-sqlite 1.0), planned here the way
/// SQLite plans it when a job is acknowledged.
const APALIS_ACK_QUERY: &str = "EXPLAIN QUERY PLAN
WITH j AS (SELECT value ->> 'task_id' AS task_id, value ->> 'attempt' AS attempt,
                  value ->> 'result' AS result, value ->> 'status' AS status FROM json_each(?1))
UPDATE Jobs SET status = j.status, attempts = j.attempt, last_result = j.result, done_at = strftime('%s', 'now')
FROM j WHERE Jobs.id = j.task_id AND Jobs.lock_by = ?2";

async fn ack_plan(store: &Store) -> String {
    let Store::Sqlite(pool) = store else {
        unreachable!()
    };
    let rows: Vec<(i64, i64, i64, String)> = sqlx::query_as(APALIS_ACK_QUERY)
        .bind("[]")
        .bind("w")
        .fetch_all(pool)
        .await
        .unwrap();
    rows.into_iter().map(|r| r.3).collect::<Vec<_>>().join("\n")
}

/// The history slow-down: with apalis's `LIdx(lock_by)` index SQLite plans the ack on it and scans
/// every row a worker ever locked, so acks slow down as finished jobs pile up (29 jobs/s at 100k).
/// Guard both halves of the fix: the index is gone (on every start), and finished rows are swept.
#[tokio::test]
async fn history_cannot_slow_the_sqlite_queue_down() {
    let db = sqlite_db();
    let store = connect(&db).await;
    let plan = ack_plan(&store).await;
    assert!(!plan.contains("LIdx"), "ack planned on LIdx:\n{plan}");
    assert!(
        plan.contains("sqlite_autoindex_Jobs") || plan.contains("PRIMARY KEY"),
        "ack not by primary key:\n{plan}"
    );

    // A future apalis migration (or an old database) may bring the index back: the next start drops it.
    let Store::Sqlite(pool) = &store else {
        unreachable!()
    };
    sqlx::query("CREATE INDEX LIdx ON Jobs(lock_by)")
        .execute(pool)
        .await
        .unwrap();
    let lidx = "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = 'LIdx'";
    assert_eq!(scalar_i64(&store, lidx).await, 1);
    store.close().await;
    let store = connect(&db).await;
    assert_eq!(scalar_i64(&store, lidx).await, 0, "dropped again at start");
    assert!(!ack_plan(&store).await.contains("LIdx"));

    // Finished queue rows are deleted; unfinished ones are kept.
    let Store::Sqlite(pool) = &store else {
        unreachable!()
    };
    let mut conn = pool.acquire().await.unwrap();
    for _ in 0..50 {
        let task = MutationTask {
            job_id: "x".into(),
            delivery: 1,
        };
        conn.push_delivery(&task, 3, chrono::Utc::now())
            .await
            .unwrap();
    }
    sqlx::query("UPDATE Jobs SET status = 'Done' WHERE rowid IN (SELECT rowid FROM Jobs LIMIT 40)")
        .execute(&mut *conn)
        .await
        .unwrap();
    drop(conn);
    assert_eq!(store.sweep_queue().await.unwrap(), 40);
    assert_eq!(queue_rows(&store).await, 10);
}
