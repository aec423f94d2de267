-- Where each running controller can be reached by the others (`--peer-url`), so a request
-- for a node connected to another controller (a backend's logs, a prepull) is passed to it.
-- Written when a controller starts, removed when it stops.
CREATE TABLE controller_peer (
    controller_id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    started_at BIGINT NOT NULL
);
