-- Webhooks and their delivery outbox, filled from job_events (issue 5).

-- The secret is stored as given: it is needed to sign every delivery.
CREATE TABLE IF NOT EXISTS webhooks (
    id bigserial PRIMARY KEY,
    organization text NOT NULL,
    url text NOT NULL,
    statuses text[] NOT NULL,
    secret text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS webhooks_org_idx ON webhooks (organization);

-- One row per (webhook, status event): created idempotently, retried until delivered or
-- given up. `status` is pending, delivered or failed.
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id bigserial PRIMARY KEY,
    webhook_id bigint NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event_id text NOT NULL,
    build_id bigint NOT NULL,
    seq integer NOT NULL,
    status text NOT NULL DEFAULT 'pending',
    attempts integer NOT NULL DEFAULT 0,
    last_status_code integer,
    last_error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    next_attempt_at timestamptz DEFAULT now(),  -- null once delivered or failed
    delivered_at timestamptz,
    UNIQUE (webhook_id, event_id)
);
-- The worker's claim query: due pending rows, oldest due first.
CREATE INDEX IF NOT EXISTS webhook_deliveries_due_idx
    ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS webhook_deliveries_webhook_idx
    ON webhook_deliveries (webhook_id, id DESC);

-- How far the outbox filler has scanned job_events, by stream sequence. It starts at the
-- events already stored, so a new installation does not replay history to new webhooks.
CREATE TABLE IF NOT EXISTS webhook_outbox_cursor (
    name text PRIMARY KEY,
    stream_seq bigint NOT NULL
);
INSERT INTO webhook_outbox_cursor (name, stream_seq)
SELECT 'job_events', coalesce(max(stream_seq), 0) FROM job_events
ON CONFLICT (name) DO NOTHING;

-- The filler scans job_events by stream sequence.
CREATE INDEX IF NOT EXISTS job_events_stream_seq_idx ON job_events (stream_seq);
