//! Queue overhead, measured side by side in one run: near-no-op jobs per second through the real
//! queue with 0 and 100,000 finished jobs of history.
//!
//! - apalis alone (a no-op handler), SQLite with apalis's own indexes ("apalis default") and with
//!   trialmatch's fix (`LIdx` dropped), history locked by the same worker name; Postgres likewise.
//! - trialmatch's whole job path (claim, flow, results, ack) with an upstream that answers at once
//!   with no trials, on SQLite and Postgres, with 0 and 100,000 finished jobs in our tables.
//!
//! Run: `TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres cargo bench --bench queue`
//! (without the URL only the SQLite rows are printed).

#[path = "../examples/fake_upstream/server.rs"]
mod server;
#[path = "../examples/fake_upstream/studies.rs"]
mod studies;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use apalis::prelude::{BoxDynError, Data, TaskSink, WorkerBuilder, WorkerBuilderExt};
use apalis_core::backend::ext::BackendExt;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use tokio::sync::Notify;
use trialmatch::config::Config;
use trialmatch::db::{NewBatch, Store};
use trialmatch::worker::{self, App, Drain};

const HISTORY: i64 = 100_000;
const WORKER: &str = "bench-worker";
const QUEUE: &str = "bench.noop";

struct Counter {
    done: AtomicUsize,
    target: usize,
    finished: Notify,
}

async fn noop(_job: u32, counter: Data<Arc<Counter>>) -> Result<(), BoxDynError> {
    if counter.done.fetch_add(1, Ordering::SeqCst) + 1 == counter.target {
        counter.finished.notify_one();
    }
    Ok(())
}

fn counter(target: usize) -> Arc<Counter> {
    Arc::new(Counter {
        done: AtomicUsize::new(0),
        target,
        finished: Notify::new(),
    })
}

async fn until_done(counter: Arc<Counter>) -> Result<(), std::io::Error> {
    counter.finished.notified().await;
    Ok(())
}

/// apalis alone on SQLite: `n` no-op jobs; `history` finished rows locked by the same worker name.
async fn apalis_sqlite(history: i64, drop_lidx: bool, n: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let options = SqliteConnectOptions::new()
        .filename(dir.path().join("q.db"))
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(30));
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .unwrap();
    apalis_sqlite::SqliteStorage::setup(&pool).await.unwrap();
    if drop_lidx {
        sqlx::query("DROP INDEX IF EXISTS LIdx")
            .execute(&pool)
            .await
            .unwrap();
    }
    if history > 0 {
        // A worker of the same name that ran long ago (stale, so the new one may register).
        sqlx::query("INSERT INTO Workers (id, worker_type, storage_name, layers, last_seen) VALUES ($1, $2, 'SqliteStorage', '', 0)")
            .bind(WORKER)
            .bind(QUEUE)
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $1)
             INSERT INTO Jobs (job, id, job_type, status, attempts, max_attempts, run_at, lock_by, lock_at, done_at, priority, metadata)
             SELECT X'30', printf('h%08d', i), $2, 'Done', 1, 3, 0, $3, 0, 0, 0, '{}' FROM n",
        )
        .bind(history)
        .bind(QUEUE)
        .bind(WORKER)
        .execute(&pool)
        .await
        .unwrap();
    }
    let mut storage = apalis_sqlite::SqliteStorage::<u32>::new(&pool).with_config(
        apalis_sqlite::Config::default()
            .queue(QUEUE)
            .batch_size(100),
    );
    storage.push_bulk((0..n as u32).collect()).await.unwrap();
    let counter = counter(n);
    let started = Instant::now();
    WorkerBuilder::new(WORKER)
        .backend(storage.poll_with_interval(Duration::from_millis(10)))
        .data(counter.clone())
        .concurrency(64)
        .build(noop)
        .run_until(until_done(counter))
        .await
        .unwrap();
    n as f64 / started.elapsed().as_secs_f64()
}

