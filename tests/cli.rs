//! The `trialmatch` binary run end to end against a fake ClinicalTrials.gov.

mod common;

use std::path::Path;

use assert_cmd::Command;
use common::*;
use predicates::prelude::*;

/// The binary, configured only through the environment, in its own working directory.
fn trialmatch(dir: &Path, ctgov_uri: &str) -> Command {
    let mut cmd = Command::cargo_bin("trialmatch").unwrap();
    cmd.current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("TRIALMATCH_CTGOV__BASE_URL", format!("{ctgov_uri}/api/v2"))
        .env("TRIALMATCH_WORKER__POLL_INTERVAL_MS", "20")
        .env("TRIALMATCH_CTGOV__RATE_LIMIT_PER_MINUTE", "0")
        .env("TRIALMATCH_CTGOV__BACKOFF_BASE_MS", "1")
        .env("TRIALMATCH_CTGOV__BACKOFF_MAX_MS", "10")
        .env("TRIALMATCH_LOG", "warn");
    cmd
}

/// How many jobs the default database in `dir` holds (0 when it was never created).
fn jobs_in(dir: &Path) -> i64 {
    let path = dir.join("trialmatch.db");
    if !path.exists() {
        return 0;
    }
    let out = std::process::Command::new("python3")
        .args(["-c", "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from tm_jobs').fetchone()[0])"])
        .arg(&path)
        .output()
        .expect("python3 runs");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_prints_summaries_and_a_table_and_stores_them() {
    let server = fake_ctgov(FakeStudies::new(4).with_count("KRAS G12C", 0)).await;
    let dir = tempfile::tempdir().unwrap();
    let uri = server.uri();
    let path = dir.path().to_owned();
    let output = tokio::task::spawn_blocking(move || {
        trialmatch(&path, &uri)
            .args(["run", "BRAF V600E", "EGFR L858R", "KRAS G12C"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("# Clinical trials for BRAF V600E"),
        "{stdout}"
    );
    assert!(
        stdout.contains("# Clinical trials for EGFR L858R"),
        "{stdout}"
    );
    assert!(stdout.contains("No trials found"), "{stdout}");
    assert!(stdout.contains("3 jobs: 3 succeeded"), "{stdout}");
    assert!(
        dir.path().join("trialmatch.db").exists(),
        "the default database is created in the working directory"
    );

    let uri = server.uri();
    let path = dir.path().to_owned();
    tokio::task::spawn_blocking(move || {
        trialmatch(&path, &uri)
            .args(["summary", "braf   v600e"])
            .assert()
            .success()
            .stdout(predicate::str::starts_with(
                "# Clinical trials for BRAF V600E",
            ));
        trialmatch(&path, &uri)
            .arg("status")
            .assert()
            .success()
            .stdout(
                predicate::str::contains("EGFR L858R").and(predicate::str::contains("succeeded")),
            );
        trialmatch(&path, &uri)
            .args(["summary", "NRAS Q61K"])
            .assert()
            .code(1)
            .stderr(predicate::str::contains(
                "no summary stored for \"NRAS Q61K\"",
            ));
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_from_a_file_then_work_drains_the_queue() {
    let server = fake_ctgov(FakeStudies::new(2)).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("mutations.txt"),
        "# nightly\nBRAF V600E\n\nEGFR L858R  # common\n",
    )
    .unwrap();
    let uri = server.uri();
    let path = dir.path().to_owned();
    tokio::task::spawn_blocking(move || {
        trialmatch(&path, &uri)
            .args(["enqueue", "--file", "mutations.txt"])
            .assert()
            .success()
            .stdout(predicate::str::contains("enqueued 2 jobs"));
        trialmatch(&path, &uri)
            .args(["enqueue", "-f", "-"])
            .write_stdin("KRAS G12C\n")
            .assert()
            .success();
        trialmatch(&path, &uri)
            .args(["work", "--drain"])
            .assert()
            .success();
        trialmatch(&path, &uri)
            .args(["summary", "EGFR L858R"])
            .assert()
            .success()
            .stdout(predicate::str::contains("**2 trials found**"));
    })
    .await
    .unwrap();
    assert_eq!(jobs_in(dir.path()), 3);
}

#[test]
fn bad_input_is_refused_with_a_clear_error_and_nothing_enqueued() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("empty.txt"), "").unwrap();
    std::fs::write(d.join("comments.txt"), "# nothing\n\n").unwrap();
    std::fs::write(d.join("latin1.txt"), b"BRAF V600E\nKRAS G12\xe9\n").unwrap();
    std::fs::write(
        d.join("one-bad.txt"),
        format!("BRAF V600E\n{}\n", "X".repeat(201)),
    )
    .unwrap();
    let long = "A".repeat(201);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["enqueue", ""], "argument 1: the mutation is empty"),
        (
            vec!["enqueue", "BRAF V600E", "   "],
            "argument 2: the mutation is empty",
        ),
        (vec!["enqueue", &long], "at most 200 are allowed"),
        (
            vec!["enqueue", "BRAF\u{1b}[31mV600E"],
            "control character (U+001B)",
        ),
        (vec!["enqueue"], "no mutations given"),
        (
            vec!["enqueue", "--file", "empty.txt"],
            "empty.txt: no mutations found",
        ),
        (
            vec!["enqueue", "--file", "comments.txt"],
            "comments.txt: no mutations found",
        ),
        (
            vec!["enqueue", "--file", "missing.txt"],
            "could not read the mutation file missing.txt",
        ),
        (
            vec!["enqueue", "--file", "latin1.txt"],
            "latin1.txt line 2: not valid UTF-8",
        ),
        (
            vec!["enqueue", "--file", "one-bad.txt"],
            "one-bad.txt line 2",
        ),
        (
            vec!["run", "BRAF V600E", ""],
            "argument 2: the mutation is empty",
        ),
    ];
    for (args, message) in cases {
        trialmatch(d, "http://127.0.0.1:9")
            .args(&args)
            .assert()
            .code(2)
            .stderr(predicate::str::contains(message).and(predicate::str::starts_with("error: ")));
        assert_eq!(jobs_in(d), 0, "{args:?} enqueued something");
    }
}

#[test]
fn bad_configuration_is_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    trialmatch(dir.path(), "http://127.0.0.1:9")
        .env("TRIALMATCH_WORKER__CONCURRENCY", "0")
        .args(["enqueue", "BRAF V600E"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("worker.concurrency"));
    trialmatch(dir.path(), "http://127.0.0.1:9")
        .args(["--summarizer", "anthropic", "run", "BRAF V600E"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("ANTHROPIC_API_KEY"));
    assert!(!dir.path().join("trialmatch.db").exists());
}

#[test]
fn config_prints_the_effective_settings_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    trialmatch(dir.path(), "http://127.0.0.1:9")
        .env("ANTHROPIC_API_KEY", "sk-ant-api03-secret-value")
        .env(
            "TRIALMATCH_DATABASE_URL",
            "postgres://trialmatch:s3cret-pw@db.internal/trials",
        )
        .arg("config")
        .assert()
        .success()
        .stdout(
            predicate::str::contains("sk-ant-api03-secret-value")
                .not()
                .and(predicate::str::contains("s3cret-pw").not())
                .and(predicate::str::contains("effective summarizer: anthropic"))
                .and(predicate::str::contains(
                    "base_url = \"http://127.0.0.1:9/api/v2\"",
                )),
        );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_exits_non_zero_when_a_job_fails() {
    let server = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::path("/api/v2/studies"))
        .respond_with(wiremock::ResponseTemplate::new(404).set_body_string("not found"))
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let uri = server.uri();
    let path = dir.path().to_owned();
    tokio::task::spawn_blocking(move || {
        trialmatch(&path, &uri)
            .args(["run", "BRAF V600E"])
            .assert()
            .code(1)
            .stdout(
                predicate::str::contains("1 job: 1 failed")
                    .and(predicate::str::contains("HTTP 404")),
            );
    })
    .await
    .unwrap();
}
