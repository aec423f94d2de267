-- Plane's initial schema (SQLite). Times are milliseconds since the Unix epoch.

-- One row per backend ever scheduled.
CREATE TABLE backend (
    id TEXT PRIMARY KEY,
    cluster TEXT NOT NULL,
    pool TEXT NOT NULL,
    drone TEXT NOT NULL,
    -- Current status, and its position in the lifecycle (only ever grows).
    status TEXT NOT NULL,
    status_number BIGINT NOT NULL,
    status_time BIGINT NOT NULL,
    -- host:port the backend listens on, from `waiting` on.
    address TEXT,
    termination_kind TEXT,
    termination_reason TEXT,
    exit_code BIGINT,
    message TEXT,
    -- The strongest termination asked of the drone so far ('soft' or 'hard').
    termination_requested TEXT,
    spawn_config TEXT NOT NULL,
    key_namespace TEXT,
    key_name TEXT,
    static_token TEXT,
    max_idle_seconds BIGINT,
    created_at BIGINT NOT NULL,
    -- When a proxy last reported a connection or traffic (or when the backend became ready).
    last_active_at BIGINT NOT NULL,
    -- created_at + lifetime_limit_seconds, when a lifetime limit was given.
    expires_at BIGINT
);
CREATE INDEX backend_by_status ON backend (status_number);
CREATE INDEX backend_by_drone ON backend (cluster, drone, status_number);

-- Every status a backend has been in, for the status stream's replay.
CREATE TABLE backend_status (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    backend_id TEXT NOT NULL REFERENCES backend (id),
    status TEXT NOT NULL,
    status_number BIGINT NOT NULL,
    termination_kind TEXT,
    termination_reason TEXT,
    exit_code BIGINT,
    message TEXT,
    time BIGINT NOT NULL
);
CREATE INDEX backend_status_by_backend ON backend_status (backend_id, status_number);

-- One row per key ever used. backend_id is the current holder (NULL when free);
-- fencing_token grows by one every time the key changes hands.
CREATE TABLE backend_key (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    tag TEXT NOT NULL,
    backend_id TEXT,
    fencing_token BIGINT NOT NULL,
    acquired_at BIGINT NOT NULL,
    PRIMARY KEY (namespace, name)
);
CREATE INDEX backend_key_by_backend ON backend_key (backend_id);

-- Connection tokens handed out by connect.
CREATE TABLE token (
    token TEXT PRIMARY KEY,
    backend_id TEXT NOT NULL REFERENCES backend (id),
    username TEXT,
    auth TEXT NOT NULL,
    secret_token TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX token_by_backend ON token (backend_id);

-- Actions for drones, kept until the drone acknowledges them.
CREATE TABLE backend_action (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    backend_id TEXT NOT NULL,
    cluster TEXT NOT NULL,
    drone TEXT NOT NULL,
    action TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    acked_at BIGINT
);
CREATE INDEX backend_action_pending ON backend_action (cluster, drone, acked_at);

-- Drones and proxies that have ever connected.
CREATE TABLE node (
    cluster TEXT NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    pool TEXT NOT NULL,
    version TEXT NOT NULL,
    last_seen BIGINT NOT NULL,
    PRIMARY KEY (cluster, kind, name)
);
