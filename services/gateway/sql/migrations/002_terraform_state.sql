-- Terraform state for the HTTP backend: every version kept (a DELETE adds a version
-- without data), and the current lock of each workspace.
CREATE TABLE IF NOT EXISTS terraform_states (
    organization text NOT NULL,
    environment text NOT NULL,
    module_name text NOT NULL,
    version integer NOT NULL,
    build_id bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    size integer NOT NULL,
    data bytea,
    PRIMARY KEY (organization, environment, module_name, version)
);

CREATE TABLE IF NOT EXISTS terraform_locks (
    organization text NOT NULL,
    environment text NOT NULL,
    module_name text NOT NULL,
    lock_id text NOT NULL,
    info jsonb NOT NULL,
    build_id bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization, environment, module_name)
);
