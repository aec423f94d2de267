-- Key leases, lost drones and open proxy connections. Times are milliseconds since the Unix epoch,
-- on the controller's clock (drones never compare it with theirs).

-- Until when the backend's drone may keep it running without renewing. A backend whose
-- lease has passed is dead by protocol: its drone stopped it on its own clock first.
ALTER TABLE backend ADD COLUMN lease_expires_at BIGINT NOT NULL DEFAULT 0;
CREATE INDEX backend_by_lease ON backend (status_number, lease_expires_at);

-- Set when a drone has been silent for longer than the lost window; cleared when it reconnects.
ALTER TABLE node ADD COLUMN lost_at BIGINT;

-- Backends that a proxy has at least one open connection to right now. A row keeps a backend
-- from being reaped as idle until it is deleted (the proxy reported the last connection
-- closed, or its session ended) or it expires (the proxy stopped refreshing it).
CREATE TABLE backend_connection (
    backend_id TEXT NOT NULL,
    cluster TEXT NOT NULL,
    proxy TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (backend_id, cluster, proxy)
);
CREATE INDEX backend_connection_by_proxy ON backend_connection (cluster, proxy);
