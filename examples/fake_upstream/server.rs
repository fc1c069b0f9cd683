//! A simulated upstream speaking the ClinicalTrials.gov API v2 `/api/v2/studies` format (with paging)
//! and the Anthropic Messages format (`/v1/messages`), with configurable latency and jitter, a rate
//! limit answered with 429 + `Retry-After`, and an error rate. Used by the benchmarks and by people
//! (`cargo run --release --example fake_upstream -- --help`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde_json::{Value, json};

use super::studies::studies_for;

/// How the fake behaves.
#[derive(Debug, Clone)]
pub struct FakeConfig {
    pub latency: Duration,
    /// Added to `latency`, uniformly at random in `[0, jitter]`.
    pub jitter: Duration,
    /// Requests a minute before answering 429; `None` = unlimited.
    pub rate_limit_per_minute: Option<u32>,
    /// Share of requests answered with 500.
    pub error_rate: f64,
    /// Studies per query term.
    pub trials: usize,
}

/// What the fake saw; read by benchmarks.
#[derive(Debug, Default)]
pub struct FakeStats {
    pub studies_requests: AtomicU64,
    pub messages_requests: AtomicU64,
    pub rate_limited: AtomicU64,
    pub errors: AtomicU64,
}

struct Shared {
    config: FakeConfig,
    limiter: Option<DefaultDirectRateLimiter>,
    stats: Arc<FakeStats>,
}

/// Starts the fake on `addr` (port 0 picks one); returns the bound address and its counters.
pub async fn start(
    addr: SocketAddr,
    config: FakeConfig,
) -> std::io::Result<(SocketAddr, Arc<FakeStats>)> {
    let stats = Arc::new(FakeStats::default());
    let limiter = config
        .rate_limit_per_minute
        .and_then(NonZeroU32::new)
        .map(|per_minute| {
            // Like a real server, allow about a second's worth of burst.
            let burst = NonZeroU32::new(per_minute.get().div_ceil(60)).unwrap_or(NonZeroU32::MIN);
            RateLimiter::direct(Quota::per_minute(per_minute).allow_burst(burst))
        });
    let shared = Arc::new(Shared {
        config,
        limiter,
        stats: stats.clone(),
    });
    let app = Router::new()
        .route("/api/v2/studies", get(studies))
        .route("/v1/messages", post(messages))
        .with_state(shared);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((bound, stats))
}

/// Latency, then the rate limit and the error rate; `Some` is the response to send instead.
async fn gate(shared: &Shared) -> Option<Response> {
    let jitter = shared.config.jitter.mul_f64(rand::random::<f64>());
    tokio::time::sleep(shared.config.latency + jitter).await;
    if let Some(limiter) = &shared.limiter
        && let Err(not_until) = limiter.check()
    {
        shared.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
        let wait = not_until.wait_time_from(governor::clock::Clock::now(
            &governor::clock::DefaultClock::default(),
        ));
        let mut headers = HeaderMap::new();
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        headers.insert("retry-after", HeaderValue::from(seconds.max(1)));
        return Some(
            (
                StatusCode::TOO_MANY_REQUESTS,
                headers,
                "rate limit exceeded",
            )
                .into_response(),
        );
    }
    if rand::random::<f64>() < shared.config.error_rate {
        shared.stats.errors.fetch_add(1, Ordering::Relaxed);
        return Some((StatusCode::INTERNAL_SERVER_ERROR, "injected error").into_response());
    }
    None
}

async fn studies(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    shared
        .stats
        .studies_requests
        .fetch_add(1, Ordering::Relaxed);
    if let Some(refusal) = gate(&shared).await {
        return refusal;
    }
    let Some(term) = query.get("query.term") else {
        return (StatusCode::BAD_REQUEST, "query.term is required").into_response();
    };
    let page_size: usize = query
        .get("pageSize")
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
        .clamp(1, 1_000);
    let offset: usize = match query
        .get("pageToken")
        .map(|t| t.strip_prefix("tok-").and_then(|s| s.parse().ok()))
    {
        None => 0,
        Some(Some(offset)) => offset,
        Some(None) => return (StatusCode::BAD_REQUEST, "invalid pageToken").into_response(),
    };
    let total = shared.config.trials;
    let page: Vec<Value> = studies_for(term, total)
        .into_iter()
        .skip(offset)
        .take(page_size)
        .collect();
    let mut body = json!({ "studies": page });
    if offset == 0 && query.get("countTotal").map(String::as_str) == Some("true") {
        body["totalCount"] = json!(total);
    }
    if offset + page_size < total {
        body["nextPageToken"] = json!(format!("tok-{}", offset + page_size));
    }
    Json(body).into_response()
}

async fn messages(State(shared): State<Arc<Shared>>, Json(request): Json<Value>) -> Response {
    shared
        .stats
        .messages_requests
        .fetch_add(1, Ordering::Relaxed);
    if let Some(refusal) = gate(&shared).await {
        return refusal;
    }
    let prompt = request["messages"][0]["content"]
        .as_str()
        .unwrap_or_default();
    let trials = prompt.lines().filter(|l| l.starts_with("- NCT")).count();
    let mutation = prompt
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("Mutation: ");
    Json(json!({
        "id": "msg_fake", "type": "message", "role": "assistant",
        "model": request["model"],
        "content": [{ "type": "text", "text": format!("## Overview\n{trials} trials for {mutation}.\n") }],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": { "input_tokens": prompt.len() / 4, "output_tokens": 20,
                   "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0 }
    }))
    .into_response()
}
