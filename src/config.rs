//! Layered configuration: defaults < `trialmatch.toml` (or `--config PATH`) < environment < CLI flags.
//!
//! Environment names use the `TRIALMATCH_` prefix and `__` for nesting (`TRIALMATCH_CTGOV__BASE_URL`);
//! plain `DATABASE_URL` and `ANTHROPIC_API_KEY` are accepted too, below their prefixed forms.
//! Every default is a named constant; [`Config::validate`] refuses contradictory settings at start.

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};
use url::Url;

use crate::resilience::{BreakerSettings, GuardSettings};

/// Default database: an SQLite file in the current directory, created on first use.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://trialmatch.db";
/// Default ClinicalTrials.gov API v2 base.
pub const DEFAULT_CTGOV_BASE_URL: &str = "https://clinicaltrials.gov/api/v2";
/// Default Anthropic API base.
pub const DEFAULT_ANTHROPIC_BASE_URL: &str = "https://api.anthropic.com";
/// Default Claude model.
pub const DEFAULT_ANTHROPIC_MODEL: &str = "claude-sonnet-4-5";
/// Default config file, read when present.
pub const DEFAULT_CONFIG_FILE: &str = "trialmatch.toml";
/// Shortest worker heartbeat accepted.
pub const MIN_HEARTBEAT_MS: u64 = 1_000;
/// Longest mutation text accepted.
pub const MAX_MUTATION_CHARS: usize = 200;

/// The effective configuration of one process.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `sqlite://PATH` or `postgres://…`. Defaults to `sqlite://trialmatch.db`.
    #[serde(serialize_with = "serialize_redacted_url")]
    pub database_url: String,
    /// Which summarizer to use; `None` picks `anthropic` when an API key is set, else `offline`.
    pub summarizer: Option<SummarizerKind>,
    /// Summarize again even when a mutation's trials have not changed since its last summary.
    /// Defaults to false.
    pub force_summarize: bool,
    pub ctgov: CtgovConfig,
    pub anthropic: AnthropicConfig,
    pub worker: WorkerConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SummarizerKind {
    /// Deterministic markdown built from the trial fields; no network.
    Offline,
    /// Claude, through the Anthropic Messages API.
    Anthropic,
}

/// ClinicalTrials.gov client settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CtgovConfig {
    /// API v2 base URL. Defaults to `https://clinicaltrials.gov/api/v2`.
    pub base_url: String,
    /// Most trials kept per mutation. Defaults to 50.
    pub max_trials: u32,
    /// Studies asked for per page (the API caps it at 1,000). Defaults to 50.
    pub page_size: u32,
    /// TCP connect timeout. Defaults to 10,000 ms.
    pub connect_timeout_ms: u64,
    /// Timeout for one whole request, headers and body. Defaults to 30,000 ms.
    pub request_timeout_ms: u64,
    /// How long an idle pooled connection is kept. Defaults to 90,000 ms.
    pub pool_idle_timeout_ms: u64,
    /// Idle connections kept per host. Defaults to 16.
    pub pool_max_idle_per_host: usize,
    /// Attempts of one page request before the node gives up. Defaults to 4.
    pub max_request_attempts: u32,
    /// First retry delay; doubles each retry, with jitter. Defaults to 500 ms.
    pub backoff_base_ms: u64,
    /// Longest wait between two requests, also the cap on `Retry-After`. Defaults to 30,000 ms.
    pub backoff_max_ms: u64,
    /// Requests in flight at once, across all jobs of a process. Defaults to 8.
    pub max_in_flight: usize,
    /// Requests a minute from one process, spread evenly; 0 = no limit. Defaults to 50 (the commonly quoted polite budget).
    pub rate_limit_per_minute: u32,
    /// Consecutive failed calls that open the circuit breaker. Defaults to 5.
    pub breaker_failure_threshold: u32,
    /// How long an open breaker refuses calls before one probe. Defaults to 30,000 ms.
    pub breaker_cooldown_ms: u64,
}

