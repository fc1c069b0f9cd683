-- trialmatch's own tables (Postgres). apalis keeps its queue in the `apalis` schema;
-- ours are prefixed `tm_`, the same names as on SQLite.
-- Timestamps are written by the application, so both backends share one clock.

CREATE TABLE tm_batches (
    id             TEXT PRIMARY KEY,
    name           TEXT UNIQUE,          -- optional idempotency key given by the user
    created_at     TIMESTAMPTZ NOT NULL,
    mutation_count BIGINT NOT NULL
);

CREATE TABLE tm_jobs (
    id              TEXT PRIMARY KEY,
    batch_id        TEXT NOT NULL REFERENCES tm_batches(id),
    position        BIGINT NOT NULL,    -- order within the batch, as the user gave it
    mutation        TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('queued', 'running', 'retrying', 'succeeded', 'failed', 'dead')),
    attempts        BIGINT NOT NULL DEFAULT 0,
    max_attempts    BIGINT NOT NULL,
    delivery        BIGINT NOT NULL DEFAULT 0, -- bumped on every re-push; stale queue deliveries are ignored
    last_error      TEXT,
    trials_found    BIGINT,
    total_count     BIGINT,             -- what ClinicalTrials.gov reported in total, when it said
    worker          TEXT,
    created_at      TIMESTAMPTZ NOT NULL,
    started_at      TIMESTAMPTZ,
    finished_at     TIMESTAMPTZ,
    next_attempt_at TIMESTAMPTZ,
    UNIQUE (batch_id, position)
);
CREATE INDEX tm_jobs_state ON tm_jobs(state);
CREATE INDEX tm_jobs_mutation ON tm_jobs(mutation, finished_at);

-- Every failed attempt, never overwritten.
CREATE TABLE tm_job_errors (
    job_id   TEXT NOT NULL REFERENCES tm_jobs(id),
    attempt  BIGINT NOT NULL,
    at       TIMESTAMPTZ NOT NULL,
    kind     TEXT NOT NULL,              -- retryable | permanent
    error    TEXT NOT NULL
);
CREATE INDEX tm_job_errors_job ON tm_job_errors(job_id);

-- Every raw ClinicalTrials.gov response page, for replay.
CREATE TABLE tm_ctgov_pages (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id      TEXT NOT NULL REFERENCES tm_jobs(id),
    attempt     BIGINT NOT NULL,
    page_number BIGINT NOT NULL,
    request_url TEXT NOT NULL,
    http_status BIGINT NOT NULL,
    body        TEXT NOT NULL,
    fetched_at  TIMESTAMPTZ NOT NULL
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
    enrollment      BIGINT,
    start_date      TEXT,
    completion_date TEXT,
    brief_summary   TEXT,
    minimum_age     TEXT,
    maximum_age     TEXT,
    raw_json        TEXT NOT NULL,
    first_seen_at   TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL
);

-- Which trials each job found, in the order the API ranked them.
CREATE TABLE tm_job_trials (
    job_id TEXT NOT NULL REFERENCES tm_jobs(id),
    rank   BIGINT NOT NULL,
    nct_id TEXT NOT NULL REFERENCES tm_trials(nct_id),
    PRIMARY KEY (job_id, rank)
);

CREATE TABLE tm_summaries (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id        TEXT NOT NULL UNIQUE REFERENCES tm_jobs(id),
    mutation      TEXT NOT NULL,
    summarizer    TEXT NOT NULL,
    model         TEXT,
    body          TEXT NOT NULL,
    trial_count   BIGINT NOT NULL,
    fingerprint   TEXT NOT NULL,
    input_tokens  BIGINT,
    output_tokens BIGINT,
    stop_reason   TEXT,
    created_at    TIMESTAMPTZ NOT NULL
);
CREATE INDEX tm_summaries_mutation ON tm_summaries(mutation, created_at);

-- One row per node exec attempt: latency and outcome.
CREATE TABLE tm_node_metrics (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id      TEXT NOT NULL REFERENCES tm_jobs(id),
    job_attempt BIGINT NOT NULL,
    node        TEXT NOT NULL,
    attempt     BIGINT NOT NULL,
    started_at  TIMESTAMPTZ NOT NULL,
    duration_ms DOUBLE PRECISION NOT NULL,
    outcome     TEXT NOT NULL,           -- ok | retryable | permanent
    error       TEXT
);
CREATE INDEX tm_node_metrics_job ON tm_node_metrics(job_id);
