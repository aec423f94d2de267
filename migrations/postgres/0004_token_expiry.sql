-- Tokens may end: after token_ttl_seconds given at connect. NULL: when their backend ends.
ALTER TABLE token ADD COLUMN expires_at BIGINT;
