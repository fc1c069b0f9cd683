//! CPU per job, with criterion: parsing a 50-trial response, parsing + offline summary, the same plus
//! storing the results in SQLite, and parsing throughput for a 1,000-study page.
//!
//! Run: `cargo bench --bench cpu`.

#[path = "../examples/fake_upstream/studies.rs"]
mod studies;

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use trialmatch::ctgov::parse_page;
use trialmatch::db::{Claim, NewBatch, Store};
use trialmatch::flow::JobState;
use trialmatch::queue::MutationTask;
use trialmatch::summarize::{
    OfflineSummarizer, Summary, SummaryInput, fingerprint, offline_markdown,
};

fn page(count: usize) -> String {
    serde_json::json!({ "studies": studies::studies_for("BRAF V600E", count), "totalCount": count })
        .to_string()
}

fn parse_and_summarize(body: &str) -> JobState {
    let page = parse_page(body).expect("valid page");
    let input = SummaryInput {
        mutation: "BRAF V600E",
        trials: &page.trials,
        total_count: page.total_count,
    };
    let summary = Summary::without_call(offline_markdown(&input), &OfflineSummarizer);
    JobState {
        mutation: "BRAF V600E".into(),
        fingerprint: Some(fingerprint(&page.trials, page.total_count)),
        total_count: page.total_count,
        trials: page.trials,
        summary: Some(summary),
        ..JobState::default()
    }
}

fn cpu(c: &mut Criterion) {
    let fifty = page(50);
    let mut group = c.benchmark_group("per job (50 trials)");
    group.bench_function("parse", |b| {
        b.iter(|| parse_page(std::hint::black_box(&fifty)).unwrap())
    });
    group.bench_function("parse + offline summary", |b| {
        b.iter(|| parse_and_summarize(std::hint::black_box(&fifty)))
    });

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("cpu.db").display());
    let store = runtime.block_on(Store::connect(&url)).unwrap();
    group.bench_function("parse + offline summary + store (SQLite)", |b| {
        b.to_async(&runtime).iter_custom(|iters| {
            let store = store.clone();
            let body = fifty.clone();
            async move {
                // Claimed jobs to record into, prepared outside the timing.
                let batch = NewBatch {
                    name: None,
                    mutations: (0..iters).map(|i| format!("M{i}")).collect(),
                    max_attempts: 3,
                };
                let enqueued = store.enqueue_batch(&batch).await.unwrap();
                let mut claimed = Vec::new();
                for row in store.batch_jobs(&enqueued.batch_id).await.unwrap() {
                    let task = MutationTask {
                        job_id: row.id.clone(),
                        delivery: 1,
                    };
                    assert!(matches!(
                        store.claim(&task, "bench").await.unwrap(),
                        Claim::Run { .. }
                    ));
                    claimed.push(row.id);
                }
                let started = Instant::now();
                for job_id in &claimed {
                    let state = parse_and_summarize(&body);
                    assert!(store.record_success(job_id, 1, &state).await.unwrap());
                }
                started.elapsed()
            }
        })
    });
    group.finish();

    let thousand = page(1_000);
    let mut group = c.benchmark_group("parse throughput");
    group.throughput(Throughput::Bytes(thousand.len() as u64));
    group.bench_function("1,000-study page", |b| {
        b.iter(|| parse_page(std::hint::black_box(&thousand)).unwrap())
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).sample_size(30);
    targets = cpu
}
criterion_main!(benches);
