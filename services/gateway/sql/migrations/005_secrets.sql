-- Terraform state at rest is encrypted (services/common/crypto.py, StateCipher): `data` is
-- nonce + AES-256-GCM ciphertext under the state key named by `key_id`. NULL: a version
-- stored in clear before this change; the gateway re-encrypts those at start.
ALTER TABLE terraform_states ADD COLUMN IF NOT EXISTS key_id text;