/// Anthropic Messages API settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnthropicConfig {
    /// API base URL. Defaults to `https://api.anthropic.com`.
    pub base_url: String,
    /// Model name. Defaults to `claude-sonnet-4-5`.
    pub model: String,
    /// `max_tokens` of one summary. Defaults to 2,048.
    pub max_tokens: u32,
    /// Sampling temperature. Defaults to 0.2.
    pub temperature: f32,
    /// Timeout for one request. Defaults to 120,000 ms.
    pub request_timeout_ms: u64,
    /// TCP connect timeout. Defaults to 10,000 ms.
    pub connect_timeout_ms: u64,
    /// How long an idle pooled connection is kept. Defaults to 90,000 ms.
    pub pool_idle_timeout_ms: u64,
    /// Idle connections kept per host. Defaults to 16.
    pub pool_max_idle_per_host: usize,
    /// Attempts of one call before the job run gives up. Defaults to 4.
    pub max_request_attempts: u32,
    /// First retry delay; doubles each retry, with jitter. Defaults to 2,000 ms.
    pub backoff_base_ms: u64,
    /// Longest wait between two calls, also the cap on `Retry-After`. Defaults to 60,000 ms.
    pub backoff_max_ms: u64,
    /// Most trials put in one prompt. Defaults to 50.
    pub max_prompt_trials: usize,
    /// Most characters of trial listing put in one prompt. Defaults to 60,000.
    pub max_prompt_chars: usize,
    /// Requests in flight at once, across all jobs of a process. Defaults to 8.
    pub max_in_flight: usize,
    /// Requests a minute from one process, spread evenly; 0 = no limit. Defaults to 50 (Anthropic's lowest tier).
    pub rate_limit_per_minute: u32,
    /// Consecutive failed calls that open the circuit breaker. Defaults to 5.
    pub breaker_failure_threshold: u32,
    /// How long an open breaker refuses calls before one probe. Defaults to 30,000 ms.
    pub breaker_cooldown_ms: u64,
    /// The key; from `ANTHROPIC_API_KEY`. Never printed.
    #[serde(serialize_with = "serialize_secret")]
    pub api_key: Option<SecretString>,
}

/// Worker and queue settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Jobs run at once by one process. Defaults to 8.
    pub concurrency: usize,
    /// Runs of one job before it is dead. Defaults to 5.
    pub max_attempts: u32,
    /// How often an idle worker looks for new jobs. Defaults to 100 ms.
    pub poll_interval_ms: u64,
    /// Longest one job run may take before it counts as a failed attempt. Defaults to 600,000 ms.
    pub job_timeout_ms: u64,
    /// First delay before a failed job runs again; doubles each attempt, with jitter. Defaults to 5,000 ms.
    pub retry_base_ms: u64,
    /// Longest delay before a failed job runs again. Defaults to 600,000 ms.
    pub retry_max_ms: u64,
    /// Heartbeat of a worker; a worker silent for three beats is presumed dead and its jobs return
    /// to the queue. At least 1,000 ms. Defaults to 10,000 ms.
    pub heartbeat_ms: u64,
    /// Longest a job may keep being deferred by an open circuit breaker before it fails.
    /// Defaults to 86,400,000 ms (24 h).
    pub max_defer_age_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database_url: DEFAULT_DATABASE_URL.to_owned(),
            summarizer: None,
            force_summarize: false,
            ctgov: CtgovConfig::default(),
            anthropic: AnthropicConfig::default(),
            worker: WorkerConfig::default(),
        }
    }
}

impl Default for CtgovConfig {
    fn default() -> Self {
        Self {
            base_url: DEFAULT_CTGOV_BASE_URL.to_owned(),
            max_trials: 50,
            page_size: 50,
            connect_timeout_ms: 10_000,
            request_timeout_ms: 30_000,
            pool_idle_timeout_ms: 90_000,
            pool_max_idle_per_host: 16,
            max_request_attempts: 4,
            backoff_base_ms: 500,
            backoff_max_ms: 30_000,
            max_in_flight: 8,
            rate_limit_per_minute: 50,
            breaker_failure_threshold: 5,
            breaker_cooldown_ms: 30_000,
        }
    }
}

