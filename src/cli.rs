//! The command line: parses nothing itself beyond clap, runs one command, and turns errors into
//! messages that say what failed and what to do, and exit codes (0 all good, 1 some job did not
//! succeed or nothing was found, 2 bad input or configuration).

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing_subscriber::EnvFilter;

use crate::config::{Config, Overrides, SummarizerKind, WorkerOverrides};
use crate::db::{NewBatch, Store};
use crate::input::{self, InputError};
use crate::report::{self, Counts};
use crate::worker::{self, App, Drain};

/// Match genetic mutations to clinical trials, nightly, durably.
#[derive(Debug, Parser)]
#[command(name = "trialmatch", version, about, long_about = None)]
pub struct Cli {
    /// Configuration file (default: ./trialmatch.toml when present).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Database URL: sqlite://PATH or postgres://… (default: sqlite://trialmatch.db).
    #[arg(long, global = true, value_name = "URL")]
    pub database_url: Option<String>,
    /// Summarizer: offline (default without ANTHROPIC_API_KEY) or anthropic.
    #[arg(long, global = true, value_enum)]
    pub summarizer: Option<SummarizerKind>,
    /// More log output (-v: debug); TRIALMATCH_LOG takes a full filter.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The main job: enqueue the mutations, work until they are done, print their summaries and a table.
    Run {
        #[command(flatten)]
        mutations: MutationArgs,
        /// Jobs run at once.
        #[arg(long)]
        concurrency: Option<usize>,
        /// Print only the table, not the summaries.
        #[arg(long)]
        no_summaries: bool,
        /// Summarize again even when a mutation's trials have not changed.
        #[arg(long)]
        force_summarize: bool,
    },
    /// Put one job per mutation into the queue (one transaction: all or none).
    Enqueue {
        #[command(flatten)]
        mutations: MutationArgs,
    },
    /// Take jobs from the queue until Ctrl-C / SIGTERM, or with --drain until none is left.
    Work {
        /// Exit when no job is left to run.
        #[arg(long)]
        drain: bool,
        /// Jobs run at once.
        #[arg(long)]
        concurrency: Option<usize>,
        /// Summarize again even when a mutation's trials have not changed.
        #[arg(long)]
        force_summarize: bool,
    },
    /// Per-mutation state of a batch (the latest by default).
    Status {
        /// A batch id, as printed by `enqueue` or `run`.
        batch_id: Option<String>,
    },
    /// Print the latest stored summary (markdown) of a mutation.
    Summary {
        /// The mutation, e.g. "BRAF V600E" (case does not matter).
        mutation: String,
    },
    /// Print the effective configuration, secrets redacted.
    Config,
}

#[derive(Debug, Args)]
pub struct MutationArgs {
    /// Mutations, e.g. "BRAF V600E" "EGFR L858R".
    pub mutations: Vec<String>,
    /// A file with one mutation a line ('#' comments and blank lines ignored); '-' reads stdin.
    #[arg(long, short, value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// Name the batch: enqueueing the same name again adds nothing (an idempotency key).
    #[arg(long, alias = "idempotency-key", value_name = "NAME")]
    pub batch_name: Option<String>,
}

/// An error the user caused and can fix: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

