//! Protection for each upstream service, shared by every job of a process: a bound on requests in
//! flight (`tokio::sync::Semaphore`), a token-bucket rate limit (`governor`, on tokio's clock so
//! tests can pause time), and a circuit breaker that opens after consecutive failures.
//!
//! While a breaker is open, calls fail at once with [`FailureKind::Deferred`]: the worker puts the
//! job back in the queue without using an attempt, so an outage does not kill a nightly batch.

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::http::{FailureKind, UpstreamError};

/// When a breaker opens and for how long.
#[derive(Debug, Clone, Copy)]
pub struct BreakerSettings {
    /// Consecutive failed calls (transport errors and retryable HTTP statuses) that open it.
    pub failure_threshold: u32,
    /// How long it stays open before one probe call is let through.
    pub cooldown: Duration,
}

/// The three states of a circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through; failures are counted.
    Closed,
    /// Calls are refused until the cool-down ends.
    Open,
    /// One probe call is in flight; its outcome closes or re-opens the breaker.
    HalfOpen,
}

/// How a call was let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Normal,
    Probe,
}

#[derive(Debug)]
struct BreakerInner {
    state: BreakerState,
    consecutive_failures: u32,
    open_until: Instant,
    probe_started: Instant,
}

/// A circuit breaker: a pure state machine driven by the times its caller passes in.
#[derive(Debug)]
pub struct CircuitBreaker {
    service: &'static str,
    settings: BreakerSettings,
    inner: Mutex<BreakerInner>,
}

impl CircuitBreaker {
    pub fn new(service: &'static str, settings: BreakerSettings) -> Self {
        let now = Instant::now();
        Self {
            service,
            settings,
            inner: Mutex::new(BreakerInner {
                state: BreakerState::Closed,
                consecutive_failures: 0,
                open_until: now,
                probe_started: now,
            }),
        }
    }

    pub fn state(&self) -> BreakerState {
        self.lock().state
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerInner> {
        // A panic while holding this lock cannot leave the state half-written: every update is
        // a few assignments. Keep serving rather than poisoning every later call.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Lets a call through, or says until when the service is closed to calls.
    pub fn admit(&self, now: Instant) -> Result<Admission, Instant> {
        let mut inner = self.lock();
        match inner.state {
            BreakerState::Closed => Ok(Admission::Normal),
            BreakerState::Open if now >= inner.open_until => {
                inner.state = BreakerState::HalfOpen;
                inner.probe_started = now;
                tracing::warn!(
                    service = self.service,
                    from = "open",
                    to = "half-open",
                    "circuit breaker lets one probe call through"
                );
                Ok(Admission::Probe)
            }
            BreakerState::Open => Err(inner.open_until),
            // A probe that never reported back (its caller was cancelled) is replaced after a cool-down.
            BreakerState::HalfOpen if now >= inner.probe_started + self.settings.cooldown => {
                inner.probe_started = now;
                Ok(Admission::Probe)
            }
            BreakerState::HalfOpen => Err(inner.probe_started + self.settings.cooldown),
        }
    }

    /// Records a call's outcome: `failed` for transport errors and retryable statuses.
    pub fn record(&self, failed: bool, now: Instant) {
        let mut inner = self.lock();
        if !failed {
            if inner.state != BreakerState::Closed {
                tracing::warn!(
                    service = self.service,
                    from = state_name(inner.state),
                    to = "closed",
                    "circuit breaker closed: the service answers again"
                );
            }
            inner.state = BreakerState::Closed;
            inner.consecutive_failures = 0;
            return;
        }
        inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
        let open = match inner.state {
            BreakerState::HalfOpen => true,
            BreakerState::Closed => inner.consecutive_failures >= self.settings.failure_threshold,
            BreakerState::Open => false,
        };
        if open {
            tracing::warn!(
                service = self.service,
                from = state_name(inner.state),
                to = "open",
                consecutive_failures = inner.consecutive_failures,
                cooldown_ms = self.settings.cooldown.as_millis() as u64,
                "circuit breaker opened: calls are refused and jobs deferred"
            );
            inner.state = BreakerState::Open;
            inner.open_until = now + self.settings.cooldown;
        }
    }
}

fn state_name(state: BreakerState) -> &'static str {
    match state {
        BreakerState::Closed => "closed",
        BreakerState::Open => "open",
        BreakerState::HalfOpen => "half-open",
    }
}

/// governor's clock on tokio time, so a paused test clock drives the rate limit too.
#[derive(Debug, Clone)]
struct TokioClock {
    start: Instant,
}

impl Clock for TokioClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        self.start.elapsed()
    }
}

type Limiter = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Duration>>;

/// Limits of one service.
#[derive(Debug, Clone, Copy)]
pub struct GuardSettings {
    /// Requests in flight at once.
    pub max_in_flight: usize,
    /// Requests per minute, spread evenly; 0 = no limit.
    pub per_minute: u32,
    pub breaker: BreakerSettings,
}

/// In-flight bound, rate limit and circuit breaker of one service.
#[derive(Debug)]
pub struct ServiceGuard {
    service: &'static str,
    in_flight: Semaphore,
    limiter: Option<Limiter>,
    clock: TokioClock,
    pub breaker: CircuitBreaker,
}

impl ServiceGuard {
    pub fn new(service: &'static str, settings: GuardSettings) -> Self {
        let clock = TokioClock {
            start: Instant::now(),
        };
        let limiter = NonZeroU32::new(settings.per_minute).map(|per_minute| {
            // A burst of one spreads requests evenly: polite to a server that counts per second.
            let quota = Quota::per_minute(per_minute).allow_burst(NonZeroU32::MIN);
            RateLimiter::direct_with_clock(quota, clock.clone())
        });
        Self {
            service,
            in_flight: Semaphore::new(settings.max_in_flight.max(1)),
            limiter,
            clock,
            breaker: CircuitBreaker::new(service, settings.breaker),
        }
    }

