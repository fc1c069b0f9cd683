//! End-to-end batch throughput, measured side by side in one run: the same batch of mutations
//! drained by the real `trialmatch work --drain` binary against a local fake ClinicalTrials.gov,
//! on SQLite with one process and on Postgres with one and three processes.
//!
//! Run: `TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres cargo bench --bench batch_throughput`
//! (without the URL only the SQLite figure is printed). Options via the environment:
//! `BENCH_MUTATIONS` (default 300), `BENCH_LATENCY_MS` (default 20), `BENCH_CONCURRENCY` (default 8).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use trialmatch::db::NewBatch;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn drain(
    db: &TestDb,
    ctgov: &str,
    processes: usize,
    mutations: usize,
    concurrency: u64,
) -> Duration {
    let store = connect(db).await;
    let batch = NewBatch {
        name: None,
        mutations: (0..mutations).map(|i| format!("GENE{i} V{i}E")).collect(),
        max_attempts: 3,
    };
    let enqueued = store.enqueue_batch(&batch).await.expect("enqueue");
    let started = Instant::now();
    let children: Vec<_> = (0..processes)
        .map(|_| {
            worker_process(
                &db.url,
                ctgov,
                &["work", "--drain", "--concurrency", &concurrency.to_string()],
            )
            .env("TRIALMATCH_LOG", "error")
            .spawn()
            .expect("the binary starts")
        })
        .collect();
    for child in children {
        let status = child.wait_with_output().await.expect("worker exits").status;
        assert!(status.success());
    }
    let elapsed = started.elapsed();
    let rows = store.batch_jobs(&enqueued.batch_id).await.expect("status");
    assert!(
        rows.iter().all(|r| r.state == "succeeded"),
        "every job succeeded"
    );
    store.close().await;
    elapsed
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mutations = env_or("BENCH_MUTATIONS", 300) as usize;
    let latency = Duration::from_millis(env_or("BENCH_LATENCY_MS", 20));
    let concurrency = env_or("BENCH_CONCURRENCY", 8);
    let server = fake_ctgov(FakeStudies::new(10).with_latency(latency)).await;
    println!(
        "batch of {mutations} mutations, upstream latency {} ms, 10 trials each, concurrency {concurrency} per process",
        latency.as_millis()
    );
    let mut results = Vec::new();
    let sqlite = sqlite_db();
    results.push((
        "SQLite, 1 process",
        drain(&sqlite, &server.uri(), 1, mutations, concurrency).await,
    ));
    if let Some(pg) = postgres_db("batch_throughput").await {
        results.push((
            "Postgres, 1 process",
            drain(&pg, &server.uri(), 1, mutations, concurrency).await,
        ));
    }
    if let Some(pg) = postgres_db("batch_throughput").await {
        results.push((
            "Postgres, 3 processes",
            drain(&pg, &server.uri(), 3, mutations, concurrency).await,
        ));
    }
    let base = results[0].1.as_secs_f64();
    println!(
        "{:<24} {:>9} {:>9} {:>16}",
        "setup", "seconds", "jobs/s", "vs SQLite 1 proc"
    );
    for (name, elapsed) in &results {
        let s = elapsed.as_secs_f64();
        println!(
            "{name:<24} {s:>9.2} {:>9.0} {:>15.2}x",
            mutations as f64 / s,
            base / s
        );
    }
}
