-- Webhook signing secrets encrypted at rest (AES-256-GCM under the gateway's state key,
-- bound to the webhook's organization and URL): `secret` is kept only until the gateway
-- re-seals a row written before this migration, then NULL.
ALTER TABLE webhooks ALTER COLUMN secret DROP NOT NULL;
ALTER TABLE webhooks ADD COLUMN IF NOT EXISTS secret_key_id text;
ALTER TABLE webhooks ADD COLUMN IF NOT EXISTS secret_sealed bytea;
