//! A simulated ClinicalTrials.gov + Anthropic upstream for trying trialmatch and for benchmarks:
//!
//! ```text
//! cargo run --release --example fake_upstream -- --port 8090 --latency-ms 100 --rate-limit 600 \
//!     --error-rate 0.01 --trials 50
//! TRIALMATCH_CTGOV__BASE_URL=http://127.0.0.1:8090/api/v2 trialmatch run "BRAF V600E"
//! ```

mod server;
mod studies;

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

/// A fake ClinicalTrials.gov API v2 (`/api/v2/studies`) and Anthropic Messages API (`/v1/messages`).
#[derive(Debug, Parser)]
struct Args {
    /// Port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 8090)]
    port: u16,
    /// Latency added to every response.
    #[arg(long, default_value_t = 100)]
    latency_ms: u64,
    /// Random extra latency, up to this much.
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Requests a minute before answering 429 with Retry-After (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    rate_limit: u32,
    /// Share of requests answered with 500 (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Studies per query term.
    #[arg(long, default_value_t = 50)]
    trials: usize,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let config = server::FakeConfig {
        latency: Duration::from_millis(args.latency_ms),
        jitter: Duration::from_millis(args.jitter_ms),
        rate_limit_per_minute: (args.rate_limit > 0).then_some(args.rate_limit),
        error_rate: args.error_rate.clamp(0.0, 1.0),
        trials: args.trials,
    };
    let (addr, _stats) =
        server::start(SocketAddr::from(([127, 0, 0, 1], args.port)), config).await?;
    println!(
        "fake upstream on http://{addr}  (ClinicalTrials.gov: http://{addr}/api/v2, Anthropic: http://{addr})"
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}
