-- Key leases, lost drones, open proxy connections, node sessions and the sweeper's leader
-- lease. Times are milliseconds since the Unix epoch, on the controller's clock (drones never
-- compare it with theirs).

-- Until when the backend's drone may keep it running without renewing. A backend whose
-- lease has passed is dead by protocol: its drone stopped it on its own clock first.
ALTER TABLE backend ADD COLUMN lease_expires_at BIGINT NOT NULL DEFAULT 0;
-- Backends already running when this version is installed get ten minutes for their drones
-- (upgraded meanwhile) to start renewing, rather than being declared lost at once.
UPDATE backend SET lease_expires_at = CAST(FLOOR(EXTRACT(EPOCH FROM clock_timestamp()) * 1000) AS BIGINT) + 600000 WHERE status_number < 80;
CREATE INDEX backend_by_lease ON backend (status_number, lease_expires_at);

-- Set when a drone has been silent for longer than the lost window; cleared when it reconnects.
ALTER TABLE node ADD COLUMN lost_at BIGINT;
-- Which controller holds the node's socket now (NULL: none), and a number that grows with every
-- new session, so a controller whose session was replaced never marks the node disconnected.
ALTER TABLE node ADD COLUMN connected_to TEXT;
ALTER TABLE node ADD COLUMN generation BIGINT NOT NULL DEFAULT 0;

-- Timed work (sweeps, lost drones) is done by one controller at a time: the holder of an
-- unexpired row here.
CREATE TABLE controller_lease (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);

-- Backends that a proxy has at least one open connection to right now. A row keeps a backend
-- from being reaped as idle until it is deleted (the proxy reported the last connection
-- closed, or its session ended) or it expires (the proxy stopped refreshing it).
CREATE TABLE backend_connection (
    backend_id TEXT NOT NULL,
    cluster TEXT NOT NULL,
    proxy TEXT NOT NULL,
    -- The proxy session (node.generation) that reported it; an older session's clean-up
    -- never removes what a newer one reported.
    generation BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (backend_id, cluster, proxy)
);
CREATE INDEX backend_connection_by_proxy ON backend_connection (cluster, proxy);
