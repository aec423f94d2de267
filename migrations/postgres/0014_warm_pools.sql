-- Warm pools: per cluster, pool and executable, how many started but unclaimed backends to
-- keep. `fingerprint` is the SHA-256 of the executable's JSON, which is what a connect's
-- executable is matched on; `executable` is that JSON.
CREATE TABLE warm_pool (
    cluster TEXT NOT NULL,
    pool TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    executable TEXT NOT NULL,
    size BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (cluster, pool, fingerprint)
);

-- A warm backend carries its pool's fingerprint for life. `warm_state` is `starting` until
-- its drone says it answers and waits (`idle`), then `claimed` once a connect took it; NULL
-- for every other backend.
ALTER TABLE backend ADD COLUMN warm_fingerprint TEXT;
ALTER TABLE backend ADD COLUMN warm_state TEXT;
CREATE INDEX backend_warm ON backend (cluster, pool, warm_fingerprint, warm_state, status_number);
