-- A cluster's TLS certificate: who may order it from the ACME CA now (one proxy at a time),
-- and the last one issued, which every proxy of the cluster loads instead of ordering its own.
CREATE TABLE cert_lease (
    cluster TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);

CREATE TABLE cluster_certificate (
    cluster TEXT PRIMARY KEY,
    chain_pem TEXT NOT NULL,
    key_pem TEXT NOT NULL,
    not_after BIGINT NOT NULL,
    stored_at BIGINT NOT NULL,
    stored_by TEXT NOT NULL
);
