//! End-to-end pipeline benchmarks against the simulated upstream, measured side by side in one run:
//!
//! - efficiency: N mutations, upstream latency L, worker concurrency C ∈ {1, 8, 64, 256}; throughput
//!   against the limit C / L (the upstream has no rate limit here);
//! - rate-limited: the upstream answers 429 above R requests a minute and our client is set to R;
//!   throughput against R, and the 429s received;
//! - memory: peak RSS of `trialmatch work --drain` with 1,000 jobs in flight (L = 2 s, C = 1,000).
//!
//! Run: `cargo bench --bench pipeline` (`BENCH_N` changes N, default 500).

#[path = "../examples/fake_upstream/server.rs"]
mod server;
#[path = "../examples/fake_upstream/studies.rs"]
mod studies;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use server::{FakeConfig, FakeStats, start};
use trialmatch::config::Config;
use trialmatch::db::{NewBatch, Store};
use trialmatch::worker::{self, App, Drain};

fn fake(latency: Duration, rate_limit_per_minute: Option<u32>) -> FakeConfig {
    FakeConfig {
        latency,
        jitter: Duration::ZERO,
        rate_limit_per_minute,
        error_rate: 0.0,
        trials: 10,
    }
}

async fn start_fake(config: FakeConfig) -> (String, Arc<FakeStats>) {
    let (addr, stats) = start(SocketAddr::from(([127, 0, 0, 1], 0)), config)
        .await
        .expect("fake starts");
    (format!("http://{addr}"), stats)
}

fn config(db_url: &str, upstream: &str, concurrency: usize, per_minute: u32) -> Config {
    let mut config = Config {
        database_url: db_url.to_owned(),
        ..Config::default()
    };
    config.ctgov.base_url = format!("{upstream}/api/v2");
    config.ctgov.rate_limit_per_minute = per_minute;
    config.ctgov.max_in_flight = concurrency;
    config.ctgov.pool_max_idle_per_host = concurrency;
    config.worker.concurrency = concurrency;
    config.worker.poll_interval_ms = 20;
    config
}

/// Enqueues `n` mutations and drains them in-process; returns the wall time of the drain.
async fn drain(config: &Config, n: usize) -> Duration {
    let store = Store::connect(&config.database_url)
        .await
        .expect("database");
    let batch = NewBatch {
        name: None,
        mutations: (0..n).map(|i| format!("GENE{i} V{i}E")).collect(),
        max_attempts: 3,
    };
    let enqueued = store.enqueue_batch(&batch).await.expect("enqueue");
    let app = Arc::new(App::new(config, store.clone()).expect("app"));
    let started = Instant::now();
    let stop = worker::until_drained(
        store.clone(),
        None,
        Duration::from_millis(5),
        Drain::UntilFinished,
    );
    worker::run_worker(app, stop).await.expect("worker");
    let elapsed = started.elapsed();
    let rows = store.batch_jobs(&enqueued.batch_id).await.expect("rows");
    assert!(
        rows.iter().all(|r| r.state == "succeeded"),
        "every job succeeded"
    );
    store.close().await;
    elapsed
}

fn temp_db() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    (dir, url)
}

async fn efficiency(n: usize) {
    let latency = Duration::from_millis(100);
    println!(
        "\n## Pipeline efficiency: N = {n}, L = {} ms, offline summaries, SQLite",
        latency.as_millis()
    );
    println!("| C | seconds | jobs/s | limit C/L (jobs/s) | ratio |");
    println!("|---|---|---|---|---|");
    for c in [1usize, 8, 64, 256] {
        let (upstream, _stats) = start_fake(fake(latency, None)).await;
        let (_dir, url) = temp_db();
        // C = 1 at 100 ms is 50 s for 500 jobs; a fifth of the batch measures the same rate.
        let jobs = if c == 1 { n / 5 } else { n };
        let elapsed = drain(&config(&url, &upstream, c, 0), jobs).await;
        let rate = jobs as f64 / elapsed.as_secs_f64();
        let limit = c as f64 / latency.as_secs_f64();
        println!(
            "| {c} | {:.2} | {rate:.1} | {limit:.0} | {:.2} |",
            elapsed.as_secs_f64(),
            rate / limit
        );
    }
}

async fn rate_limited() {
    let per_minute = 600;
    let n = 100;
    let (upstream, stats) = start_fake(fake(Duration::from_millis(20), Some(per_minute))).await;
    let (_dir, url) = temp_db();
    let elapsed = drain(&config(&url, &upstream, 16, per_minute), n).await;
    let rate = n as f64 / elapsed.as_secs_f64() * 60.0;
    println!("\n## Rate-limited: upstream and client at R = {per_minute}/min, N = {n}, C = 16");
    println!("| requests/min | vs R | 429s received | requests |");
    println!("|---|---|---|---|");
    println!(
        "| {rate:.0} | {:.2} | {} | {} |",
        rate / per_minute as f64,
        stats.rate_limited.load(Ordering::Relaxed),
        stats.studies_requests.load(Ordering::Relaxed)
    );
}

/// Peak RSS of the real binary while 1,000 jobs wait on a slow upstream.
async fn memory() {
    let n = 1_000;
    let (upstream, _stats) = start_fake(fake(Duration::from_secs(2), None)).await;
    let (_dir, url) = temp_db();
    let store = Store::connect(&url).await.expect("database");
    let batch = NewBatch {
        name: None,
        mutations: (0..n).map(|i| format!("GENE{i} V{i}E")).collect(),
        max_attempts: 3,
    };
    store.enqueue_batch(&batch).await.expect("enqueue");
    store.close().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_trialmatch"))
        .args(["work", "--drain", "--concurrency", "1000"])
        .env_clear()
        .env("TRIALMATCH_DATABASE_URL", &url)
        .env("TRIALMATCH_CTGOV__BASE_URL", format!("{upstream}/api/v2"))
        .env("TRIALMATCH_CTGOV__RATE_LIMIT_PER_MINUTE", "0")
        .env("TRIALMATCH_CTGOV__MAX_IN_FLIGHT", "1000")
        .env("TRIALMATCH_CTGOV__POOL_MAX_IDLE_PER_HOST", "1000")
        .env("TRIALMATCH_LOG", "error")
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts");
    let pid = child.id().expect("pid");
    let started = Instant::now();
    let mut peak_kb = 0u64;
    loop {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            let hwm = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
            peak_kb = peak_kb.max(hwm.unwrap_or(0));
        }
        if let Ok(Some(status)) = child.try_wait() {
            assert!(status.success());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("\n## Memory: `trialmatch work --drain`, {n} jobs, C = 1000, L = 2 s");
    println!("| peak RSS (MB) | seconds |");
    println!("|---|---|");
    println!(
        "| {:.1} | {:.2} |",
        peak_kb as f64 / 1024.0,
        started.elapsed().as_secs_f64()
    );
}

#[tokio::main]
async fn main() {
    let n = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    println!(
        "# trialmatch pipeline benchmarks ({} cores)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    efficiency(n).await;
    rate_limited().await;
    memory().await;
}
