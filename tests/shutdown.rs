//! Graceful shutdown of the real binary: SIGTERM stops taking jobs, lets the in-flight ones finish,
//! and leaves nothing `running`.

mod common;

use std::time::Duration;

use common::*;
use trialmatch::db::NewBatch;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_jobs_finish_and_leaves_the_rest_queued() {
    let server = fake_ctgov(FakeStudies::new(2).with_latency(Duration::from_millis(800))).await;
    let db = sqlite_db();
    let store = connect(&db).await;
    let batch = NewBatch {
        name: None,
        mutations: (0..6).map(|i| format!("GENE{i} V600E")).collect(),
        max_attempts: 3,
    };
    let enqueued = store.enqueue_batch(&batch).await.unwrap();

    let child = worker_process(&db.url, &server.uri(), &["work", "--concurrency", "2"])
        .spawn()
        .unwrap();

    // Wait (bounded) until jobs are in flight, then ask the worker to stop.
    let running = async {
        loop {
            let rows = store.batch_jobs(&enqueued.batch_id).await.unwrap();
            if rows.iter().any(|r| r.state == "running") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("a job starts");
    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let output = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("the worker exits after SIGTERM")
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let rows = store.batch_jobs(&enqueued.batch_id).await.unwrap();
    let states: Vec<&str> = rows.iter().map(|r| r.state.as_str()).collect();
    assert!(
        !states.contains(&"running"),
        "no job left running: {states:?}"
    );
    let succeeded = states.iter().filter(|s| **s == "succeeded").count();
    let queued = states.iter().filter(|s| **s == "queued").count();
    assert!(succeeded >= 1, "the in-flight jobs finished: {states:?}");
    assert!(
        queued >= 1,
        "jobs not started stay queued for the next worker: {states:?}"
    );
    assert_eq!(succeeded + queued, rows.len(), "{states:?}");

    // The jobs left behind are taken by the next worker.
    let child = worker_process(
        &db.url,
        &server.uri(),
        &["work", "--drain", "--concurrency", "8"],
    )
    .status();
    let status = tokio::time::timeout(Duration::from_secs(30), child)
        .await
        .expect("drains")
        .unwrap();
    assert!(status.success());
    let rows = store.batch_jobs(&enqueued.batch_id).await.unwrap();
    assert!(rows.iter().all(|r| r.state == "succeeded"), "{rows:?}");
}
