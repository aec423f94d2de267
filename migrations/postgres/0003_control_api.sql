-- Drain, revoke, node identity, and Plane 0.5's termination reasons.

-- A drained drone gets no new backends; its own keep serving. 1 = draining.
ALTER TABLE node ADD COLUMN draining BIGINT NOT NULL DEFAULT 0;
-- The commit the node was built from, as its hello said.
ALTER TABLE node ADD COLUMN hash TEXT NOT NULL DEFAULT '';
-- The process holding the name now: a hello under the name of a connected node with another
-- instance is a second process, and refused.
ALTER TABLE node ADD COLUMN instance TEXT NOT NULL DEFAULT '';

-- Set when the token was revoked; a revoked token leads nowhere.
ALTER TABLE token ADD COLUMN revoked_at BIGINT;
CREATE INDEX token_by_backend_user ON token (backend_id, username);

-- Every revocation, in order: the change bus reads it by sequence number and tells each
-- controller's proxies to drop the tokens, as it does with status changes.
CREATE TABLE token_revocation (
    id BIGSERIAL PRIMARY KEY,
    backend_id TEXT NOT NULL,
    cluster TEXT NOT NULL,
    username TEXT NOT NULL,
    time BIGINT NOT NULL
);

-- A backend that could not start is terminated with reason internalerror (and a message
-- saying why), as Plane 0.5 reports it; its clients know no other reason for it.
UPDATE backend SET termination_reason = 'internalerror' WHERE termination_reason = 'startfailed';
UPDATE backend_status SET termination_reason = 'internalerror' WHERE termination_reason = 'startfailed';