impl Default for AnthropicConfig {
    fn default() -> Self {
        Self {
            base_url: DEFAULT_ANTHROPIC_BASE_URL.to_owned(),
            model: DEFAULT_ANTHROPIC_MODEL.to_owned(),
            max_tokens: 2_048,
            temperature: 0.2,
            request_timeout_ms: 120_000,
            connect_timeout_ms: 10_000,
            pool_idle_timeout_ms: 90_000,
            pool_max_idle_per_host: 16,
            max_request_attempts: 4,
            backoff_base_ms: 2_000,
            backoff_max_ms: 60_000,
            max_prompt_trials: 50,
            max_prompt_chars: 60_000,
            max_in_flight: 8,
            rate_limit_per_minute: 50,
            breaker_failure_threshold: 5,
            breaker_cooldown_ms: 30_000,
            api_key: None,
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 8,
            max_attempts: 5,
            poll_interval_ms: 100,
            job_timeout_ms: 600_000,
            retry_base_ms: 5_000,
            retry_max_ms: 600_000,
            heartbeat_ms: 10_000,
            max_defer_age_ms: 86_400_000,
        }
    }
}

/// What went wrong reading or checking the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("could not read the configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("configuration file {0} does not exist (given with --config)")]
    MissingFile(PathBuf),
    #[error("invalid setting `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// Settings given on the command line; they win over everything else.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summarizer: Option<SummarizerKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub force_summarize: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<WorkerOverrides>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct WorkerOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
}

