-- How the proxy speaks to a backend: `http1`, or `http2` (cleartext with prior knowledge).
ALTER TABLE backend ADD COLUMN protocol TEXT NOT NULL DEFAULT 'http1';
