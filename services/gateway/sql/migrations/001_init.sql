-- The gateway's durable record of jobs, their events and logs, fed from JetStream.

CREATE TABLE IF NOT EXISTS jobs (
    build_id bigint PRIMARY KEY,
    organization text NOT NULL,
    environment text NOT NULL,
    module_type text NOT NULL,
    module_name text NOT NULL,
    action text NOT NULL,
    status text NOT NULL,
    reason text,
    exit_code integer,
    runner_id text,
    queue_position integer,
    seq integer NOT NULL,
    requested_by text,
    submitted_at timestamptz NOT NULL,
    started_at timestamptz,
    finished_at timestamptz,
    updated_at timestamptz NOT NULL,
    stream_seq bigint NOT NULL,
    variables jsonb
);
-- Keyset paging newest first, alone and under the usual filters.
CREATE INDEX IF NOT EXISTS jobs_org_idx ON jobs (organization, build_id DESC);
CREATE INDEX IF NOT EXISTS jobs_org_status_idx ON jobs (organization, status, build_id DESC);
CREATE INDEX IF NOT EXISTS jobs_status_idx ON jobs (status, build_id DESC);
CREATE INDEX IF NOT EXISTS jobs_env_idx ON jobs (environment, build_id DESC);
CREATE INDEX IF NOT EXISTS jobs_module_idx ON jobs (module_name, build_id DESC);

CREATE TABLE IF NOT EXISTS job_events (
    event_id text PRIMARY KEY,
    build_id bigint NOT NULL,
    seq integer NOT NULL,
    status text NOT NULL,
    at timestamptz NOT NULL,
    reason text,
    runner_id text,
    exit_code integer,
    queue_position integer,
    stream_seq bigint NOT NULL,
    payload jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS job_events_build_idx ON job_events (build_id, seq);

CREATE TABLE IF NOT EXISTS job_log_chunks (
    build_id bigint NOT NULL,
    "offset" bigint NOT NULL,
    size integer NOT NULL,
    data text NOT NULL,
    eof boolean NOT NULL,
    PRIMARY KEY (build_id, "offset")
);

-- How far each ingestion consumer has stored a contiguous prefix of its stream.
CREATE TABLE IF NOT EXISTS ingest_progress (
    consumer text PRIMARY KEY,
    kind text NOT NULL,
    watermark bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Messages refused at ingestion (malformed, wrong schema), kept for people to look at.
CREATE TABLE IF NOT EXISTS rejected_messages (
    id bigserial PRIMARY KEY,
    subject text NOT NULL,
    stream_seq bigint,
    error text NOT NULL,
    payload bytea,
    at timestamptz NOT NULL DEFAULT now()
);

-- Runners seen in the registry, so one whose key expired stays listed as lost a while.
CREATE TABLE IF NOT EXISTS runners (
    runner_id text PRIMARY KEY,
    registration jsonb NOT NULL,
    last_seen timestamptz NOT NULL
);