impl Config {
    /// Loads defaults < config file < environment < `overrides`, then validates.
    ///
    /// `file` is the `--config` path: it must exist. Without it `trialmatch.toml` is read if present.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let toml_path = match file {
            Some(path) if !path.exists() => return Err(ConfigError::MissingFile(path.to_owned())),
            Some(path) => path.to_owned(),
            None => PathBuf::from(DEFAULT_CONFIG_FILE),
        };
        let config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::file(toml_path))
            // Unprefixed names first, so the prefixed ones win.
            .merge(
                Env::raw()
                    .only(&["DATABASE_URL"])
                    .map(|_| "database_url".into()),
            )
            .merge(
                Env::raw()
                    .only(&["ANTHROPIC_API_KEY"])
                    .map(|_| "anthropic.api_key".into()),
            )
            .merge(
                Env::prefixed("TRIALMATCH_")
                    .split("__")
                    .ignore(&["CONFIG", "LOG"]),
            )
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Refuses settings that cannot work, with a message naming the setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                field,
                reason: reason.into(),
            }
        }
        if !(self.database_url.starts_with("sqlite:")
            || self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://"))
        {
            return Err(invalid(
                "database_url",
                format!(
                    "`{}` is neither an sqlite: nor a postgres:// URL",
                    redact_url(&self.database_url)
                ),
            ));
        }
        check_http_url("ctgov.base_url", &self.ctgov.base_url)?;
        check_http_url("anthropic.base_url", &self.anthropic.base_url)?;
        let positive: &[(&'static str, u64)] = &[
            ("worker.concurrency", self.worker.concurrency as u64),
            ("worker.max_attempts", self.worker.max_attempts.into()),
            ("worker.poll_interval_ms", self.worker.poll_interval_ms),
            ("worker.job_timeout_ms", self.worker.job_timeout_ms),
            ("worker.heartbeat_ms", self.worker.heartbeat_ms),
            ("ctgov.max_trials", self.ctgov.max_trials.into()),
            ("ctgov.page_size", self.ctgov.page_size.into()),
            (
                "ctgov.max_request_attempts",
                self.ctgov.max_request_attempts.into(),
            ),
            ("ctgov.request_timeout_ms", self.ctgov.request_timeout_ms),
            ("anthropic.max_tokens", self.anthropic.max_tokens.into()),
            (
                "anthropic.max_request_attempts",
                self.anthropic.max_request_attempts.into(),
            ),
            (
                "anthropic.max_prompt_trials",
                self.anthropic.max_prompt_trials as u64,
            ),
            (
                "anthropic.request_timeout_ms",
                self.anthropic.request_timeout_ms,
            ),
        ];
        for &(field, value) in positive {
            if value == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        if self.worker.heartbeat_ms < MIN_HEARTBEAT_MS {
            // apalis turns heartbeat × missed beats into whole seconds; below a second a worker
            // can find its own running jobs "orphaned" and hand them out again.
            return Err(invalid(
                "worker.heartbeat_ms",
                format!("must be at least {MIN_HEARTBEAT_MS} ms"),
            ));
        }
        if self.ctgov.page_size > 1_000 {
            return Err(invalid(
                "ctgov.page_size",
                "the API serves at most 1,000 studies a page",
            ));
        }
        if self.worker.concurrency > 10_000 {
            return Err(invalid(
                "worker.concurrency",
                "more than 10,000 jobs at once is not supported",
            ));
        }
        if self.worker.retry_base_ms > self.worker.retry_max_ms {
            return Err(invalid(
                "worker.retry_base_ms",
                "must not exceed worker.retry_max_ms",
            ));
        }
        if self.ctgov.backoff_base_ms > self.ctgov.backoff_max_ms {
            return Err(invalid(
                "ctgov.backoff_base_ms",
                "must not exceed ctgov.backoff_max_ms",
            ));
        }
        if self.anthropic.max_prompt_chars < 1_000 {
            return Err(invalid(
                "anthropic.max_prompt_chars",
                "must be at least 1,000",
            ));
        }
        if !(0.0..=1.0).contains(&self.anthropic.temperature) {
            return Err(invalid("anthropic.temperature", "must be between 0 and 1"));
        }
        if self.anthropic.backoff_base_ms > self.anthropic.backoff_max_ms {
            return Err(invalid(
                "anthropic.backoff_base_ms",
                "must not exceed anthropic.backoff_max_ms",
            ));
        }
        if self
            .anthropic
            .api_key
            .as_ref()
            .is_some_and(|k| k.expose_secret().trim().is_empty())
        {
            return Err(invalid(
                "anthropic.api_key",
                "is set but empty; unset ANTHROPIC_API_KEY or give a key",
            ));
        }
        if self.summarizer == Some(SummarizerKind::Anthropic) && self.anthropic.api_key.is_none() {
            return Err(invalid(
                "summarizer",
                "`anthropic` needs an API key: set ANTHROPIC_API_KEY, or use --summarizer offline",
            ));
        }
        Ok(())
    }

    /// The summarizer this process uses: the explicit choice, else `anthropic` when a key is set.
    pub fn effective_summarizer(&self) -> SummarizerKind {
        self.summarizer.unwrap_or(match self.anthropic.api_key {
            Some(_) => SummarizerKind::Anthropic,
            None => SummarizerKind::Offline,
        })
    }

    /// The configuration as TOML with secrets redacted, for `trialmatch config`.
    pub fn to_redacted_toml(&self) -> String {
        let mut text = toml_string(self);
        text.push_str(&format!(
            "\n# effective summarizer: {}\n",
            match self.effective_summarizer() {
                SummarizerKind::Offline => "offline",
                SummarizerKind::Anthropic => "anthropic",
            }
        ));
        text
    }
}

impl CtgovConfig {
    pub fn guard(&self) -> GuardSettings {
        guard_settings(
            self.max_in_flight,
            self.rate_limit_per_minute,
            self.breaker_failure_threshold,
            self.breaker_cooldown_ms,
        )
    }
}

impl AnthropicConfig {
    pub fn guard(&self) -> GuardSettings {
        guard_settings(
            self.max_in_flight,
            self.rate_limit_per_minute,
            self.breaker_failure_threshold,
            self.breaker_cooldown_ms,
        )
    }
}

fn guard_settings(
    max_in_flight: usize,
    per_minute: u32,
    threshold: u32,
    cooldown_ms: u64,
) -> GuardSettings {
    GuardSettings {
        max_in_flight,
        per_minute,
        breaker: BreakerSettings {
            failure_threshold: threshold,
            cooldown: Duration::from_millis(cooldown_ms),
        },
    }
}

impl WorkerConfig {
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }
    pub fn job_timeout(&self) -> Duration {
        Duration::from_millis(self.job_timeout_ms)
    }
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }
    pub fn max_defer_age(&self) -> Duration {
        Duration::from_millis(self.max_defer_age_ms)
    }
}

