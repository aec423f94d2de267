-- ACME DNS-01 challenge values, published for a cluster and served by `plane dns`.
CREATE TABLE acme_txt (
    cluster TEXT NOT NULL,
    value TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (cluster, value)
);
