-- API tokens (issue 6, Access). Only a hash of each token is kept: SHA-256 of a 256-bit
-- random secret. No salt or slow KDF: those defend low-entropy passwords against guessing,
-- and a 256-bit random value cannot be guessed; a plain hash also lets a request find its
-- token by an index lookup.
CREATE TABLE IF NOT EXISTS api_tokens (
    id bigserial PRIMARY KEY,
    name text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('admin', 'org', 'runner')),
    -- The organizations an `org` token may act for; empty for admin and runner tokens.
    organizations text[] NOT NULL DEFAULT '{}',
    token_hash bytea NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz,
    last_used_at timestamptz,
    CHECK (kind <> 'org' OR cardinality(organizations) > 0)
);
