-- Credential rotation: the previous credential of a device and when it stops working (its
-- grace period). Looked up by hash like the current one.
ALTER TABLE devices ADD COLUMN prev_credential_hash TEXT;
ALTER TABLE devices ADD COLUMN prev_credential_expires_ms BIGINT;
CREATE INDEX devices_prev_credential ON devices (prev_credential_hash);
