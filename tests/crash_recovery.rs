//! A worker process killed with SIGKILL mid-job: its job is handed out again once its heartbeat is
//! missed, and the next worker finishes it. Runs on SQLite and, with `TEST_DATABASE_URL`, Postgres.

mod common;

use std::time::Duration;

use common::*;
use trialmatch::db::NewBatch;

/// The shortest heartbeat allowed: a dead worker is noticed after about 3 s instead of 30 s.
const HEARTBEAT_MS: &str = "1000";

async fn killed_worker_jobs_are_picked_up_again(db: TestDb) {
    let server = fake_ctgov(FakeStudies::new(2).with_latency(Duration::from_millis(1_500))).await;
    let store = connect(&db).await;
    let batch = NewBatch {
        name: None,
        mutations: vec!["BRAF V600E".into()],
        max_attempts: 3,
    };
    let enqueued = store.enqueue_batch(&batch).await.unwrap();

    let mut doomed = worker_process(&db.url, &server.uri(), &["work"])
        .env("TRIALMATCH_WORKER__HEARTBEAT_MS", HEARTBEAT_MS)
        .spawn()
        .unwrap();
    let running = async {
        while store.batch_jobs(&enqueued.batch_id).await.unwrap()[0].state != "running" {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("the job starts");
    doomed.kill().await.unwrap(); // SIGKILL: no graceful shutdown, no result recorded

    let rescuer = worker_process(&db.url, &server.uri(), &["work", "--drain"])
        .env("TRIALMATCH_WORKER__HEARTBEAT_MS", HEARTBEAT_MS)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), rescuer)
        .await
        .expect("the second worker takes the orphaned job over and drains")
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let row = &store.batch_jobs(&enqueued.batch_id).await.unwrap()[0];
    assert_eq!(
        (row.state.as_str(), row.attempts),
        ("succeeded", 2),
        "{row:?}"
    );
    assert_eq!(
        scalar_i64(&store, "SELECT COUNT(*) FROM tm_summaries").await,
        1
    );
}

on_both_backends!(killed_worker_jobs_are_picked_up_again);
