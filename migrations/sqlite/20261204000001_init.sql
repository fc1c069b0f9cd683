-- trialmatch's own tables (SQLite). apalis keeps its queue in `Jobs`/`Workers`;
-- ours are prefixed `tm_` so the two never collide (SQLite table names are case-insensitive).
-- Timestamps are RFC 3339 text written by the application, so both backends share one clock.

CREATE TABLE tm_batches (
    id             TEXT PRIMARY KEY,
    name           TEXT UNIQUE,          -- optional idempotency key given by the user
    created_at     TEXT NOT NULL,
    mutation_count INTEGER NOT NULL
);

CREATE TABLE tm_jobs (
    id              TEXT PRIMARY KEY,
    batch_id        TEXT NOT NULL REFERENCES tm_batches(id),
    position        INTEGER NOT NULL,    -- order within the batch, as the user gave it
    mutation        TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('queued', 'running', 'retrying', 'succeeded', 'failed', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    max_attempts    INTEGER NOT NULL,
    delivery        INTEGER NOT NULL DEFAULT 0, -- bumped on every re-push; stale queue deliveries are ignored
    last_error      TEXT,
    trials_found    INTEGER,
    total_count     INTEGER,             -- what ClinicalTrials.gov reported in total, when it said
    worker          TEXT,
    created_at      TEXT NOT NULL,
    started_at      TEXT,
    finished_at     TEXT,
    next_attempt_at TEXT,
    UNIQUE (batch_id, position)
);
CREATE INDEX tm_jobs_state ON tm_jobs(state);
CREATE INDEX tm_jobs_mutation ON tm_jobs(mutation, finished_at);

-- Every failed attempt, never overwritten.
CREATE TABLE tm_job_errors (
    job_id   TEXT NOT NULL REFERENCES tm_jobs(id),
    attempt  INTEGER NOT NULL,
    at       TEXT NOT NULL,
    kind     TEXT NOT NULL,              -- retryable | permanent
    error    TEXT NOT NULL
);
CREATE INDEX tm_job_errors_job ON tm_job_errors(job_id);

-- Every raw ClinicalTrials.gov response page, for replay.
CREATE TABLE tm_ctgov_pages (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id      TEXT NOT NULL REFERENCES tm_jobs(id),
    attempt     INTEGER NOT NULL,
    page_number INTEGER NOT NULL,
    request_url TEXT NOT NULL,
    http_status INTEGER NOT NULL,
    body        TEXT NOT NULL,
    fetched_at  TEXT NOT NULL
);
CREATE INDEX tm_ctgov_pages_job ON tm_ctgov_pages(job_id);

-- Parsed trials, latest version of each study.
CREATE TABLE tm_trials (
    nct_id          TEXT PRIMARY KEY,
    brief_title     TEXT,
    overall_status  TEXT,
    phases          TEXT NOT NULL,       -- JSON array, e.g. ["PHASE1","PHASE2"]
    conditions      TEXT NOT NULL,       -- JSON array
    interventions   TEXT NOT NULL,       -- JSON array
    lead_sponsor    TEXT,
    enrollment      INTEGER,
    start_date      TEXT,
    completion_date TEXT,
    brief_summary   TEXT,
    minimum_age     TEXT,
    maximum_age     TEXT,
    raw_json        TEXT NOT NULL,
    first_seen_at   TEXT NOT NULL,
    updated_at      TEXT NOT NULL
);

-- Which trials each job found, in the order the API ranked them.
CREATE TABLE tm_job_trials (
    job_id TEXT NOT NULL REFERENCES tm_jobs(id),
    rank   INTEGER NOT NULL,
    nct_id TEXT NOT NULL REFERENCES tm_trials(nct_id),
    PRIMARY KEY (job_id, rank)
);

CREATE TABLE tm_summaries (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id        TEXT NOT NULL UNIQUE REFERENCES tm_jobs(id),
    mutation      TEXT NOT NULL,
    summarizer    TEXT NOT NULL,
    model         TEXT,
    body          TEXT NOT NULL,
    trial_count   INTEGER NOT NULL,
    fingerprint   TEXT NOT NULL,
    input_tokens  INTEGER,
    output_tokens INTEGER,
    stop_reason   TEXT,
    created_at    TEXT NOT NULL
);
CREATE INDEX tm_summaries_mutation ON tm_summaries(mutation, created_at);

-- One row per node exec attempt: latency and outcome.
CREATE TABLE tm_node_metrics (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id      TEXT NOT NULL REFERENCES tm_jobs(id),
    job_attempt INTEGER NOT NULL,
    node        TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    started_at  TEXT NOT NULL,
    duration_ms REAL NOT NULL,
    outcome     TEXT NOT NULL,           -- ok | retryable | permanent
    error       TEXT
);
CREATE INDEX tm_node_metrics_job ON tm_node_metrics(job_id);