    /// Runs one call under the service's limits, and tells the breaker how it went.
    pub async fn run<T>(
        &self,
        call: impl Future<Output = Result<T, UpstreamError>>,
    ) -> Result<T, UpstreamError> {
        if let Err(until) = self.breaker.admit(Instant::now()) {
            return Err(UpstreamError::deferred(
                self.service,
                until.saturating_duration_since(Instant::now()),
            ));
        }
        let _permit = self
            .in_flight
            .acquire()
            .await
            .expect("the semaphore is never closed");
        self.wait_for_rate().await;
        let result = call.await;
        let failed = matches!(&result, Err(e) if e.kind == FailureKind::Retryable);
        self.breaker.record(failed, Instant::now());
        result
    }

    async fn wait_for_rate(&self) {
        let Some(limiter) = &self.limiter else { return };
        while let Err(not_until) = limiter.check() {
            tokio::time::sleep(not_until.wait_time_from(self.clock.now())).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: BreakerSettings = BreakerSettings {
        failure_threshold: 3,
        cooldown: Duration::from_secs(30),
    };

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_only() {
        let breaker = CircuitBreaker::new("test", SETTINGS);
        let now = Instant::now();
        breaker.record(true, now);
        breaker.record(true, now);
        breaker.record(false, now);
        breaker.record(true, now);
        breaker.record(true, now);
        assert_eq!(
            breaker.state(),
            BreakerState::Closed,
            "a success resets the count"
        );
        breaker.record(true, now);
        assert_eq!(breaker.state(), BreakerState::Open);
        assert_eq!(
            breaker.admit(now + Duration::from_secs(10)),
            Err(now + SETTINGS.cooldown)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn half_opens_for_one_probe_and_closes_on_its_success() {
        let breaker = CircuitBreaker::new("test", SETTINGS);
        let now = Instant::now();
        for _ in 0..3 {
            breaker.record(true, now);
        }
        let later = now + SETTINGS.cooldown;
        assert_eq!(breaker.admit(later), Ok(Admission::Probe));
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert!(breaker.admit(later).is_err(), "one probe at a time");
        breaker.record(false, later);
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(breaker.admit(later), Ok(Admission::Normal));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_opens_it_again() {
        let breaker = CircuitBreaker::new("test", SETTINGS);
        let now = Instant::now();
        for _ in 0..3 {
            breaker.record(true, now);
        }
        let later = now + SETTINGS.cooldown;
        assert_eq!(breaker.admit(later), Ok(Admission::Probe));
        breaker.record(true, later);
        assert_eq!(breaker.state(), BreakerState::Open);
        assert_eq!(
            breaker.admit(later + Duration::from_secs(1)),
            Err(later + SETTINGS.cooldown)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_probe_is_replaced_after_a_cool_down() {
        let breaker = CircuitBreaker::new("test", SETTINGS);
        let now = Instant::now();
        for _ in 0..3 {
            breaker.record(true, now);
        }
        let probe = now + SETTINGS.cooldown;
        assert_eq!(breaker.admit(probe), Ok(Admission::Probe));
        assert_eq!(
            breaker.admit(probe + SETTINGS.cooldown),
            Ok(Admission::Probe)
        );
    }

    fn new_guard(per_minute: u32, max_in_flight: usize) -> ServiceGuard {
        ServiceGuard::new(
            "test",
            GuardSettings {
                max_in_flight,
                per_minute,
                breaker: SETTINGS,
            },
        )
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_spreads_calls_evenly() {
        let guard = new_guard(60, 100);
        let start = Instant::now();
        for _ in 0..10 {
            guard
                .run(async { Ok::<_, UpstreamError>(()) })
                .await
                .unwrap();
        }
        // 60 a minute, one at a time: the 10th call starts 9 s after the first.
        assert_eq!(start.elapsed(), Duration::from_secs(9));
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_calls_are_bounded() {
        let guard = std::sync::Arc::new(new_guard(0, 2));
        let running = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let calls = (0..6).map(|_| {
            let (guard, running, peak) = (guard.clone(), running.clone(), peak.clone());
            tokio::spawn(async move {
                guard
                    .run(async {
                        let now = running.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                        peak.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                        Ok::<_, UpstreamError>(())
                    })
                    .await
            })
        });
        for call in futures::future::join_all(calls).await {
            call.unwrap().unwrap();
        }
        assert_eq!(peak.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_defers_without_calling() {
        let guard = new_guard(0, 4);
        for _ in 0..3 {
            let failure = UpstreamError::from_status("test", 503, "down", None);
            let _ = guard.run(async { Err::<(), _>(failure) }).await;
        }
        let called = std::sync::atomic::AtomicBool::new(false);
        let err = guard
            .run(async {
                called.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            })
            .await
            .unwrap_err();
        assert_eq!(err.kind, FailureKind::Deferred);
        assert_eq!(err.retry_after, Some(SETTINGS.cooldown));
        assert!(!called.load(std::sync::atomic::Ordering::SeqCst));
        // A 404 is the service answering: it does not count as a failure.
        let guard2 = new_guard(0, 4);
        for _ in 0..5 {
            let answer = UpstreamError::from_status("test", 404, "no such study", None);
            let _ = guard2.run(async { Err::<(), _>(answer) }).await;
        }
        assert_eq!(guard2.breaker.state(), BreakerState::Closed);
    }
}