fn toml_string(config: &Config) -> String {
    // figment's `toml` dependency is not public; a small hand-written rendering keeps us off a second
    // TOML crate and lets us order the sections for people.
    let value = serde_json::to_value(config).unwrap_or_default();
    let mut out = String::new();
    let mut sections = Vec::new();
    if let serde_json::Value::Object(map) = value {
        for (key, value) in map {
            match value {
                serde_json::Value::Object(inner) => sections.push((key, inner)),
                serde_json::Value::Null => out.push_str(&format!("# {key} = (not set)\n")),
                other => out.push_str(&format!("{key} = {other}\n")),
            }
        }
        for (name, inner) in sections {
            out.push_str(&format!("\n[{name}]\n"));
            for (key, value) in inner {
                match value {
                    serde_json::Value::Null => out.push_str(&format!("# {key} = (not set)\n")),
                    other => out.push_str(&format!("{key} = {other}\n")),
                }
            }
        }
    }
    out
}

fn check_http_url(field: &'static str, value: &str) -> Result<(), ConfigError> {
    match Url::parse(value) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => Ok(()),
        Ok(_) => Err(ConfigError::Invalid {
            field,
            reason: format!("`{value}` must be an http:// or https:// URL with a host"),
        }),
        Err(e) => Err(ConfigError::Invalid {
            field,
            reason: format!("`{value}` is not a URL: {e}"),
        }),
    }
}

/// A database URL with any password replaced by `***`, safe to print.
pub fn redact_url(raw: &str) -> String {
    match Url::parse(raw) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("***"));
            url.to_string()
        }
        Ok(_) => raw.to_owned(),
        // Unparseable: it may still hold a password, so show only the scheme.
        Err(_) => match raw.split_once(':') {
            Some((scheme, _)) => format!("{scheme}:***"),
            None => "***".to_owned(),
        },
    }
}

fn serialize_redacted_url<S: Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(url))
}

fn serialize_secret<S: Serializer>(secret: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match secret {
        Some(_) => s.serialize_some("***redacted***"),
        None => s.serialize_none(),
    }
}

/// Reads a secret for use in a request header; the only place a key is exposed.
pub fn expose(secret: &SecretString) -> &str {
    secret.expose_secret()
}