/// apalis alone on Postgres.
async fn apalis_postgres(url: &str, history: i64, n: usize) -> f64 {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    apalis_postgres::PostgresStorage::setup(&pool)
        .await
        .unwrap();
    if history > 0 {
        sqlx::query("INSERT INTO apalis.workers (id, worker_type, storage_name, layers, last_seen) VALUES ($1, $2, 'PostgresStorage', '', to_timestamp(0))")
            .bind(WORKER)
            .bind(QUEUE)
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO apalis.jobs (job, id, job_type, status, attempts, max_attempts, run_at, lock_by, lock_at, done_at, priority)
             SELECT '\\x30'::bytea, 'h' || i, $2, 'Done', 1, 3, now(), $3, now(), now(), 0 FROM generate_series(1, $1) AS i",
        )
        .bind(history)
        .bind(QUEUE)
        .bind(WORKER)
        .execute(&pool)
        .await
        .unwrap();
    }
    let mut storage = apalis_postgres::PostgresStorage::<u32>::new(&pool).with_config(
        apalis_postgres::Config::default()
            .queue(QUEUE)
            .batch_size(100),
    );
    storage.push_bulk((0..n as u32).collect()).await.unwrap();
    let counter = counter(n);
    let started = Instant::now();
    WorkerBuilder::new(WORKER)
        .backend(storage.poll_with_interval(Duration::from_millis(10)))
        .data(counter.clone())
        .concurrency(64)
        .build(noop)
        .run_until(until_done(counter))
        .await
        .unwrap();
    n as f64 / started.elapsed().as_secs_f64()
}

/// trialmatch's whole job path with an instant upstream that finds no trials.
async fn trialmatch_path(url: &str, upstream: &str, history: i64, n: usize) -> f64 {
    let store = Store::connect(url).await.unwrap();
    if history > 0 {
        seed_finished_jobs(&store, history).await;
    }
    let mut config = Config {
        database_url: url.to_owned(),
        ..Config::default()
    };
    config.ctgov.base_url = format!("{upstream}/api/v2");
    config.ctgov.rate_limit_per_minute = 0;
    config.ctgov.max_in_flight = 64;
    config.worker.concurrency = 64;
    config.worker.poll_interval_ms = 10;
    let batch = NewBatch {
        name: None,
        mutations: (0..n).map(|i| format!("NOOP{i}")).collect(),
        max_attempts: 3,
    };
    store.enqueue_batch(&batch).await.unwrap();
    let app = Arc::new(App::new(&config, store.clone()).unwrap());
    let started = Instant::now();
    let stop = worker::until_drained(
        store.clone(),
        None,
        Duration::from_millis(5),
        Drain::UntilFinished,
    );
    worker::run_worker(app, stop).await.unwrap();
    let rate = n as f64 / started.elapsed().as_secs_f64();
    store.close().await;
    rate
}

/// `count` finished jobs with a summary each, as months of nightly runs leave them.
async fn seed_finished_jobs(store: &Store, count: i64) {
    match store {
        Store::Sqlite(pool) => {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "INSERT INTO tm_batches (id, created_at, mutation_count) VALUES ('history', '2026-01-01T00:00:00Z', {count});
                 WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {count})
                 INSERT INTO tm_jobs (id, batch_id, position, mutation, state, attempts, max_attempts, delivery, created_at, finished_at)
                 SELECT printf('old%08d', i), 'history', i, printf('GENE%d V600E', i), 'succeeded', 1, 5, 1,
                        '2026-01-01T00:00:00Z', '2026-01-01T00:00:01Z' FROM n;
                 INSERT INTO tm_summaries (job_id, mutation, summarizer, body, trial_count, fingerprint, created_at, prompt_version)
                 SELECT id, mutation, 'offline', 'old', 0, 'x', finished_at, 'offline-1' FROM tm_jobs WHERE batch_id = 'history';"
            )))
            .execute(pool)
            .await
            .unwrap();
        }
        Store::Postgres(pool) => {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "INSERT INTO tm_batches (id, created_at, mutation_count) VALUES ('history', '2026-01-01T00:00:00Z', {count});
                 INSERT INTO tm_jobs (id, batch_id, position, mutation, state, attempts, max_attempts, delivery, created_at, finished_at)
                 SELECT 'old' || i, 'history', i, 'GENE' || i || ' V600E', 'succeeded', 1, 5, 1,
                        '2026-01-01T00:00:00Z', '2026-01-01T00:00:01Z' FROM generate_series(1, {count}) AS i;
                 INSERT INTO tm_summaries (job_id, mutation, summarizer, body, trial_count, fingerprint, created_at, prompt_version)
                 SELECT id, mutation, 'offline', 'old', 0, 'x', finished_at, 'offline-1' FROM tm_jobs WHERE batch_id = 'history';"
            )))
            .execute(pool)
            .await
            .unwrap();
        }
    }
}

