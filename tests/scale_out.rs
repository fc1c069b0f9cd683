//! Scale-out on Postgres: several `trialmatch work` processes (the real binary) share one queue,
//! and every job's result is stored exactly once.

mod common;

use std::time::{Duration, Instant};

use common::*;
use trialmatch::db::NewBatch;

const PROCESSES: usize = 3;
const MUTATIONS: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_worker_processes_drain_one_postgres_queue_exactly_once() {
    let Some(db) =
        postgres_db("three_worker_processes_drain_one_postgres_queue_exactly_once").await
    else {
        return;
    };
    let server = fake_ctgov(FakeStudies::new(3).with_latency(Duration::from_millis(20))).await;
    let store = connect(&db).await;
    let mutations: Vec<String> = (0..MUTATIONS).map(|i| format!("GENE{i} V{i}E")).collect();
    let batch = NewBatch {
        name: None,
        mutations,
        max_attempts: 3,
    };
    let enqueued = store.enqueue_batch(&batch).await.unwrap();

    let started = Instant::now();
    let children: Vec<_> = (0..PROCESSES)
        .map(|_| {
            worker_process(
                &db.url,
                &server.uri(),
                &["work", "--drain", "--concurrency", "8"],
            )
            .spawn()
            .expect("the binary starts")
        })
        .collect();
    for child in children {
        let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("each worker drains and exits")
            .unwrap();
        assert!(
            output.status.success(),
            "worker failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let elapsed = started.elapsed();
    eprintln!(
        "{MUTATIONS} jobs, {PROCESSES} processes on Postgres: {:.2} s, {:.0} jobs/s",
        elapsed.as_secs_f64(),
        MUTATIONS as f64 / elapsed.as_secs_f64()
    );

    let rows = store.batch_jobs(&enqueued.batch_id).await.unwrap();
    let not_done: Vec<_> = rows
        .iter()
        .filter(|r| r.state != "succeeded" || r.attempts != 1)
        .collect();
    assert!(
        not_done.is_empty(),
        "every job succeeded in one attempt: {not_done:?}"
    );
    let count = |sql| scalar_i64(&store, sql);
    assert_eq!(
        count("SELECT COUNT(*) FROM tm_summaries").await,
        MUTATIONS as i64,
        "one summary per job"
    );
    assert_eq!(
        count("SELECT COUNT(DISTINCT job_id) FROM tm_summaries").await,
        MUTATIONS as i64
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM tm_job_trials").await,
        3 * MUTATIONS as i64,
        "no duplicate results"
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM apalis.jobs WHERE status IN ('Pending', 'Queued', 'Running')")
            .await,
        0,
        "nothing left pending or running in the queue"
    );
    let workers = count("SELECT COUNT(DISTINCT worker) FROM tm_jobs").await;
    assert!(
        workers > 1,
        "the work was shared, but only {workers} process did it"
    );
}