#[cfg(test)]
// figment's `Jail` closures return its large error type; that is figment's choice, not ours.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    fn load_in_jail(overrides: &Overrides) -> Result<Config, ConfigError> {
        Config::load(None, overrides)
    }

    #[test]
    fn defaults_apply_without_any_configuration() {
        Jail::expect_with(|_jail| {
            let config = load_in_jail(&Overrides::default()).expect("defaults are valid");
            assert_eq!(config.database_url, DEFAULT_DATABASE_URL);
            assert_eq!(config.worker.concurrency, 8);
            assert_eq!(config.effective_summarizer(), SummarizerKind::Offline);
            Ok(())
        });
    }

    #[test]
    fn file_then_env_then_flags_each_win() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "trialmatch.toml",
                "database_url = \"sqlite://from-file.db\"\n[worker]\nconcurrency = 3\nmax_attempts = 7\n",
            )?;
            let config = load_in_jail(&Overrides::default()).unwrap();
            assert_eq!(config.database_url, "sqlite://from-file.db");
            assert_eq!(config.worker.concurrency, 3);

            jail.set_env("DATABASE_URL", "sqlite://plain-env.db");
            assert_eq!(
                load_in_jail(&Overrides::default()).unwrap().database_url,
                "sqlite://plain-env.db"
            );
            jail.set_env("TRIALMATCH_DATABASE_URL", "sqlite://prefixed-env.db");
            jail.set_env("TRIALMATCH_WORKER__CONCURRENCY", "5");
            let config = load_in_jail(&Overrides::default()).unwrap();
            assert_eq!(config.database_url, "sqlite://prefixed-env.db");
            assert_eq!(config.worker.concurrency, 5);
            assert_eq!(
                config.worker.max_attempts, 7,
                "file value kept where env says nothing"
            );

            let flags = Overrides {
                database_url: Some("sqlite://flag.db".into()),
                worker: Some(WorkerOverrides {
                    concurrency: Some(2),
                }),
                ..Overrides::default()
            };
            let config = load_in_jail(&flags).unwrap();
            assert_eq!(config.database_url, "sqlite://flag.db");
            assert_eq!(config.worker.concurrency, 2);
            Ok(())
        });
    }

    #[test]
    fn invalid_settings_are_refused_with_the_setting_named() {
        Jail::expect_with(|jail| {
            jail.set_env("TRIALMATCH_WORKER__CONCURRENCY", "0");
            let err = load_in_jail(&Overrides::default()).unwrap_err().to_string();
            assert!(err.contains("worker.concurrency"), "{err}");

            jail.set_env("TRIALMATCH_WORKER__CONCURRENCY", "4");
            jail.set_env("TRIALMATCH_CTGOV__BASE_URL", "not a url");
            let err = load_in_jail(&Overrides::default()).unwrap_err().to_string();
            assert!(err.contains("ctgov.base_url"), "{err}");

            jail.set_env("TRIALMATCH_CTGOV__BASE_URL", "http://127.0.0.1:1/api/v2");
            jail.set_env("TRIALMATCH_WORKER__HEARTBEAT_MS", "300");
            let err = load_in_jail(&Overrides::default()).unwrap_err().to_string();
            assert!(err.contains("worker.heartbeat_ms"), "{err}");
            jail.set_env("TRIALMATCH_WORKER__HEARTBEAT_MS", "1000");
            jail.set_env("TRIALMATCH_DATABASE_URL", "mysql://x");
            let err = load_in_jail(&Overrides::default()).unwrap_err().to_string();
            assert!(err.contains("database_url"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn anthropic_without_a_key_is_a_startup_error() {
        Jail::expect_with(|jail| {
            jail.set_env("TRIALMATCH_SUMMARIZER", "anthropic");
            let err = load_in_jail(&Overrides::default()).unwrap_err().to_string();
            assert!(err.contains("ANTHROPIC_API_KEY"), "{err}");
            jail.set_env("ANTHROPIC_API_KEY", "sk-ant-test-secret");
            let config = load_in_jail(&Overrides::default()).unwrap();
            assert_eq!(config.effective_summarizer(), SummarizerKind::Anthropic);
            Ok(())
        });
    }

    #[test]
    fn printed_configuration_hides_secrets() {
        Jail::expect_with(|jail| {
            jail.set_env("ANTHROPIC_API_KEY", "sk-ant-very-secret");
            jail.set_env(
                "TRIALMATCH_DATABASE_URL",
                "postgres://app:hunter2@db.example/trials",
            );
            let config = load_in_jail(&Overrides::default()).unwrap();
            let shown = config.to_redacted_toml();
            assert!(!shown.contains("sk-ant-very-secret"), "{shown}");
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("***redacted***"), "{shown}");
            assert!(!format!("{config:?}").contains("sk-ant-very-secret"));
            Ok(())
        });
    }

    #[test]
    fn variables_that_are_not_settings_are_ignored() {
        Jail::expect_with(|jail| {
            jail.set_env("TRIALMATCH_LOG", "debug");
            jail.set_env("TRIALMATCH_CONFIG", "elsewhere.toml");
            assert!(load_in_jail(&Overrides::default()).is_ok());
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_in_the_file_are_refused() {
        Jail::expect_with(|jail| {
            jail.create_file("trialmatch.toml", "[worker]\nconcurency = 3\n")?;
            let err = load_in_jail(&Overrides::default()).unwrap_err().to_string();
            assert!(err.contains("concurency"), "{err}");
            Ok(())
        });
    }
}
