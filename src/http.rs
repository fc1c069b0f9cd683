//! The shared HTTP layer: one pooled `reqwest::Client` per upstream service, the classification of
//! failures into retryable and permanent, `Retry-After` parsing and the backoff schedule.
//!
//! Everything here except [`build_client`] is pure, so the retry rules are unit-tested without a network.

use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};

/// `User-Agent` sent to every upstream: honest about who is calling.
pub const USER_AGENT: &str = concat!("trialmatch/", env!("CARGO_PKG_VERSION"));

/// Timeouts and pool sizes of one service's client.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
}

/// Builds the one client a service uses for its whole life; clones share the pool.
pub fn build_client(settings: &ClientSettings) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .connect_timeout(settings.connect_timeout)
        .timeout(settings.request_timeout)
        .pool_idle_timeout(settings.pool_idle_timeout)
        .pool_max_idle_per_host(settings.pool_max_idle_per_host)
        .build()
}

/// Whether trying again can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// A transient fault: timeouts, resets, 429, 5xx, Anthropic's 529.
    Retryable,
    /// Trying again gives the same answer: 4xx other than 429, a body we cannot read.
    Permanent,
    /// The service's circuit breaker is open: try later, without counting an attempt.
    Deferred,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Retryable => "retryable",
            FailureKind::Permanent => "permanent",
            FailureKind::Deferred => "deferred",
        }
    }
}

/// A failed call to an upstream service, classified.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{service}: {message}")]
pub struct UpstreamError {
    pub service: &'static str,
    pub kind: FailureKind,
    /// HTTP status, when the server answered.
    pub status: Option<u16>,
    /// What the server asked us to wait, already capped by the caller's maximum.
    pub retry_after: Option<Duration>,
    pub message: String,
}

impl UpstreamError {
    pub fn permanent(service: &'static str, message: impl Into<String>) -> Self {
        Self {
            service,
            kind: FailureKind::Permanent,
            status: None,
            retry_after: None,
            message: message.into(),
        }
    }

    /// The service is refusing calls (its circuit breaker is open) for `wait` more.
    pub fn deferred(service: &'static str, wait: Duration) -> Self {
        Self {
            service,
            kind: FailureKind::Deferred,
            status: None,
            retry_after: Some(wait),
            message: format!(
                "circuit breaker open after repeated failures; calls resume in {:.0} s",
                wait.as_secs_f64().ceil()
            ),
        }
    }

    /// A transport-level failure (no usable HTTP answer).
    pub fn from_transport(service: &'static str, err: &reqwest::Error) -> Self {
        let what = if err.is_timeout() {
            "timed out"
        } else if err.is_connect() {
            "could not connect"
        } else if err.is_body() || err.is_decode() {
            "connection failed while reading the response body"
        } else {
            "request failed"
        };
        // `without_url` keeps query strings out of messages; our URLs hold no secrets, but
        // error text ends up in the database and logs, so keep it short and predictable.
        let detail = std::error::Error::source(err)
            .map(|s| format!(": {s}"))
            .unwrap_or_default();
        Self {
            service,
            kind: FailureKind::Retryable,
            status: None,
            retry_after: None,
            message: format!("{what}{detail}"),
        }
    }

    /// An HTTP error status, with a short excerpt of the body to say why.
    pub fn from_status(
        service: &'static str,
        status: u16,
        body: &str,
        retry_after: Option<Duration>,
    ) -> Self {
        let kind = classify_status(status, body);
        let excerpt = excerpt(body, 300);
        let advice = match (kind, status) {
            (FailureKind::Permanent, 401 | 403) => " (check the API key and its permissions)",
            (FailureKind::Permanent, 429) => {
                " (a spend or usage limit was reached; raise it or wait)"
            }
            (FailureKind::Permanent, 400) => " (the request was refused as malformed)",
            _ => "",
        };
        Self {
            service,
            kind,
            status: Some(status),
            retry_after,
            message: format!("HTTP {status}{advice}: {excerpt}"),
        }
    }
}

/// Retryable: 408, 429 (unless the body says a spend limit was hit), 500, 502, 503, 504, 529.
pub fn classify_status(status: u16, body: &str) -> FailureKind {
    match status {
        429 if mentions_spend_limit(body) => FailureKind::Permanent,
        408 | 425 | 429 | 500 | 502 | 503 | 504 | 529 => FailureKind::Retryable,
        _ => FailureKind::Permanent,
    }
}

fn mentions_spend_limit(body: &str) -> bool {
    let lower = body.to_ascii_lowercase();
    [
        "spend limit",
        "spending limit",
        "credit balance",
        "billing",
        "quota exceeded",
    ]
    .iter()
    .any(|needle| lower.contains(needle))
}