/// A fresh Postgres database for one measurement, or `None` without `TEST_DATABASE_URL`.
async fn postgres_db(admin: Option<&str>) -> Option<String> {
    let admin = admin?;
    let name = format!(
        "trialmatch_bench_{}",
        ulid::Ulid::new().to_string().to_lowercase()
    );
    let pool = sqlx::PgPool::connect(admin).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&pool)
        .await
        .unwrap();
    let mut url = url::Url::parse(admin).unwrap();
    url.set_path(&name);
    Some(url.to_string())
}

async fn drop_postgres_dbs(admin: Option<&str>) {
    let Some(admin) = admin else { return };
    let pool = sqlx::PgPool::connect(admin).await.unwrap();
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT datname FROM pg_database WHERE datname LIKE 'trialmatch_bench_%'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for name in names {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&pool)
        .await;
    }
}

fn sqlite_url(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}", dir.path().join("tm.db").display())
}

#[tokio::main]
async fn main() {
    let admin = std::env::var("TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty());
    let admin = admin.as_deref();
    println!(
        "# Queue overhead ({} cores), history = {HISTORY} finished jobs",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!("\n## apalis alone, no-op handler, concurrency 64, batch 100");
    println!(
        "| backend | variant | jobs | jobs/s, no history | jobs/s, with history | with / without |"
    );
    println!("|---|---|---|---|---|---|");
    for (variant, drop_lidx, n_history) in [
        ("apalis default (LIdx)", false, 300),
        ("trialmatch (LIdx dropped)", true, 5_000),
    ] {
        let fresh = apalis_sqlite(0, drop_lidx, 5_000).await;
        let old = apalis_sqlite(HISTORY, drop_lidx, n_history).await;
        println!(
            "| SQLite | {variant} | 5000 / {n_history} | {fresh:.0} | {old:.0} | {:.2} |",
            old / fresh
        );
    }
    if let Some(url) = postgres_db(admin).await {
        let fresh = apalis_postgres(&url, 0, 20_000).await;
        let url2 = postgres_db(admin).await.unwrap();
        let old = apalis_postgres(&url2, HISTORY, 20_000).await;
        println!(
            "| Postgres | apalis default | 20000 | {fresh:.0} | {old:.0} | {:.2} |",
            old / fresh
        );
    }

    let (addr, _stats) = server::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        server::FakeConfig {
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
            rate_limit_per_minute: None,
            error_rate: 0.0,
            trials: 0,
        },
    )
    .await
    .unwrap();
    let upstream = format!("http://{addr}");
    println!(
        "\n## trialmatch job path (claim, flow with an instant upstream and no trials, results, ack), concurrency 64"
    );
    println!("| backend | jobs | jobs/s, no history | jobs/s, with history | with / without |");
    println!("|---|---|---|---|---|");
    let n = 3_000;
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let fresh = trialmatch_path(&sqlite_url(&a), &upstream, 0, n).await;
    let old = trialmatch_path(&sqlite_url(&b), &upstream, HISTORY, n).await;
    println!(
        "| SQLite | {n} | {fresh:.0} | {old:.0} | {:.2} |",
        old / fresh
    );
    if let (Some(u1), Some(u2)) = (postgres_db(admin).await, postgres_db(admin).await) {
        let fresh = trialmatch_path(&u1, &upstream, 0, n).await;
        let old = trialmatch_path(&u2, &upstream, HISTORY, n).await;
        println!(
            "| Postgres | {n} | {fresh:.0} | {old:.0} | {:.2} |",
            old / fresh
        );
    }
    drop_postgres_dbs(admin).await;
}