/// Runs the command line; the exit code says how it went.
pub fn main(cli: Cli) -> ExitCode {
    // A `.env` next to the user's work is a common way to keep settings; real variables win.
    if let Err(e) = dotenvy::dotenv()
        && !e.not_found()
    {
        eprintln!("error: could not read .env: {e}");
        return ExitCode::from(2);
    }
    init_tracing(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            let usage = e.downcast_ref::<UsageError>().is_some()
                || e.downcast_ref::<InputError>().is_some()
                || e.downcast_ref::<crate::config::ConfigError>().is_some();
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

fn init_tracing(cli: &Cli) {
    let default = match (&cli.command, cli.verbose) {
        (_, 1) => "info,trialmatch=debug",
        (_, 2..) => "debug",
        (Command::Work { .. }, 0) => "warn,trialmatch=info",
        (_, 0) => "warn",
    };
    let filter = std::env::var("TRIALMATCH_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let concurrency = match &cli.command {
        Command::Run { concurrency, .. } | Command::Work { concurrency, .. } => *concurrency,
        _ => None,
    };
    let force_summarize = match &cli.command {
        Command::Run {
            force_summarize, ..
        }
        | Command::Work {
            force_summarize, ..
        } => force_summarize.then_some(true),
        _ => None,
    };
    let overrides = Overrides {
        force_summarize,
        database_url: cli.database_url.clone(),
        summarizer: cli.summarizer,
        worker: concurrency.map(|c| WorkerOverrides {
            concurrency: Some(c),
        }),
    };
    let config = Config::load(cli.config.as_deref(), &overrides)?;
    match cli.command {
        Command::Config => {
            print!("{}", config.to_redacted_toml());
            Ok(ExitCode::SUCCESS)
        }
        Command::Enqueue { mutations } => {
            let batch = read_batch(&mutations, &config)?;
            let store = open_store(&config).await?;
            let enqueued = store.enqueue_batch(&batch).await?;
            if enqueued.already_existed {
                println!(
                    "batch {} exists already ({} jobs); nothing enqueued",
                    enqueued.batch_id, enqueued.job_count
                );
            } else {
                println!(
                    "enqueued {} jobs as batch {}",
                    enqueued.job_count, enqueued.batch_id
                );
            }
            store.close().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Work { drain, .. } => {
            let store = open_store(&config).await?;
            let app = Arc::new(App::new(&config, store.clone())?);
            let stop_on_drain = drain.then(|| {
                worker::until_drained(
                    store.clone(),
                    None,
                    config.worker.poll_interval().max(Duration::from_millis(50)),
                    Drain::UntilOnlyDeferredLeft,
                )
            });
            let stop = async move {
                match stop_on_drain {
                    Some(drained) => {
                        tokio::select! { _ = drained => {}, _ = worker::shutdown_signal() => {} }
                    }
                    None => worker::shutdown_signal().await,
                }
            };
            worker::run_worker(app, stop).await?;
            let backlog = store.backlog(None).await?;
            let deferred = report_deferred(&store, None).await?;
            store.close().await;
            let others = backlog.unfinished - deferred as i64;
            if others > 0 {
                eprintln!(
                    "stopped with {others} job(s) not finished; they stay in the queue for the next worker"
                );
            }
            // A drain that ends with jobs still waiting on an outage did not do its work.
            Ok(if drain && deferred > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Run {
            mutations,
            no_summaries,
            ..
        } => run(&mutations, no_summaries, &config).await,
        Command::Status { batch_id } => {
            let store = open_store(&config).await?;
            let batch_id = resolve_batch(&store, batch_id).await?;
            let rows = store.batch_jobs(&batch_id).await?;
            println!("batch {batch_id}: {}", Counts::of(&rows).line());
            println!("{}", report::status_table(&rows));
            store.close().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Summary { mutation } => {
            let mutation = input::normalize_mutation(&mutation, "the mutation")?;
            let store = open_store(&config).await?;
            let summary = store.latest_summary(&mutation).await?;
            store.close().await;
            match summary {
                Some(summary) => {
                    if summary.stop_reason.as_deref() == Some("max_tokens") {
                        eprintln!(
                            "note: this summary was cut short (the model reached max_tokens)"
                        );
                    }
                    print!("{}", summary.body);
                    Ok(ExitCode::SUCCESS)
                }
                None => {
                    eprintln!(
                        "no summary stored for \"{mutation}\"; run: trialmatch run \"{mutation}\""
                    );
                    Ok(ExitCode::from(1))
                }
            }
        }
    }
}

/// The main job: enqueue, work until the batch is done, print summaries and the table.
async fn run(
    mutations: &MutationArgs,
    no_summaries: bool,
    config: &Config,
) -> anyhow::Result<ExitCode> {
    let batch = read_batch(mutations, config)?;
    let store = open_store(config).await?;
    let app = Arc::new(App::new(config, store.clone())?);
    let enqueued = store.enqueue_batch(&batch).await?;
    let batch_id = enqueued.batch_id.clone();

    let progress = progress_bar(enqueued.job_count as u64);
    let progress_task = tokio::spawn(follow_progress(
        store.clone(),
        batch_id.clone(),
        progress.clone(),
    ));
    let poll = config.worker.poll_interval().max(Duration::from_millis(50));
    let drained = worker::until_drained(
        store.clone(),
        Some(batch_id.clone()),
        poll,
        Drain::UntilOnlyDeferredLeft,
    );
    let stop = async move {
        tokio::select! { _ = drained => {}, _ = worker::shutdown_signal() => {} }
    };
    worker::run_worker(app, stop).await?;
    progress_task.abort();
    progress.finish_and_clear();

    let rows = store.batch_jobs(&batch_id).await?;
    if !no_summaries {
        for row in &rows {
            if let Some(summary) = store.job_summary(&row.id).await? {
                println!("{}", summary.body.trim_end());
                println!();
            }
        }
    }
    let counts = Counts::of(&rows);
    println!("batch {batch_id}: {}", counts.line());
    println!("{}", report::status_table(&rows));
    let deferred = report_deferred(&store, Some(&batch_id)).await?;
    store.close().await;
    if counts.all_succeeded() {
        Ok(ExitCode::SUCCESS)
    } else {
        if counts.finished() + deferred < counts.total() {
            eprintln!("interrupted: run `trialmatch work --drain` to finish the rest of the batch");
        }
        Ok(ExitCode::from(1))
    }
}

/// Says which jobs wait on an open circuit breaker, and why; returns how many.
async fn report_deferred(store: &Store, batch_id: Option<&str>) -> anyhow::Result<usize> {
    let deferred = store.deferred_jobs(batch_id).await?;
    if !deferred.is_empty() {
        eprintln!(
            "{} job(s) wait because an upstream service refuses calls; they stay queued and run when it recovers \
             (`trialmatch work` keeps trying):",
            deferred.len()
        );
        for job in &deferred {
            let next = job
                .next_attempt_at
                .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                .unwrap_or_default();
            eprintln!(
                "  {}: {} (next try {next})",
                job.mutation,
                job.reason.as_deref().unwrap_or("deferred")
            );
        }
    }
    Ok(deferred.len())
}

fn progress_bar(total: u64) -> ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(total), target);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} mutations {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

async fn follow_progress(store: Store, batch_id: String, bar: ProgressBar) {
    loop {
        if let Ok(states) = store.batch_state_counts(&batch_id).await {
            let counts = Counts::from_state_counts(states.iter().map(|(s, n)| (s.as_str(), *n)));
            bar.set_position(counts.finished() as u64);
            let problems = counts.failed + counts.dead;
            bar.set_message(if problems > 0 {
                format!("({problems} failed)")
            } else {
                String::new()
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn open_store(config: &Config) -> anyhow::Result<Store> {
    Store::connect(&config.database_url)
        .await
        .context("opening the database failed; check database_url (`trialmatch config` shows it)")
}

async fn resolve_batch(store: &Store, batch_id: Option<String>) -> anyhow::Result<String> {
    match batch_id {
        Some(id) if store.batch_exists(&id).await? => Ok(id),
        Some(id) => bail!(UsageError(format!(
            "no batch with id {id}; `trialmatch status` shows the latest"
        ))),
        None => match store.latest_batch_id().await? {
            Some(id) => Ok(id),
            None => bail!(UsageError(
                "no batches yet; enqueue some with `trialmatch enqueue` or `trialmatch run`".into()
            )),
        },
    }
}

/// Reads and checks every mutation before anything touches the database.
fn read_batch(args: &MutationArgs, config: &Config) -> anyhow::Result<NewBatch> {
    let mut mutations = input::mutations_from_args(&args.mutations)?;
    if let Some(path) = &args.file {
        mutations.extend(input::mutations_from_file(
            &read_source(path)?,
            &display_name(path),
        )?);
    }
    if mutations.is_empty() {
        return Err(InputError::NothingGiven.into());
    }
    let (mutations, repeats) = input::dedupe(mutations);
    if !repeats.is_empty() {
        eprintln!(
            "note: {} repeated mutation(s) left out: {}",
            repeats.len(),
            repeats.join(", ")
        );
    }
    let name = match &args.batch_name {
        Some(name) if name.trim().is_empty() => {
            bail!(UsageError("--batch-name must not be empty".into()))
        }
        Some(name) => Some(
            input::normalize_mutation(name, "--batch-name")
                .map_err(|e| UsageError(e.to_string()))?,
        ),
        None => None,
    };
    Ok(NewBatch {
        name,
        mutations,
        max_attempts: config.worker.max_attempts,
    })
}

fn read_source(path: &Path) -> anyhow::Result<Vec<u8>> {
    if path == Path::new("-") {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .map_err(|e| UsageError(format!("could not read standard input: {e}")))?;
        return Ok(bytes);
    }
    std::fs::read(path).map_err(|e| {
        UsageError(format!(
            "could not read the mutation file {}: {e}",
            path.display()
        ))
        .into()
    })
}

fn display_name(path: &Path) -> String {
    if path == Path::new("-") {
        "standard input".to_owned()
    } else {
        path.display().to_string()
    }
}