/// The first `max` characters of a body, on one line.
pub fn excerpt(body: &str, max: usize) -> String {
    let one_line: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= max {
        one_line
    } else {
        let cut: String = one_line.chars().take(max).collect();
        format!("{cut}…")
    }
}

/// `Retry-After` as a delay: either delta-seconds or an HTTP date; `None` when unreadable.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when: DateTime<Utc> = DateTime::parse_from_rfc2822(value)
        .ok()?
        .with_timezone(&Utc);
    let now: DateTime<Utc> = now.into();
    Some((when - now).to_std().unwrap_or(Duration::ZERO))
}

/// Reads `Retry-After` from a response, capped at `max`.
pub fn retry_after_header(headers: &reqwest::header::HeaderMap, max: Duration) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()))
        .map(|d| d.min(max))
}

/// A response read whole.
#[derive(Debug, Clone)]
pub struct ReadResponse {
    pub status: u16,
    /// The server's `Retry-After`, capped.
    pub retry_after: Option<Duration>,
    pub body: String,
}

impl ReadResponse {
    /// `Err` for any status outside 2xx, classified, with a body excerpt.
    pub fn check_status(&self, service: &'static str) -> Result<(), UpstreamError> {
        if (200..300).contains(&self.status) {
            Ok(())
        } else {
            Err(UpstreamError::from_status(
                service,
                self.status,
                &self.body,
                self.retry_after,
            ))
        }
    }
}

/// Sends `request` and reads the whole response; transport failures (connect, timeout, a
/// connection closed mid-body) come back classified as retryable.
pub async fn send_and_read(
    service: &'static str,
    request: reqwest::RequestBuilder,
    max_retry_after: Duration,
) -> Result<ReadResponse, UpstreamError> {
    let response = request
        .send()
        .await
        .map_err(|e| UpstreamError::from_transport(service, &e))?;
    let status = response.status().as_u16();
    let retry_after = retry_after_header(response.headers(), max_retry_after);
    let body = response
        .text()
        .await
        .map_err(|e| UpstreamError::from_transport(service, &e))?;
    Ok(ReadResponse {
        status,
        retry_after,
        body,
    })
}

/// Capped exponential backoff with jitter.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The wait after failed attempt number `attempt` (1-based). `jitter` in `[0, 1]` picks a point
    /// in the upper half of the exponential step ("equal jitter"), so retries of many jobs spread out
    /// yet never wait less than half the step.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(30);
        let step = self.base.saturating_mul(1u32 << exponent).min(self.max);
        let jitter = jitter.clamp(0.0, 1.0);
        step / 2 + step.mul_f64(jitter / 2.0)
    }

    /// The wait before the next try: the server's `Retry-After` when given (capped at `max`),
    /// else [`Self::delay`] with random jitter.
    pub fn next_delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        match retry_after {
            Some(theirs) => theirs.min(self.max),
            None => self.delay(attempt, rand::random::<f64>()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        for status in [408, 429, 500, 502, 503, 504, 529] {
            assert_eq!(
                classify_status(status, ""),
                FailureKind::Retryable,
                "{status}"
            );
        }
        for status in [400, 401, 403, 404, 422] {
            assert_eq!(
                classify_status(status, ""),
                FailureKind::Permanent,
                "{status}"
            );
        }
        let spend = r#"{"type":"error","error":{"type":"rate_limit_error","message":"You have reached your spend limit"}}"#;
        assert_eq!(classify_status(429, spend), FailureKind::Permanent);
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn backoff_doubles_is_capped_and_jitters_in_the_upper_half() {
        let backoff = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        assert_eq!(backoff.delay(1, 0.0), Duration::from_millis(50));
        assert_eq!(backoff.delay(1, 1.0), Duration::from_millis(100));
        assert_eq!(backoff.delay(2, 1.0), Duration::from_millis(200));
        assert_eq!(backoff.delay(3, 0.5), Duration::from_millis(300));
        assert_eq!(backoff.delay(10, 1.0), Duration::from_secs(1), "capped");
        assert_eq!(
            backoff.delay(u32::MAX, 1.0),
            Duration::from_secs(1),
            "no overflow"
        );
    }

    #[test]
    fn retry_after_wins_but_is_capped() {
        let backoff = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(5),
        };
        assert_eq!(
            backoff.next_delay(1, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
        assert_eq!(
            backoff.next_delay(1, Some(Duration::from_secs(60))),
            Duration::from_secs(5)
        );
        assert!(backoff.next_delay(1, None) <= Duration::from_millis(100));
    }

    #[test]
    fn excerpts_are_short_and_single_line() {
        assert_eq!(excerpt("bad\n  query", 100), "bad query");
        assert_eq!(excerpt(&"x".repeat(10), 4), "xxxx…");
    }
}
